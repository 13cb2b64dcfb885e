"""学出来的重排器（learning to rank）：把第一阶段已有的证据拼成特征，在 dev 的真问题上学一个打分函数。

为什么不是现场训练的交叉编码器：它从英文 MiniLM 起步（读不了中文），CPU 上只能见几百个伪问题——伪问题是块里的
原句，真问题是改写过的说法，学到的是"原句照抄"；在本知识库上它单独排序不比随机好（--rerank-epochs 1 可以自己测，
metrics 的 rerank.cross_encoder_alone）。而第一阶段的候选里几乎总有金标（rerank.oracle_recall_at_1），缺的是
"该信哪一路"：英文问题上 MiniLM 懂改写，中文问题上 BM25 与 LSA 才可靠。这正是排序学习擅长的——
搜索引擎的第二阶段就是这样做的（LambdaMART 等，交叉编码器的分数只是其中一个特征）。

特征（每个候选一行）：第一阶段名次；每一路检索器（BM25、MiniLM、适配后 MiniLM、LSA）的 min-max 分数与倒数名次；
问题词的 IDF 覆盖率；字 2/3 元组重合率；块长度；给了交叉编码器时它的分数。每个特征按"问题含不含汉字"拆成两列，
模型才能学出"英文题信 MiniLM、中文题信字面"这种随语言变的权重。
模型：逻辑回归（scikit-learn，十几个权重，几十道 dev 题学得动、不易过拟合）；正则强度 C 用 dev 上的 5 折交叉验证挑，
dev 上报的是折外（没见过那道题的模型给的）排名：拿它和第一阶段做配对自助法，好出噪声才采用。
"""
from __future__ import annotations

import math
import re

from common import data, retrieval

CS = (0.1, 0.3, 1.0, 3.0)    # 正则强度候选：C 越小权重越收敛，dev 只有几十题时偏小的 C 更稳
FOLDS = 5


def minmax(run: list[tuple[int, float]]) -> dict[int, float]:
    """一路的分数 min-max 到 [0, 1]：BM25 是几十、余弦是 0..1，不先各自归一化就没法放在一起比。"""
    if not run:
        return {}
    lo, hi = min(s for _, s in run), max(s for _, s in run)
    # hi == lo（只有一个候选或分数全相同）时直接除会除零：记 1.0，即这一路认为它们一样好
    return {i: (s - lo) / (hi - lo) if hi > lo else 1.0 for i, s in run}


def _grams(text: str, n: int) -> set[str]:
    """去掉空白后的字 n 元组（中文不用分词，英文也能用）。"""
    t = re.sub(r"\s+", "", text.lower())
    return {t[i:i + n] for i in range(len(t) - n + 1)}


def features(question: str, cands: list[int], runs: dict, bm25, texts: list[str], ce: dict | None = None):
    """一题的前 n 个候选 → 特征矩阵（行 = 候选）。runs: {检索器: 这一题的 [(块, 分数)]}；ce: {块: 交叉编码器分数}。"""
    import numpy as np

    idf = bm25.bm25.idf
    top = max(idf.values(), default=1.0)       # 语料里没出现过的词按最稀有的算：问题里的生词最有区分度
    qt = set(retrieval.bm25_tokens(question))
    q_idf = sum(idf.get(w, top) for w in qt) or 1.0
    qg = {n: _grams(question, n) for n in (2, 3)}
    per_run = []
    for run in runs.values():
        norm, rank = minmax(run), {c: k for k, (c, _) in enumerate(run)}
        per_run.append([(norm.get(c, 0.0), 1 / (1 + rank[c]) if c in rank else 0.0) for c in cands])
    rows = []
    for k, c in enumerate(cands):
        # bm25.bm25.doc_freqs[c] 就是块 c 分好的词（rank-bm25 建索引时存的），不必再跑一遍 jieba
        cover = sum(idf.get(w, top) for w in qt if w in bm25.bm25.doc_freqs[c]) / q_idf
        overlap = [len(qg[n] & _grams(texts[c], n)) / max(1, len(qg[n])) for n in (2, 3)]
        rows.append([1 / (1 + k), cover, *overlap, math.log1p(len(texts[c]))]
                    + [v for r in per_run for v in r[k]] + ([ce[c]] if ce is not None else []))
    x = np.array(rows, dtype="float64")
    zh = float(data.detect_lang(question) == "zh")   # 按字判（含汉字即中文）：学生的 --qa 没有 lang 字段也能用
    # 按语言拆成两组列：同一个特征在中文题、英文题上可以有不同的权重
    return np.hstack([x * zh, x * (1 - zh)])


def fit(c: float, xs: list, ys: list):
    """在若干题上拟合逻辑回归（交叉验证的每一折；挑出 C 后再用全部 dev 题拟合一次给 test 用）。

    这些题的候选里全是负例（或全是正例）时学不出东西，返回 None。
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.concatenate(ys) if ys else np.array([])
    if len(set(y.tolist())) < 2:
        return None
    # 标准化后再正则：各特征尺度不同（名次倒数、覆盖率、log 长度），不标准化 C 就对各特征不公平
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(np.vstack(xs), y)


def _order(model, x, cands: list[int]) -> list[int]:
    """按模型分数重排；模型学不出来（None）时保持第一阶段的顺序。稳定排序：同分保持原顺序。"""
    import numpy as np

    if model is None:
        return list(cands)
    return [cands[j] for j in np.argsort(-model.decision_function(x), kind="stable")]


def cross_validate(xs: list, ys: list, cands: list[list[int]], key, seed: int) -> tuple[float, list[list[int]]]:
    """dev 上 5 折交叉验证挑 C：每道题由没见过它的模型排序（折外排名）。返回 (C, 该 C 下 dev 的折外排名)。

    key(排名列表) -> 可比较的分数（与融合挑权重用的是同一个 dev_key）。
    """
    import random

    idx = list(range(len(xs)))
    random.Random(seed).shuffle(idx)
    fold = {q: k % FOLDS for k, q in enumerate(idx)}
    best = None
    for c in CS:
        ranked = [None] * len(xs)
        for f in range(FOLDS):
            model = fit(c, [xs[q] for q in idx if fold[q] != f], [ys[q] for q in idx if fold[q] != f])
            for q in (q for q in idx if fold[q] == f):
                ranked[q] = _order(model, xs[q], cands[q])
        # 并列时取更小的 C（更强的正则）：在几十题上分不出高下时，宁可要更平滑的模型
        if best is None or key(ranked) > best[0]:
            best = (key(ranked), c, ranked)
    return best[1], best[2]


def rank_with(model, xs: list, cands: list[list[int]]) -> list[list[int]]:
    """最终模型给每题的候选重排。"""
    return [_order(model, x, c) for x, c in zip(xs, cands)]


def coefficients(model, names: list[str]) -> dict[str, float]:
    """标准化后的权重（可比大小）：学生看得到模型在中文题、英文题上各信哪一路。"""
    if model is None:
        return {}
    coef = model[-1].coef_[0]
    return {f"{lang}.{n}": round(float(w), 3) for (lang, n), w in
            zip([(lang, n) for lang in ("zh", "other") for n in names], coef)}
