"""第 1 课 06：CPU 推理取舍。KV 缓存输出不变、省下前向计算；int8 困惑度几乎不变；每个配置都量到了吞吐与首 token 延迟。

KV 缓存的墙钟加速比（脚本里 2 轮取中位数）在忙碌的 2 核上会被别的进程打乱，这里不断言它：
改为数前向 token（与机器快慢无关）并核对开不开缓存生成的 token 完全相同。
"""
import json

import pytest

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson1_sft/06_cpu_deploy/cpu_inference_case.py"


def test_every_config_measured_and_int8_keeps_quality(tmp_path, tiny_models, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("tokens_per_s", "kv_cache_speedup", "int8_speedup", "int8_ppl_delta"):
        assert key in saved
    assert {"fp32", "fp32_no_kv", "bf16", "int8", "fp32_bs4"} <= set(m["tokens_per_s"])
    assert set(m["first_token_ms"]) == set(m["tokens_per_s"])
    # bf16 的两段速度分开报：预填充（首 token）与批 1 解码；"加快预填充"这条只在有 AMX 的 CPU 上出指标、才检查
    assert m["bf16_prefill_speedup"] == round(m["first_token_ms"]["fp32"] / m["first_token_ms"]["bf16"], 3)
    assert ("bf16_prefill_speedup_native" in m) == mod.models.cpu_has_bf16()
    # 动态 int8 只量化 Linear 权重：困惑度相对 fp32 的变化在 5% 以内，权重体积变小
    assert abs(m["int8_ppl_delta_pct"]) < 5, m["perplexity"]
    # 逐类敏感度扫描覆盖每一类 Linear；留在 fp32 的正是单独量化时困惑度比超过门槛的那些
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(m["int8_sensitivity"])
    assert m["int8_kept_fp32"] == [k for k, v in m["int8_sensitivity"].items() if v > 1.05]
    assert "int8_all" in m["perplexity"]
    assert m["size_mb"]["int8"] < m["size_mb"]["fp32"] and m["size_mb"]["bf16"] < m["size_mb"]["fp32"]
    # 只量化权重（激活 bf16）：不碰激活，困惑度与 fp32 差不到 1%；权重体积比 fp32 小（极小模型里词嵌入占大头，省得少）
    assert "int8w" in m["tokens_per_s"] and m["perplexity"]["int8w"] / m["perplexity"]["fp32"] < 1.01, m["perplexity"]
    assert m["size_mb"]["int8w"] < 0.7 * m["size_mb"]["fp32"], m["size_mb"]
    # 批量生成：每个请求都拿到了同样多的新 token
    assert m["new_tokens"]["fp32_bs4"] == 4 * m["new_tokens"]["fp32"]
    assert (tmp_path / "cpu_inference.png").stat().st_size > 0
    # 脚本自己也数前向 token（批 1、fp32）：不开缓存多算 10 倍以上
    assert m["forward_tokens"]["no_kv_cache"] > 10 * m["forward_tokens"]["kv_cache"], m["forward_tokens"]
    assert_claims(saved)


def test_kv_cache_same_tokens_less_work(tiny_models):
    """数真正送进模型前向的 token：有 KV 缓存时每步只算 1 个新 token，没有时每步重算整段前文（与机器快慢无关）；
    两种方式贪心生成的 token 一模一样：缓存只省计算，不改结果。首 token 计时器记的确实是第一个新 token。"""
    import torch

    from common import models

    mod = load_script(SCRIPT)
    model, tok = models.load("tiny-llama", device="cpu", dtype="float32")
    enc = dict(tok(["你好，请介绍一下电动车的续航。"], return_tensors="pt"))
    fed = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        counts, new = {}, {}
        for use_cache in (True, False):
            fed.clear()
            _, _, n_new = mod.timed_generate(model, dict(enc), 32, use_cache)
            counts[use_cache] = sum(fed)
            assert n_new == 32
            timer = mod.FirstTokenTimer()   # 首 token 计时器：第 1 次 put 是提示词，之后每个新 token 一次
            with torch.inference_mode():
                new[use_cache] = model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                                use_cache=use_cache, streamer=timer)
            assert timer.calls == 1 + 32 and timer.first is not None
    finally:
        hook.remove()
    prompt = enc["input_ids"].shape[1]
    assert torch.equal(new[True], new[False])
    assert counts[True] == prompt + 31                                     # 提示词一次 + 每个新 token 一次
    assert counts[False] == sum(prompt + i for i in range(32))             # 每步都从头算：平方级
    assert counts[False] > 10 * counts[True]


def test_bad_data_line_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   'not json at all\n', encoding="utf-8")
    p = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=600)
    assert_user_error(p, f"{bad}:2")


def test_sensitivity_scan_finds_the_layer_with_activation_outliers(tiny_models):
    """造一个激活离群值：每层 up_proj 的第 0 个输出通道放大 1000 倍、down_proj 对应的输入列缩小 1000 倍——fp32 的函数
    不变，但 down_proj 的输入多了一个巨大的通道。动态 int8 按整个张量取尺度，这一类必须被扫描抓出来、留在 fp32。"""
    import torch

    from common import lm, models

    mod = load_script(SCRIPT)
    model, tok = models.load("tiny-llama", device="cpu", dtype="float32")
    rows = [{"input_ids": tok(t)["input_ids"]} for t in ("The quick brown fox jumps over the lazy dog.",
                                                          "A model learns from data and forgets nothing.")]
    base = lm.perplexity(model, rows, batch_size=1, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[0] *= 1000
            layer.mlp.down_proj.weight[:, 0] /= 1000
    assert lm.perplexity(model, rows, batch_size=1, pad_token_id=tok.pad_token_id) == pytest.approx(base, rel=1e-3)
    scan = mod.int8_sensitivity(model, rows, tok.pad_token_id)
    assert scan["down_proj"] > 1.05 and scan["q_proj"] < 1.05, scan
