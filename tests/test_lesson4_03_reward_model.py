"""第 4 课 03：奖励模型。留出准确率明显高于随机、chosen 分数高于 rejected、手算损失与 TRL 一致、坏数据一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson4_alignment/03_reward_model_training/train_reward_model.py"


def test_reward_model_learns_preferences(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_accuracy", "mean_margin", "manual_loss_matches"):
        assert key in saved, key
    assert m["model"] == "tiny-llama"
    # 留出对的排序准确率：随机打分头约 0.5，训练后远高于随机（固定种子下约 0.9）
    assert m["eval_accuracy"] >= 0.75, m
    assert m["eval_accuracy"] >= m["eval_accuracy_before"] + 0.15, m
    assert m["mean_margin"] > 0.5 and m["chosen_score_mean"] > m["rejected_score_mean"], m
    # 从隐状态手算的 −log σ(r_c − r_r) 与 RewardTrainer.compute_loss 一致
    assert m["manual_loss_matches"] is True and m["manual_loss_abs_diff"] <= 1e-4, m
    assert (tmp_path / "score_hist.png").stat().st_size > 0 and (tmp_path / "margin_hist.png").stat().st_size > 0
    assert (tmp_path / "reward_model" / "config.json").is_file()
    assert_claims(saved)


def test_lora_default_path_matches_manual_loss_and_saves_a_merged_model(tmp_path, tiny_models):
    """CPU 默认（smollm2）走 LoRA：打分头全参数、主干只训 adapter；手算损失仍与 TRL 一致，保存的是合并后的普通模型。"""
    from transformers import AutoModelForSequenceClassification

    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, lora_r=8, learning_rate=5e-3, max_steps=8, output_dir=str(tmp_path)))
    assert m["manual_loss_matches"] is True, m
    rm_dir = tmp_path / "reward_model"
    assert not (rm_dir / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1)   # 02 的 --reward-model 能直接加载


def test_missing_field_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=?", "chosen": "2", "rejected": "3"}\n{"prompt": "2+2=?", "chosen": "4"}\n',
                   encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=180)
    assert_user_error(proc, f"{bad}:2", "rejected")
