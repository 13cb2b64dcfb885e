"""启动并看管子进程：把一个服务（chroma run、mlflow server、python -m common.serving……）起在本机空闲端口上。

本模块只管进程（起、等就绪、停）；课程的聊天服务器本身在 common/serving.py。start() 轮询直到服务应答，
并保证在任何退出路径上停掉它（with 语句 / atexit）：测试或脚本崩了，也不会留下占着端口的孤儿进程。
"""
from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from common.run import get_logger


def free_port() -> int:
    """向系统要一个空闲的本机端口。"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Service:
    """一个正在运行的服务进程：.url、.port、.proc；stop() 先 SIGTERM，超时再 SIGKILL。"""

    def __init__(self, proc: subprocess.Popen, port: int, log_file: Path | None):
        self.proc, self.port, self.log_file = proc, port, log_file
        self.url = f"http://127.0.0.1:{port}"
        atexit.register(self.stop)

    def alive(self) -> bool:
        """进程还在运行吗。"""
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """停掉服务（可重复调用）。"""
        if self.proc.poll() is None:
            try:   # 整个进程组一起停：uvicorn/mlflow 会再起子进程
                os.killpg(self.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    self.proc.kill()
                self.proc.wait()
        atexit.unregister(self.stop)

    def __enter__(self) -> _Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(cmd: list[str], ready_path: str = "/health", log_file: str | Path | None = None,
          deadline_s: float = 60.0, env: dict | None = None, port: int | None = None) -> _Service:
    """启动 cmd（其中的 "{port}" 换成空闲端口），轮询 GET ready_path 直到 2xx；超时或进程退出时抛 RuntimeError。

    返回的服务对象有 .url、.port、.proc、.alive()、.stop()，也可以用作 with 语句。
    """
    import httpx

    port = port or free_port()
    argv = [str(a).replace("{port}", str(port)) for a in cmd]
    log_path = Path(log_file) if log_file else None
    fh = log_path.open("w") if log_path else subprocess.DEVNULL
    try:   # 新的进程组：stop() 能连同它派生的子进程一起停掉
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    finally:
        if log_path:
            fh.close()   # 子进程继承了文件描述符，父进程这边可以马上关
    svc = _Service(proc, port, log_path)
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(svc.url + ready_path, timeout=2).is_success:
                took = time.monotonic() - t0
                get_logger().info(f"{Path(argv[0]).name} 已就绪：{svc.url}（pid {proc.pid}，{took:.1f} 秒）")
                return svc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    code = proc.poll()
    svc.stop()
    tail = log_path.read_text(errors="replace")[-800:] if log_path and log_path.exists() else ""
    why = f"进程已退出（退出码 {code}）" if code is not None else f"{deadline_s:.0f} 秒内没有就绪"
    raise RuntimeError(f"{' '.join(argv[:3])} …: {why}；日志 {log_path}\n{tail}")
