"""第 4 课 02：RLHF 三阶段 + 手写 PPO。RM 留出准确率高于随机、PPO 提高平均奖励且 KL 有界、
GRPO 对照用同一个 RM 也提高平均奖励、坏参数一行报错。
"""
import json
import math

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py"


def test_ppo_raises_reward_with_bounded_kl(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("rm_eval_accuracy", "reward_before", "reward_after", "kl_final", "policy_loss_last", "value_loss_last"):
        assert key in saved and math.isfinite(saved[key]), key
    assert m["rm_eval_accuracy"] >= 0.75, m   # 阶段 2：留出偏好对排序（固定种子下约 0.93）
    # 阶段 3：留出 prompt 上贪心回答的平均 RM 分数明显上升（固定种子下约 -2.7 -> 1.9）
    assert m["reward_after"] > m["reward_before"] + 1.0, m
    # KL 惩罚让策略不至于跑飞：每条回答的 KL(actor‖ref) 停在几个 nat 以内（16 个 token）
    assert abs(m["kl_final"]) < 12, m
    assert (tmp_path / "ppo_curves.png").stat().st_size > 0
    assert_claims(saved)


def test_lora_default_path_runs_all_three_stages(tmp_path, tiny_models):
    """CPU 默认走 LoRA：阶段 1、2 训练 adapter 后合并；阶段 3 的 actor 与 critic（打分头全参数）各挂 adapter。"""
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, lora_r=8, sft_steps=4, rm_steps=6, ppo_steps=4, output_dir=str(tmp_path)))
    assert "value_loss_last" in m, m   # PPO 路径：有 critic
    # actor 的 adapter 真的在训练：新 adapter 的 B = 0，PPO 前的 actor 就是 SFT 起点；4 次迭代后同一把尺子量的
    # 留出平均奖励上升（固定种子下 0.099 -> 0.151；RM 只训了 6 步 LoRA，分数尺度小，所以只比方向）
    assert m["reward_after"] > m["reward_before"], m


def test_grpo_with_same_reward_model(tmp_path, tiny_models):
    """冒烟的 SFT 与 RM（20 / 30 步，RM 留出准确率约 0.93）+ 4 步 GRPO：同一把尺子量的留出平均奖励上升。

    RM 要像样：只训 10 步的 RM（准确率约 0.87）下，几步 GRPO 反而让贪心回答的分数下降——优化的是一个不准的奖励。
    """
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, algo="grpo", ppo_steps=4, output_dir=str(tmp_path)))
    assert m["algo"] == "grpo" and "value_loss_last" not in m   # 没有 critic
    # 组内相对优势真的在更新策略（KL > 0），且 β 把它拴在参考附近。奖励升多少在玩具上随种子和 CPU 摆动
    # （实测 -0.18 … +0.96），不在冒烟里断言；GRPO 的奖励上升由默认模式的 CLAIMS 检查
    assert 0.05 < m["kl_final"] < 2.0, m
    assert_claims(m)   # 同一份 CLAIMS：RM、奖励上升、KL、熵，对 GRPO 也成立


def test_bad_algo_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--cliprange", "1.5", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--cliprange")
