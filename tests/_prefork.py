"""run_script 的预热启动器：先把 torch / transformers / peft 等大库导入好，每个请求 fork 一个子进程跑课程脚本。

为什么：make test 里约 130 次"像学生那样"起进程跑脚本（坏输入的一行错误、--help、几个完整冒烟），每次新解释器
光导入 torch 就 1.3 秒、peft 5 秒、sentence-transformers 7 秒，两核上合计约 2 分钟 CPU，比多数脚本自己的活还多。
fork 出来的子进程与 `python 脚本.py` 看到的一样：sys.argv、sys.path[0]（脚本所在目录）、当前目录、环境变量、
stdin 是 /dev/null、stdout / stderr 各进一个文件、`__name__ == "__main__"`；未捕获的异常走 sys.excepthook
（cli.parse 装的那个把 UserError 变成一行 + 退出码 2），退出前与解释器一样等非守护线程、跑 atexit、刷缓冲。
差别只有一个：大库已经导入了（导入本身的副作用——读环境变量——发生在启动器启动时；所以环境变量与启动器
启动时不同的请求不走这里，调用方照旧起全新进程；设了 LLM_COURSE_TEST_FRESH=1 时 maybe() 不给启动器）。

协议（一次一个请求）：stdin 一行 JSON {"argv", "cwd", "env", "stdout", "stderr"} → stdout 先回 {"pid"}、
子进程结束后回 {"rc"}；rc 与 subprocess 的 returncode 同义（被信号杀死是 -信号号）。
"""
import atexit
import json
import locale
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import threading

# 只预热第三方大库（课程自己的 common/ 照旧由脚本自己导入，改了就生效）
PRELOAD = ("torch", "transformers", "peft", "datasets", "trl", "sentence_transformers", "numpy", "faiss",
           "matplotlib.pyplot", "langchain_core", "openai")


def _exit_code(exc: SystemExit) -> int:
    """与解释器处理 SystemExit 一样：None → 0，整数照用，其它打印到 stderr、退出码 1。"""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _child(req: dict) -> None:
    """在 fork 出的子进程里把自己变成 `python argv[0] argv[1:]`，跑完按解释器的收尾顺序退出（从不返回）。"""
    mode = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if req.get("append") else os.O_TRUNC)
    null, out = os.open(os.devnull, os.O_RDONLY), os.open(req["stdout"], mode, 0o644)
    err = out if req["stderr"] == req["stdout"] else os.open(req["stderr"], mode, 0o644)   # 同一个文件 = 2>&1
    for src, dst in ((null, 0), (out, 1), (err, 2)):
        os.dup2(src, dst)
    for fd in {null, out, err}:
        os.close(fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    script = os.path.abspath(req["argv"][0])
    sys.argv = [script, *req["argv"][1:]]
    sys.path[0] = os.path.dirname(script)       # python 脚本.py 的 sys.path[0] 就是脚本所在目录
    try:
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except BaseException:                   # noqa: BLE001 —— 解释器对未捕获异常做的事：交给 excepthook，退出码 1
            etype, exc, tb = sys.exc_info()
            while tb is not None and tb.tb_frame.f_code.co_filename != script:
                tb = tb.tb_next                 # traceback 从脚本那一帧开始，像解释器打印的那样（不含 runpy 的帧）
            try:
                sys.excepthook(etype, exc.with_traceback(tb or exc.__traceback__), tb or exc.__traceback__)
                code = 1
            except SystemExit as e:             # cli 的 excepthook 自己 sys.exit(2)
                code = _exit_code(e)
        threading._shutdown()                   # 与解释器退出一样：先等非守护线程
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:                   # noqa: BLE001 —— 关掉了的流：解释器退出时同样忽略
                pass
    os._exit(code)


def serve() -> None:
    proto_in, proto_out = os.fdopen(os.dup(0), "r"), os.dup(1)   # 协议用复制出的描述符：子进程的 0/1/2 另有去处
    os.dup2(2, 1)                               # 库导入时往 stdout 打印的话（bitsandbytes 会）不能混进协议
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:
            pass
    sys.stdout.flush()                          # 缓冲区里剩的东西不能让子进程继承、写进它的输出
    os.write(proto_out, b'{"ready": true}\n')
    for line in proto_in:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            proto_in.close()
            os.close(proto_out)
            try:
                _child(req)
            finally:
                os._exit(70)                    # _child 自己出了错（不会发生在脚本里）：不让子进程回到这个循环
        os.write(proto_out, json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        os.write(proto_out, json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


# 比较时不算的环境变量：pytest 每个测试阶段都改写的 PYTEST_CURRENT_TEST（只是测试名）；测试进程里导入库时库自己补上
# 的默认值（deepspeed 的 __init__ 设 PYTORCH_NVML_BASED_CUDA_CHECK，inductor 第一次用缓存时设 TORCHINDUCTOR_CACHE_DIR）
# 这些都只在运行时读，子进程的环境又取自请求时的 os.environ，所以它们照样看到；若把它们算作"环境变了"，同一 worker
# 里第一个在进程内跑过训练的测试之后，每次都会退回全新解释器（整个 kill/resume 测试曾因此 31 → 66 秒）
_IGNORED = {"PYTEST_CURRENT_TEST", "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR"}


def _environ() -> dict:
    """要比较的环境变量（不含 _IGNORED）。"""
    return {k: v for k, v in os.environ.items() if k not in _IGNORED}


class Forked:
    """spawn() 的返回：用法同 subprocess.Popen 的 pid / poll / wait / send_signal（子进程结束时启动器回报退出码）。"""

    def __init__(self, launcher: "Launcher", pid: int):
        self.pid, self.returncode = pid, None
        self._reader = threading.Thread(target=self._read_rc, args=(launcher,), daemon=True)
        self._reader.start()

    def _read_rc(self, launcher: "Launcher") -> None:
        rc = json.loads(launcher.proc.stdout.readline())["rc"]
        launcher.busy = False            # 先放开启动器，再让 poll() 看到退出码：看到了就能马上 spawn 下一个
        self.returncode = rc

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._reader.join(timeout)
        if self._reader.is_alive():
            raise subprocess.TimeoutExpired(str(self.pid), timeout)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:      # 已经结束（pid 可能已被复用）就不发
            os.kill(self.pid, sig)


class Launcher:
    """测试进程一侧：按需起一个启动器（每个 pytest worker 一个）。run() 的返回与 subprocess.run(capture_output=True,
    text=True) 相同（超时就杀掉那个子进程、抛 TimeoutExpired），spawn() 像 subprocess.Popen；一次只跑一个脚本。
    环境变量与启动器启动时不同的调用返回 None（调用方自己起全新进程）。"""

    def __init__(self, **overrides: str):
        # 启动器用创建时（会话开始）的环境变量，加上 overrides（可复现测试用它给子进程换 PYTHONHASHSEED）
        self.overrides = overrides
        self.proc, self.env, self.busy, self.last = None, {**_environ(), **overrides}, False, None

    def spawn(self, argv: list[str], cwd: str, stdout: str, stderr: str, append: bool = False) -> Forked | None:
        """stdout / stderr 是文件路径（同一个路径 = 2>&1）；append：接在文件末尾写（几次运行共用一个日志）。"""
        if {**_environ(), **self.overrides} != self.env:
            return None
        if self.busy:                    # 一次只跑一个：上一个测试失败时留下的子进程先杀掉
            self.last.send_signal(signal.SIGKILL)
            self.last.wait()
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True, bufsize=1, env=self.env)
            assert json.loads(self.proc.stdout.readline()).get("ready"), "启动器没起来"
        req = {"argv": argv, "cwd": cwd, "env": {**os.environ, **self.overrides}, "stdout": stdout, "stderr": stderr,
               "append": append}
        self.busy = True
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.last = Forked(self, json.loads(self.proc.stdout.readline())["pid"])
        return self.last

    def run(self, argv: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess | None:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            child = self.spawn(argv, cwd, out, err)
            if child is None:
                return None
            try:
                child.wait(timeout)
                killed = False
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait()
                killed = True
            # 与 subprocess.run(text=True) 同样的解码（本地首选编码、通用换行）
            texts = [open(f, encoding=locale.getpreferredencoding(False)).read() for f in (out, err)]
        if killed:
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, *texts)
        return subprocess.CompletedProcess([sys.executable, *argv], child.returncode, *texts)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def maybe(**overrides: str) -> Launcher | None:
    """测试用的启动器；LLM_COURSE_TEST_FRESH=1 时返回 None（每次起全新解释器）。"""
    return None if os.environ.get("LLM_COURSE_TEST_FRESH") == "1" else Launcher(**overrides)


if __name__ == "__main__":
    serve()
