"""第 2 课 05：量化推理并排比。DeepSpeed（CPU 不注入）与 fp32 完全一致；量化的一致性与困惑度关系；坏参数一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py"


def test_quantized_inference_side_by_side(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for v in ("fp32", "bf16", "bnb_int8", "bnb_nf4", "deepspeed"):
        for key in ("latency_ms_p50", "latency_ms_p95", "memory_mb", "agreement", "tf_agreement", "kl", "ppl",
                    "ppl_delta"):
            assert key in saved[v], (v, key)
    # CPU 上 DeepSpeed 不注入内核，包装的是同一个 fp32 模型：输出与困惑度都和 fp32 一样
    assert m["device"] == "cpu" and m["deepspeed"]["agreement"] == 1.0 == m["deepspeed"]["tf_agreement"]
    assert m["fp32"]["tf_agreement"] == 1.0 and m["fp32"]["kl"] == 0.0
    assert abs(m["deepspeed"]["ppl"] - m["fp32"]["ppl"]) < 1e-3 * m["fp32"]["ppl"]
    # NF4 的误差比 bf16 大：困惑度上升、贪心输出更早偏离（tiny-llama：bf16 一致 1.00，NF4 0.89）
    assert m["bnb_nf4"]["ppl"] > m["fp32"]["ppl"], m
    assert m["bf16"]["agreement"] > m["bnb_nf4"]["agreement"], m
    assert abs(m["bf16"]["ppl_delta"]) < abs(m["bnb_nf4"]["ppl_delta"]), m
    # 量化后每一步仍大体选 fp32 的 token（同前缀比较），且 8 bit 的 KL 比 4 bit 小
    assert min(m[v]["tf_agreement"] for v in ("bnb_int8", "bnb_nf4")) > 0.8, m
    assert 0 < m["bnb_int8"]["kl"] < m["bnb_nf4"]["kl"], m
    assert (tmp_path / "latency_vs_agreement.png").stat().st_size > 0
    assert_claims(saved)


def test_unknown_variant_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--variants", "fp32", "awq", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--variants")
