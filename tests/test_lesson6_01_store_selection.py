"""第 6 课 01：同一批块在 FAISS（Flat/IVF/HNSW）、Chroma（嵌入式 + chroma run 服务）、FTS5/BM25 上实测对比。"""
import json

import psutil
import pytest

from tests.conftest import assert_claims, load_script

SCRIPT = "lesson6_rag/01_vector_store_selection/knowledge_base_selection.py"


@pytest.mark.needs_service   # 会真的启动 `chroma run` 子进程（回环地址、空闲端口），测完停掉
def test_all_stores_measured(tmp_path, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    stores = m["stores"]
    for name in ("faiss_flat", "faiss_ivf", "faiss_hnsw", "chroma_embedded", "chroma_server", "sqlite_fts5",
                 "rank_bm25"):
        for key in ("build_s", "p50_ms", "p95_ms", "recall_at_10", "recall_at_5_gold", "index_bytes"):
            assert key in stores[name], (name, key)
        assert stores[name]["p50_ms"] <= stores[name]["p95_ms"]
    # Flat 就是精确检索；HNSW 在这么小的库上几乎精确；服务模式的 Chroma 与嵌入式同样准
    assert stores["faiss_flat"]["recall_at_10"] == 1.0
    assert stores["faiss_hnsw"]["recall_at_10"] >= 0.9
    assert stores["chroma_server"]["recall_at_10"] > 0.8
    # IVF：nprobe 扫到全部簇时等于精确检索，nprobe=1 时更低（近似的代价）
    sweep = m["ivf_nprobe_sweep"]
    assert sweep[str(m["nlist"])] == 1.0 and sweep["1"] < 1.0
    # 全文检索的 recall@10 口径是问答金标，并且要真的检索到东西
    for name in ("sqlite_fts5", "rank_bm25"):
        assert stores[name]["recall_kind"] == "gold_qa" and stores[name]["recall_at_10"] > 0.5
    # chroma run 子进程已经停掉，没有留下孤儿服务
    assert not [p for p in psutil.Process().children(recursive=True) if "chroma" in " ".join(p.cmdline())]
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved["embedding_model"] and saved["stores"]["chroma_server"]["recall_kind"] == "vs_exact_faiss_flat"
    assert_claims(saved)   # CLAIMS：HNSW/Chroma 召回、IVF 的取舍、FAISS 与 Chroma 的延迟差、中英文上全文 vs 向量
    assert "chroma_server" in (tmp_path / "features.md").read_text(encoding="utf-8")
    assert (tmp_path / "stores.png").stat().st_size > 0


def test_bad_qa_reports_file_and_line(tmp_path, run_script):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "客服几点下班？", "answer": "21:00", "doc_id": "faq/general_faq_zh.md"}\n'
                   '{"question": "少了答案"\n', encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--qa", str(bad), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fts5_matches_any_word_and_time_queries_warms_up(tmp_path):
    """_stores.FTS5Index 把问题的词用 OR 连起来：FTS5 默认的 AND 要求每个词都出现，自然语言的问题几乎搜不到。

    基线在同一个测试里：同一个库、同样的词，按 FTS5 默认语法（AND）查，一条也没有。
    """
    from common import retrieval

    stores = load_script(SCRIPT).stores
    texts = ["退货政策：签收后七天内可无理由退货。", "客服热线每天九点到二十一点有人接听。",
             "The S9 doorbell keeps clips for 7 days."]
    index = stores.FTS5Index(texts, tmp_path / "fts.sqlite")
    question = "客服热线几点下班？"
    assert index.search(question, k=3)[0][0] == 1                            # OR：共享"客服""热线"的块排第一
    and_query = " ".join(f'"{w}"' for w in retrieval.bm25_tokens(question))
    rows = index.con.execute("SELECT rowid FROM fts WHERE fts MATCH ?", (and_query,)).fetchall()
    assert rows == []                                                        # AND：问题里的"几点""下班"不在任何块里
    assert index.search("？！", k=3) == []                                  # 没有可用的词：返回空而不是语法错误
    calls = []
    ranked, lat = stores.time_queries(lambda i: calls.append(i) or [i], n_queries=3, repeats=2)
    assert ranked == [[0], [1], [2]] and len(lat) == 6                        # 每题 repeats 次计时
    assert calls == [0, 1, 2] * 3                                            # 先预热一轮（不计时），再计时 2 轮

