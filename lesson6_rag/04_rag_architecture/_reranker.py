"""第 6 课 04 的重排器训练：用 CrossEncoderTrainer 把 MiniLM 训练成交叉编码器（问题, 块）→ 是否金标。

为什么要自己训：现成的中文重排器（bge-reranker）要联网下载几百 MB；这里用离线就有的 MiniLM 现场训一个，
让整条"检索 → 重排 → 生成"在没有网络的 CPU 上也能跑通。代价是它很弱，所以脚本在 dev 上决定用不用它。
"""
from __future__ import annotations

import hashlib
import json

from common import retrieval, train


def training_pairs(train_q: list[dict], ranked: list[list[int]], chunks, by_id, negatives: int) -> dict:
    """(问题, 块, 标签) 三列：正例是金标块，负例是第一阶段排得靠前、却不是金标的块（难负例）。

    随机负例太容易（一眼就看出不相关），模型学不到东西；重排器上线后面对的正是第一阶段的前几名，负例就从那里取。
    """
    rows = {"query": [], "passage": [], "label": []}
    for q, rank in zip(train_q, ranked):
        # 正例不在候选里也从整个库里找出来：第一阶段漏掉的金标，正是重排器最该学会认出的
        pos = [c for c in chunks if retrieval.is_hit(c, q, by_id)][:2]
        neg = [chunks[i] for i in rank if not retrieval.is_hit(chunks[i], q, by_id)][:negatives]
        for c, y in [(c, 1.0) for c in pos] + [(c, 0.0) for c in neg]:
            for k, v in zip(("query", "passage", "label"), (q["question"], c.text, y)):
                rows[k].append(v)
    return rows


def train_reranker(args, out, train_q: list[dict], ranked: list[list[int]], chunks, by_id, device: str):
    """用 CrossEncoderTrainer 把 MiniLM 训练成重排器：(问题, 块) -> 是否金标。有匹配的缓存就直接加载。

    args：脚本的 Args（rerank_* 几个参数）；out：common.run.Run。返回 (重排器, 训练对数, 损失曲线)。
    """
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    base, epochs, max_length = retrieval.default_embedding_model(), args.rerank_epochs, args.rerank_max_length
    rows = training_pairs(train_q, ranked, chunks, by_id, args.rerank_negatives)
    # 指纹 = 训练数据 + 全部超参：只调生成参数时重跑脚本不必再训一遍；任何一项变了，缓存就作废
    key = hashlib.sha256(json.dumps([base, rows, epochs, args.rerank_lr, args.seed, max_length,
                                     args.rerank_freeze_layers]).encode()).hexdigest()
    cache = out.path("reranker")
    if (cache / "fingerprint.txt").exists() and (cache / "fingerprint.txt").read_text() == key:
        out.log.info(f"重排器：训练数据与参数未变，直接加载缓存 {cache}")
        return CrossEncoder(str(cache), max_length=max_length, device=device), 0, None
    n_pos = sum(rows["label"])
    out.log.info(f"重排器：从 MiniLM 初始化，训练对 {len(rows['label'])} 个（正 {n_pos:.0f} / 负 "
                 f"{len(rows['label']) - n_pos:.0f}），{epochs} 轮")
    model = CrossEncoder(base, num_labels=1, max_length=max_length, device=device)
    # 冻结词嵌入和底层：底层学的是通用的词法/句法，小数据上主要靠上层学"问题与段落是否匹配"
    frozen = ("embeddings.",) + tuple(f"layer.{i}." for i in range(args.rerank_freeze_layers))
    for name, p in model.model.named_parameters():
        if any(f in name for f in frozen):
            p.requires_grad = False
    # 负例是正例的好几倍，给正例加权（权重 = 负/正），免得模型学会"全判负"也能拿到低损失
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(rows["label"]) - n_pos) / max(1.0, n_pos)))
    targs = CrossEncoderTrainingArguments(
        output_dir=str(out.path("reranker_ckpt")), num_train_epochs=epochs, learning_rate=args.rerank_lr,
        per_device_train_batch_size=16, warmup_steps=0.1, save_strategy="no", logging_steps=5, seed=args.seed,
        report_to=out.trainer_report_to(), **train.trainer_flags(model))
    trainer = CrossEncoderTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(rows), loss=loss)
    result = trainer.train()
    # 每 logging_steps 步记一次的损失；步数太少没记到时，用整轮的平均损失
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [result.training_loss]
    model.save_pretrained(str(cache))
    (cache / "fingerprint.txt").write_text(key)
    return model, len(rows["label"]), losses
