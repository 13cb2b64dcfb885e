"""common.retrieval：recall@k / MRR / nDCG@10 对照手算的排序；RRF、统一的抽样规则、--data 被拒。"""
import math

import pytest

from common import retrieval
from common.data import Document
from common.errors import UserError

# 三个问题的命中序列（True = 该名次的块命中金标），手算的指标写在旁边
HITS = [
    [False, True, False, False, False, False, False, False, False, False, True],   # 第 2 名、第 11 名命中
    [True, False, True, False, False],                                             # 第 1、3 名命中
    [False] * 10,                                                                  # 一个也没有
]


def test_recall_at_k_hand_computed():
    assert retrieval.recall_at_k(HITS, 1) == pytest.approx(1 / 3)        # 只有第 2 题第 1 名命中
    assert retrieval.recall_at_k(HITS, 2) == pytest.approx(2 / 3)
    assert retrieval.recall_at_k(HITS, 10) == pytest.approx(2 / 3)       # 第 11 名不算
    assert retrieval.recall_at_k([], 5) == 0.0


def test_mrr_hand_computed():
    # 1/2 + 1/1 + 0 = 1.5，三题平均 0.5；k=1 时只剩第 2 题的 1
    assert retrieval.mrr(HITS) == pytest.approx(0.5)
    assert retrieval.mrr(HITS, k=1) == pytest.approx(1 / 3)


def test_ndcg_at_10_hand_computed():
    l2 = math.log2
    q1 = (1 / l2(3)) / 1.0                                  # 前 10 里一个命中（第 2 名）；理想：它排第 1
    q2 = (1 + 1 / l2(4)) / (1 + 1 / l2(3))                  # 第 1、3 名命中；理想：排在第 1、2 名
    assert retrieval._ndcg_at_k(HITS, 10) == pytest.approx((q1 + q2 + 0.0) / 3)
    assert retrieval._ndcg_at_k([[True, False]], 10) == 1.0
    m = retrieval.evaluate(HITS, (1, 5))
    assert m == {"recall_at_1": 0.3333, "recall_at_5": 0.6667, "mrr": 0.5, "ndcg_at_10": round((q1 + q2) / 3, 4)}


def test_recall_by_lang():
    qas = [{"lang": "zh"}, {"lang": "en"}, {"lang": "zh"}]
    assert retrieval.recall_by_lang(HITS, qas, 5) == {"en": 1.0, "zh": 0.5}


def test_rrf_hand_computed():
    # k=60：a 在两路都是第 1 → 2/61；b 第 2 + 第 3 → 1/62 + 1/63；c 只在第二路第 2 → 1/62
    assert retrieval.rrf([["a", "b"], ["a", "c", "b"]]) == ["a", "b", "c"]
    # 第二路权重 0：只看第一路的名次
    assert retrieval.rrf([["x", "y"], ["y", "x"]], [1.0, 0.0]) == ["x", "y"]


def test_subsample_one_rule():
    docs = [Document(f"d{i}.md", f"文档 {i} 的正文，金标 {i}。", None) for i in range(12)]
    qas = [{"question": f"q{i}", "doc_id": f"d{i}.md", "gold_passage": None} for i in range(12)] + \
          [{"question": "无 doc_id", "doc_id": None, "gold_passage": "金标 4。"}]
    kept, by_id, q = retrieval._subsample(docs, qas, max_docs=4)
    assert [d.id for d in kept] == ["d0.md", "d3.md", "d6.md", "d9.md"]          # 均匀抽：每 3 篇取 1 篇
    assert set(by_id) == {d.id for d in kept}
    assert [x["question"] for x in q] == ["q0", "q3", "q6", "q9"]                 # 只留问到这些文档的题
    kept, _, q = retrieval._subsample(docs, qas, max_docs=6, max_questions=2)
    assert [d.id for d in kept] == ["d0.md", "d2.md", "d4.md", "d6.md", "d8.md", "d10.md"]
    assert [x["question"] for x in q] == ["q0", "q2"]
    assert retrieval._subsample(docs, qas)[0] == docs                              # 0 = 不抽


def test_load_kb_subsamples_and_refuses_empty(tmp_path):
    docs, by_id, qas = retrieval.load_kb(None, None, max_docs=11)
    assert len(docs) == 11 and all(q["doc_id"] in by_id or q["gold_passage"] for q in qas) and qas
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("第一篇：退货政策是七天无理由。", encoding="utf-8")
    (tmp_path / "docs" / "b.md").write_text("第二篇：客服热线九点到二十一点。", encoding="utf-8")
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "客服几点上班？", "answer": "九点", "doc_id": "b.md"}\n', encoding="utf-8")
    assert len(retrieval.load_kb(tmp_path / "docs", qa)[2]) == 1
    with pytest.raises(UserError, match="--max-docs"):   # 抽到的文档没有任何问答：一行报错，而不是跑出空指标
        retrieval.load_kb(tmp_path / "docs", qa, max_docs=1)


def test_clearly_better_needs_a_gain_beyond_noise():
    first = [[True, False]] * 20                     # 基线：每题第 1 名命中，MRR 1
    second = [[False, True]] * 20                    # 每题第 2 名命中，MRR 0.5
    # 30 题里只有一题变好：均值高一点，但配对自助法的下界不过 0
    one_better = [[False, True]] * 29 + [[True, False]]
    assert retrieval.clearly_better(first, second) and not retrieval.clearly_better(second, first)
    assert not retrieval.clearly_better(one_better, [[False, True]] * 30)
    assert not retrieval.clearly_better(first, first)   # 一样好不算胜过：平手留基线
    assert retrieval.mrr(one_better) == (29 * 0.5 + 1) / 30
