"""第 7 课 01：dev 调权的混合检索在 test 上不差于最好的单路，并且（本知识库上）同时胜过 BM25 与向量；坏参数一行报错。"""
import json

import pytest

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson7_hybrid_rag/01_hybrid_retrieval/hybrid_retrieval.py"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("hybrid")
    mod = load_script(SCRIPT)
    return mod.main(mod.Args(smoke=True, output_dir=str(out))), out


def test_tuned_hybrid_beats_both_single_retrievers(smoke):
    m, out = smoke
    methods = m["methods"]
    assert {"bm25", "dense", "dense_adapted", "hybrid_rrf", "hybrid_convex"} <= set(methods)
    for v in methods.values():
        assert set(v) == {"recall_at_1", "recall_at_5", "mrr", "ndcg_at_10"}
    # 设计文档的实测结论：中文为主的知识库上 BM25 远强于英文 MiniLM
    assert methods["bm25"]["recall_at_5"] > methods["dense"]["recall_at_5"] + 0.1
    # dev 调权选出的融合（含 0/1 端点的网格保证 dev 上不差于单路）在 test 上同时胜过两路
    best = m["best_fusion"]
    assert best.startswith("hybrid"), best
    # 上线的方法：融合要在 dev 上比最好的单路好出噪声才用，否则就是 dev 上最好的单路（冒烟的 dev 只有十几题，
    # 实测落回 bm25——这条规则在小 dev 上保守，代价是 test 上少拿融合那点增益，日志说明了为什么）
    assert m["best_method"] in {best, f"{best}+rerank", m["best_single"]}, m["best_method"]
    assert m["best_single"] in {"bm25", "dense", "dense_adapted"}
    for single in ("bm25", "dense"):
        assert methods[best]["recall_at_5"] > methods[single]["recall_at_5"], (best, methods)
        assert methods[best]["mrr"] > methods[single]["mrr"], (best, methods)
    # dev 上：调过权重的融合不会比任何单路差（网格含 0 与 1 两个端点）
    dev = m["dev_methods"]
    for fused in ("hybrid_rrf", "hybrid_convex"):
        side = m["fusion_weights"][fused.split("_")[1]]["dense_side"]
        assert dev[fused]["recall_at_5"] >= max(dev["bm25"]["recall_at_5"], dev[side]["recall_at_5"])
    # 主力那一路：融合的第 1 名与它的第 1 名相同的比例不低于另一路
    agree = m["top1_agreement"]
    assert m["carried_by"] in agree and agree[m["carried_by"]] == max(agree.values()), agree
    # 增益就是同一份 test 上两个方法之差（不是另算的数）
    assert m["dense_adapted_gain"] == pytest.approx(methods["dense_adapted"]["recall_at_5"]
                                                    - methods["dense"]["recall_at_5"], abs=1e-4)
    fused = next(k for k in methods if k.endswith("+rerank")).split("+")[0]     # 重排接在 dev 上更好的融合之后
    r1 = methods[f"{fused}+rerank"]["recall_at_1"] - methods[fused]["recall_at_1"]
    assert m["rerank_gain_r1"] == pytest.approx(r1, abs=1e-4)
    # 完美重排的上限 = 第一阶段前 n 个候选的召回：重排只改顺序，任何重排器的 R@1 都到不了它上面
    rr = m["rerank"]
    oracle = rr["oracle_recall_at_1"]
    assert methods[f"{fused}+rerank"]["recall_at_1"] <= oracle <= 1 and oracle >= methods[fused]["recall_at_5"] - 1e-9
    # 重排只改前 n 个的顺序：recall@n 不变（n = 5 时即 recall@5）
    assert rr["candidates"] == 5 and methods[f"{fused}+rerank"]["recall_at_5"] == methods[fused]["recall_at_5"]
    # 学出来的重排器：中文题、其它题各一组权重，特征里有 LSA；C 来自交叉验证的候选
    assert {"zh.dense_lsa.score", "other.dense.score", "zh.first_rank"} <= set(rr["coefficients"]), rr
    assert rr["C"] in (0.1, 0.3, 1.0, 3.0) and "cross_encoder_alone" not in rr   # 默认不训练交叉编码器
    # dev 规则没采用重排时，它不能是上线的方法
    if not rr["adopted"]:
        assert not m["best_method"].endswith("+rerank"), m["best_method"]
    # 离线读中文的向量检索：只用知识库拟合的 LSA 在中文问题上与 BM25 相当，英文 MiniLM 远不及；LSA 只报告、不进融合
    zh = m["zh_recall_at_5"]
    assert zh["dense_lsa"] >= 0.8 * zh["bm25"] > 0 and zh["dense"] <= 0.5 * zh["bm25"], zh
    assert set(m["lsa"]) == {"recall_at_1", "recall_at_5", "mrr", "ndcg_at_10"} and "dense_lsa" not in methods
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert {"methods", "best_method", "fusion_weights", "dense_adapted_gain", "rerank_gain_r1"} <= set(saved)
    assert_claims(saved)
    assert (out / "methods_test.png").stat().st_size > 0


def test_bad_overlap_is_one_line_error(run_script, tmp_path):
    proc = run_script(SCRIPT, "--smoke", "--chunk-size", "100", "--chunk-overlap", "100", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--chunk-overlap")


def test_lsa_encoder_reads_chinese_and_reduces_dimensions():
    """LSA 只用语料拟合：中文问题按字面找回对的那段；维度被截到块数 − 1（维度 ≥ 块数就不是降维了）。"""
    from common import retrieval

    texts = ["退保需要在犹豫期内提交申请，保费全额退还。", "理赔材料包括身份证、保单和医院发票。",
             "客服热线每天九点到晚上九点服务。", "The warranty covers parts and labour for two years."]
    enc = retrieval.lsa_encoder(texts, 64, seed=0)
    vecs = enc.encode(texts)
    assert vecs.shape == (4, 3)
    q = enc.encode(["理赔要交哪些材料？"], normalize_embeddings=True)
    assert int((vecs @ q[0]).argmax()) == 1
    assert retrieval.lsa_encoder(["只有一块的知识库"]).encode(["一块"]).shape == (1, 1)   # 至少 1 维，不崩


def test_learned_reranker_learns_the_signal_and_refuses_a_blind_fold():
    """排序学习：标签只由一个特征决定时，交叉验证的折外排名把金标排到第一；某折训练题全是负例时保持原顺序。"""
    import numpy as np

    from common import run
    from tests.conftest import REPO

    ltr = run.import_sibling(str(REPO / SCRIPT), "_learned_rerank")
    rng = np.random.default_rng(0)
    xs, ys, cands = [], [], []
    for q in range(20):
        x = rng.normal(size=(6, 3))
        gold = int(rng.integers(6))
        x[gold, 1] += 4.0                      # 第二列是"真信号"，其余是噪声
        xs.append(x), ys.append(np.eye(6)[gold]), cands.append(list(range(10 * q, 10 * q + 6)))
    c, ranked = ltr.cross_validate(xs, ys, cands, lambda r: sum(r[q][0] == cands[q][int(np.argmax(ys[q]))]
                                                              for q in range(20)), seed=0)
    assert c in ltr.CS
    assert sum(r[0] == cs[int(np.argmax(y))] for r, cs, y in zip(ranked, cands, ys)) >= 18
    assert ltr.fit(1.0, xs[:3], [np.zeros(6)] * 3) is None          # 全是负例：学不出东西
    assert ltr.rank_with(None, xs[:2], cands[:2]) == cands[:2]        # 于是保持第一阶段的顺序


def test_learned_reranker_features_split_by_question_language():
    """同一个特征在中文题、英文题上是两列：中文题的英文列全 0，反之亦然。"""
    from common import data, retrieval, run
    from tests.conftest import REPO

    ltr = run.import_sibling(str(REPO / SCRIPT), "_learned_rerank")
    texts = ["退保需要在犹豫期内提交申请。", "The warranty covers parts for two years.", "客服热线每天九点服务。"]
    bm25 = retrieval.BM25Index(texts)
    for q in ("怎么退保？", "How long is the warranty?"):
        x = ltr.features(q, [0, 1, 2], {"bm25": bm25.search(q, 3)}, bm25, texts)
        assert x.shape == (3, 2 * (5 + 2)), x.shape      # 5 个字面/名次特征 + 每路 2 个，按语言拆成两组
        zh_part, other_part = x[:, :7], x[:, 7:]
        assert (other_part == 0).all() if data.detect_lang(q) == "zh" else (zh_part == 0).all()
    x = ltr.features("怎么退保？", [0, 1, 2], {"bm25": bm25.search("怎么退保？", 3)}, bm25, texts)
    assert x[0, 1] > x[1, 1] and x[0, 1] > x[2, 1]     # IDF 覆盖率：含"退保"的块最高
