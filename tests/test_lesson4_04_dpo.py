"""第 4 课 04：DPO。留出隐式奖励准确率高于随机、手算损失与 TRL 一致、β 小偏离参考更远、坏参数一行报错。"""
import json

from tests import test_own_data_trainers
from tests.conftest import assert_claims, assert_user_error, load_script

course_log = test_own_data_trainers.course_log   # 收集课程日志的 fixture（与自有数据的测试共用一份）
PAIRS = test_own_data_trainers.PAIRS

SCRIPT = "lesson4_alignment/04_dpo/dpo_train.py"


def test_dpo_matches_manual_loss_and_learns(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("rewards_accuracy", "rewards_margin", "manual_vs_trl_abs_diff", "beta_sweep"):
        assert key in saved, key
    # 从策略与参考模型 logits 亲手算的 −log σ(β·(Δ_c − Δ_r)) 与 DPOTrainer 一致
    assert m["manual_vs_trl_abs_diff"] <= 1e-4, m
    assert m["manual_loss"] > 1e-3   # 训练后策略已偏离参考（不是 log 2 那种平凡情形）
    # 留出对上隐式奖励排序正确的比例明显高于 0.5（固定种子下约 0.9），分差为正
    assert m["rewards_accuracy"] >= 0.7 and m["rewards_margin"] > 0.2, m
    # β 越小，KL 约束越松，策略的 log π/π_ref 偏离越大
    sweep = m["beta_sweep"]
    assert set(sweep) == {"0.1", "0.5"}
    assert sweep["0.1"]["mean_abs_logratio"] > sweep["0.5"]["mean_abs_logratio"] * 1.1, sweep
    assert (tmp_path / "beta_sweep.png").stat().st_size > 0
    assert_claims(saved)


def test_lora_default_path_matches_manual_loss(tmp_path, tiny_models):
    """CPU 默认走 LoRA：参考模型 = 关掉 adapter 的同一个模型；手算损失仍与 TRL 一致。"""
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, lora_r=8, learning_rate=5e-3, max_steps=4, output_dir=str(tmp_path)))
    assert m["manual_vs_trl_abs_diff"] <= 1e-4 and m["manual_loss"] > 1e-4, m


def test_bad_beta_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--beta", "0", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--beta")
