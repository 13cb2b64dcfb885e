"""第 1 课 05：LoRA 微调 GLM 架构对话模型。

损失下降、身份准确率上升、adapter 与合并模型一致；用自己的数据时：不报身份准确率、超长条数进日志和 metrics.json、
留下验证损失最低的一步而不是最后一步；打包与填充损失相同；梯度检查点在 CPU 上实测降低峰值内存；坏数据一行报错。
"""
import json

import pytest

from tests import test_own_data_trainers
from tests.conftest import REPO, assert_claims, assert_user_error, load_script

SCRIPT = "lesson1_sft/05_lora_finetune/lora_chatglm_demo.py"
LONG = REPO / "data" / "longform" / "sft_long.jsonl"   # 学生式长回答数据（data/longform/build.py 生成）
course_log = test_own_data_trainers.course_log   # 收集课程日志的 fixture（与自有数据的测试共用一份）


def test_lora_identity_finetune_and_merge(tmp_path, tiny_models, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_loss_before", "eval_loss_after", "identity_accuracy_before", "identity_accuracy_after",
                "trainable_ratio", "merge_max_abs_logit_diff", "merge_matches_adapter", "samples", "peak_rss_mb",
                "kept_step", "train_tokens_per_s", "over_max_length"):
        assert key in saved, key
    assert m["model"] == "tiny-glm"
    # 训练的效果：验证损失下降（固定种子下约 5.6 -> 4.5），留出身份问题的准确率明显上升（0 -> 0.7）
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.3, m
    assert m["identity_accuracy_after"] >= m["identity_accuracy_before"] + 0.3, m
    # 只训练低秩增量：可训练参数是一小部分（极小模型上约 11%，因为它的隐藏维只有 128）
    assert 0 < m["trainable_ratio"] < 0.2
    assert set(m["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    # fp32 下合并只差浮点舍入；重新加载的 adapter 与训练中的模型完全一致
    assert m["merge_max_abs_logit_diff"] < 1e-3 and m["merge_matches_adapter"] is True
    assert m["adapter_reload_max_diff"] < 1e-5
    # 打包（position_ids 标边界、没有 attention_mask）与填充在同一批上损失相同
    assert m["packing"] and m["packed_vs_padded_loss_diff"] <= 1e-4
    assert m["peak_rss_mb"] > 100 and m["train_tokens_per_s"] > 0
    # 评估只做前向、只收损失（prediction_loss_only）：每 token 至少比训练（前向 + 反向 + 优化器）快 1.5 倍
    assert m["eval_tokens_per_s"] >= 1.5 * m["train_tokens_per_s"], m
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert list((tmp_path / "merged").glob("*.safetensors")) and (tmp_path / "merged" / "config.json").is_file()
    assert not list((tmp_path / "merged").glob("adapter_*")), "合并后的模型不应再带 adapter"
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert all(s["before"] != s["after"] for s in m["samples"])
    # adapter 确实改变了输出（否则"合并后一致"什么也说明不了），合并误差比这个改变小几个数量级
    assert m["lora_logit_change"] > 1000 * m["merge_max_abs_logit_diff"], m
    assert_claims(saved)


def test_own_data_no_identity_and_over_length_counted(tmp_path, tiny_models, course_log):
    """--data 是学生自己的长回答数据：不出现身份准确率；超过 --max-length 的条数写进日志和 metrics.json；
    --gradient-checkpointing on 在 CPU 上真的打开并能训练。"""
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path), data=str(LONG), max_length=128, max_steps=6,
                          eval_steps=3, gradient_checkpointing="on", per_device_train_batch_size=4))
    assert "identity_accuracy_before" not in m and "identity_accuracy_after" not in m, m
    # 长回答数据在 tiny 分词器下平均约 250 token：128 截断时绝大多数都超长
    assert m["records"] == 198 and m["over_max_length"] > 150, m
    assert m["answer_tokens_cut"] > 0
    line = next(x for x in course_log if "超过 --max-length 128" in x)
    assert f"的 {m['over_max_length']} 条" in line and "--over-length drop" in line, line
    assert m["gradient_checkpointing"] is True and m["steps"] == 6
    assert any("第 1 步实测" in x for x in course_log)
    assert m["packed_vs_padded_loss_diff"] <= 1e-4


def test_keeps_best_adapter_not_last_and_stops_early(tmp_path, tiny_models):
    """10 条训练样本反复训：验证损失先降（学会格式和常见词）后升（死记这 10 条）。保留的是最低点那一步，
    不是最后一步；连续 2 次评估没有改善就提前停（固定种子下：第 15 步最低 ≈5.88，第 25 步停，≈5.94）。"""
    lines = LONG.read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "train.jsonl").write_text("".join(lines[:10]), encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("".join(lines[99:139]), encoding="utf-8")
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path / "out"), data=str(tmp_path / "train.jsonl"),
                          eval_data=str(tmp_path / "eval.jsonl"), max_length=128, max_steps=60, eval_steps=5,
                          learning_rate=5e-3, early_stopping_patience=2, per_device_train_batch_size=4))
    losses = [loss for _, loss in m["eval_history"]]
    assert losses[-1] > min(losses) + 0.03, losses   # 末尾过拟合：验证损失比最低点高
    assert m["kept_step"] < m["steps"] and m["eval_loss_after"] < m["eval_loss_before"] - 0.1, m
    assert m["eval_loss_after"] == pytest.approx(min(losses), abs=1e-3)   # 装回的就是最低点那一步
    assert m["stopped_early"] and m["steps"] < 60 and m["kept_step"] == m["steps"] - 2 * 5, m
    assert "identity_accuracy_after" not in m


def test_time_budget_caps_steps_and_micro_batches(tmp_path, tiny_models, course_log):
    """--max-train-minutes：训练前实测一步，自动步数减到预算以内，日志说出原计划、预计用时和减到几步；
    --micro-batch-tokens 小于一步的 token 数时分几次前向累积梯度。"""
    mod = load_script(SCRIPT)
    # 不用 --smoke（它固定了 120 步，给了步数就不按预算减）：直接指定极小模型
    m = mod.main(mod.Args(model="tiny-glm", num_threads=1, output_dir=str(tmp_path), data=str(LONG), max_length=128,
                          max_train_minutes=0.01, micro_batch_tokens=128, num_train_epochs=2, max_new_tokens=8))
    assert m["steps_before_time_budget"] > m["planned_steps"] >= m["steps"] >= 1, m
    assert m["measured_step_seconds"] > 0 and m["gradient_accumulation_steps"] > 1, m
    line = next(x for x in course_log if x.startswith("训练前实测一步"))
    assert "超过 --max-train-minutes 0.01" in line and f"减到 {m['planned_steps']} 步" in line, line


@pytest.mark.parametrize("name", ["tiny-glm", "tiny-llama", "tiny-qwen2"])
def test_packed_loss_equals_padded_loss(name, tiny_models):
    from common import data, models, run, train

    plan = run.import_sibling(REPO / SCRIPT, "_plan")
    model, tok = models.load(name, for_training=True)
    model.config.use_cache = False
    convs = data.load_sft(LONG)[:6]
    rows = train.truncate([data.tokenize_chat(tok, c, 10**9) for c in convs], 200)
    padded, packed = plan.packed_vs_padded_loss(model, rows, tok.pad_token_id)
    assert abs(padded - packed) <= 1e-4, (padded, packed)
    # 对照：如果位置不归零（边界丢了），后面的段落看得见前面的段落，损失就不一样了——这个检查是能失败的
    import torch

    batch = train.PackedCollator(tok.pad_token_id)([{"input_ids": sum((r["input_ids"] for r in rows), []),
                                                     "labels": sum((r["labels"] for r in rows), []),
                                                     "seq_lengths": [len(r["input_ids"]) for r in rows]}])
    with torch.no_grad():
        wrong = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss.item()
    assert abs(wrong - padded) > 1e-3


_STEP_MEMORY = """
import sys, torch
from common import models, run
plan = run.import_sibling("lesson1_sft/05_lora_finetune/lora_chatglm_demo.py", "_plan")
model, tok = models.load("tiny-llama", for_training=True)
model.config.use_cache = False
torch.manual_seed(0)
ids = torch.randint(10, tok.vocab_size - 1, (16, 512))
batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
print("PEAK_MB", plan.step_cost(model, batch, checkpointing=sys.argv[1] == "on")[1])
"""


def test_checkpointing_lowers_peak_memory_on_cpu(tiny_models):
    """一次前向 + 反向的实测峰值内存（RSS 采样）：开梯度检查点明显更低。每种设置在一个新进程里测——
    同一进程里先测的那次释放的内存会留在分配器里，后测的那次就"不用涨 RSS"，比较就不公平了。"""
    import os
    import subprocess
    import sys

    from common import models, run

    plan = run.import_sibling(REPO / SCRIPT, "_plan")

    def peak(mode: str) -> float:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-c", _STEP_MEMORY, mode], capture_output=True, text=True, env=env,
                           cwd=str(REPO), timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        return float(next(x for x in p.stdout.splitlines() if x.startswith("PEAK_MB")).split()[1])

    with_ckpt, without = peak("on"), peak("off")
    config = models.load("tiny-llama")[0].config
    est_full = plan.activation_gb(config, 16 * 512, 16, 512, False) * 1024
    est_ckpt = plan.activation_gb(config, 16 * 512, 16, 512, True) * 1024
    # 固定种子下实测约 without ≈ 1.1 GB、with ≈ 0.4 GB 量级；估计值只要求方向与量级对
    assert without > with_ckpt * 1.3 and without - with_ckpt > 50, (without, with_ckpt, est_full, est_ckpt)
    assert est_full > est_ckpt


def test_malformed_jsonl_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "你是谁？", "output": "我是小助手。"}\n{"instruction": "坏行", "output": \n',
                   encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=180)
    assert_user_error(proc, f"{bad}:2")


def test_bad_gradient_checkpointing_value_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--gradient-checkpointing", "maybe", "--output-dir", str(tmp_path),
                      timeout=120)
    assert_user_error(proc, "--gradient-checkpointing")


@pytest.mark.parametrize("keywords", [",", " , ", "找不到的词"])
def test_bad_identity_keywords_name_the_flag(tmp_path, monkeypatch, keywords):
    """--identity-keywords 全是空的，或自带身份集的答案里一个都没有：一行点名 --identity-keywords
    （不是 --eval-data None），在加载模型之前（issue 22 第 6 组）。"""
    import torch

    from common import cli, models
    from common.errors import UserError

    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("坏参数应在加载模型之前就被拒绝"))
    mod = load_script(SCRIPT)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UserError) as e:
            mod.main(cli.parse(mod.Args, ["--smoke", "--identity-keywords", keywords, "--output-dir", str(tmp_path)]))
    finally:
        torch.set_num_threads(threads)   # 冒烟的 run.start 改了线程数，出错时没走到 finish 还原
    msg = str(e.value)
    assert msg.startswith("--identity-keywords ") and "--eval-data" not in msg and "\n" not in msg, msg
    assert not (tmp_path / "metrics.json").exists()
