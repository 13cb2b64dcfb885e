"""第 7 课 06：每个配置都报 p50/p95/p99 与吞吐；近似索引对精确检索的 recall@10 高；坏参数一行报错。"""
import math

from tests.conftest import assert_user_error, load_script

SCRIPT = "lesson7_hybrid_rag/06_performance_testing/performance_benchmark.py"


def test_benchmark_reports_percentiles_per_config(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    sizes, clients = m["sizes"], m["clients"]
    assert len(m["configs"]) == 4 * len(sizes) * len(clients)
    for key, c in m["configs"].items():
        assert {"p50_ms", "p95_ms", "p99_ms", "rps"} <= set(c), key
        assert all(math.isfinite(c[k]) and c[k] > 0 for k in ("p50_ms", "p95_ms", "p99_ms", "rps")), (key, c)
        assert c["p50_ms"] <= c["p95_ms"] <= c["p99_ms"], (key, c)
    # HNSW 在默认参数下几乎找回精确 Flat 的前 10；IVF（nprobe=8）也大部分找回
    for n in sizes:
        assert m["recall_at_10"][f"hnsw_n{n}"] >= 0.9, m["recall_at_10"]
        assert m["recall_at_10"][f"ivf_n{n}"] >= 0.5, m["recall_at_10"]
    # BM25 是纯 Python 打分：同规模下比 FAISS Flat 慢
    big = max(sizes)
    assert m["configs"][f"bm25_n{big}_c1"]["p50_ms"] > m["configs"][f"flat_n{big}_c1"]["p50_ms"]
    assert m["generation"]["local_tokens_per_s"] > 0
    assert (tmp_path / "latency_vs_size.png").stat().st_size > 0


def test_unknown_index_is_one_line_error(run_script, tmp_path):
    proc = run_script(SCRIPT, "--smoke", "--indexes", "flat", "annoy", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--indexes")
