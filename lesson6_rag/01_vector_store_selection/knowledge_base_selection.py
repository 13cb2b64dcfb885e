"""向量库选型：同一批切块、同一组问题，分别放进 FAISS（Flat / IVF / HNSW）、Chroma（嵌入式 + HTTP 服务）
和全文检索引擎（Elasticsearch，或本地的 SQLite FTS5 + rank-bm25），实测建库时间、查询延迟 p50/p95、
近似检索相对精确检索的召回、任务召回（对照问答金标）、索引大小 / 内存增量，并列出功能对比表。

选型不能靠宣传页：近似索引（IVF、HNSW）用一点召回换速度，服务模式多一跳网络，全文检索不需要向量模型
却常常在中文上更准（默认向量模型 all-MiniLM-L6-v2 是英文模型）。每个库单独报告，不预设谁更好。

运行：
  python lesson6_rag/01_vector_store_selection/knowledge_base_selection.py           # CPU，全部 44 篇文档，空闲 2 核约 20 秒
  python lesson6_rag/01_vector_store_selection/knowledge_base_selection.py --smoke   # 12 篇文档、少量问题，约 12 秒
  python lesson6_rag/01_vector_store_selection/knowledge_base_selection.py \
      --embedding-model BAAI/bge-small-zh-v1.5 --es-url http://127.0.0.1:9200 \
      --config configs/lesson6/knowledge_base_selection.yaml     # 中文向量模型 + 真实 Elasticsearch（需要能联网/有服务）

你会看到（默认运行：330 块、135 题）：FAISS Flat 相对精确检索的 recall@10 = 1.0（它就是精确检索）；
HNSW ≈ 1.0（efSearch=32）；IVF 随 --nprobe 变化（nlist=18，nprobe=1/2/4 约 0.55/0.81/0.93，扫全部簇 = 1.0）；
Chroma 嵌入式与 HTTP 服务召回都是 1.0，但每次查询 p50 约 0.6 / 1.4 毫秒（服务模式多一次 HTTP 往返），
FAISS 只要约 10 微秒；
全文检索（FTS5 / BM25）的 recall@10 是对照问答金标算的。任务召回（金标 recall@5）：MiniLM 向量检索约 0.45，
其中中文只有约 0.2、英文约 0.8；FTS5 / BM25 约 0.68（中文约 0.74）—— 向量不一定更好，中文请换中文向量模型。
输出目录里有 metrics.json、features.md（功能对比表）和 stores.png（延迟、召回与旋钮扫描图）。
"""

import json
import pickle
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, retrieval, run
from common.errors import UserError


@dataclass
class Args(retrieval.KBArgs):
    chunk_size: int = cli.arg(200, "切块字符数：切小一点向量多一些，IVF/HNSW 的取舍才看得出来")
    chunk_overlap: int = cli.arg(30, "相邻块重叠的字符数")
    max_docs: int = cli.arg(0, "只用其中 N 篇文档（均匀抽取，0 = 全部）；--smoke 时默认 12")
    nprobe: int = cli.arg(2, "IVF 每次查询扫描的聚类数（nlist ≈ √块数）：越大越准也越慢")
    hnsw_m: int = cli.arg(16, "HNSW 每个节点的邻居数 M：越大图越密、越准、越占内存")
    ef_search: int = cli.arg(32, "HNSW 查询时的候选队列长度 efSearch：越大越准、越慢")
    repeats: int = cli.arg(5, "每个问题重复查询的次数（延迟取 全部问题 × 重复次数 的 p50/p95）")
    chroma_server: bool = cli.arg(True, "启动 `chroma run` 子进程并通过 HttpClient 测一遍（--no-chroma-server 关闭）")
    es_url: str = cli.arg(None, "Elasticsearch 地址，如 http://127.0.0.1:9200；不给则用 SQLite FTS5 + rank-bm25")


K = 10


def rss() -> int:
    """本进程当前常驻内存（字节）。"""
    import psutil

    return psutil.Process().memory_info().rss


def free_port() -> int:
    """向系统要一个空闲的本地端口。"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_bytes(path: Path) -> int:
    """目录（或文件）在磁盘上的总字节数。"""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def time_queries(search, n_queries: int, repeats: int) -> tuple[list[list[int]], list[float]]:
    """先每个问题查一次（预热，顺便拿结果），再重复 repeats 轮计时；返回 (排序结果, 每次延迟 ms)。"""
    ranked = [search(i) for i in range(n_queries)]
    lat = []
    for _ in range(repeats):
        for i in range(n_queries):
            t = time.perf_counter()
            search(i)
            lat.append((time.perf_counter() - t) * 1000)
    return ranked, lat


def start_chroma_server(path: Path, log_file: Path, log, deadline_s: float = 60.0):
    """把 `chroma run` 作为真实子进程启动，轮询 /api/v2/heartbeat 直到就绪；返回 (进程, 端口) 或 None。"""
    import httpx

    exe = Path(sys.executable).parent / "chroma"
    exe = str(exe) if exe.exists() else shutil.which("chroma")
    if not exe:
        log.warning("找不到 chroma 命令行（应在 %s 旁边）：跳过 HTTP 服务模式，只测嵌入式 Chroma", sys.executable)
        return None
    port = free_port()
    with log_file.open("w") as fh:   # 子进程继承了文件描述符，父进程这边可以马上关掉
        proc = subprocess.Popen([exe, "run", "--path", str(path), "--host", "127.0.0.1", "--port", str(port)],
                                stdout=fh, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            break
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/heartbeat", timeout=1).status_code == 200:
                log.info("chroma run 已就绪：127.0.0.1:%d（pid %d，%.1f 秒）", port, proc.pid, time.monotonic() - t0)
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    log.warning("chroma run 在 %.0f 秒内没有就绪（日志 %s）：只测嵌入式 Chroma", deadline_s, log_file)
    return None


def chroma_store(client, vecs, chunks, langs) -> tuple[object, float]:
    """在一个 Chroma 客户端（嵌入式或 HTTP）里建集合并写入向量；返回 (集合, 建库秒数)。"""
    t = time.perf_counter()
    col = client.create_collection("kb_chunks", configuration={"hnsw": {"space": "cosine"}}, embedding_function=None)
    step = client.get_max_batch_size()   # 单次 add 有上限，大库要分批
    for s in range(0, len(chunks), step):
        col.add(ids=[str(i) for i in range(s, min(s + step, len(chunks)))], embeddings=vecs[s:s + step],
                documents=[c.text for c in chunks[s:s + step]],
                metadatas=[{"doc_id": c.doc_id, "lang": lg} for c, lg in zip(chunks[s:s + step], langs[s:s + step])])
    return col, time.perf_counter() - t


def es_connect(url: str):
    """连上 Elasticsearch（纯 HTTP，httpx）；连不上就一行错误退出，别等向量库都测完才发现。"""
    import httpx

    http = httpx.Client(base_url=url.rstrip("/"), timeout=60)   # 带认证时写成 http://user:pass@host:9200
    try:
        http.get("/").raise_for_status()
    except httpx.HTTPError as e:
        raise UserError(f"--es-url {url}: 连不上 Elasticsearch（{type(e).__name__}: {e}）") from None
    return http


def es_store(http, token_texts: list[str], token_queries: list[str]):
    """Elasticsearch REST API：建索引、_bulk 批量写入、match 查询；返回 (search, 建库秒数, 索引字节)。"""
    name = "course-kb-selection"
    t = time.perf_counter()
    http.delete(f"/{name}")   # 上次留下的同名索引（不存在时 404，无妨）
    # 文本已用 jieba 分好词、空格拼接，所以用 whitespace 分析器即可，不依赖 IK 之类的中文分词插件
    http.put(f"/{name}", json={"settings": {"number_of_shards": 1, "number_of_replicas": 0},
                               "mappings": {"properties": {"text": {"type": "text", "analyzer": "whitespace"}}}}
             ).raise_for_status()
    bulk = "".join(json.dumps({"index": {"_id": str(i)}}) + "\n" + json.dumps({"text": tx}, ensure_ascii=False) + "\n"
                   for i, tx in enumerate(token_texts))
    r = http.post(f"/{name}/_bulk?refresh=true", content=bulk.encode(),
                  headers={"Content-Type": "application/x-ndjson"})
    r.raise_for_status()
    if r.json().get("errors"):
        raise UserError(f"--es-url {http.base_url}: _bulk 写入有错误：{str(r.json()['items'][:1])[:200]}")
    build_s = time.perf_counter() - t
    size = http.get(f"/{name}/_stats/store").json()["indices"][name]["primaries"]["store"]["size_in_bytes"]

    def search(i: int) -> list[int]:
        body = {"size": K, "_source": False, "query": {"match": {"text": token_queries[i]}}}
        return [int(h["_id"]) for h in http.post(f"/{name}/_search", json=body).json()["hits"]["hits"]]

    return search, build_s, size


def fts5_store(db: Path, token_texts: list[str], token_queries: list[str]):
    """SQLite FTS5：索引 jieba 分词后用空格拼接的文本，bm25() 排序；返回 (search, 建库秒数, 库文件字节)。"""
    db.unlink(missing_ok=True)
    t = time.perf_counter()
    con = sqlite3.connect(db, check_same_thread=False)
    con.execute("CREATE VIRTUAL TABLE fts USING fts5(text)")
    con.executemany("INSERT INTO fts(rowid, text) VALUES (?, ?)", enumerate(token_texts))
    con.commit()
    build_s = time.perf_counter() - t
    # 每个词加引号再 OR：FTS5 默认是 AND，而且不加引号时 "-"、":" 之类会被当成查询语法
    match = [" OR ".join('"' + w.replace('"', '""') + '"' for w in q.split()) for q in token_queries]

    def search(i: int) -> list[int]:
        if not match[i]:
            return []
        sql = "SELECT rowid FROM fts WHERE fts MATCH ? ORDER BY bm25(fts) LIMIT ?"
        return [r[0] for r in con.execute(sql, (match[i], K))]

    return search, build_s, db.stat().st_size


def faiss_can_delete(index) -> bool:
    """实测：在索引的副本上调 remove_ids，看它支不支持删除。"""
    import faiss
    import numpy as np

    try:
        faiss.clone_index(index).remove_ids(np.array([0], dtype="int64"))
        return True
    except RuntimeError:
        return False


def main(args: Args) -> dict:
    import faiss
    import numpy as np

    out = run.start(__file__, args)
    log = out.log
    max_docs = args.max_docs or (12 if args.smoke else 0)
    repeats = 1 if args.smoke and args.repeats == 5 else args.repeats

    # 1. 读知识库、切块、向量化：所有库吃同一批块和同一组问题，比较才公平
    docs_dir = args.docs or args.data   # --data 指向文件夹时与 --docs 相同
    if docs_dir and not args.qa:
        raise UserError("--docs 需要配套的 --qa（问题的 doc_id/gold_passage 要指向你的文档，才能算任务召回）")
    docs, by_id, qas = retrieval.load_kb(docs_dir, args.qa)
    es = es_connect(args.es_url) if args.es_url else None
    if max_docs and len(docs) > max_docs:
        docs = docs[:: len(docs) // max_docs][:max_docs]   # 均匀抽取，中英文、各类文档都留一些
        keep = {d.id for d in docs}
        qas = [q for q in qas if (q["doc_id"] in keep if q["doc_id"]
                                  else any(q["gold_passage"] in d.text for d in docs))]
        by_id = {d.id: d for d in docs}
    if not qas:
        raise UserError("--max-docs 太小：抽到的文档里没有任何问答金标，请调大或设为 0")
    chunks = retrieval.chunk_documents(docs, args.chunk_size, args.chunk_overlap)
    n, nq = len(chunks), len(qas)
    embedder = retrieval.load_embedder(args.embedding_model, str(models.pick_device(args.device)))   # 只有向量化用 GPU
    vecs = retrieval.embed(embedder, [c.text for c in chunks])
    qvecs = retrieval.embed(embedder, [q["question"] for q in qas])
    langs = [data.detect_lang(c.text) for c in chunks]
    log.info("%d 篇文档 → %d 个块（%d 字符/块），%d 个问题，向量维度 %d", len(docs), n, args.chunk_size, nq, vecs.shape[1])

    results: dict[str, dict] = {}
    exact: list[list[int]] = []   # FAISS Flat 的精确 top-10：向量库召回的"标准答案"

    def vs_exact(ranked) -> float:
        """每个问题的 top-10 与精确 top-10 的重合比例，取平均。"""
        return round(float(np.mean([len(set(list(r)[:K]) & set(e)) / len(e) for r, e in zip(ranked, exact)])), 4)

    def record(name: str, ranked, lat, build_s, index_bytes, rss_delta, vector: bool) -> None:
        """一个库的全部指标：建库时间、延迟、召回（相对精确检索或对照金标）、任务召回@5、大小。"""
        hits = retrieval.hits_matrix(ranked, qas, chunks, by_id)
        gold10 = retrieval.recall_at_k(hits, K)
        by_lang = {lg: round(retrieval.recall_at_k([h for h, q in zip(hits, qas) if q["lang"] == lg], 5), 4)
                   for lg in sorted({q["lang"] for q in qas})}
        results[name] = {
            "build_s": round(build_s, 4), "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p95_ms": round(float(np.percentile(lat, 95)), 3),
            "recall_at_10": vs_exact(ranked) if vector else round(gold10, 4),
            "recall_kind": "vs_exact_faiss_flat" if vector else "gold_qa",
            "recall_at_10_gold": round(gold10, 4), "recall_at_5_gold": round(retrieval.recall_at_k(hits, 5), 4),
            "recall_at_5_gold_by_lang": by_lang, "index_bytes": int(index_bytes),
            "rss_delta_bytes": None if rss_delta is None else int(rss_delta)}
        r = results[name]
        log.info("%-16s 建库 %.3fs  p50 %.2fms  p95 %.2fms  recall@10(%s)=%.3f  金标 recall@5=%.3f", name,
                 r["build_s"], r["p50_ms"], r["p95_ms"], r["recall_kind"], r["recall_at_10"], r["recall_at_5_gold"])

    # 2. FAISS：Flat 是精确检索（也是其它向量库的"标准答案"），IVF 先聚类再只搜 nprobe 个簇，HNSW 走近邻图
    d = vecs.shape[1]
    nlist = max(1, round(n ** 0.5))
    ivf_quantizer = faiss.IndexFlatIP(d)   # IVF 持有它的指针，要活得和 IVF 一样久
    builders = {
        "faiss_flat": lambda: faiss.IndexFlatIP(d),
        "faiss_ivf": lambda: faiss.IndexIVFFlat(ivf_quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT),
        "faiss_hnsw": lambda: faiss.IndexHNSWFlat(d, args.hnsw_m, faiss.METRIC_INNER_PRODUCT),
    }
    features: dict[str, dict] = {}
    indexes = {}
    for name, make in builders.items():
        r0, t = rss(), time.perf_counter()
        index = make()
        if name == "faiss_ivf":
            index.train(vecs)   # 块数 < 39×nlist 时 faiss 会警告训练点不足：小库上 IVF 本就不划算，照实报告
            index.nprobe = min(args.nprobe, nlist)
        if name == "faiss_hnsw":
            index.hnsw.efSearch = args.ef_search
        index.add(vecs)
        indexes[name] = index
        build_s, rss_delta = time.perf_counter() - t, rss() - r0
        ranked, lat = time_queries(lambda i, ix=index: ix.search(qvecs[i:i + 1], K)[1][0].tolist(), nq, repeats)
        if name == "faiss_flat":
            exact[:] = [[i for i in r if i >= 0] for r in ranked]
        record(name, ranked, lat, build_s, faiss.serialize_index(index).nbytes, rss_delta, vector=True)
        can_del = faiss_can_delete(index)
        features[name] = {"过滤": "IDSelector（按 id 集合/区间，元数据要自己管）", "持久化": "write_index 写文件",
                          "更新": "无原地更新：remove_ids + 重新 add" if can_del else "不支持：只能重建",
                          "删除": "remove_ids（实测可用）" if can_del else "不支持（remove_ids 实测报错，只能重建）",
                          "服务模式": "无（进程内的库）"}
    # 旋钮扫描（放在计时之后）：近似索引的召回随 nprobe / efSearch 怎么变；nprobe = nlist 等于扫全部簇
    ivf, hnsw = indexes["faiss_ivf"], indexes["faiss_hnsw"]
    ivf_sweep, hnsw_sweep = {}, {}
    for v in [v for v in (1, 2, 4, 8, 16, 32) if v < nlist] + [nlist]:
        ivf.nprobe = v
        ivf_sweep[str(v)] = vs_exact(ivf.search(qvecs, K)[1])
    for v in (4, 8, 16, 32, 64):
        hnsw.hnsw.efSearch = v
        hnsw_sweep[str(v)] = vs_exact(hnsw.search(qvecs, K)[1])
    log.info("IVF nlist=%d：recall@10 随 nprobe %s；HNSW M=%d：随 efSearch %s", nlist, ivf_sweep, args.hnsw_m, hnsw_sweep)

    # 3. Chroma：嵌入式（PersistentClient，数据落盘在输出目录）与 HTTP 服务（chroma run 子进程 + HttpClient）
    import chromadb

    def bench_chroma(name: str, client, size_path: Path, server_pid: int | None) -> None:
        import psutil

        proc = psutil.Process(server_pid) if server_pid else psutil.Process()
        r0 = proc.memory_info().rss
        col, build_s = chroma_store(client, vecs, chunks, langs)
        rss_delta = proc.memory_info().rss - r0   # 服务模式看的是服务进程的内存
        def search(i: int) -> list[int]:
            return [int(x) for x in col.query(query_embeddings=qvecs[i:i + 1], n_results=K)["ids"][0]]

        ranked, lat = time_queries(search, nq, repeats)
        record(name, ranked, lat, build_s, dir_bytes(size_path), rss_delta, vector=True)
        # 功能实测：按元数据过滤查询、删除一条，看返回和计数
        filtered = col.query(query_embeddings=qvecs[:1], n_results=3, where={"lang": langs[0]},
                             include=["metadatas"])["metadatas"][0]
        before = col.count()
        col.delete(ids=["0"])
        features[name] = {"过滤": f"where 元数据过滤（实测 {len(filtered)} 条，lang 全部匹配："
                                  f"{all(m['lang'] == langs[0] for m in filtered)}）",
                          "持久化": "目录落盘（SQLite + HNSW 段）", "更新": "update / upsert",
                          "删除": f"delete（实测 {before} → {col.count()}）",
                          "服务模式": "有：chroma run + HttpClient" if server_pid else "可切换到 chroma run"}

    emb_dir = out.path("chroma_embedded")
    shutil.rmtree(emb_dir, ignore_errors=True)
    bench_chroma("chroma_embedded", chromadb.PersistentClient(path=str(emb_dir)), emb_dir, None)
    if args.chroma_server:
        srv_dir = out.path("chroma_server")
        shutil.rmtree(srv_dir, ignore_errors=True)
        started = start_chroma_server(srv_dir, out.path("chroma_server.log"), log)
        if started:
            proc, port = started
            try:
                bench_chroma("chroma_server", chromadb.HttpClient(host="127.0.0.1", port=port), srv_dir, proc.pid)
            finally:   # 无论成败都要停掉子进程，不留孤儿服务
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log.info("chroma run 已停止（退出码 %s）", proc.returncode)

    # 4. 全文检索：不需要向量模型；中文先用 jieba 分词，再按空格拼接交给引擎
    token_texts = [" ".join(retrieval.bm25_tokens(c.text)) for c in chunks]
    token_queries = [" ".join(retrieval.bm25_tokens(q["question"])) for q in qas]
    if args.es_url:
        log.info("全文检索：Elasticsearch %s（REST API，whitespace 分析器 + jieba 预分词）", args.es_url)
        search, build_s, size = es_store(es, token_texts, token_queries)
        # 内存花在远端的 ES 进程里，本进程看不到：rss_delta_bytes 记为 None
        record("elasticsearch", *time_queries(search, nq, repeats), build_s, size, None, vector=False)
        features["elasticsearch"] = {"过滤": "bool/filter 查询", "持久化": "有（分片落盘）", "更新": "按 _id 覆盖写",
                                     "删除": "DELETE /_doc/<id>", "服务模式": "有（本身就是服务）"}
    else:
        log.info("未给 --es-url：全文检索用 SQLite FTS5（jieba 分词后空格拼接建索引）和 rank-bm25（BM25Okapi）两种")
    r0 = rss()
    search, build_s, size = fts5_store(out.path("fts5.sqlite"), token_texts, token_queries)
    record("sqlite_fts5", *time_queries(search, nq, repeats), build_s, size, rss() - r0, vector=False)
    features["sqlite_fts5"] = {"过滤": "SQL WHERE（可 JOIN 元数据表）", "持久化": "单个 .sqlite 文件",
                               "更新": "UPDATE", "删除": "DELETE", "服务模式": "无（进程内的库）"}
    r0, t = rss(), time.perf_counter()
    bm25 = retrieval.BM25Index([c.text for c in chunks])
    build_s, rss_delta = time.perf_counter() - t, rss() - r0
    search = lambda i: [j for j, _ in bm25.search(qas[i]["question"], K)]  # noqa: E731
    record("rank_bm25", *time_queries(search, nq, repeats), build_s, len(pickle.dumps(bm25.bm25)), rss_delta,
           vector=False)
    features["rank_bm25"] = {"过滤": "无（只能查完再筛）", "持久化": "无（自己 pickle）", "更新": "无：整体重建",
                             "删除": "无：整体重建", "服务模式": "无（纯 Python 库）"}

    # 5. 结果表、功能对比表（rich 打印 + features.md）与柱状图（图里用英文：CI 机器上常常没有中文字体）
    from rich.console import Console
    from rich.table import Table

    console = Console(width=119)
    table = Table(title="同一批块、同一组问题在各个库上的实测")
    for c in ["库", "建库 s", "p50 ms", "p95 ms", "recall@10", "口径", "金标 recall@5", "索引字节", "RSS 增量"]:
        table.add_column(c, justify="left" if c in ("库", "口径") else "right")
    for name, r in results.items():
        table.add_row(name, f"{r['build_s']:.3f}", f"{r['p50_ms']:.3f}", f"{r['p95_ms']:.3f}",
                      f"{r['recall_at_10']:.3f}",
                      "相对 Flat" if r["recall_kind"] == "vs_exact_faiss_flat" else "对照金标",
                      f"{r['recall_at_5_gold']:.3f}", f"{r['index_bytes']:,}",
                      "-" if r["rss_delta_bytes"] is None else f"{r['rss_delta_bytes']:,}")
    console.print(table)
    cols = ["过滤", "持久化", "更新", "删除", "服务模式"]
    table = Table(title="功能对比（带“实测”的是本次运行真的调用过的）")
    for c in ["库", *cols]:
        table.add_column(c, overflow="fold")
    md = ["| 库 | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, f in features.items():
        table.add_row(name, *[f[c] for c in cols])
        md.append(f"| {name} | " + " | ".join(f[c] for c in cols) + " |")
    console.print(table)
    out.path("features.md").write_text("# 功能对比\n\n" + "\n".join(md) + "\n", encoding="utf-8")

    names = list(results)
    fig, save = out.plot("stores.png")
    fig.set_size_inches(14, 4.4)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    xs = np.arange(len(names))
    ax1.bar(xs - 0.2, [results[s]["p50_ms"] for s in names], 0.4, label="p50")
    ax1.bar(xs + 0.2, [results[s]["p95_ms"] for s in names], 0.4, label="p95")
    ax1.set(yscale="log", ylabel="query latency, ms (log)", title="latency per query")
    ax2.bar(xs - 0.2, [results[s]["recall_at_10"] for s in names], 0.4,
            label="recall@10 (vector: vs exact Flat; full-text: vs gold)")
    ax2.bar(xs + 0.2, [results[s]["recall_at_5_gold"] for s in names], 0.4, label="task recall@5 vs gold")
    ax2.set(ylim=(0, 1.15), title="recall")
    for ax in (ax1, ax2):
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    ax3.plot([int(v) for v in ivf_sweep], list(ivf_sweep.values()), "o-", label=f"IVF (nlist={nlist}): nprobe")
    ax3.plot([int(v) for v in hnsw_sweep], list(hnsw_sweep.values()), "s-", label=f"HNSW (M={args.hnsw_m}): efSearch")
    ax3.set(xscale="log", xlabel="knob value", ylabel="recall@10 vs exact", ylim=(0, 1.05),
            title="approximate index knobs")
    ax3.legend(fontsize=7)
    save()

    best_gold = max(names, key=lambda s: results[s]["recall_at_5_gold"])
    return out.finish({"stores": results, "features": features, "chunks": n, "queries": nq, "nlist": nlist,
                       "nprobe": min(args.nprobe, nlist), "ivf_nprobe_sweep": ivf_sweep, "hnsw_m": args.hnsw_m,
                       "ef_search": args.ef_search, "hnsw_ef_search_sweep": hnsw_sweep,
                       "embedding_model": args.embedding_model or "all-MiniLM-L6-v2", "best_gold_store": best_gold},
                      summary=", ".join(f"{s}: recall@10={r['recall_at_10']:.2f} p50={r['p50_ms']:.2f}ms"
                                        for s, r in results.items()) + f"; 金标 recall@5 最高：{best_gold}")


if __name__ == "__main__":
    main(cli.parse(Args))
