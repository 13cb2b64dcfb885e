"""第 1 课 06：CPU 推理取舍。KV 缓存更快、int8 困惑度几乎不变、每个配置都量到了吞吐与首 token 延迟。"""
import json

from tests.conftest import assert_user_error, load_script

SCRIPT = "lesson1_sft/06_cpu_deploy/cpu_inference_case.py"


def test_kv_cache_faster_and_int8_keeps_quality(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("tokens_per_s", "kv_cache_speedup", "int8_speedup", "int8_ppl_delta"):
        assert key in saved
    assert {"fp32", "fp32_no_kv", "bf16", "int8", "fp32_bs4"} <= set(m["tokens_per_s"])
    assert all(v > 0 for v in m["tokens_per_s"].values()) and all(v > 0 for v in m["first_token_ms"].values())
    # 不开 KV 缓存，每个新 token 都要把整段前文重算一遍：安静的机器上快约 2.7 倍；这里只要求 1.2 倍，
    # 忙碌的 CI 上两种配置交替计时、噪声大多相互抵消，2 倍的噪声也不至于翻转方向（省下的计算量见下一个测试）
    assert m["kv_cache_speedup"] > 1.2, m["tokens_per_s"]
    # 动态 int8 只量化 Linear 权重：困惑度变化在 5% 以内，权重体积变小
    assert abs(m["int8_ppl_delta_pct"]) < 5, m["perplexity"]
    assert m["size_mb"]["int8"] < m["size_mb"]["fp32"] and m["size_mb"]["bf16"] < m["size_mb"]["fp32"]
    # 批量生成：每个请求都拿到了同样多的新 token
    assert m["new_tokens"]["fp32_bs4"] == 4 * m["new_tokens"]["fp32"]
    assert (tmp_path / "cpu_inference.png").stat().st_size > 0


def test_kv_cache_saves_counted_work(tiny_models):
    """数真正送进模型前向的 token：有 KV 缓存时每步只算 1 个新 token，没有时每步重算整段前文（与机器快慢无关）。"""
    from common import models

    mod = load_script(SCRIPT)
    model, tok = models.load("tiny-llama", device="cpu", dtype="float32")
    enc = dict(tok(["你好，请介绍一下电动车的续航。"], return_tensors="pt"))
    fed = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        counts = {}
        for use_cache in (True, False):
            fed.clear()
            _, _, n_new = mod.timed_generate(model, dict(enc), 32, use_cache)
            counts[use_cache] = sum(fed)
    finally:
        hook.remove()
    prompt = enc["input_ids"].shape[1]
    assert n_new == 32
    assert counts[True] == prompt + 31                                     # 提示词一次 + 每个新 token 一次
    assert counts[False] == sum(prompt + i for i in range(32))             # 每步都从头算：平方级
    assert counts[False] > 10 * counts[True]


def test_bad_data_line_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   'not json at all\n', encoding="utf-8")
    p = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=180)
    assert_user_error(p, f"{bad}:2")
