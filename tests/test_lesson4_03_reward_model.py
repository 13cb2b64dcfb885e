"""第 4 课 03：奖励模型。留出准确率明显高于随机、chosen 分数高于 rejected、手算损失与 TRL 一致、坏数据一行报错。"""
import json
import re

import pytest

from tests import test_own_data_trainers
from tests.conftest import assert_claims, assert_user_error, load_script

course_log = test_own_data_trainers.course_log   # 收集课程日志的 fixture（与自有数据的测试共用一份）
PAIRS = test_own_data_trainers.PAIRS

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


@pytest.mark.parametrize("script", [SCRIPT, "lesson4_alignment/04_dpo/dpo_train.py"])
def test_identical_pairs_are_dropped_with_a_line_or_refused_when_all(script, tmp_path, monkeypatch, course_log):
    """chosen == rejected（规范化后，第 4 课 06 的规则 1）的对没有偏好信号：data.preference_split 去掉并一行说清
    几对、哪个文件，对数随之减少；全是这样的对：一行拒绝，不加载模型、不写 metrics.json（issue 22 第 6 组）。"""
    import torch

    from common import models
    from common.errors import UserError

    class Stop(Exception):
        pass

    def stop(*a, **k):   # 走到加载模型就停：要看的只是数据这一步
        raise Stop

    monkeypatch.setattr(models, "load", stop)
    monkeypatch.setattr(models, "resolve", stop)
    pairs = [json.loads(ln) for ln in PAIRS.read_text(encoding="utf-8").splitlines()[:30]]
    for p in pairs[:4]:
        p["rejected"] = " " + p["chosen"].upper() + "！"     # 只差大小写、空白和标点：规范化后相同
    own = tmp_path / "own.jsonl"
    mod = load_script(script)
    threads = torch.get_num_threads()
    try:
        own.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
        with pytest.raises(Stop):
            mod.main(mod.Args(smoke=True, data=str(own), output_dir=str(tmp_path / "o")))
        assert any(f"{own}: 去掉 4 对 chosen 与 rejected 相同" in ln for ln in course_log), course_log[-5:]
        counts = next(ln for ln in course_log if ln.startswith("偏好对：训练"))
        assert sum(int(n) for n in re.findall(r"\d+", counts)) == 26, counts
        own.write_text("".join(json.dumps({**p, "rejected": p["chosen"]}, ensure_ascii=False) + "\n" for p in pairs),
                       encoding="utf-8")
        with pytest.raises(UserError) as e:
            mod.main(mod.Args(smoke=True, data=str(own), output_dir=str(tmp_path / "o2")))
    finally:
        torch.set_num_threads(threads)   # 冒烟的 run.start 改了线程数，出错时没走到 finish 还原
    assert str(e.value).startswith(f"{own}: 全部 30 对的 chosen 与 rejected 相同") and "\n" not in str(e.value)
    assert not (tmp_path / "o2" / "metrics.json").exists()
