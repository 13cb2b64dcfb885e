"""第 4 课 01：DPO / KTO / ORPO / SimPO 同起点比较。每种方法都把留出的 log π 差推离 SFT 起点、表格齐全、
坏参数一行报错。
"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson4_alignment/01_alignment_overview/compare_methods.py"


def test_four_methods_same_start(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    start = m["sft_start"]["pref_accuracy"]
    for method in ("dpo", "kto", "orpo", "simpo"):
        r = saved[method]
        for key in ("pref_accuracy", "margin", "toward_chosen", "seconds", "peak_mem_mb"):
            assert key in r, (method, key)
        # 四种损失都奖励"chosen 比 rejected 更可能"：留出的平均 log π 差都比 SFT 起点大
        # （固定种子下 0.28 -> DPO 0.46、KTO 0.39、ORPO 0.30、SimPO 0.46）
        assert r["margin"] > saved["sft_start"]["margin"], (method, saved)
        # 逐对看：多数没见过的对比起点更偏向 chosen（均值变大也可能只是少数几对被推得很远）
        assert r["toward_chosen"] > 0.5, (method, r)
    assert m["dpo"]["needs_ref_model"] and m["kto"]["needs_ref_model"]
    assert not m["orpo"]["needs_ref_model"] and not m["simpo"]["needs_ref_model"]
    # 偏好训练确实改变了策略：直接优化偏好的 DPO / SimPO 把留出准确率明显拉高
    assert m["dpo"]["pref_accuracy"] >= start + 0.05, m
    assert m["simpo"]["pref_accuracy"] >= start + 0.05, m
    assert len({m[k]["pref_accuracy"] for k in ("dpo", "kto", "orpo", "simpo")}) > 1, \
        "四种方法结果完全相同：没有各自训练"
    assert (tmp_path / "results.md").read_text(encoding="utf-8").count("|") > 20
    assert (tmp_path / "compare_methods.png").stat().st_size > 0
    assert_claims(saved)


def test_lora_default_path(tmp_path, tiny_models):
    """CPU 默认走 LoRA：SFT 起点训练 adapter 后合并；DPO 的参考模型 = 关掉 adapter；ORPO 不需要参考模型。"""
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, lora_r=8, methods="dpo,orpo", sft_steps=4, max_steps=3, output_dir=str(tmp_path)))
    assert set(m) >= {"dpo", "orpo", "sft_start"}, m
    # 新挂的 adapter B = 0，训练前策略就是起点；3 步 DPO 之后留出的 log π 差必须离开起点、往 chosen 那边走
    assert m["dpo"]["margin"] > m["sft_start"]["margin"], m


def test_unknown_method_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--methods", "dpo,ppo", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--methods")
