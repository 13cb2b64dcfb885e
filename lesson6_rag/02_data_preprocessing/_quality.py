"""第 6 课 02 的数据质量报告：语言判定、覆盖率、质量计数，以及写成 quality_report.md 的表。

切块策略"看起来都能用"，问题藏在计数里：空块和重复块白占检索名额，过短块（孤立的标题）语义稀薄，
超过向量模型长度的块尾部被静默截断——这些只有数出来才看得见。
"""
from __future__ import annotations

import re
import statistics
from collections import Counter

from common.retrieval import Chunk


def lang_of(text: str) -> str:
    """按字符粗分 zh / en / mixed：汉字占（汉字 + 拉丁字母）的比例 ≥ 0.7 为 zh，≤ 0.1 为 en。"""
    cjk = sum("\u4e00" <= c <= "\u9fff" for c in text)   # 基本区汉字：区分中英文足够了
    # 必须加 isascii：str.isalpha() 对汉字也返回 True，否则汉字会被算两遍
    lat = sum(c.isascii() and c.isalpha() for c in text)
    if cjk + lat == 0:   # 只有数字、标点的块（表格碎片）：不归任何一种语言
        return "mixed"
    share = cjk / (cjk + lat)
    # 中文块里常夹着型号、英文缩写，英文块里几乎不出现汉字：所以 zh 的门槛（≥0.7）比 en 的（≤0.1）宽
    return "zh" if share >= 0.7 else "en" if share <= 0.1 else "mixed"


def coverage(docs, chunks: list[Chunk]) -> float:
    """文档里非空白字符被至少一个块覆盖的比例（切块不能丢内容：没进任何块的文字永远检索不到）。"""
    # 每篇文档一张逐字符的标记表：重叠区被相邻两块重复标记也只算一次，覆盖率不会超过 1
    covered = {d.id: bytearray(len(d.text)) for d in docs}
    for c in chunks:
        covered[c.doc_id][c.start:c.end] = b"\x01" * len(c.text)
    total = hit = 0
    for d in docs:
        for ch, flag in zip(d.text, covered[d.id]):
            if not ch.isspace():   # 空白不算：strip 掉块首尾的空白不是丢内容
                total += 1
                hit += flag
    return hit / max(1, total)


def quality(chunks: list[Chunk], tokenizer, max_tokens: int, min_chars: int) -> dict:
    """数据质量计数：空块、重复块、过短块、超过向量模型长度（会被截断）的块、语言分布、长度分布。"""
    # 先把空白归一再判空/重复：只差换行或多几个空格的两块算同一块，纯空白的块算空块
    norm = [re.sub(r"\s+", " ", c.text).strip() for c in chunks]
    lens = [len(c.text) for c in chunks]
    # 用向量模型自己的分词器数 token：同样的字符数，中文（一字一 token）与英文（一词 1~2 个）差得很远
    # add_special_tokens=True：[CLS]/[SEP] 也占 max_seq_length 的名额，不算进去会漏掉刚好超长的块；
    # 不截断（tokenizer 默认如此）才数得出真实长度；verbose=False 关掉"超过模型上限"的警告，超长正是这里要数的
    enc = tokenizer([c.text for c in chunks], add_special_tokens=True, verbose=False)
    ntok = [len(ids) for ids in enc["input_ids"]]
    seen, dup = set(), 0
    for t in norm:
        dup += t in seen and bool(t)   # 空块不算重复：它已单独计进 empty，否则一个空块会被数两次
        seen.add(t)
    langs = Counter(lang_of(c.text) for c in chunks)
    return {"chunks": len(chunks), "avg_len": round(statistics.mean(lens), 1), "max_len": max(lens),
            "empty": sum(not t for t in norm), "duplicate": dup,
            "too_short": sum(0 < len(t) < min_chars for t in norm),   # 下限 0 <：空块同理不重复计进过短
            "too_long": sum(n > max_tokens for n in ntok),
            "lang": {k: langs.get(k, 0) for k in ("zh", "en", "mixed")}}


def write_report(out, args, results: dict, n_docs: int, n_qas: int, max_tokens: int, clean_stats: dict,
                 k: int) -> None:
    """质量报告：一张表 + 名词解释，写成 quality_report.md（out：common.run.Run；args：脚本的 Args）。"""
    lines = ["# 切块数据质量报告", "", f"文档 {n_docs} 篇，问题 {n_qas} 个；向量模型 {args.resolved_model()}"
             f"（最长 {max_tokens} token）；清洗：{clean_stats}", "",
             "| 策略 | 块数 | 平均长度 | 最长 | 空 | 重复 | 过短 | 超长(截断) | zh/en/mixed | 覆盖率 "
             f"| dense R@{k} | BM25 R@{k} |", "|" + "---|" * 12]
    for name, r in results.items():
        lang = f"{r['lang']['zh']}/{r['lang']['en']}/{r['lang']['mixed']}"
        lines.append(f"| {name} | {r['chunks']} | {r['avg_len']} | {r['max_len']} | {r['empty']} | {r['duplicate']} "
                     f"| {r['too_short']} | {r['too_long']} | {lang} "
                     f"| {r['coverage']} | {r['recall_at_5']} | {r['bm25_recall_at_5']} |")
    # 名词解释写进报告本身：报告会被转给没跑过脚本的人看，"过短""超长"的口径要跟着表走
    lines += ["", f"- 过短：去掉空白后少于 {args.min_chunk_chars} 个字符；"
              f"超长：分词后超过向量模型的 {max_tokens} token，编码时尾部被截断。",
              "- zh/en/mixed：汉字占（汉字+拉丁字母）≥0.7 为 zh，≤0.1 为 en，其余 mixed。",
              "- dense = 向量检索（FAISS IndexFlatIP，余弦）；BM25 = jieba 分词后的关键词检索。",
              f"- 分语言 recall@{k}：" + "; ".join(f"{n} {r['by_lang']}" for n, r in results.items())]
    out.path("quality_report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
