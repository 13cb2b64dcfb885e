"""混合检索：BM25（jieba）+ 向量检索，按 dev 调权融合（RRF 与归一化分数的凸组合），再用交叉编码器重排。

要点：
  - 每个检索器单独报：默认向量模型 all-MiniLM-L6-v2 是英文模型，在中文为主的知识库上比 BM25 弱得多，
    等权融合会把 BM25 拖下水；所以融合权重在 dev 上从网格里挑（网格含 0 和 1 两个端点 = 单用一路），
    dev 上融合结果就不可能比最好的单路差，脚本会说明结果主要靠哪一路；
  - 离线领域适配：只用语料本身造"伪问题"（从块里抽一句当问题、其余部分当正例，即 Inverse Cloze Task），
    用 sentence-transformers 的 MultipleNegativesRankingLoss（批内其它块当负例）微调向量模型，报告适配前后的召回；
  - 重排要挣到自己的位置：交叉编码器同样用伪问题训练（第一阶段召回的非正例块做难负例），
    再把重排名次与第一阶段名次做 RRF（权重在 dev 上挑，0 = 不重排）；dev 上没有更好就不用，并如实报告增益。
  所有指标在整个 test 切分上计算（recall@1/5、MRR、nDCG@10）。

运行：
  python lesson7_hybrid_rag/01_hybrid_retrieval/hybrid_retrieval.py            # CPU，全部 44 篇文档
  python lesson7_hybrid_rag/01_hybrid_retrieval/hybrid_retrieval.py --smoke    # 一半文档、少量训练步
  python lesson7_hybrid_rag/01_hybrid_retrieval/hybrid_retrieval.py --embedding-model BAAI/bge-small-zh-v1.5 \\
      --reranker BAAI/bge-reranker-base --config configs/lesson7/hybrid_retrieval.yaml   # GPU / 中文向量模型

你会看到（冒烟实测，test 34 题）：BM25 recall@5 0.79、MRR 0.63 远强于 MiniLM 0.56 / 0.39；dev 选出的凸组合
（向量权重 0.5）test recall@5 0.88、MRR 0.67，同时胜过两路；伪问题适配后向量 test recall@5 0.56 → 0.59；
重排在 dev 上没有提升，选出权重 0（rerank_gain_r1 = 0）。默认运行（test 67 题）：BM25 0.76 / 0.57，
向量 0.49 / 0.38（适配后 0.54），dev 调权的凸组合 0.84 / 0.64（recall@5 / MRR），主要靠 BM25；重排同样不采用。
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from common import cli, data, models, retrieval, run
from common.errors import UserError

SMOKE = dict(doc_stride=2, pseudo_per_chunk=1, max_pseudo=32, batch_size=16, rerank_candidates=5, max_length=96,
             rerank_negatives=2)
GRID = [round(x * 0.1, 1) for x in range(11)]           # 0 = 只用 BM25，1 = 只用向量


@dataclass
class Args(retrieval.KBArgs):
    chunk_size: int = cli.arg(300, "切块长度（字符）", min=50)
    chunk_overlap: int = cli.arg(50, "相邻块重叠（字符）", min=0)
    dev_fraction: float = cli.arg(0.5, "问答集中划给 dev（调权重）的比例，其余为 test（报告）", min=0.1, max=0.9)
    depth: int = cli.arg(50, "每一路取前多少个候选参与融合", min=10)
    rrf_k: int = cli.arg(60, "RRF 的平滑常数 k：score = Σ w / (k + rank)", min=1)
    doc_stride: int = cli.arg(1, "每隔几篇取一篇文档（1 = 全部；--smoke 时 2）", min=1)
    pseudo_per_chunk: int = cli.arg(2, "每块造几个伪问题（领域适配与重排器训练共用）", min=1, max=5)
    max_pseudo: int = cli.arg(256, "伪问题总数上限（CPU 上控制训练时间）", min=8)
    max_length: int = cli.arg(128, "领域适配与重排器训练/打分时的最多 token 数（中文一字一 token；CPU 耗时与它成正比）",
                              min=32)
    adapt_epochs: int = cli.arg(1, "向量模型领域适配的轮数（0 = 不适配）", min=0)
    adapt_lr: float = cli.arg(3e-5, "领域适配学习率", min=0)
    batch_size: int = cli.arg(32, "适配时的批大小：批内其它块就是负例，批越大负例越多", min=2)
    reranker: str = cli.arg(None, "现成的交叉编码器（本地目录或 hub id，如 BAAI/bge-reranker-base）；不填则用伪问题现场训练")
    rerank_epochs: int = cli.arg(1, "重排器训练轮数", min=1)
    rerank_negatives: int = cli.arg(3, "每个伪问题取几个难负例（第一阶段召回、来自别的文档的块）", min=1)
    rerank_candidates: int = cli.arg(20, "交给重排器的候选数", min=2)
    freeze_layers: int = cli.arg(3, "训练时冻结 MiniLM 词嵌入与最底下 N 层（共 6 层）：反向传播只走上层，CPU 上快近一倍",
                                 min=0, max=6)


def pseudo_queries(chunks, per_chunk: int, limit: int, seed: int) -> list[tuple[str, int]]:
    """Inverse Cloze Task：从块里抽一句当"问题"，它所在的块就是正例。只用语料，不碰问答集（不泄漏）。"""
    rng, out = random.Random(seed), []
    for i, c in enumerate(chunks):
        sents = [s.strip() for s in re.split(r"(?<=[。！？!?\n])|(?<=[.;])\s+", c.text) if len(s.strip()) >= 12]
        for s in rng.sample(sents, min(per_chunk, len(sents))):
            out.append((s, i))
    rng.shuffle(out)
    return out[:limit]


def ict_positive(text: str, sent: str, rng: random.Random) -> str:
    """正例通常去掉那句话本身（90%）：逼模型学"语义相关"而不是"原句照抄"。"""
    rest = text.replace(sent, " ").strip()
    return rest if rest and rng.random() < 0.9 else text


def freeze(model, n: int) -> None:
    """冻结词嵌入与底下 n 层：底层是通用的词法/句法，小数据上主要靠上层学"什么算相关"。"""
    frozen = ("embeddings.",) + tuple(f"layer.{i}." for i in range(n))
    for name, p in model.named_parameters():
        if n and any(f in name for f in frozen):
            p.requires_grad = False


def adapt_embedder(args, out, pairs, chunks, device):
    """用伪问题 + 批内负例（MultipleNegativesRankingLoss）微调向量模型。"""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import BatchSamplers

    model = retrieval.load_embedder(args.embedding_model, device)
    model.max_seq_length = args.max_length
    freeze(model, args.freeze_layers)
    rng = random.Random(args.seed)
    ds = Dataset.from_dict({"anchor": [q for q, _ in pairs],
                            "positive": [ict_positive(chunks[i].text, q, rng) for q, i in pairs]})
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(out.path("adapt_ckpt")), num_train_epochs=args.adapt_epochs, learning_rate=args.adapt_lr,
        per_device_train_batch_size=args.batch_size, warmup_steps=0.1, save_strategy="no", logging_steps=5,
        seed=args.seed, report_to=out.trainer_report_to(), batch_sampler=BatchSamplers.NO_DUPLICATES,
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
        negs = [c for c in cands if c != i and chunks[c].doc_id != chunks[i].doc_id][:args.rerank_negatives]   # 同文档的块可能也答得上，不当负例
        for c, y in [(i, 1.0)] + [(c, 0.0) for c in negs]:
            rows["query"].append(q)
            rows["passage"].append(chunks[c].text)
            rows["label"].append(y)
    model = CrossEncoder(retrieval.default_embedding_model(), num_labels=1, max_length=args.max_length, device=device)
    freeze(model, args.freeze_layers)
    n_pos = sum(rows["label"])
    loss = BinaryCrossEntropyLoss(model, pos_weight=torch.tensor((len(rows["label"]) - n_pos) / max(1.0, n_pos)))
    targs = CrossEncoderTrainingArguments(
        output_dir=str(out.path("rerank_ckpt")), num_train_epochs=args.rerank_epochs, learning_rate=1e-4,
        per_device_train_batch_size=16, warmup_steps=0.1, save_strategy="no", logging_steps=5, seed=args.seed,
        report_to=out.trainer_report_to(), use_cpu=device == "cpu", dataloader_pin_memory=False)
    CrossEncoderTrainer(model=model, args=targs, train_dataset=Dataset.from_dict(rows), loss=loss).train()
    return model, len(rows["label"])


def convex(bm25_run, dense_run, w: float) -> list[int]:
    """归一化分数的凸组合：每一路 min-max 到 [0,1]，score = w·dense + (1-w)·bm25（缺席记 0）。"""
    def norm(r):
        if not r:
            return {}
        lo, hi = min(s for _, s in r), max(s for _, s in r)
        return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in r}
    b, d = norm(bm25_run), norm(dense_run)
    score = {i: w * d.get(i, 0.0) + (1 - w) * b.get(i, 0.0) for i in (*b, *d)}
    return sorted(score, key=lambda i: -score[i])


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)
    log, device = out.log, models.pick_device(args.device).type
    if args.chunk_overlap >= args.chunk_size:
        raise UserError(f"--chunk-overlap {args.chunk_overlap}: 必须小于 --chunk-size {args.chunk_size}")

    # 1. 数据：知识库切块；问答按种子切成 dev（调权重、决定要不要重排）与 test（报告）
    docs, by_id, qas = retrieval.load_kb(args.docs, args.qa)
    docs = docs[::args.doc_stride]
    by_id = {d.id: d for d in docs}
    qas = [q for q in qas if (q["doc_id"] in by_id if q["doc_id"] else any(q["gold_passage"] in d.text for d in docs))]
    if len(qas) < 4:
        raise UserError(f"--qa: 只有 {len(qas)} 个问题能在所选文档里找到答案，不够切 dev/test")
    test, dev = data.split(qas, args.dev_fraction, args.seed)
    chunks = retrieval.chunk_documents(docs, args.chunk_size, args.chunk_overlap)
    split_q = {"dev": dev, "test": test}
    log.info(f"{len(docs)} 篇文档 → {len(chunks)} 块；问答 dev {len(dev)} / test {len(test)}")

    def evaluate(runs: dict) -> dict:
        return {sp: retrieval.evaluate(retrieval.hits_matrix([r[:10] for r in runs[sp]], split_q[sp], chunks, by_id),
                                       (1, 5, 10)) for sp in runs}

    # 2. 单路检索：BM25（jieba 分词）与 MiniLM 向量（FAISS 精确内积），分数一并留着给凸组合用
    depth = min(args.depth, len(chunks))
    bm25 = retrieval.BM25Index([c.text for c in chunks])
    scored = {"bm25": {sp: [bm25.search(q["question"], depth) for q in qs] for sp, qs in split_q.items()}}

    def dense_runs(model):
        index = retrieval.DenseIndex(retrieval.embed(model, [c.text for c in chunks]))
        return {sp: index.search_vectors(retrieval.embed(model, [q["question"] for q in qs]), depth)
                for sp, qs in split_q.items()}
    scored["dense"] = dense_runs(retrieval.load_embedder(args.embedding_model, device))

    # 3. 离线领域适配：语料自己造伪问题，批内负例微调向量模型（问答集一条都不用）
    pairs = pseudo_queries(chunks, args.pseudo_per_chunk, args.max_pseudo, args.seed)
    if args.adapt_epochs:
        log.info(f"领域适配：{len(pairs)} 个伪问题，批大小 {args.batch_size}，{args.adapt_epochs} 轮")
        scored["dense_adapted"] = dense_runs(adapt_embedder(args, out, pairs, chunks, device))
    ranked = {m: {sp: [[i for i, _ in r] for r in rs] for sp, rs in v.items()} for m, v in scored.items()}
    single = {m: evaluate(r) for m, r in ranked.items()}
    for m, s in single.items():
        log.info(f"{m:14s} dev R@5={s['dev']['recall_at_5']:.3f} MRR={s['dev']['mrr']:.3f} | "
                 f"test R@5={s['test']['recall_at_5']:.3f} MRR={s['test']['mrr']:.3f}")

    # 4. 融合：向量一路取 dev 上更好的那个（原始 / 适配后），两种融合的权重都在 dev 上从 0..1 网格挑
    def key(s):
        return s["recall_at_5"], s["mrr"], s["ndcg_at_10"]
    dense_side = max((m for m in single if m.startswith("dense")), key=lambda m: key(single[m]["dev"]))
    fusers = {"rrf": lambda sp, i, w: retrieval.rrf([ranked[dense_side][sp][i], ranked["bm25"][sp][i]], [w, 1 - w],
                                                    args.rrf_k),
              "convex": lambda sp, i, w: convex(scored["bm25"][sp][i], scored[dense_side][sp][i], w)}
    fusion_weights, methods_runs = {}, {m: r for m, r in ranked.items()}
    for name, fuse in fusers.items():
        dev_scores = {w: evaluate({"dev": [fuse("dev", i, w) for i in range(len(dev))]})["dev"] for w in GRID}
        w = max(GRID, key=lambda g: (key(dev_scores[g]), -abs(g - 0.5)))   # 并列时取更居中的权重
        fusion_weights[name] = {"dense": w, "bm25": round(1 - w, 1), "dense_side": dense_side,
                                "dev_recall_at_5_by_weight": {str(g): dev_scores[g]["recall_at_5"] for g in GRID}}
        methods_runs[f"hybrid_{name}"] = {sp: [fuse(sp, i, w) for i in range(len(qs))] for sp, qs in split_q.items()}
        log.info(f"{name} 融合：dev 选出向量权重 {w}（{dense_side}），dev R@5 {dev_scores[w]['recall_at_5']:.3f}")
    fused = {m: evaluate(methods_runs[m]) for m in ("hybrid_rrf", "hybrid_convex")}
    best_fusion = max(fused, key=lambda m: key(fused[m]["dev"]))

    # 5. 重排：交叉编码器给前 N 个候选打分，再与第一阶段名次 RRF（权重在 dev 上挑，0 = 不重排）
    first = methods_runs[best_fusion]
    if args.reranker:
        from sentence_transformers.cross_encoder import CrossEncoder
        try:
            ce, n_pairs = CrossEncoder(args.reranker, device=device), 0
        except Exception as e:  # noqa: BLE001 - 路径不对 / 离线找不到，统一成一行
            raise UserError(f"--reranker {args.reranker}: 无法加载（{type(e).__name__}）") from None
    else:
        pseudo_first = [[i for i, _ in bm25.search(q, 8)] for q, _ in pairs]
        ce, n_pairs = train_reranker(args, out, pairs, chunks, pseudo_first, device)
        log.info(f"重排器：伪问题训练对 {n_pairs} 个（正例 + 第一阶段召回的难负例）")
    n = min(args.rerank_candidates, depth)
    ce_rank = {sp: [] for sp in split_q}
    for sp, qs in split_q.items():
        for q, cands in zip(qs, first[sp]):
            s = ce.predict([(q["question"], chunks[c].text) for c in cands[:n]], show_progress_bar=False)
            ce_rank[sp].append([c for _, c in sorted(zip(s, cands[:n]), key=lambda t: -t[0])])

    def with_rerank(sp, i, w):
        return retrieval.rrf([ce_rank[sp][i], first[sp][i][:n]], [w, 1 - w], args.rrf_k) + first[sp][i][n:]
    rr_dev = {w: evaluate({"dev": [with_rerank("dev", i, w) for i in range(len(dev))]})["dev"] for w in GRID}
    w_rr = max(GRID, key=lambda g: (key(rr_dev[g]), -g))                      # 并列时取更小的重排权重（更省）
    methods_runs[f"{best_fusion}+rerank"] = {sp: [with_rerank(sp, i, w_rr) for i in range(len(qs))]
                                             for sp, qs in split_q.items()}
    fused[f"{best_fusion}+rerank"] = evaluate(methods_runs[f"{best_fusion}+rerank"])
    fusion_weights["rerank"] = {"reranker": w_rr, "first_stage": round(1 - w_rr, 1), "candidates": n}
    log.info(f"重排：dev 选出重排权重 {w_rr}" + ("（= 不重排：在 dev 上没有带来提升）" if w_rr == 0 else ""))

    # 6. 汇总：test 上报告；best_method 按 dev 选出（不偷看 test）
    all_scores = {**single, **fused}
    methods = {m: {k: s["test"][k] for k in ("recall_at_1", "recall_at_5", "mrr", "ndcg_at_10")}
               for m, s in all_scores.items()}
    best_method = max(all_scores, key=lambda m: (key(all_scores[m]["dev"]), "+" not in m, m.startswith("hybrid")))
    # 谁撑起了融合结果：test 上融合的第 1 名与哪一路的第 1 名相同的比例更高
    agree = {m: round(sum(f[:1] == r[:1] for f, r in zip(methods_runs[best_fusion]["test"], ranked[m]["test"]))
                      / len(test), 4) for m in ("bm25", dense_side)}
    carrier = max(agree, key=agree.get)
    adapted_gain = (round(methods["dense_adapted"]["recall_at_5"] - methods["dense"]["recall_at_5"], 4)
                    if "dense_adapted" in methods else 0.0)
    rerank_gain = round(methods[f"{best_fusion}+rerank"]["recall_at_1"] - methods[best_fusion]["recall_at_1"], 4)
    fig, save = out.plot("methods_test.png")
    ax = fig.add_subplot(111)
    names = list(methods)
    for j, k in enumerate(("recall_at_1", "recall_at_5", "mrr")):
        ax.bar([x + j * 0.27 for x in range(len(names))], [methods[m][k] for m in names], width=0.27, label=k)
    ax.set_xticks([x + 0.27 for x in range(len(names))])
    ax.set_xticklabels(names, rotation=20, fontsize=7)
    ax.set(ylabel="test score", title=f"retrievers on the test split ({len(test)} questions)")
    ax.legend()
    save()
    return out.finish({"methods": methods, "best_method": best_method, "fusion_weights": fusion_weights,
                       "dense_adapted_gain": adapted_gain, "rerank_gain_r1": rerank_gain, "carried_by": carrier, "top1_agreement": agree,
                       "dev_methods": {m: s["dev"] for m, s in all_scores.items()}, "pseudo_queries": len(pairs),
                       "rerank_pairs": n_pairs, "chunks": len(chunks), "dev_questions": len(dev),
                       "test_questions": len(test)},
                      summary=f"best={best_method}（dev 选出），test R@5={methods[best_method]['recall_at_5']}、"
                              f"MRR={methods[best_method]['mrr']}；bm25 R@5={methods['bm25']['recall_at_5']}、"
                              f"dense={methods['dense']['recall_at_5']}；主力={carrier}；"
                              f"适配增益 {adapted_gain:+.3f}，重排 R@1 增益 {rerank_gain:+.3f}")


if __name__ == "__main__":
    main(cli.parse(Args))
