"""第 5 课 07：压测。并发时请求被凑成批（服务自己的批大小计数，不看墙钟）、零失败；只压本机；坏参数一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/07_serving/load_test.py"


def test_load_test_batches_concurrent_requests(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for c in (1, 4, 8):
        r = saved[f"concurrency_{c}"]
        for key in ("rps", "tokens_per_s", "p50_ms", "p95_ms", "ttft_p50_ms", "mean_batch_size"):
            assert key in r and r[key] > 0, (c, key, r)
        assert r["ok"] == 16 and r["errors"] == 0 and r["p95_ms"] >= r["p50_ms"] >= r["ttft_p50_ms"]
    assert m["errors"] == 0 and "batching_speedup_8" in m
    assert_claims(saved)
    # 基线：顺序发（1 并发）时每次 generate 只服务 1 个请求。8 并发：同一等待窗口里到达的请求被凑成批。
    # 读的是服务 /metrics 的 chat_batch_size 增量，不是墙钟吞吐比（后者在忙碌的共享机上会起伏，见 README）
    one, eight = saved["concurrency_1"]["mean_batch_size"], saved["concurrency_8"]["mean_batch_size"]
    assert one == 1.0 and eight >= one + 1.0, (one, eight)
    assert (tmp_path / "load_test.png").stat().st_size > 0


def test_only_loopback_targets(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--base-url", "http://example.com:8000", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--base-url")


def test_bad_concurrency_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--concurrency", "1,0", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--concurrency")


def test_broken_model_dir_refused_before_the_server_starts(tmp_path, tiny_models, run_script):
    """--model 目录的 config.json 是合法 JSON 对象、权重却是截断的：在本进程一行点名 --model 和坏文件，
    不起服务子进程（没有 server.log）。以前是服务起不来之后的 RuntimeError traceback。"""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_bytes((tiny_models["tiny-qwen2"] / "config.json").read_bytes())
    (model / "model.safetensors").write_bytes((tiny_models["tiny-qwen2"] / "model.safetensors").read_bytes()[:100])
    out = tmp_path / "out"
    proc = run_script(SCRIPT, "--smoke", "--model", str(model), "--output-dir", str(out))
    assert_user_error(proc, f"--model {model}", "model.safetensors")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (out / "server.log").exists() and not (out / "metrics.json").exists()
