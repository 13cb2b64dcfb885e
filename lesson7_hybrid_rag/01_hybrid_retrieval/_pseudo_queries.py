"""伪问题（Inverse Cloze Task）：只用知识库自己的文字，造出训练向量模型与重排器的 (问题, 正例块) 对。

从块里抽一句当"问题"，它所在的块就是正例（Lee et al. 2019, ORQA 的预训练任务）。问答集一条都不碰：
dev/test 上报的增益才不是"在考题上训练"得来的。向量模型用批内负例（MultipleNegativesRankingLoss），
交叉编码器用第一阶段召回的难负例（BinaryCrossEntropyLoss；可选：--rerank-epochs > 0 才训练，分数作为学出来的重排器的
一个特征）。只有 01 用到，所以放在本节旁边。
"""
from __future__ import annotations

import random
import re

from common import retrieval


def pseudo_queries(chunks, per_chunk: int, limit: int, seed: int) -> list[tuple[str, int]]:
    """Inverse Cloze Task：从块里抽一句当"问题"，它所在的块就是正例。只用语料，不碰问答集（不泄漏）。"""
    rng, out = random.Random(seed), []
    for i, c in enumerate(chunks):
        # 按中英句末标点切句；短于 12 字符的句子（标题、"是的。"）信息太少，当问题只会教模型猜
        sents = [s.strip() for s in re.split(r"(?<=[。！？!?\n])|(?<=[.;])\s+", c.text) if len(s.strip()) >= 12]
        # min：只有一两句够长的块也能取；rng.sample 要的个数多于总数会抛 ValueError
        for s in rng.sample(sents, min(per_chunk, len(sents))):
            out.append((s, i))
    rng.shuffle(out)   # 先打乱再截断：--max-pseudo 小时伪问题仍来自整个语料，而不只是前几篇文档
    return out[:limit]


def ict_positive(text: str, sent: str, rng: random.Random) -> str:
    """正例通常去掉那句话本身（90%）：逼模型学"语义相关"而不是"原句照抄"。"""
    # 换成空格而不是直接删掉：前后两句的英文单词不会粘成一个原文没有的词
    rest = text.replace(sent, " ").strip()
    # 10% 保留原句是 ORQA 的做法：全删掉的话模型学不到"字面重合也算相关"，而真问题常与原文共享关键词；
    # 这句就是整块时 rest 为空，只能用原文
    return rest if rest and rng.random() < 0.9 else text


def freeze(model, n: int) -> None:
    """冻结词嵌入与底下 n 层：底层是通用的词法/句法，小数据上主要靠上层学"什么算相关"。"""
    # 末尾带点：换成 12 层的模型时 "layer.1." 不会误配 "layer.10."；
    # 按子串匹配：向量模型与交叉编码器的参数名前缀不同，同一个函数两边都能用
    frozen = ("embeddings.",) + tuple(f"layer.{i}." for i in range(n))
    for name, p in model.named_parameters():
        # n = 0 时连词嵌入也不冻：--freeze-layers 0 就是全参数微调
        if n and any(f in name for f in frozen):
            p.requires_grad = False


def adapt_embedder(args, out, pairs, chunks, device):
    """用伪问题 + 批内负例（MultipleNegativesRankingLoss）微调向量模型。"""
    # 在函数里导入：这几个包要拉起 torch/transformers，导入很慢；--help 和只导入脚本的测试不必付这个代价
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = retrieval.load_embedder(args.embedding_model, device)
    model.max_seq_length = args.max_length   # CPU 上训练时间随序列长度增长：截到 --max-length（MiniLM 默认 256）
    freeze(model, args.freeze_layers)
    rng = random.Random(args.seed)
    # 列的顺序就是损失的输入顺序：MultipleNegativesRankingLoss 把第一列当查询、第二列当正例
    ds = Dataset.from_dict({"anchor": [q for q, _ in pairs],
                            "positive": [ict_positive(chunks[i].text, q, rng) for q, i in pairs]})
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out.path("adapt_ckpt")), num_train_epochs=args.adapt_epochs, learning_rate=args.adapt_lr,
        # NO_DUPLICATES：同一批里不放重复的文本，否则"批内其它块当负例"会把正例本身当成负例
        # warmup_steps 小于 1 时 transformers 按总步数的比例算：总共才几步（256 个伪问题、批 32），写死整数会超过总步数
        per_device_train_batch_size=args.batch_size, warmup_steps=0.1, save_strategy="no", logging_steps=5,
        seed=args.seed, report_to=out.trainer_report_to(), batch_sampler=BatchSamplers.NO_DUPLICATES,
        # CPU 上没有 GPU 可拷，pin memory 只会多打一条警告
        use_cpu=device == "cpu", dataloader_pin_memory=False)
    trainer = SentenceTransformerTrainer(model=model, args=targs, train_dataset=ds,
                                         loss=MultipleNegativesRankingLoss(model))
    trainer.train()
    return model


def train_reranker(args, out, pairs, chunks, first_stage, device):
    """交叉编码器：伪问题 + 正例块（1）+ 第一阶段召回的难负例（0）。"""
    import torch
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    rows = {"query": [], "passage": [], "label": []}
    for (q, i), cands in zip(pairs, first_stage):
        # 同文档的块可能也答得上，不当负例（假负例会教重排器把对的块往后排）
        negs = [c for c in cands if c != i and chunks[c].doc_id != chunks[i].doc_id][:args.rerank_negatives]
        for c, y in [(i, 1.0)] + [(c, 0.0) for c in negs]:
            rows["query"].append(q)
            rows["passage"].append(chunks[c].text)
            rows["label"].append(y)
    # 从 MiniLM 向量模型起步（离线就有），加一个打分头：num_labels=1 输出一个相关度分数
    model = CrossEncoder(retrieval.default_embedding_model(), num_labels=1, max_length=args.max_length, device=device)
    freeze(model, args.freeze_layers)
    # 每个正例配 rerank_negatives 个负例：pos_weight = 负/正，否则"全判不相关"就有 75%（默认 1 正 3 负）的准确率
    n_pos = sum(rows["label"])
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(rows["label"]) - n_pos) / max(1.0, n_pos)))
    targs = CrossEncoderTrainingArguments(
        # 学习率比向量适配（--adapt-lr）大：打分头是新初始化的随机权重，要从零学起，3e-5 在这几步里几乎学不动它
        output_dir=str(out.path("rerank_ckpt")), num_train_epochs=args.rerank_epochs, learning_rate=1e-4,
        per_device_train_batch_size=16, warmup_steps=0.1, save_strategy="no", logging_steps=5, seed=args.seed,
        report_to=out.trainer_report_to(), use_cpu=device == "cpu", dataloader_pin_memory=False)
    CrossEncoderTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(rows), loss=loss).train()
    return model, len(rows["label"])


def cross_encoder(args, out, bm25, pairs, chunks, device: str):
    """交叉编码器是可选特征：--reranker 给了就加载现成的；--rerank-epochs > 0 就用伪问题现场训练（难负例来自 BM25
    的前 8 名）；都没有返回 (None, 0)，重排器只用第一阶段已有的证据。"""
    if args.reranker:
        return retrieval.load_cross_encoder(args.reranker, device), 0
    if not args.rerank_epochs:
        return None, 0
    # 难负例取 BM25 的前 8 名：和真问题的第一阶段候选一样"看起来相关"，重排器才学得到细分
    pseudo_first = [[i for i, _ in bm25.search(q, 8)] for q, _ in pairs]
    ce, n_pairs = train_reranker(args, out, pairs, chunks, pseudo_first, device)
    out.log.info(f"交叉编码器：伪问题训练对 {n_pairs} 个（正例 + 第一阶段召回的难负例）")
    return ce, n_pairs
