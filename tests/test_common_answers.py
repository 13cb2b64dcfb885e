"""common.answers：SQuAD 式规范化与 EM / F1 / 包含判定，对照手算；中文按字、英文按词。"""
import pytest

from common import answers


def test_normalization():
    assert answers._answer_tokens("The 1 个工作日。") == ["1", "个", "工", "作", "日"]   # 冠词、标点去掉，中文按字
    assert answers._normalize_answer("１ 个工作日") == answers._normalize_answer("1个工作日。")   # NFKC 全角转半角
    assert answers._answer_tokens("An Apple, a DAY!") == ["apple", "day"]


def test_exact_match_and_f1_hand_computed():
    assert answers.exact_match("21:00", "21:00。") == 1.0
    assert answers.exact_match("晚上 21:00", "21:00") == 0.0
    # 预测 [晚, 上, 21, 00]、标准 [21, 00]：共有 2 个，F1 = 2·2 / (4 + 2)
    assert answers.token_f1("晚上 21:00", "21:00") == pytest.approx(4 / 6)
    assert answers.token_f1("the cat sat", "a cat") == pytest.approx(2 * 1 / (2 + 1))   # 冠词不算词
    assert answers.token_f1("完全无关", "21:00") == 0.0
    # 重复的词只按次数配对一次（Counter 交集）
    assert answers.token_f1("好 好 好", "好") == pytest.approx(2 * 1 / (3 + 1))


def test_contains_answer():
    assert answers.contains_answer("According to passage [1], the hotline opens at 9:00.", "9:00")
    assert answers.contains_answer("客服热线：九点到二十一点", "九点")
    assert not answers.contains_answer("随便说点什么", "九点")
    assert not answers.contains_answer("任何回答", "。")   # 标准答案规范化后为空：不算对
