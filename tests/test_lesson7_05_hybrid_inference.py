"""第 7 课 05：服务中途被 SIGKILL，请求切到本地备用模型一个不丢；熔断器 断开 → 半开 → 重新闭合；库外问题拒答。"""
import re

import pytest

from common.errors import UserError
from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py"


@pytest.mark.needs_service
def test_failover_and_circuit_breaker(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    assert m["correct"] + m["abstained"] + m["wrong"] == len(m["rows"])
    assert m["failover_worked"] is True, m["rows"]
    # 切换时间至少包含两次退避等待（连续失败 2 次熔断器才断开，每次等 backoff·2^k·[0.5, 1.5)）：
    # 下界来自参数，机器再忙也只会更长
    args = mod.Args(smoke=True)
    assert m["failover_ms"] >= 1000 * args.backoff * 0.5 * (1 + 2), m["failover_ms"]
    assert m["served_by"]["server"] > 0 and m["served_by"]["fallback"] > 0
    states = m["breaker_states"]
    assert "open" in states and "half_open" in states and states[-1] == "closed", states
    assert m["breaker_reclosed"] is True and m["server_after_restart"] > 0
    # 置信度路由：库外问题至少有一半被拒答/转人工
    assert m["abstained_out_of_kb"] >= m["out_of_kb"] / 2, m["rows"]
    assert_claims(m)


def test_breaker_state_machine():
    mod = load_script(SCRIPT)
    b = mod.CircuitBreaker(threshold=2, reset_timeout=0.05)
    assert b.allow()
    b.failure()
    assert b.allow() and b.state == "closed"
    b.failure()
    assert not b.allow() and b.state == "open"
    import time
    time.sleep(0.06)
    assert b.allow() and b.state == "half_open"
    b.failure()                                        # 半开时试探失败：立即再断开
    assert b.state == "open" and not b.allow()
    time.sleep(0.06)
    assert b.allow()
    b.success()
    assert b.state == "closed" and [s["state"] for s in b.log] == ["open", "half_open", "open", "half_open", "closed"]


def test_bad_thresholds_are_one_line_error(run_script, tmp_path):
    proc = run_script(SCRIPT, "--smoke", "--abstain-quantile", "0.9", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--abstain-quantile")


def test_abstain_threshold_is_the_calibration_quantile_and_separates_out_of_kb():
    """阈值 = 校准题（库内、不参与评测）BM25 最高分的分位：库内约一成低于它，明显离题的库外问题低于它。"""
    import numpy as np

    mod = load_script(SCRIPT)
    args = mod.Args(smoke=True)
    items, _, bm25, calib = mod.load_items(args)
    assert not {it["question"] for it in items} & set(calib)           # 校准题不参与评测
    thr = mod.calibrate(args, bm25, calib)
    scores = np.array([bm25.search(q, 1)[0][1] for q in calib])
    assert abs((scores < thr).mean() - args.abstain_quantile) <= 0.02
    off = [bm25.search(q, 1)[0][1] for q in ("今天上海的天气怎么样？", "帮我写一首关于秋天的诗。")]
    assert max(off) < thr, (off, thr)
    assert mod.route_of(args, thr - 0.01, thr, 1.0) == "abstain" and mod.route_of(args, thr, thr, 1.0) == "rag"
    assert mod.route_of(args, thr, thr, args.rag_threshold - 0.01) == "closed_book"
    with pytest.raises(UserError, match="--questions"):
        mod.calibrate(args, bm25, calib[:5])


def test_bad_model_dirs_named_before_any_load(tmp_path, monkeypatch):
    """服务的 --model 在子进程里才加载、--fallback-model 在本进程加载：坏目录都在加载任何模型、起服务之前
    一行报出，点名的是给错的那个参数。"""
    from common import models

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("坏模型目录还没报就先加载了模型"))
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2, 3]", encoding="utf-8")
    mod = load_script(SCRIPT)
    for kw, flag in (({"fallback_model": str(bad)}, "--fallback-model"),
                     ({"model": str(bad), "fallback_model": "tiny-qwen2"}, "--model")):
        with pytest.raises(UserError, match=re.escape(f"{flag} {bad}")):
            mod.main(mod.Args(smoke=True, output_dir=str(tmp_path / "out"), **kw))
        assert not (tmp_path / "out" / "metrics.json").exists()
