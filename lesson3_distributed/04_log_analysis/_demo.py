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
    if args.demo_lora_r:   # 只为造一份日志：LoRA + 短序列 + 小批，135M 模型在 2 核上几分钟（全参数 8×256 时每步 17 秒）
        from peft import get_peft_model

        model = get_peft_model(model, train.lora_config(args.demo_lora_r, 2 * args.demo_lora_r))
    # 全参数（冒烟的极小模型）仍是 8 × 256：批小了损失太抖，注入的尖峰会淹没在噪声里
    bs, seq = (4, 128) if args.demo_lora_r else (8, 256)
    tr, ev = data.split(convs, 0.15, args.seed)
    # assistant_masks 不是模型的输入：留着的话 collator 会把它一起补齐、传进 forward 报错
    enc = lambda cs: Dataset.from_list([data.tokenize_chat(tok, c, seq) for c in cs]).remove_columns(   # noqa: E731
        ["assistant_masks"])
    ev = ev[:24]   # 评估约 8 次，每次只要看出走向：24 条足够，多了评估比训练还慢
    # logging_steps=1：每步一个记录，尖峰才不会被平均掉；评估约 8 次，够画出验证曲线的走向
    # cosine + 预热：lr 先升后降，_planted 注入"调度器被重置"要求日志里已开始衰减，恒定 lr 没法注入
    targs = TrainingArguments(output_dir=str(out.path("demo_run")), max_steps=args.demo_steps, learning_rate=5e-4,
                              lr_scheduler_type="cosine", warmup_steps=3, per_device_train_batch_size=bs,
                              logging_steps=1, eval_strategy="steps", eval_steps=max(1, args.demo_steps // 8),
                              save_strategy="no", report_to=["tensorboard"],
                              seed=args.seed, dataloader_num_workers=0,
                              **train.trainer_flags(model, log=False))
    trainer = Trainer(model=model, args=targs, train_dataset=enc(tr), eval_dataset=enc(ev),
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True))
    trainer.train()
    trainer.state.save_to_json(str(out.path("demo_run/trainer_state.json")))   # 检查点里的同一份文件，不存权重
    return out.path("demo_run")
