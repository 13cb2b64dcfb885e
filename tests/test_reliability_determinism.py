"""可靠性 · 可复现（issue 8 第 11 项）：同一种子跑两次，第 1、6 课每个脚本的 metrics.json 数字相同（计时除外）。

两次运行是两个独立进程，并且 PYTHONHASHSEED 不同：如果哪里的结果依赖 set/dict 里字符串的遍历顺序，
这里就会露馅。第一次运行用课程测试已经做过的那次（pytest worker 进程里、默认冒烟参数，见 conftest.SharedSmoke），
这里只再起一个进程（从哈希种子不同的预热启动器 fork 出来，见 tests/_prefork.py；LLM_COURSE_TEST_FRESH=1 时起全新
解释器）：比两次都新起进程还多查一件事——进程里先跑过别的测试，结果也不变。课程测试还没跑到
（xdist 把它分给了另一个 worker、或只选了本文件）时，照旧起两个进程同时跑（计时类指标本来就排除在外）。
会变的键只有计时类（秒、吞吐、加速比、延迟）与内存类（峰值、按本机空闲内存定的预算），由 TIMING 正则排除；
其余任何一个键不同都算失败，
并列出是哪个键、两次的值。
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tests._prefork import maybe
from tests.conftest import REPO

SCRIPTS = sorted(p.relative_to(REPO).as_posix() for d in ("lesson1_sft", "lesson6_rag")
                 for p in (REPO / d).glob("[0-9][0-9]_*/*.py") if not p.name.startswith(("_", "test")))
# 计时类：墙钟时间、吞吐、加速比、延迟、内存峰值——同一台机器两次跑也会不同，按定义不可复现
TIMING = re.compile(r"(seconds|_s$|_s\.|_ms|per_s|speedup|slowdown|latency|throughput|qps|tokens_per_sec|rss|peak_mb|"
                    r"memory_mb|mem_mb|budget_gb|wall|elapsed|_time|p50|p95|p99)", re.I)


def flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        return {k2: v2 for k, v in d.items() for k2, v2 in flatten(v, f"{prefix}{k}.").items()}
    if isinstance(d, list):
        return {k2: v2 for i, v in enumerate(d) for k2, v2 in flatten(v, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): d}


def _without_timing_claims(m: dict) -> dict:
    """结论的值由它的表达式决定：表达式里有计时类指标，这条结论的值和成立与否也跟着机器忙闲变，不比。"""
    return {**m, "claims": [c for c in m.get("claims", []) if not TIMING.search(c["expr"])]}


def differing_keys(a: dict, b: dict) -> dict:
    fa, fb = flatten(_without_timing_claims(a)), flatten(_without_timing_claims(b))
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if not TIMING.search(k) and fa.get(k) != fb.get(k)}


def test_timing_filter_only_drops_timing_keys():
    a = {"seconds": 1.0, "eval_loss": 2.0, "t": {"prefill_ms": 3, "recall_at_5": 0.5}, "train_tokens_per_s": 9,
         "claims": [{"expr": "eval_loss", "value": 2.0}, {"expr": "t['prefill_ms'] / 2", "value": 1.5}]}
    b = {"seconds": 2.0, "eval_loss": 2.5, "t": {"prefill_ms": 4, "recall_at_5": 0.5}, "train_tokens_per_s": 8,
         "claims": [{"expr": "eval_loss", "value": 2.5}, {"expr": "t['prefill_ms'] / 2", "value": 2.0}]}
    assert differing_keys(a, b) == {"eval_loss": (2.0, 2.5), "claims.0.value": (2.0, 2.5)}


@pytest.fixture(scope="module")
def fresh_seed_launcher():
    """第二次运行的进程：从哈希种子与本进程（pytest worker）不同的预热启动器 fork 出来（tests/_prefork.py：
    大库已导入，省下每个脚本 5–7 秒的导入；字符串哈希的顺序由启动器的 PYTHONHASHSEED 决定，与新解释器一样）。"""
    fresh = "2" if os.environ.get("PYTHONHASHSEED") != "2" else "3"
    launcher = maybe(PYTHONHASHSEED=fresh)
    yield fresh, launcher
    if launcher:
        launcher.close()


@pytest.mark.slow
@pytest.mark.parametrize("rel", SCRIPTS)
def test_same_seed_same_metrics(rel, tmp_path, tiny_models, shared_smoke, fresh_seed_launcher):
    fresh, launcher = fresh_seed_launcher
    earlier = shared_smoke.path(rel)
    procs, metrics = [], []
    if earlier.exists():
        metrics.append(json.loads(earlier.read_text(encoding="utf-8")))
        argv = [str(REPO / rel), "--smoke", "--output-dir", str(tmp_path / "b")]
        done = launcher and launcher.run(argv, cwd=str(tmp_path), timeout=900)
        if done:
            assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
            metrics.append(json.loads((tmp_path / "b" / "metrics.json").read_text(encoding="utf-8")))
    for run, hashseed in (("a", "1"), ("b", fresh))[len(metrics):]:
        env = {**os.environ, "PYTHONHASHSEED": hashseed}
        out = tmp_path / run
        log = open(tmp_path / f"{run}.log", "wb")
        procs.append((out, log, subprocess.Popen([sys.executable, str(REPO / rel), "--smoke", "--output-dir", str(out)],
                                                 stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path))))
    for out, log, p in procs:
        code = p.wait(timeout=900)
        log.close()
        assert code == 0, (tmp_path / f"{out.name}.log").read_text(errors="replace")[-3000:]
        metrics.append(json.loads((out / "metrics.json").read_text(encoding="utf-8")))
    diff = differing_keys(*metrics)
    assert not diff, f"{rel}：同一种子两次运行这些键不同：{diff}"
