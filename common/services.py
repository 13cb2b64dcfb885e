"""启动并看管子进程：把一个服务（chroma run、mlflow server、python -m common.serving……）起在本机空闲端口上。

本模块只管进程（起、等就绪、停）；课程的聊天服务器本身在 common/serving.py。start() 轮询直到服务应答，
并保证在任何退出路径上停掉它（with 语句 / atexit）：测试或脚本崩了，也不会留下占着端口的孤儿进程。
"""
from __future__ import annotations

import atexit
import contextlib
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

    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}"
        atexit.register(self.stop)

    def alive(self) -> bool:
        """进程还在运行吗。"""
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """停掉服务（可重复调用）。"""
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        atexit.unregister(self.stop)

    def _signal(self, sig: int) -> None:
        try:   # 整个进程组一起停：uvicorn/mlflow 会再起子进程
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            self.proc.send_signal(sig)

    def __enter__(self) -> _Service:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(cmd: list[str], ready_path: str = "/health", log_file: str | Path | None = None,
          deadline_s: float = 60.0, env: dict | None = None, port: int | None = None) -> _Service:
    """启动 cmd（"{port}" 换成空闲端口），轮询 GET ready_path 直到 2xx，返回 _Service（可用作 with 语句）；
    超时或进程退出时抛 RuntimeError，带日志末尾。"""
    import httpx

    port = port or free_port()
    argv = [str(a).replace("{port}", str(port)) for a in cmd]
    log_path = Path(log_file) if log_file else None
    # 子进程继承了日志的文件描述符，父进程这边 with 结束就关；新的进程组：stop() 能连同它派生的子进程一起停掉
    with log_path.open("w") if log_path else contextlib.nullcontext(subprocess.DEVNULL) as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    svc = _Service(proc, port)
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s and proc.poll() is None:
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
