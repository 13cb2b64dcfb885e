"""第 6 课 03：FAISS IndexIDMap2 + SQLite 元数据，按文档哈希增量增、改、删，与全量重建一致且更快。"""
import hashlib
import json
import sqlite3

from tests.conftest import assert_claims, load_script

SCRIPT = "lesson6_rag/03_vector_db_build/build_vector_store.py"


def test_incremental_sync_matches_rebuild(tmp_path, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    assert (m["added"], m["updated"], m["deleted"]) == (2, 2, 1)   # 演示里新增 2、修改 2、删除 1
    assert m["consistent"] is True and all(m["checks"].values())
    # 省下的是计算量（与机器快慢无关）：增量只向量化改动文档的块，重建要把全部块重新向量化
    assert m["chunks_embedded_rebuild"] == m["vectors"]
    assert 0 < m["chunks_embedded_incremental"] < m["chunks_embedded_rebuild"] / 2
    # 稳定 id：每一行元数据的 id 都等于 sha1("文档id#块序号") 前 8 字节截成 63 位
    con = sqlite3.connect(tmp_path / "store" / "meta.sqlite")
    rows = con.execute("SELECT id, doc_id, chunk_no FROM chunks").fetchall()
    con.close()
    assert len(rows) == m["vectors"]
    for i, doc_id, no in rows:
        assert i == int.from_bytes(hashlib.sha1(f"{doc_id}#{no}".encode()).digest()[:8], "big") & (2**63 - 1)
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("vectors", "added", "updated", "deleted", "consistent", "incremental_vs_rebuild_speedup"):
        assert key in saved
    assert_claims(saved)   # CLAIMS：增量只向量化改动的块、与全量重建一致（秒数的倍数只在默认模式检查）
    assert (tmp_path / "sync_vs_rebuild.png").stat().st_size > 0


def test_bad_qa_reports_file_and_line(tmp_path, run_script):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "S9 电池能用多久？", "answer": "6 个月", "doc_id": "x.md"}\nnot json\n',
                   encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--qa", str(bad), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr
    assert "Traceback" not in proc.stderr
