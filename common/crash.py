"""崩溃试验的公共机械：在 fork 出的子进程里跑一个函数，可在任意时刻 SIGKILL 它，结果经 JSON 文件带回。

增量索引、检查点这类"写到一半被杀也不能坏"的代码，要在真实的进程被杀之后再检查磁盘上的状态；
父进程里不初始化 Chroma / torch 线程池，fork 才安全。
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
from pathlib import Path


def run_in_child(fn, *a, kill_after: float | None = None, hang_s: float = 600) -> dict | None:
    """fork 一个子进程跑 fn，结果经 JSON 文件带回；kill_after 秒后由父进程 SIGKILL（None = 等它跑完）。"""
    import tempfile

    res = Path(tempfile.mkstemp(suffix=".json")[1])

    def target():
        res.write_text(json.dumps(fn(*a)), encoding="utf-8")
    p = mp.get_context("fork").Process(target=target)
    p.start()
    p.join(kill_after if kill_after is not None else hang_s)
    if p.is_alive():   # 到点（或卡死超过 hang_s 秒）就杀掉，绝不无限等
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        if kill_after is None:
            raise RuntimeError(f"子进程 {hang_s:.0f} 秒没有结束（fork 前进程里若有别的线程持锁，子进程可能死锁）")
    text = res.read_text(encoding="utf-8")
    res.unlink()
    if p.exitcode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"子进程异常退出（退出码 {p.exitcode}）")
    return json.loads(text) if p.exitcode == 0 and text else None
