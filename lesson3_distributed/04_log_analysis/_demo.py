"""没有日志可读时现训一段（只属于第 3 课 04）：真实 Trainer 写出 trainer_state.json 与 TensorBoard 事件，给体检读。

体检本身在 training_log_inspector.py 里，那是这一课要读的内容；现训只是"手边没有日志时"造一份真实的日志，
所以单独放在脚本旁边（run.import_sibling 加载）。
"""
from __future__ import annotations

from pathlib import Path

from common import data, models, run, train


def demo_run(args, out: run.Run, convs: list) -> Path:
    """没有日志可读时现训一段：真实 Trainer，每步记录 loss/lr/grad_norm，定期评估，写 TensorBoard。

    用真实 Trainer 而不是手造数字：日志的格式、字段名、评估穿插的节奏都和学生以后读到的一样。
    """
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    model, tok = models.load_args(args, for_training=True)
    tr, ev = data.split(convs, 0.15, args.seed)
    # assistant_masks 不是模型的输入：留着的话 collator 会把它一起补齐、传进 forward 报错
    enc = lambda cs: Dataset.from_list([data.tokenize_chat(tok, c, 256) for c in cs]).remove_columns(   # noqa: E731
        ["assistant_masks"])
    # logging_steps=1：每步一个记录，尖峰才不会被平均掉；评估约 8 次，够画出验证曲线的走向
    targs = TrainingArguments(output_dir=str(out.path("demo_run")), max_steps=args.demo_steps, learning_rate=5e-4,
                              lr_scheduler_type="cosine", warmup_steps=3, per_device_train_batch_size=8,
                              logging_steps=1, eval_strategy="steps", eval_steps=max(1, args.demo_steps // 8),
                              save_strategy="no", report_to=["tensorboard"],
                              seed=args.seed, dataloader_num_workers=0,
                              **train.trainer_flags(model, log=False))
    trainer = Trainer(model=model, args=targs, train_dataset=enc(tr), eval_dataset=enc(ev),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    trainer.train()
    trainer.state.save_to_json(str(out.path("demo_run/trainer_state.json")))   # 检查点里的同一份文件，不存权重
    return out.path("demo_run")
