"""第 5 课 07：压测。动态批处理让 8 并发的吞吐明显高于顺序；只压本机；坏参数一行报错。"""
import json

from tests.conftest import assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/07_serving/load_test.py"


def test_load_test_batching_speedup(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for c in (1, 4, 8):
        r = saved[f"concurrency_{c}"]
        for key in ("rps", "tokens_per_s", "p50_ms", "p95_ms", "ttft_p50_ms"):
            assert key in r and r[key] > 0, (c, key, r)
        assert r["ok"] == 16 and r["errors"] == 0 and r["p95_ms"] >= r["p50_ms"] >= r["ttft_p50_ms"]
    # 请求被凑成批：8 并发的吞吐是顺序的 ≥1.5 倍（忙碌的 2 核机上实测约 2.7-3.5 倍）
    assert m["batching_speedup_8"] >= 1.5, m
    assert saved["concurrency_8"]["tokens_per_s"] > saved["concurrency_1"]["tokens_per_s"]
    assert (tmp_path / "load_test.png").stat().st_size > 0


def test_only_loopback_targets(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--base-url", "http://example.com:8000", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--base-url")


def test_bad_concurrency_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--concurrency", "1,0", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--concurrency")
