"""测试公共设施：强制 CPU + 离线，会话级构建极小模型一次，子进程运行脚本的帮手。"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# 与 CI 一致：不联网、不用 GPU、不上报
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # 两个 pytest 进程分两个核：每个进程（和它起的子进程）只用 1 个线程（冒烟的 run.start 只降不升）。不设时默认模型的
    # 测试、服务子进程按核数开 2 个，两个进程就是 4 个线程抢 2 个核（OpenMP 线程空转等同伴，白占 CPU）
    os.environ["OMP_NUM_THREADS"] = "1"


# make test 的排队顺序（xdist --dist loadfile --no-loadscope-reorder：按这里的文件顺序，谁空了谁取下一个文件）。
# xdist 默认按测试个数从多到少排：可复现测试（13 个）排在多数课程测试（2–5 个）前面，拿不到课程测试共享的那次
# 冒烟结果，12 个脚本各起两个进程（实测 205 秒 CPU）；几个一分钟以上的文件排到最后，另一个进程干等
RUN_ORDER = (
    ("test_lesson1_", "test_lesson6_"),                      # 1. 给可复现测试共享冒烟结果的课程测试
    ("test_reliability_kill_resume", "test_reliability_fuzz"),   # 2. 单个文件就要一两分钟的，早开始
    ("test_reliability_determinism",),                       # 3. 这时第 1、6 课的冒烟结果都已登记
    ("test_",),                                              # 4. 其余（按文件名）
    ("test_common_", "test_house_rules", "test_bench", "test_scripts_contract", "test_reliability_readers"),
)                                                            # 5. 几秒一个的进程内测试：最后填平两个进程的收尾


def _run_rank(item) -> int:
    """文件名落在哪一组：按最长的匹配前缀算（test_lesson1_ 比 test_ 具体）。"""
    name = Path(str(item.fspath)).name
    return max((len(p), i) for i, prefixes in enumerate(RUN_ORDER) for p in prefixes if name.startswith(p))[1]


def pytest_collection_modifyitems(config, items):
    items.sort(key=_run_rank)    # 稳定排序：同一组里保持文件名顺序、文件内保持定义顺序


@pytest.fixture(autouse=True)
def _restore_environ():
    """一个测试改过的环境变量不带进同一 worker 的下一个测试。mlflow.set_tracking_uri 会把 URI 写进 os.environ
    （好让子进程继承）：第 5 课 01/04 在进程内跑完后，后面的测试起的训练子进程就去连已经停掉的 MLflow 服务，
    按退避重试好几分钟（run.start 只在用户没设时才把 URI 指向本地 sqlite）。"""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, Path]:
    """三个极小模型（首次构建约 30 秒，之后读缓存）。"""
    from common import models, tiny

    return {name: models.resolve(name) for name in tiny.TINY_NAMES}


@pytest.fixture(scope="session")
def launcher():
    """本 worker 的预热启动器（tests/_prefork.py：大库已导入，fork 出的子进程省下每次 1–7 秒的导入，其余与新解释器
    一样）；设了 LLM_COURSE_TEST_FRESH=1 时是 None（每次起全新的解释器）。"""
    from tests._prefork import maybe

    one = maybe()
    yield one
    if one:
        one.close()


@pytest.fixture(scope="session")
def run_script(launcher):
    """以子进程运行一个课程脚本（像学生那样），返回 CompletedProcess。子进程从 launcher fork 出来；本测试改过
    环境变量、或没有启动器时起全新的解释器。"""

    def _run(rel: str, *args: str, timeout: int = 600, check: bool = False) -> subprocess.CompletedProcess:
        cwd = str(REPO / "tests")   # 故意不在仓库根目录运行
        proc = launcher and launcher.run([str(REPO / rel), *args], cwd=cwd, timeout=timeout)
        if proc is None:
            proc = subprocess.run([sys.executable, str(REPO / rel), *args], capture_output=True, text=True,
                                  timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise AssertionError(f"{rel} 退出码 {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    return _run


class SharedSmoke:
    """一次 pytest 运行里各 worker 共用的冒烟结果：课程测试进程内跑完 --smoke 后把 metrics.json 登记在这里，
    可复现测试（test_reliability_determinism）拿它当两次运行里的一次，只需再起一个进程（省掉 12 次冒烟运行）。
    目录在本次 pytest 的临时根目录下（xdist 的各 worker 共用），不会读到上一次运行留下的旧结果。"""

    def __init__(self, root: Path):
        self.root = root

    def path(self, rel: str) -> Path:
        return self.root / (rel.replace("/", "__") + ".json")

    def share(self, rel: str, out_dir: Path) -> None:
        """out_dir 里是 rel 用默认冒烟参数（只给 --smoke 与 --output-dir）跑出的结果。先写临时文件再改名：读的一方
        要么看不到，要么看到完整的文件。"""
        tmp = self.path(rel).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes((Path(out_dir) / "metrics.json").read_bytes())
        tmp.replace(self.path(rel))


@pytest.fixture(scope="session")
def shared_smoke(tmp_path_factory) -> SharedSmoke:
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-smoke"
    root.mkdir(exist_ok=True)
    return SharedSmoke(root)


def load_script(rel: str):
    """按路径导入一个课程脚本模块（文件夹名以数字开头，不能直接 import）。"""
    import importlib.util

    path = REPO / rel
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    # 先登记到 sys.modules：dataclass 解析字符串注解（from __future__ import annotations）时要按模块名找回它
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """坏输入的统一约定：退出码 2、没有 traceback、stderr 里点名了 needles（`文件:行`、参数名……）。"""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for n in needles:
        assert n in proc.stderr, f"stderr 里没有 {n!r}：{proc.stderr[-2000:]}"


def assert_claims(metrics: dict | Path) -> list[dict]:
    """脚本在 CLAIMS 里声明的结论，本次运行（按它的模式的门槛）每条都成立；不成立就点名哪条、值多少。

    每个冒烟测试都调用它；测试自己的"方向 + 余量"断言照留（它们检查的是同一件事的另一面）。
    """
    import json

    if not isinstance(metrics, dict):
        metrics = json.loads(Path(metrics).read_text(encoding="utf-8"))
    rows = metrics.get("claims") or []
    assert rows, "metrics.json 里没有 claims：脚本要把 CLAIMS 传给 out.finish(..., claims=CLAIMS)"
    failed = [f"{r['statement']}：{r['expr']} = {r['value']} 不满足 {r['op']} {r['threshold']}"
              + (f"（{r['error']}）" if r.get("error") else "") for r in rows if r["held"] is False]
    assert not failed, "结论不成立：\n" + "\n".join(failed)
    # 冒烟跑的是全套方法：本模式有门槛却没测到（表达式拼错了指标名）也算失败
    missing = [f"{r['statement']}：{r['error']}" for r in rows if r["threshold"] is not None and r["value"] is None]
    assert not missing, "结论没测到：\n" + "\n".join(missing)
    assert any(r["held"] for r in rows), f"{metrics.get('mode')} 模式下一条结论都没检查"
    return rows
