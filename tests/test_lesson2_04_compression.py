"""第 2 课 04：压缩实验台。剪枝/蒸馏/量化同表；蒸馏胜过同步数的纯交叉熵；量化变小；坏参数一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson2_qlora_ptuning/04_model_compression/compression_lab.py"
METHODS = ("fp32", "prune_unstructured_0.3", "prune_structured_0.3", "prune_unstructured_0.6", "prune_structured_0.6",
           "dynamic_int8", "bnb_int8", "bnb_nf4", "student_kd", "student_ce")


def test_compression_table(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for name in METHODS:
        assert set(saved[name]) == {"ppl", "size_mb", "latency_ms"}, name
    assert "distill_gain" in saved
    fp32 = m["fp32"]["size_mb"]
    # 非结构化剪枝：稠密存储一点没省；结构化剪枝删掉整行，越剪越小，剪得多困惑度明显变差
    assert m["prune_unstructured_0.6"]["size_mb"] == fp32
    assert m["prune_structured_0.6"]["size_mb"] < m["prune_structured_0.3"]["size_mb"] < fp32
    assert m["prune_structured_0.6"]["ppl"] > 1.1 * m["fp32"]["ppl"], m
    # 量化：int8 / NF4 都比 fp32 小，困惑度几乎不变（tiny-llama：±1%）
    for q in ("dynamic_int8", "bnb_int8", "bnb_nf4"):
        assert m[q]["size_mb"] < 0.7 * fp32, (q, m[q])
        assert abs(m[q]["ppl"] / m["fp32"]["ppl"] - 1) < 0.05, (q, m[q])
    # 蒸馏：同样的学生、同样的批和步数，KD 的困惑度比纯交叉熵低（固定种子 367 vs 684，gain 1.87）
    assert m["distill_gain"] > 1.2, m
    assert (tmp_path / "ppl_vs_size.png").stat().st_size > 0
    assert_claims(saved)


def test_bad_sparsity_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--sparsities", "0.5", "1.5", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--sparsities")
