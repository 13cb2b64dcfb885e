"""崩溃试验的两种"杀法"：父进程按时长从外面 SIGKILL 子进程，或子进程在第 N 次写之前 SIGKILL 自己。

"写到一半被杀也不能坏"只能在真实的进程被杀之后、看磁盘上的状态来验证：try/except 接不住 SIGKILL，
atexit、finally、数据库的析构都不会运行——这正是断电、OOM killer、kill -9 时的样子。
只有 03 的增量更新（和 tests/test_reliability_index_crash.py）做这种试验，所以放在本节旁边，不进 common/。
"""
from __future__ import annotations

import functools
import json
import multiprocessing as mp
import os
import signal
import tempfile
from pathlib import Path


def run_in_child(fn, *a, kill_after: float | None = None, hang_s: float = 600) -> dict | None:
    """fork 一个子进程跑 fn(*a)，结果经 JSON 文件带回；kill_after 秒后由父进程 SIGKILL（None = 等它跑完）。

    返回 fn 的结果；子进程被 SIGKILL 了就返回 None。用 fork 而不是 spawn：子进程直接继承父进程已导入的库和
    参数对象，不必可 pickle；代价是父进程里不能先建 Chroma 客户端或 torch 线程池（fork 后别的线程持有的锁
    不会被释放，子进程会死锁）。
    """
    # 结果文件由父进程先建好：子进程只在 fn 完整返回后才写它，被杀时留下的是空文件。
    # mkstemp 返回的 fd 立刻关掉：不关的话每次调用漏一个文件描述符，调用多了会撞上 ulimit
    fd, name = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    res = Path(name)
    p = mp.get_context("fork").Process(target=_write_result, args=(res, fn, a))
    p.start()
    p.join(kill_after if kill_after is not None else hang_s)
    if p.is_alive():   # 到点（或卡死超过 hang_s 秒）就杀掉，绝不无限等
        os.kill(p.pid, signal.SIGKILL)
        # 杀完还要 join：回收僵尸进程，并拿到 exitcode（-SIGKILL）
        p.join()
        # 按时长杀是试验本意，不算错；没给 kill_after 却等到了 hang_s 才是真卡死
        if kill_after is None:
            raise RuntimeError(f"子进程 {hang_s:.0f} 秒没有结束（fork 前进程里若有别的线程持锁，子进程可能死锁）")
    text = res.read_text(encoding="utf-8")
    res.unlink()
    # 其它非零退出码是子进程里的异常（bug），不能当成"被杀了"混进试验结果
    if p.exitcode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"子进程异常退出（退出码 {p.exitcode}）")
    return json.loads(text) if p.exitcode == 0 and text else None


def _write_result(res: Path, fn, a: tuple) -> None:
    """子进程的入口：结果只在 fn 完整返回后才写出，被杀的子进程留下的是空文件。"""
    # 结果走 JSON：fn 的返回值只能是 dict/list/数字这类（numpy 要先转，见 snapshot）；
    # 被杀在写结果途中时文件只有半截，但那时退出码是 -SIGKILL，父进程不会去解析它
    res.write_text(json.dumps(fn(*a)), encoding="utf-8")


class KillSwitch:
    """数写动作，数到第 crash_at 次时在这次写之前 SIGKILL 自己（0 = 只数不杀）。

    按"第几次写"而不是按时间杀，种子相同的试验每次都杀在同一点上，失败可以复现；
    把 crash_at 取遍 1..ops，就覆盖了每一种"写了一半"的中间状态。
    """

    def __init__(self, crash_at: int = 0):
        self.crash_at, self.ops = crash_at, 0

    def tick(self) -> None:
        """记一次写；到点就杀。SIGKILL 不能被捕获，之后的代码（包括 finally）一行都不会运行。"""
        self.ops += 1
        # 用 == 而不是 >=：只在第 crash_at 次杀；crash_at = 0 时 ops 从 1 数起，永远等不到，即只数不杀
        if self.ops == self.crash_at:
            # 用 SIGKILL 而不是 raise / sys.exit：后者会跑 finally 与析构，Chroma、SQLite 有机会收尾，测的就不是真崩溃了
            os.kill(os.getpid(), signal.SIGKILL)

    def guard(self, obj, names: tuple[str, ...]) -> None:
        """把 obj 的这些写方法换成"先 tick 再写"的版本（只改这个实例，不动类）。"""
        for n in names:
            setattr(obj, n, functools.partial(self._guarded, getattr(obj, n)))

    def _guarded(self, write, *a, **k):
        # 先 tick 再写：杀在这次写之前，磁盘上正好是"前 N-1 次写完"的状态
        self.tick()
        return write(*a, **k)
