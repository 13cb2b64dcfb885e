"""run_script 的预热启动器（tests/_prefork.py）与新解释器看到的一样：同一个探针脚本两种方式跑，输出逐字相同。"""
import subprocess
import sys

import pytest

from tests._prefork import Launcher

# 探针：把脚本能看到的进程状态都打印出来，再按参数正常退出 / 抛 UserError / 抛普通异常 / 睡过超时
PROBE = r'''
import atexit, os, sys, threading, time
print("argv", sys.argv[1:], "path0", sys.path[0] == os.path.dirname(os.path.abspath(__file__)))
print("cwd", os.getcwd(), "name", __name__, "stdin", repr(sys.stdin.read()))
atexit.register(lambda: print("atexit"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread"))).start()
if "user-error" in sys.argv:
    from common import cli
    from common.errors import UserError
    sys.excepthook = cli._excepthook
    raise UserError("坏输入 x.jsonl:3")
if "boom" in sys.argv:
    raise ValueError("boom")
if "sleep" in sys.argv:
    time.sleep(60)
print("中文输出")
sys.exit(int(sys.argv[1]))
'''


@pytest.fixture(scope="module")
def launcher():
    one = Launcher()
    yield one
    one.close()


@pytest.mark.parametrize("args", [["0"], ["3"], ["user-error"], ["boom"]])
def test_forked_run_equals_a_fresh_interpreter(args, launcher, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    fresh = subprocess.run([sys.executable, str(probe), *args], capture_output=True, text=True, cwd=tmp_path,
                           timeout=60)
    forked = launcher.run([str(probe), *args], cwd=str(tmp_path), timeout=60)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert "thread" in fresh.stdout and "atexit" in fresh.stdout


def test_timeout_kills_and_changed_environment_falls_back(launcher, tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    with pytest.raises(subprocess.TimeoutExpired):
        launcher.run([str(probe), "sleep"], cwd=str(tmp_path), timeout=1)
    assert launcher.run([str(probe), "0"], cwd=str(tmp_path), timeout=60).returncode == 0   # 超时后照常可用
    monkeypatch.setenv("LLM_COURSE_PROBE", "1")      # 导入时读环境变量的库会看到旧值：改过环境的调用不走启动器
    assert launcher.run([str(probe), "0"], cwd=str(tmp_path), timeout=60) is None


def test_defaults_that_imported_libraries_add_still_fork_and_reach_the_child(launcher, tmp_path, monkeypatch):
    """测试进程里导入 deepspeed、用过 inductor 之后环境里多出的默认值：不算"环境变了"（还是 fork），子进程也看得到。"""
    probe = tmp_path / "env.py"
    probe.write_text("import os; print(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'), "
                     "os.environ.get('TORCHINDUCTOR_CACHE_DIR'))", encoding="utf-8")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    forked = launcher.run([str(probe)], cwd=str(tmp_path), timeout=60)
    assert forked is not None and forked.stdout.split() == ["1", str(tmp_path / "inductor")]


def test_spawn_is_a_popen_a_signal_can_kill(launcher, tmp_path):
    """spawn：像 Popen（poll / wait / send_signal），stdout 与 stderr 同一个文件 = 2>&1，append 接着写。"""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    log = tmp_path / "runs.log"
    first = launcher.spawn([str(probe), "3"], cwd=str(tmp_path), stdout=str(log), stderr=str(log), append=True)
    assert first.wait(timeout=60) == 3 and first.poll() == 3
    sleeper = launcher.spawn([str(probe), "sleep"], cwd=str(tmp_path), stdout=str(log), stderr=str(log), append=True)
    assert sleeper.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.5)
    sleeper.send_signal(9)
    assert sleeper.wait(timeout=60) == -9                     # 与 Popen 一样：被信号杀死是负的信号号
    text = log.read_text(encoding="utf-8")
    assert text.count("argv") == 2 and "中文输出" in text       # 两次运行都在，第一次的没被截掉


def test_a_leftover_child_is_killed_before_the_next_spawn(launcher, tmp_path):
    """上一个测试失败、没等它的子进程结束：下一次 spawn 先杀掉它，不会卡住也不会串了协议。"""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    leftover = launcher.spawn([str(probe), "sleep"], cwd=str(tmp_path), stdout=str(tmp_path / "a"),
                              stderr=str(tmp_path / "a"))
    assert launcher.run([str(probe), "5"], cwd=str(tmp_path), timeout=60).returncode == 5
    assert leftover.poll() == -9
