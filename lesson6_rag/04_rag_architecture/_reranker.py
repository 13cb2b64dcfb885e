"""第 6 课 04 的重排器：把 MiniLM 训练成交叉编码器（问题, 块）→ 是否金标；重排、融合、在 dev 上挑权重。

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
        # 候选里也可能有金标（重叠切块时相邻两块都覆盖了它）：排除掉，否则同一段文字既当正例又当负例
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
        # 缓存命中时训练对数记 0、没有损失曲线：metrics 里看得出这次没有真的训练
        return CrossEncoder(str(cache), max_length=max_length, device=device), 0, None
    n_pos = sum(rows["label"])
    out.log.info(f"重排器：从 MiniLM 初始化，训练对 {len(rows['label'])} 个（正 {n_pos:.0f} / 负 "
                 f"{len(rows['label']) - n_pos:.0f}），{epochs} 轮")
    # num_labels=1：输出一个相关度分数，配下面的二分类 BCE 损失，而不是多类 softmax
    model = CrossEncoder(base, num_labels=1, max_length=max_length, device=device)
    # 冻结词嵌入和底层：底层学的是通用的词法/句法，小数据上主要靠上层学"问题与段落是否匹配"
    # 按 BERT 结构的参数名匹配（embeddings.* 与 encoder.layer.{i}.*），末尾带点，layer.1. 不会误配 layer.10.；
    # 换成别的结构的基座，这里可能一个参数也冻不住
    frozen = ("embeddings.",) + tuple(f"layer.{i}." for i in range(args.rerank_freeze_layers))
    for name, p in model.model.named_parameters():
        if any(f in name for f in frozen):
            p.requires_grad = False
    # 负例是正例的好几倍，给正例加权（权重 = 负/正），免得模型学会"全判负"也能拿到低损失
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(rows["label"]) - n_pos) / max(1.0, n_pos)))
    targs = CrossEncoderTrainingArguments(
        output_dir=str(out.path("reranker_ckpt")), num_train_epochs=epochs, learning_rate=args.rerank_lr,
        # warmup_steps=0.1：transformers 把小于 1 的值当作总步数的比例；save_strategy="no"：不存中间检查点，
        # 训完只在下面 save_pretrained 一次；设备与精度开关由 common.train.trainer_flags 统一给（CPU fp32）
        per_device_train_batch_size=16, warmup_steps=0.1, save_strategy="no", logging_steps=5, seed=args.seed,
        report_to=out.trainer_report_to(), **train.trainer_flags(model))
    trainer = CrossEncoderTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(rows), loss=loss)
    result = trainer.train()
    # 每 logging_steps 步记一次的损失；步数太少没记到时，用整轮的平均损失
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [result.training_loss]
    # 先存模型、最后写指纹：训练或保存中途被打断时没有指纹，下次不会把半成品当缓存加载
    model.save_pretrained(str(cache))
    (cache / "fingerprint.txt").write_text(key)
    return model, len(rows["label"]), losses


def rerank(reranker, chunks, qs: list[dict], ranked: list[list[int]]) -> list[list[int]]:
    """每个问题的候选交给交叉编码器重新排序（common.retrieval.rerank）。"""
    texts = [c.text for c in chunks]
    return [retrieval.rerank(reranker, q["question"], cand, texts) for q, cand in zip(qs, ranked)]


def fuse(first: list[list[int]], reranked: list[list[int]], w: float) -> list[list[int]]:
    """RRF 融合第一阶段与重排器的名次：w=0 只信第一阶段，w 很大时只信重排器。

    k=5 而不是常用的 60：这里只有 N≤10 个候选，k=60 时第 1 名与第 10 名的分数只差约 13%，名次几乎不起作用。
    """
    return [retrieval.rrf([f, r], [1.0, w], k=5) for f, r in zip(first, reranked)]


def pick_weight(reranker, chunks, by_id, dev_q: list[dict], dev_first: list[list[int]]) -> tuple[float, dict]:
    """在 dev 上挑重排器与第一阶段的融合权重：(MRR, recall@5) 最高的那个。返回 (权重, {权重: (MRR, recall@5)})。

    权重网格含 0 = 不用重排器：小数据训出的重排器可能不如 BM25（冒烟时单用它 MRR 只有约 0.2），不能默认它更好。
    """
    dev_rr = rerank(reranker, chunks, dev_q, dev_first)
    # 权重 100 ≈ 只信重排器：重排相邻名次的分差放大 100 倍后，远大于第一阶段名次能造成的分差，
    # 融合结果就是重排器的顺序
    hits = {w: retrieval.hits_matrix(fuse(dev_first, dev_rr, w), dev_q, chunks, by_id)
            for w in (0.0, 0.5, 1.0, 2.0, 100.0)}
    dev_score = {w: (round(retrieval.mrr(h), 4), round(retrieval.recall_at_k(h, 5), 4)) for w, h in hits.items()}
    best = max(dev_score, key=lambda w: (dev_score[w], w))   # 并列时取更信重排器的
    # dev 只有二十几题：网格上最好的一格要比"不重排"好出噪声才用（参考运行挑中 0.5，test 上 MRR 反降 0.05）
    return (best if best == 0.0 or retrieval.clearly_better(hits[best], hits[0.0]) else 0.0), dev_score
