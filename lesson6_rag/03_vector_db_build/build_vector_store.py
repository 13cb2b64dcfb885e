"""构建可增量维护的向量库：FAISS 索引 + SQLite 元数据，按文档哈希做增、改、删，不必每次全量重建。

知识库天天在变：新文档上线、旧文档修订、过期文档下架。每次都把全部文档重新向量化太慢，
但增量维护一旦做错，就会出现"已删除的文档还能被搜到""改过的文档搜出旧内容"。本脚本演示正确做法：
  - 分批向量化、分批写入 faiss.IndexIDMap2(IndexFlatIP)，每个块的 id 是稳定的 int64：
    sha1("文档id#块序号") 的前 8 字节、截成 63 位（SQLite 的 INTEGER 主键也能放下），两次运行 id 不变；
  - 元数据（id → 文档 id、块文本、文档内容哈希）存在 SQLite 里，和索引文件一起保存；
  - 同步时逐篇算内容哈希：没变 → 跳过；变了 → remove_ids 删掉旧块再加新块；文档没了 → remove_ids。
演示流程：把知识库复制到输出目录里的工作文件夹 → 建库 → 在副本上新增 2 篇、修改 2 篇、删除 1 篇
→ 增量同步，并与同一最终状态的全量重建（--rebuild 走的那条路）比较耗时和检索结果，最后做一致性检查。

运行：
  python lesson6_rag/03_vector_db_build/build_vector_store.py          # CPU，44 篇文档
  python lesson6_rag/03_vector_db_build/build_vector_store.py --smoke  # 均匀抽 12 篇文档、20 个问题（SMOKE）
  python lesson6_rag/03_vector_db_build/build_vector_store.py --docs my_docs/ --qa my_qa.jsonl \
      --embedding-model BAAI/bge-small-zh-v1.5 \
      --config configs/lesson6/build_vector_store.yaml                 # 自己的文档（在副本上演示）
  加 --rebuild：第 1 步的初次建库强制全量（默认会复用输出目录里上次的库，只同步有变化的文档）。

你会看到：added=2、updated=2、deleted=1，其余文档 skipped；增量同步只向量化变化文档的块（只占全量重建的一小部分），
所以比全量重建快数倍（incremental_vs_rebuild_speedup；机器被占用时两边一起变慢，倍数会小一些但仍明显）；
一致性检查全部通过（consistent=True）：每个块用自己的向量搜索时第 1 名是它自己、任何查询都搜不到已删除或过期的 id、
ntotal 等于元数据条数、增量库与重建库对同一批查询给出相同结果。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.0 分钟，0.9 GB，结论 3/3 成立
  ✓ 增量同步只向量化改动文档的块：增量 / 全量重建向量化的块数：0.07812（≤ 0.2）
  ✓ 增量同步比全量重建快：重建 / 增量的耗时：13.62（≥ 3）
  ✓ 增量库与全量重建的库一致（同 id、同向量、同检索结果，不返回已删除或过期的块）：通过的检查项比例：1（≥ 1）
<!-- /results -->
"""

import hashlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, retrieval, run
from common.errors import UserError


@dataclass
class Args(retrieval.KBArgs):
    chunk_size: int = cli.arg(300, "切块字符数", min=1)
    chunk_overlap: int = cli.arg(50, "相邻块重叠的字符数", min=0)
    batch_size: int = cli.arg(32, "每批向量化并写入索引的块数：大库一次全算会占满内存，分批还能显示进度", min=1)
    rebuild: bool = cli.arg(False, "初次建库强制全量重建（默认：输出目录里已有上次的库时只做增量同步）")


SMOKE = dict(max_docs=12, max_questions=20)   # 冒烟：均匀抽 12 篇文档；一致性检查只用前 20 个问题
# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线是同一次运行里对同一最终状态的全量重建
CLAIMS = [
    run.Claim("增量同步只向量化改动文档的块：增量 / 全量重建向量化的块数",
              "chunks_embedded_incremental / chunks_embedded_rebuild", "<=", 0.5, 0.2),
    # 冒烟只有 12 篇文档，增量与重建的耗时只差 3 倍左右（忙机器上 2.6-3.9 倍）：秒数会翻，只在默认模式检查
    run.Claim("增量同步比全量重建快：重建 / 增量的耗时", "incremental_vs_rebuild_speedup", ">=", None, 3.0),
    run.Claim("增量库与全量重建的库一致（同 id、同向量、同检索结果，不返回已删除或过期的块）：通过的检查项比例",
              "sum(checks.values()) / len(checks)", ">=", 1.0, 1.0),
]


# 演示用的"知识库变了"：新增 2 篇、修改 2 篇、删除 1 篇，在副本上做（内容与做法见旁边的 _edits.py）
edits = run.import_sibling(__file__, "_edits")


def chunk_key(chunk_id: str) -> int:
    """稳定的 int64 id：sha1("文档id#块序号") 前 8 字节，截成 63 位非负数（FAISS 与 SQLite 都能存）。"""
    # 截成 63 位：FAISS 的 id 和 SQLite 的 INTEGER 都是有符号 int64，首位为 1 就成了负数，
    # 而 FAISS 用 -1 表示"没有结果"；字节序（big）定了就不能再改：改了 id 全变，旧库里的每一块都对不上号
    return int.from_bytes(hashlib.sha1(chunk_id.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def file_sha256(path: Path) -> str:
    """文件内容的 sha256（分块读，大索引也不占内存）。"""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sync(docs_dir: Path, store: Path, embedder, args: Args, rebuild: bool, log) -> dict:
    """让 store（index.faiss + meta.sqlite）与 docs_dir 一致：按文档哈希增、改、删；rebuild=True 时全量重建。"""
    import faiss
    import numpy as np
    from tqdm import tqdm

    t0 = time.perf_counter()
    store.mkdir(parents=True, exist_ok=True)
    index_path, model_name = store / "index.faiss", args.embedding_model or "all-MiniLM-L6-v2"
    # 哈希算在解析后的文本上而不是文件字节上：PDF / HTML 只改了元数据、正文没变时，不必重算向量
    current = {d.id: (d, hashlib.sha256(d.text.encode("utf-8")).hexdigest()) for d in data.load_documents(docs_dir)}
    con = sqlite3.connect(store / "meta.sqlite")
    # doc_hash 存在每一行块上：不另建文档表，下面一句 SELECT DISTINCT doc_id, doc_hash 就取回每篇上次的哈希
    con.execute("CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, "
                "chunk_no INTEGER NOT NULL, text TEXT NOT NULL, doc_hash TEXT NOT NULL)")
    # info 记着向量模型名与配套索引文件的 sha256：下面靠这两项判断旧索引还能不能接着用
    con.execute("CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT)")
    info = dict(con.execute("SELECT key, value FROM info"))
    # 两阶段提交（见函数末尾）：元数据里记着"配套的索引文件"的 sha256。上次在提交之后、换文件之前被杀：
    # 临时文件就是已提交的那一版，补做改名（前滚）；临时文件对不上号：是没提交的半成品，丢掉
    tmp = store / "index.faiss.tmp"
    if tmp.exists():
        if info.get("index_sha256") == file_sha256(tmp):
            log.info("上次同步已提交、但换索引文件前中断：补做改名")
            os.replace(tmp, index_path)   # 同一文件系统上 os.replace 是原子的：不会留下写了一半的 index.faiss
        else:
            tmp.unlink()
    index = faiss.read_index(str(index_path)) if index_path.exists() and not rebuild else None
    count = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    # 换了向量模型、或索引文件不是元数据记录的那一版（被别的进程改过、旧版本的库），旧向量都不能再用：只能全量重建
    why = ("--rebuild" if rebuild else "还没有库" if index is None
           else "向量模型变了" if info.get("model") != model_name
           else "索引文件与元数据记录的版本不符" if info.get("index_sha256") != file_sha256(index_path)
           else f"索引 {index.ntotal} 条 ≠ 元数据 {count} 条" if index.ntotal != count else None)
    if why:
        log.info("%s：全量构建 %s", why, store.name)
        # 全量重建时元数据一起清空：否则下面按哈希比对会把旧文档都当成"没变"跳过，新索引里就缺了它们
        con.execute("DELETE FROM chunks")
        # IndexIDMap2 比 IndexIDMap 多一张 id → 位置的反查表：reconstruct(id) 靠它（一致性检查要按 id 取回向量）
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(embedder.get_embedding_dimension()))
    stored = dict(con.execute("SELECT DISTINCT doc_id, doc_hash FROM chunks"))
    new = [d for d in current if d not in stored]
    changed = [d for d in current if d in stored and stored[d] != current[d][1]]
    deleted = [d for d in stored if d not in current]

    # 删：已删除文档和已修改文档的旧块，一起按 id 从索引和元数据里拿掉
    for doc_id in deleted + changed:
        ids = np.array([r[0] for r in con.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))], "int64")
        # 索引和元数据必须一起删：只删元数据，旧向量还会被搜出来却查不到文本；只删索引，下次同步会以为这篇还在
        index.remove_ids(ids)
        con.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
    # 加：只有新文档和修改过的文档需要切块、向量化（这是最贵的一步，也是增量省下的时间）
    todo = retrieval.chunk_documents([current[d][0] for d in changed + new], args.chunk_size, args.chunk_overlap)
    # 块数不到 100 时不显示进度条：增量同步通常只有几块，一闪而过的进度条只会刷屏
    for s in tqdm(range(0, len(todo), args.batch_size), desc=f"向量化 {store.name}", disable=len(todo) < 100):
        batch = todo[s:s + args.batch_size]
        # id 由"文档 id#块序号"算出：修改过的文档块序号不变 → id 不变，所以上面必须先删旧块再加，否则 id 重复
        ids = np.array([chunk_key(c.id) for c in batch], dtype="int64")
        index.add_with_ids(retrieval.embed(embedder, [c.text for c in batch]), ids)
        con.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?)",
                        [(int(i), c.doc_id, int(c.id.rsplit("#", 1)[1]), c.text, current[c.doc_id][1])
                         for i, c in zip(ids, batch)])
    con.execute("INSERT OR REPLACE INTO info VALUES ('model', ?)", (model_name,))
    # 两阶段提交：① 新索引写到临时文件；② 它的 sha256 与块的增删在同一个 SQLite 事务里提交——这是唯一的提交点；
    # ③ 再把临时文件改名成正式文件。①② 之间被杀：事务回滚，旧索引 + 旧元数据仍然配套；②③ 之间被杀：下次开头前滚。
    # （只比条数不够：挪动一篇文档 = 删 1 增 1、条数不变，半途崩溃后会留下重复 id
    #   ——tests/test_reliability_index_crash.py）
    faiss.write_index(index, str(tmp))
    con.execute("INSERT OR REPLACE INTO info VALUES ('index_sha256', ?)", (file_sha256(tmp),))
    con.commit()
    con.close()
    os.replace(tmp, index_path)
    return {"added": len(new), "updated": len(changed), "deleted": len(deleted),
            "skipped": len(current) - len(new) - len(changed), "chunks_embedded": len(todo),
            "vectors": int(index.ntotal), "seconds": round(time.perf_counter() - t0, 3)}


def load_store(store: Path):
    """读回索引和元数据：(index, {id: (doc_id, text)})。"""
    import faiss

    con = sqlite3.connect(store / "meta.sqlite")
    meta = {i: (doc_id, text) for i, doc_id, text in con.execute("SELECT id, doc_id, text FROM chunks")}
    con.close()
    return faiss.read_index(str(store / "index.faiss")), meta


def every_nth(docs: list, max_docs: int) -> list:
    """均匀抽 max_docs 篇（0 = 全部），与 retrieval.load_kb 的抽样规则相同。

    等间隔而不是取前 N 篇：文档按路径排序，前 N 篇往往同一类（全是 faq/ 或全是中文），演示的增删改就偏了。
    """
    return docs[:: len(docs) // max_docs][:max_docs] if max_docs and len(docs) > max_docs else docs


def copy_kb(args: Args, work: Path) -> tuple[list, list[str]]:
    """把知识库（--max-docs 均匀抽样）复制到工作文件夹：演示的增删改只动副本。返回 (文档, 一致性检查用的查询)。"""
    if args.qa or not args.docs:   # 默认知识库自带问答；自己的 --docs 配 --qa
        src, _, qas = retrieval.load_kb(args.docs, args.qa, args.max_docs, args.max_questions)
        queries = [q["question"] for q in qas]
    else:                          # 只给了 --docs：用每篇文档的开头当查询
        src = every_nth(data.load_documents(args.docs), args.max_docs)
        # 取每篇开头 80 字当查询：它一定出自某篇文档；一致性检查只需要增量库与重建库"对同一批查询"比结果，用不着金标
        queries = [d.text[:80] for d in src][: args.max_questions or None]
    if len(src) < 3:
        raise UserError(f"--docs {args.docs}: 演示要修改 2 篇、删除 1 篇，至少需要 3 篇文档（现在 {len(src)} 篇）")
    # 每次从干净的副本开始：上次运行改过的副本若还在，演示的"新增 / 修改"就不再是变化
    shutil.rmtree(work, ignore_errors=True)
    for d in src:
        (work / d.id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(d.path, work / d.id)
    # 再加上问新文档的问题：增量同步后它们应当搜得到新块
    return src, queries + ["S9 门铃的录像在云端保存几天？", "How high to mount the S9?"]


def check_consistency(store: Path, rebuilt: Path, old_meta: dict, removed_id: str, qvecs) -> tuple[dict, set, set]:
    """一致性检查：每一项都是增量维护最容易出错的地方。返回 (各项结果, 过期 id, 查询返回过的 id)。"""
    import numpy as np

    index, meta = load_store(store)
    index_full, meta_full = load_store(rebuilt)
    live = np.array(sorted(meta), dtype="int64")
    own = np.stack([index.reconstruct(int(i)) for i in live])
    # 取前 2 名：第 2 名用来识别"另一块文本完全相同、分数并列"的情形
    scores, top = index.search(own, 2)
    # 第 1 名应是它自己；若另有一块文本完全相同（向量相同、分数并列），也算对
    self_top1 = all(t[0] == i or abs(s[0] - s[1]) < 1e-6 and i in t for i, t, s in zip(live, top, scores))
    # 过期 id：被删文档的块 + 修改后不复存在的尾部块。修改文档的其余块沿用原 id（位置没变），
    # 旧内容有没有残留，靠下面 same_vectors_as_rebuild（同一 id 的向量与重建库逐一比较）来查
    stale = set(old_meta) - set(meta)
    s_inc, i_inc = index.search(qvecs, 10)
    s_full, i_full = index_full.search(qvecs, 10)
    returned = {int(i) for i in i_inc.ravel() if i >= 0}
    # id 集合不同时逐一比向量没有意义，而且 reconstruct 一个重建库里没有的 id 会直接报错：记为 None，该项判失败
    own_full = np.stack([index_full.reconstruct(int(i)) for i in live]) if set(meta) == set(meta_full) else None
    checks = {
        "ntotal_equals_metadata": index.ntotal == len(meta) == index_full.ntotal == len(meta_full),
        "self_search_top1": bool(self_top1),
        "no_stale_ids_returned": not (returned & stale) and returned <= set(meta),
        "same_ids_as_rebuild": set(meta) == set(meta_full),
        # 容差 1e-4：增量与重建的分批组成不同，同一段文本两次编码可能有浮点级的微小差别
        "same_vectors_as_rebuild": own_full is not None and bool(np.allclose(own, own_full, atol=1e-4)),
        "same_results_as_rebuild": bool(np.allclose(s_inc, s_full, atol=1e-4))
        # 只比 top-5 的 id 集合、不比顺序：分数并列的块谁先谁后没有保证
        and all(set(a) == set(b) for a, b in zip(i_inc[:, :5].tolist(), i_full[:, :5].tolist())),
        "deleted_doc_gone": all(doc != removed_id for doc, _ in meta.values()),
    }
    return checks, stale, returned


def plot_timings(out: run.Run, runs: list[dict], speedup: float) -> None:
    """三次同步（初次建库、增量、重建）的耗时柱状图，每根柱子标上向量化的块数。"""
    fig, save = out.plot("sync_vs_rebuild.png")
    ax = fig.subplots()
    names = ["step 1: build (or sync)", "incremental sync", "full rebuild"]
    bars = ax.bar(names, [r["seconds"] for r in runs], color=["#999999", "#2a9d8f", "#e76f51"])
    for b, r in zip(bars, runs):
        ax.annotate(f"{r['seconds']:.2f}s\n{r['chunks_embedded']} chunks embedded",
                    (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title(f"FAISS IndexIDMap2: incremental is {speedup:.1f}x faster than rebuild")
    ax.margins(y=0.25)   # 给柱顶的标注留出空间，否则最高那根的文字会被图框切掉
    save()


def main(args: Args) -> dict:
    import faiss

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    log = out.log

    # 1. 把知识库复制到输出目录里的工作文件夹：演示的增删改只动副本，不碰你的原始文档
    work = out.path("work_kb")
    src, queries = copy_kb(args, work)
    embedder = retrieval.load_embedder(args.embedding_model, str(models.pick_device(args.device)))   # 只有向量化用 GPU
    store, rebuilt = out.path("store"), out.path("store_rebuilt")
    initial = sync(work, store, embedder, args, args.rebuild, log)
    log.info("建库（输出目录里有上次的库时是增量同步）：%d 篇文档 → %d 个向量，%.2fs，%s", len(src), initial["vectors"],
             initial["seconds"], {k: initial[k] for k in ("added", "updated", "deleted", "skipped")})

    # 2. 在副本上新增 2 篇、修改 2 篇（一篇末尾追加、一篇开头插入：后者让所有块都错位）、删除 1 篇
    edited, removed = edits.edit_copy(work, src)
    _, old_meta = load_store(store)   # 改动前的 id 留一份：同步后还能搜到其中已过期的，就是增量维护出了错
    log.info("副本上的改动：新增 %s，修改 %s，删除 %s", list(edits.NEW_DOCS), [d.id for d in edited], removed.id)

    # 3. 增量同步 vs 同一最终状态的全量重建（--rebuild 那条路），同一个向量模型、同样的写盘
    inc = sync(work, store, embedder, args, False, log)
    full = sync(work, rebuilt, embedder, args, True, log)
    speedup = full["seconds"] / max(inc["seconds"], 1e-9)   # 分母兜底：增量快到计时为 0 时不除零
    log.info("增量同步 %.2fs（向量化 %d 块） vs 全量重建 %.2fs（向量化 %d 块）：快 %.1f 倍", inc["seconds"],
             inc["chunks_embedded"], full["seconds"], full["chunks_embedded"], speedup)

    # 4. 一致性检查：每一项都是增量维护最容易出错的地方
    checks, stale, returned = check_consistency(store, rebuilt, old_meta, removed.id,
                                                retrieval.embed(embedder, queries))
    consistent = all(checks.values())
    for k, v in checks.items():
        (log.info if v else log.error)("一致性检查 %-24s %s", k, "通过" if v else "失败")
    log.info("%d 个过期 id（删除/修改前的旧块）在 %d 个查询的 top-10 里出现 %d 次", len(stale), len(queries),
             len(returned & stale))

    # 5. 耗时对比图：柱子上同时标向量化了多少块——省下的是计算量，秒数随机器忙闲会变，块数不会
    plot_timings(out, [initial, inc, full], speedup)

    return out.finish({
        "vectors": inc["vectors"], "added": inc["added"], "updated": inc["updated"], "deleted": inc["deleted"],
        "skipped": inc["skipped"], "consistent": consistent, "checks": checks,
        "incremental_s": inc["seconds"], "rebuild_s": full["seconds"], "initial_build_s": initial["seconds"],
        "incremental_vs_rebuild_speedup": round(speedup, 2), "chunks_embedded_incremental": inc["chunks_embedded"],
        "chunks_embedded_rebuild": full["chunks_embedded"], "stale_ids": len(stale), "queries": len(queries),
        # 记下 faiss 版本：索引文件是 faiss 的二进制格式，拿结果复现或换机器读库时要知道是哪一版写的
        "index_bytes": (store / "index.faiss").stat().st_size, "faiss_version": faiss.__version__,
        "embedding_model": args.embedding_model or "all-MiniLM-L6-v2"},
        summary=f"+{inc['added']} ~{inc['updated']} -{inc['deleted']} 篇，{inc['vectors']} 个向量；"
                f"增量 {inc['seconds']:.2f}s vs 重建 {full['seconds']:.2f}s（{speedup:.1f}x）；consistent={consistent}",
        claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
