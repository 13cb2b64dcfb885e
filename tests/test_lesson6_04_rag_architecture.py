"""第 6 课 04：检索 → 重排 → 带引用生成。

冒烟用极小模型（约 1M 参数、只在课程语料上预训练过）：它答不出问题，所以这里不断言 "RAG > 闭卷"，
而断言检索到的资料里确有答案（context_answer_rate）——这是 RAG 能赢的前提；"RAG 准确率 > 闭卷" 由默认运行
（smollm2-135m）实测，见 README。
重排：冒烟只训一小会儿，重排器很弱，dev 上挑出的融合权重常常是 0（= 不用它）；所以重排能带来什么、
权重怎么挑，在第一阶段漏掉金标的真实案例上用"知道金标"的打分器单独验证（好的打分器必须被采用并抬高排名，
坏的必须被权重 0 挡住：test_rerank_weight_follows_reranker_quality）。
"""
import json
import logging

from common import cli, retrieval
from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson6_rag/04_rag_architecture/rag_architecture_demo.py"


def test_retrieve_rerank_generate(tmp_path, tiny_models, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    # 融合权重是 dev 网格上 (MRR, recall@5) 最好的那个（并列取更信重排器的）
    dev = {float(w): tuple(v) for w, v in m["rerank_dev"].items()}
    assert m["rerank_weight"] == max(dev, key=lambda w: (dev[w], w))
    assert m["reranker_train_pairs"] > 0 and m["reranker_loss"] is not None
    # 中文为主的知识库上 BM25 强于英文 MiniLM 向量检索
    assert m["retrievers"]["bm25"]["mrr"] > m["retrievers"]["dense"]["mrr"]
    # RAG 的前提：交给模型的资料里有答案（检索坏了这里就掉下去）
    assert m["context_answer_rate"] >= 0.5
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text(encoding="utf-8").splitlines()]
    # --max-eval 只限制生成（10 题）；检索与重排指标用全部测试题
    assert len(rows) == 10 <= m["test_questions"] and {"closed_book", "rag", "cited"} <= set(rows[0])
    assert all(r["rag"].startswith(("According to passage [", "根据资料 [")) for r in rows)   # 预填的引用开头
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved["recall_at_5_after_rerank"] == m["recall_at_5_after_rerank"]
    # 注入案例有 / 没有防御各生成一遍（极小模型不会听注入：成功率的对比由默认运行的 CLAIMS 检查）
    assert saved["injection_cases"] >= 10 and 0 <= saved["injection_success_defended"] <= 1
    assert_claims(saved)   # CLAIMS：BM25 vs 向量、混合 ≥ 最好单路、dev 挑的权重不拖累、资料里有答案


def test_rerank_weight_follows_reranker_quality():
    """第一阶段用中文上弱的向量检索、候选池取 20：有金标在池子里却不在前 5 的题。

    好的打分器（把金标打高分）：rerank + fuse 后 recall@5 必须严格上升到池子的召回，dev 上挑出的权重 > 0。
    坏的打分器（把金标打低分）：单用它 MRR 低于第一阶段，dev 上必须挑出权重 0，融合结果与第一阶段逐题相同。
    两个打分器用的是同一批题、同一个池子：第一阶段就是对照。
    """
    mod = load_script(SCRIPT)
    args = cli.with_smoke(mod.Args(smoke=True, first_stage="dense", candidates=20), mod.SMOKE)
    kb = mod.load_kb(args, "cpu", logging.getLogger("test"))
    qs = kb["train_q"] + kb["test_q"]
    pool = [r[:20] for r in mod.first_stage(qs, kb["chunks"], kb["bm25"], kb["dense"], kb["embedder"], 20,
                                            None)["dense"]]
    gold = {(q["question"], c.text) for q in qs for c in kb["chunks"] if retrieval.is_hit(c, q, kb["by_id"])}

    class Scorer:   # 与 CrossEncoder.predict 同样的接口；sign=+1 偏爱金标，-1 把金标压到最后
        def __init__(self, sign: float):
            self.sign = sign

        def predict(self, pairs, show_progress_bar=False):
            return [self.sign * float(p in gold) for p in pairs]

    hits = lambda ranked: retrieval.hits_matrix(ranked, qs, kb["chunks"], kb["by_id"])  # noqa: E731
    before, pool_recall = retrieval.recall_at_k(hits(pool), 5), retrieval.recall_at_k(hits(pool), 20)
    assert before < pool_recall, "这组设置下第一阶段应当有漏在 5 名之外的金标"

    good = mod.reranking.rerank(Scorer(1.0), kb["chunks"], qs, pool)
    assert all(sorted(a) == sorted(b) for a, b in zip(good, pool))             # 只改顺序，不增删候选
    for w in (1.0, 100.0):
        assert retrieval.recall_at_k(hits(mod.reranking.fuse(pool, good, w)), 5) == pool_recall > before
    weight, _ = mod.reranking.pick_weight(Scorer(1.0), kb["chunks"], kb["by_id"], qs, pool)
    assert weight > 0

    bad = mod.reranking.rerank(Scorer(-1.0), kb["chunks"], qs, pool)
    assert retrieval.mrr(hits(bad)) < retrieval.mrr(hits(pool))               # 单用坏重排器：比第一阶段差
    weight, score = mod.reranking.pick_weight(Scorer(-1.0), kb["chunks"], kb["by_id"], qs, pool)
    assert weight == 0.0 and score[0.0] > score[100.0]
    assert mod.reranking.fuse(pool, bad, weight) == pool                                  # 权重 0：坏重排器被完全挡住


def test_citation_parsing():
    mod = load_script(SCRIPT)
    assert mod.citations("答案是 21:00 [2]，见 [1] 和 [9]", k=3) == [2, 1]


def test_bad_inputs_exit_2(tmp_path, run_script):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "客服几点下班？", "answer": "21:00", "doc_id": "faq/general_faq_zh.md"}\n'
                   '{"question": "坏行" "answer": 1}\n', encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--qa", str(bad), "--output-dir", str(tmp_path / "out"))
    assert_user_error(proc, f"{bad}:2")
    proc = run_script(SCRIPT, "--smoke", "--docs", str(tmp_path / "missing_docs"), "--output-dir",
                      str(tmp_path / "out"))
    assert_user_error(proc, "missing_docs")
    proc = run_script(SCRIPT, "--smoke", "--first-stage", "colbert", "--output-dir", str(tmp_path / "out"))
    assert_user_error(proc, "--first-stage")
