"""答案比对（不是 metrics.json 的"指标"）：SQuAD 式规范化 + 精确匹配（EM）与词级 F1。

中文按字、英文/数字按词（CMRC 的混合切分）。
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter


def _answer_tokens(text: str) -> list[str]:
    """NFKC、小写、去掉英文冠词和标点后切词：中文每个字一个词，英文/数字按连续字母数字。"""
    text = re.sub(r"\b(a|an|the)\b", " ", unicodedata.normalize("NFKC", text).lower())
    return re.findall(r"[\u3400-\u9fff]|[a-z0-9]+", text)


def _normalize_answer(text: str) -> str:
    """规范化后的答案串（'1 个工作日' 与 '1个工作日。' 相同）。"""
    return "".join(_answer_tokens(text))


def exact_match(pred: str, gold: str) -> float:
    """规范化后完全相同为 1.0。"""
    return float(_answer_tokens(pred) == _answer_tokens(gold))


def token_f1(pred: str, gold: str) -> float:
    """词（字）级 F1：预测与标准答案共有词数的调和平均。"""
    p, g = _answer_tokens(pred), _answer_tokens(gold)
    same = sum((Counter(p) & Counter(g)).values())
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))


def contains_answer(pred: str, gold: str) -> bool:
    """规范化后的标准答案出现在预测里（生成式回答常带前后文，用它判对错）。"""
    g = _normalize_answer(gold)
    return bool(g) and g in _normalize_answer(pred)
