"""知识库增量更新：增 / 改 / 删文档时只重新向量化变了的块，定期全量重建，追加式审计日志，进程被 SIGKILL 也不坏。

做法（都是真实的库）：
  - LangChain 索引 API `index(..., cleanup="full")` + `SQLRecordManager`（SQLite）记下每个块内容哈希，
    向量库是 Chroma（langchain-chroma，本地持久化）；块 id = 内容哈希，没变的块直接跳过，不再向量化；
  - 审计日志 audit.jsonl 只追加：每次更新先写本次的动作（time / doc_id / action / hash），索引写完再写一行 commit；
    "已提交状态" = 按顺序回放有 commit 的更新，下一次更新就和它比（崩溃的那次没有 commit，重跑时会再做一遍）；
  - 崩溃测试：子进程做更新，在随机点（一半在第 N 次写向量库/记录表/日志时，一半按随机时长）被 SIGKILL，
    然后重跑更新，检查索引与"干净重建"完全一致（块 id、文本、来源、向量），没有重复块也没有丢块，审计日志一致。

运行：
  python lesson7_hybrid_rag/03_incremental_updates/update_strategy.py            # CPU，全部文档，10 次崩溃试验
  python lesson7_hybrid_rag/03_incremental_updates/update_strategy.py --smoke    # 1/4 文档，10 次崩溃试验
  python lesson7_hybrid_rag/03_incremental_updates/update_strategy.py --docs 你的文档目录 --crash-trials 30 \\
      --embedding-model BAAI/bge-small-zh-v1.5 --config configs/lesson7/update_strategy.yaml   # GPU / 自己的数据

你会看到：增量更新只重新向量化变了的少数块，文档没变的更新一个块都不重算，定期全量重建则重算全部块；
10 次 SIGKILL 试验（绝大多数真的杀在更新途中）之后重跑，索引都与干净重建一致（consistent_after_crash = true）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：0.5 分钟，0.8 GB，结论 5/5 成立
  ✓ 增量更新只重算变了的块：增量那轮重新向量化的块数 / 初次全量建库向量化的块数：0.02116（≤ 0.2）
  ✓ 文档没变的更新一个块都不重算：无变化那轮重新向量化的块数 / 初次全量建库的块数：0（≤ 0）
  ✓ 增量更新的索引与同一版文档的干净重建完全一致（一致为真）：1（≥ 1）
  ✓ SIGKILL 之后重跑，索引与干净重建一致：一致的试验 / 试验次数：1（≥ 1）
  ✓ 崩溃真的发生在更新途中：被杀的试验 / 试验次数：1（≥ 0.7）
<!-- /results -->
"""
from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, retrieval, run
from common.errors import UserError

# 冒烟只取 1/4 文档：崩溃试验次数不减（结论要看 --crash-trials 次都一致），省的是每次建库的向量化时间
SMOKE = dict(doc_stride=4)
# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（初次全量建库、干净重建）都在同一次运行里做
CLAIMS = [
    run.Claim("增量更新只重算变了的块：增量那轮重新向量化的块数 / 初次全量建库向量化的块数",
              'reembedded / rounds[0]["reembedded"]', "<=", 0.2, 0.2),
    run.Claim("文档没变的更新一个块都不重算：无变化那轮重新向量化的块数 / 初次全量建库的块数",
              'rounds[2]["reembedded"] / rounds[0]["reembedded"]', "<=", 0, 0),
    run.Claim("增量更新的索引与同一版文档的干净重建完全一致（一致为真）",
              "incremental_equals_rebuild", ">=", 1, 1),
    run.Claim("SIGKILL 之后重跑，索引与干净重建一致：一致的试验 / 试验次数",
              'sum(t["consistent"] for t in trials) / len(trials)', ">=", 1, 1),
    # 上一条要有分量，杀点得真的落在更新途中（按时长杀的可能在更新跑完之后才到）
    run.Claim("崩溃真的发生在更新途中：被杀的试验 / 试验次数",
              "killed_trials / crash_trials", ">=", 0.7, 0.7),
]
NEW_DOCS = {  # 第一次更新新增的两篇（项目自写，中英各一）
    "faq/r5_presale_zh.md": "# 云帆扫地机器人 R5 预售说明\n\nR5 将于下月开启预售，预售价 2999 元，"
                            "定金 100 元可抵 300 元。\n\nR5 支持自动集尘和热风烘干拖布，整机保修 2 年，"
                            "电池保修 1 年。预售订单在正式发售后 3 天内发货。",
    "faq/r5_presale_en.md": "# Yunfan R5 pre-sale\n\nThe R5 opens for pre-order next month at 2999 yuan. "
                            "A 100 yuan deposit counts as 300 yuan at checkout.\n\nThe R5 adds an auto-empty dock "
                            "and hot-air mop drying. Pre-orders ship within 3 days of the official launch.",
}


@dataclass
class Args(retrieval.KBArgs):
    chunk_size: int = cli.arg(300, "切块长度（字符）", min=50)
    chunk_overlap: int = cli.arg(50, "相邻块重叠（字符）", min=0)
    doc_stride: int = cli.arg(1, "每隔几篇取一篇文档（--smoke 时 4）", min=1)
    batch_size: int = cli.arg(16, "索引 API 每批写入的块数（批越小，可崩溃的点越多）", min=1)
    full_rebuild_every: int = cli.arg(3, "每多少次更新做一次定期全量重建（清空后重算）", min=1)
    crash_trials: int = cli.arg(10, "SIGKILL 崩溃试验次数（随机点由 --seed 决定）", min=0)


# 只有本节用到的机械放在旁边的文件里：_kill_child（两种杀法）、_audit（审计日志）、_counting（数向量化次数）
kill = run.import_sibling(__file__, "_kill_child")
audit_log = run.import_sibling(__file__, "_audit")
# KillSwitch 在这些方法（向量库 / 记录表真正写盘的地方）之前各数一次：杀点能落在任意两次写之间
VECTOR_WRITES, RECORD_WRITES = ("add_documents", "delete"), ("update", "delete_keys")


def open_store(state: Path, embeddings):
    """Chroma（本地持久化）+ SQLRecordManager（SQLite），都放在 state 目录里。"""
    from langchain_chroma import Chroma
    from langchain_classic.indexes import SQLRecordManager

    # persist_directory：索引落在磁盘上，被杀的子进程写到哪一步，重跑的子进程就从哪一步看起——崩溃试验要的正是这个
    vs = Chroma(collection_name="kb_chunks", embedding_function=embeddings, persist_directory=str(state / "chroma"))
    # 记录表记下每个块 id（内容哈希）属于哪篇文档、何时写入：index() 靠它判断跳过、新增还是清理
    rm = SQLRecordManager("chroma/kb_chunks", db_url=f"sqlite:///{state / 'records.db'}")
    # create_schema 用 SQLAlchemy 的 create_all，表已存在就跳过：每次打开都调用也无害
    rm.create_schema()
    return vs, rm


def update(args: Args, docs_dir: Path, state: Path, embed, rebuild: bool = False, crash_at: int = 0) -> dict:
    """一次更新：与已提交状态比出增/改/删 → 写审计 → LangChain index() 增量写入 → commit。

    crash_at > 0：第 N 次写之前 SIGKILL 自己（崩溃试验用）。
    """
    from langchain_classic.indexes import index
    from langchain_core.documents import Document

    state.mkdir(parents=True, exist_ok=True)
    switch = kill.KillSwitch(crash_at)
    docs = data.load_documents(docs_dir)
    audit = state / "audit.jsonl"
    recs, committed = audit_log.read(audit)
    # 每次更新一个新 id（含 pid）：被杀后重跑的那次与被杀的那次在日志里分得开
    uid = f"u{len({r['update'] for r in recs}) + 1}-{os.getpid()}"
    actions = audit_log.plan_actions(committed, {d.id: audit_log.sha(d.text) for d in docs}, rebuild)
    for act, doc_id, h in actions:   # 先写"要做什么"再动索引（预写日志）：被杀时日志里看得出做到哪一步
        audit_log.append(audit, {"time": time.time(), "update": uid, "doc_id": doc_id, "action": act, "hash": h})
        # 每写一行审计也算一次写：杀点可以落在两行审计之间（动作只记下一半）
        switch.tick()
    vs, rm = open_store(state, embed.for_index())
    switch.guard(vs, VECTOR_WRITES)   # 向量库与记录表的每次真正写盘之前，都可能被杀
    switch.guard(rm, RECORD_WRITES)
    # 记录表也要清：只删向量不删记录，index() 会以为块都还在而全部跳过；
    # delete_collection 之后 langchain_chroma 把集合句柄置空，旧的 vs 再用就报错，所以重新打开；
    # 重开的两个对象没有再 guard：崩溃试验只跑 rebuild=False，重建这一轮不设杀点
    if rebuild:
        vs.delete_collection()
        rm.delete_keys(rm.list_keys())
        vs, rm = open_store(state, embed.for_index())
    chunks = retrieval.chunk_documents(docs, args.chunk_size, args.chunk_overlap)
    # source 是文档 id：cleanup="full" 据此删掉"这次没出现的文档"的旧块，改了的文档旧块也随之清理
    lc_docs = [Document(page_content=c.text, metadata={"source": c.doc_id}) for c in chunks]
    # 取差值：count 是对象上的累计值（fork 时连同父进程里的数一起继承），只算这次更新新增的
    before = embed.count
    # cleanup="full"：这次没出现的文档的块全删；"incremental" 只清理本批出现过的 source，被删的文档会一直留在库里。
    # key_encoder="sha256"：默认 sha1 会警告不抗碰撞；块 id 就是这个哈希，中途换算法等于所有块都要重算
    res = index(lc_docs, rm, vs, cleanup="full", source_id_key="source", batch_size=args.batch_size,
                key_encoder="sha256")
    audit_log.append(audit, {"time": time.time(), "update": uid, "doc_id": "*", "action": "commit", "hash": ""})
    switch.tick()
    return {**res, "reembedded": embed.count - before, "actions": len(actions), "ops": switch.ops,
            "chunks": len(chunks)}


def snapshot(state: Path) -> dict:
    """索引的内容：块 id、来源、文本哈希、向量，以及记录表里的键（崩溃后与干净重建逐项比）。"""
    counting = run.import_sibling(__file__, "_counting")
    vs, rm = open_store(state, counting.CountingEmbeddings(None).for_index())   # 只读，不会真的加载模型
    got = vs.get(include=["documents", "metadatas", "embeddings"])
    rows = sorted([i, m["source"], audit_log.sha(t)] for i, t, m in zip(got["ids"], got["documents"], got["metadatas"]))
    # 转成 Python float：Chroma 给的是 numpy 数组，快照要经 JSON 从子进程带回父进程，numpy 类型序列化不了
    vecs = {i: [float(x) for x in e] for i, e in zip(got["ids"], got["embeddings"])}
    return {"rows": rows, "vectors": vecs, "record_keys": sorted(rm.list_keys())}


def same_index(a: dict, b: dict) -> bool:
    """块（id、来源、文本）完全相同，向量逐元素差 < 1e-4（不同批大小下矩阵乘法的舍入会差 1e-7 量级）。"""
    return a["rows"] == b["rows"] and all(
        max(abs(x - y) for x, y in zip(a["vectors"][i], b["vectors"][i])) < 1e-4 for i, *_ in a["rows"])


def rerun_and_snapshot(args, docs_dir: Path, state: Path, embed) -> dict:
    """崩溃之后：重跑同一次更新，再取索引快照（同一个子进程里做，省一次启动）。"""
    update(args, docs_dir, state, embed)
    return snapshot(state)


def apply_changes(live: Path) -> dict:
    """第一次更新的改动：新增 2 篇、改 2 篇（改一个数字、补一段）、删 1 篇。"""
    # 排序后固定取第一、中间、最后一篇来改：每次运行改的是同样几篇，重算块数可复现
    files = sorted(p for p in live.rglob("*") if p.is_file())
    for rel, text in NEW_DOCS.items():
        (live / rel).parent.mkdir(parents=True, exist_ok=True)
        (live / rel).write_text(text + "\n", encoding="utf-8")
    a, b, c = files[0], files[len(files) // 2], files[-1]
    # 改一个数字：只有一两个块的哈希变了；末尾补一段：前面的块原样保留，只多出新块——两种都应只重算少数块
    a.write_text(a.read_text(encoding="utf-8").replace("1", "2", 1), encoding="utf-8")
    b.write_text(b.read_text(encoding="utf-8") + "\n\n补充说明 / Note: 本条款自 2027 年 1 月 1 日起生效。\n",
                 encoding="utf-8")
    c.unlink()
    return {"added": list(NEW_DOCS), "modified": [str(a.relative_to(live)), str(b.relative_to(live))],
            "deleted": [str(c.relative_to(live))]}


def prepare_versions(args: Args, out) -> tuple[Path, Path, dict]:
    """一份"活的"知识库副本 v0，以及在它上面改出来的 v1（新增 / 修改 / 删除各有）。"""
    docs, _, _ = retrieval.load_kb(args.docs, args.qa)
    v0, v1 = out.path("kb_v0"), out.path("kb_v1")
    for d in (v0, v1):
        # 重跑同一 --output-dir 时先清掉上次的副本：copytree 的目标已存在会报 FileExistsError
        shutil.rmtree(d, ignore_errors=True)
    for doc in docs[::args.doc_stride]:
        (v0 / doc.id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(doc.path, v0 / doc.id)
    shutil.copytree(v0, v1)
    return v0, v1, apply_changes(v1)


def update_rounds(args: Args, out, v0: Path, v1: Path, state: Path) -> tuple[list[dict], dict | None]:
    """初次建库 → 增量更新 → 无变化的更新 → 定期全量重建（每 --full-rebuild-every 次），各记重新向量化的块数；
    另返回最后一次增量（非重建）更新之后的索引快照：拿它和干净重建比，才是在检验增量更新本身。"""
    counting = run.import_sibling(__file__, "_counting")
    plain = counting.CountingEmbeddings(args.embedding_model)   # 不带缓存：数出来的就是真实的向量化次数
    history, incremental_snapshot = [], None
    # CLAIMS 把 rounds[2] 当"无变化"那轮：--full-rebuild-every 设成 1 或 2 时它会变成全量重建，那条结论就不成立；
    # 默认 3 时第 4 轮（again）正好是定期重建
    for n, (name, folder) in enumerate([("initial", v0), ("incremental", v1), ("no_change", v1), ("again", v1)], 1):
        # 定期全量重建：防止长期漂移（比如换了切块参数、手工改过库），代价是这一轮全部重算
        rebuild = n > 1 and (n - 1) % args.full_rebuild_every == 0
        name = "scheduled_rebuild" if rebuild else name
        # 每轮都在新的子进程里跑：和崩溃试验走同一条路径，向量模型也只在子进程里加载（见 _counting）
        r = kill.run_in_child(update, args, folder, state, plain, rebuild)
        history.append({"round": name, "rebuild": rebuild, **r})
        if n > 1 and not rebuild:   # 定期重建之后的索引等于重建是理所当然的，要比的是增量更新出来的那一份
            incremental_snapshot = kill.run_in_child(snapshot, state)
        out.log.info(f"更新 {n}（{name}{'，全量重建' if rebuild else ''}）：新增 {r['num_added']}、"
                     f"跳过 {r['num_skipped']}、删除 {r['num_deleted']}，"
                     f"重新向量化 {r['reembedded']} / {r['chunks']} 块")
    return history, incremental_snapshot


def trial_dir(out, t: int, pristine: Path) -> Path:
    """每次试验从 v0 索引的一份拷贝出发（v0 由已退出的子进程写完，文件是关着的）。"""
    d = out.path(f"trial_{t}")
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(pristine, d)
    return d


def crash_trial(args: Args, out, t: int, point, v1: Path, pristine: Path, cached, want: dict) -> dict:
    """一次试验：从 v0 的索引更新到 v1，途中 SIGKILL；重跑后与干净重建比块、向量、记录表与审计日志。"""
    d = trial_dir(out, t, pristine)
    if t % 2 == 0:   # 在第 N 次写之前自杀（覆盖每一种"写了一半"的中间状态）
        killed = kill.run_in_child(update, args, v1, d, cached, False, point) is None
    else:            # 按随机时长从外面杀（可能正好在 Chroma / SQLite 写盘途中，是 tick 够不到的位置）
        killed = kill.run_in_child(update, args, v1, d, cached, kill_after=point) is None
    snap = kill.run_in_child(rerun_and_snapshot, args, v1, d, cached)
    recs, committed = audit_log.read(d / "audit.jsonl")
    # 审计日志回放出的状态必须等于磁盘上的文档：否则下次更新会漏掉（或重复）某篇的改动
    audit_ok = committed == {doc.id: audit_log.sha(doc.text) for doc in data.load_documents(v1)}
    # 块 id 有重复 = 同一块写了两次；记录表的键必须正好是这些 id：多了是删不掉的孤儿记录，少了下次更新会重复写
    ids = [r[0] for r in snap["rows"]]
    ok = (same_index(snap, want) and len(ids) == len(set(ids)) and snap["record_keys"] == sorted(ids)
          and audit_ok)
    out.log.info(f"崩溃试验 {t}：{f'第 {point} 次写' if t % 2 == 0 else f'{point:.2f} 秒'} "
                 f"{'被杀' if killed else '（已跑完）'} → 重跑后{'一致' if ok else '不一致！'}")
    # 试验做完就删：每份都是完整的 Chroma + SQLite 拷贝，--crash-trials 调大时会一直占着磁盘
    shutil.rmtree(d, ignore_errors=True)
    return {"trial": t, "kind": "op" if t % 2 == 0 else "timer", "point": point, "killed": killed,
            "consistent": ok, "chunks": len(ids), "audit_lines": len(recs)}


def crash_trials(args: Args, out, v1: Path, pristine: Path, cached, want: dict) -> tuple[list[dict], int]:
    """先完整跑一次数出写动作总数与用时，再按种子抽杀点：偶数次按"第几次写"，奇数次按"多少秒"。"""
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    # 先在一份拷贝上完整跑一次，只为数出写动作总数与用时：pristine 本身不能被改动，每次试验都从它出发
    total_ops = kill.run_in_child(update, args, v1, trial_dir(out, -1, pristine), cached)["ops"]
    full_s = time.perf_counter() - t0                                    # 一次完整更新（含子进程启动）的用时
    shutil.rmtree(out.path("trial_-1"), ignore_errors=True)
    trials = []
    for t in range(args.crash_trials):
        # 时长取完整用时的 20%..100%：太早只会杀在启动阶段（什么都还没写），看不出写了一半的问题
        # randint 两端都含：杀点可以落在 commit 那行审计写完之后（索引已完整，只是进程没正常退出）
        point = rng.randint(1, total_ops) if t % 2 == 0 else round(rng.uniform(0.2, 1.0) * full_s, 3)
        trials.append(crash_trial(args, out, t, point, v1, pristine, cached, want))
    return trials, total_ops


def plot_rounds(out, history: list[dict]) -> None:
    """每轮重新向量化的块数 vs 总块数：增量更新那一根柱子应远低于虚线。"""
    fig, save = out.plot("reembedded_per_round.png")
    ax = fig.add_subplot(111)
    ax.bar([h["round"] for h in history], [h["reembedded"] for h in history], label="re-embedded chunks")
    ax.plot([h["round"] for h in history], [h["chunks"] for h in history], "k--o", label="total chunks")
    ax.set(ylabel="chunks", title="chunks embedded per update round")
    ax.legend()
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 只为尽早校验 --device：向量模型在子进程里由 HuggingFaceEmbeddings 按默认设备加载
    models.pick_device(args.device)
    if args.chunk_overlap >= args.chunk_size:
        raise UserError(f"--chunk-overlap {args.chunk_overlap}: 必须小于 --chunk-size {args.chunk_size}")
    # 向量模型在 fork 出的子进程里才加载（见 _counting）：坏的本地目录要在父进程里、起子进程之前查出来
    if (name := args.embedding_model) and (name.startswith(("/", ".", "~")) or os.path.lexists(name)):
        models.check_dir(name, "--embedding-model")   # hub id 留给加载时报
    # 这些库先在父进程里导入，fork 出的子进程直接复用（sentence-transformers 连带 torch、transformers，每个子进程
    # 省下约 3 秒）。只导入：不建 Chroma 客户端、不加载模型——导入不起 torch 的线程池，fork 才安全（见 _counting）
    import langchain_chroma  # noqa: F401
    import langchain_classic.indexes  # noqa: F401
    import langchain_huggingface  # noqa: F401
    import sentence_transformers  # noqa: F401

    # 1. 准备一份"活的"知识库副本（v0），以及它的改动版本（v1）
    v0, v1, changes = prepare_versions(args, out)
    out.log.info(f"v0 {sum(1 for _ in v0.rglob('*.*'))} 篇文档；v1 改动：{changes}")

    # 2. 初次建库 → 增量更新 → 无变化的更新 → 定期全量重建：只有变了的块才重新向量化
    state = out.path("index_state")
    # state 残留上次运行的索引时，"初次建库"会变成一次增量更新，rounds[0] 就不再是全量的基线
    shutil.rmtree(state, ignore_errors=True)
    history, incremental_snapshot = update_rounds(args, out, v0, v1, state)
    incr = history[1]

    # 3. 干净重建：同样的 v1 从零建一个索引，作为崩溃试验的"标准答案"；增量更新的结果也要与它一致
    # 都先清空；缓存的 namespace 固定为 minilm，换了 --embedding-model 还留着旧缓存，就会读到别的模型的向量
    cache, pristine, clean = out.path("embed_cache"), out.path("state_v0"), out.path("state_clean")
    for d in (cache, pristine, clean):
        shutil.rmtree(d, ignore_errors=True)
    cached = run.import_sibling(__file__, "_counting").CountingEmbeddings(args.embedding_model, cache)
    kill.run_in_child(update, args, v0, pristine, cached)
    kill.run_in_child(update, args, v1, clean, cached)
    want = kill.run_in_child(snapshot, clean)
    # 比的是最后一次增量更新之后的快照（默认 --full-rebuild-every 3 时最后一轮是定期重建，拿它比什么也证明不了）；
    # --full-rebuild-every 1 时每轮都重建、没有增量快照，这一条就照实不成立
    same_as_rebuild = incremental_snapshot is not None and same_index(incremental_snapshot, want)

    # 4. 崩溃试验：从 v0 的索引出发更新到 v1，在随机点 SIGKILL，重跑，再与干净重建比
    trials, total_ops = crash_trials(args, out, v1, pristine, cached, want)

    # 5. 图与指标：一致性要求每次试验都一致，且增量结果等于干净重建（只看"没报错"证明不了崩溃安全）
    plot_rounds(out, history)
    consistent = all(t["consistent"] for t in trials) and same_as_rebuild
    killed = sum(bool(t["killed"]) for t in trials)
    return out.finish({"reembedded": incr["reembedded"], "total_chunks": incr["chunks"],
                       "crash_trials": len(trials), "consistent_after_crash": consistent,
                       "killed_trials": killed, "incremental_equals_rebuild": same_as_rebuild,
                       "rounds": history, "trials": trials, "changes": changes, "total_ops": total_ops},
                      summary=f"增量更新只重算 {incr['reembedded']}/{incr['chunks']} 块；{len(trials)} 次 SIGKILL 试验"
                              f"（{killed} 次真的杀在途中）后重跑，与干净重建一致={consistent}",
                      claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
