"""可靠性 · 索引增量更新被 kill（issue 8 第 7 项）：任何一点崩溃后再跑一次，索引都与全量重建一模一样。

第 6 课 03 的 sync()（FAISS 索引 + SQLite 元数据，按文档哈希增删改）在一次增量更新（新增 2 篇、改 2 篇、删 1 篇）
的途中被 SIGKILL：按种子从它的每一个"写动作"（SQLite 的 execute/commit、FAISS 的 add/remove/write_index、
os.replace）里抽 ≥10 个，在那个动作执行前杀掉子进程。然后正常地再同步一次，断言：
  文档一篇不少、块 id 没有重复、索引条数 = 元数据条数，id/文本/向量与对同一最终状态的全量重建完全相同。
子进程用 fork 得到（父进程已加载好向量模型）；子进程里的向量来自父进程用真实 MiniLM 算好的缓存，
这样子进程不跑 torch（fork 后的 OpenMP 线程池不安全），被测的只有索引与元数据的写入顺序。
"""
import functools
import os
import random
import shutil
import sqlite3
import sys

import numpy as np
import pytest

from common import data, retrieval, run
from tests.conftest import REPO, load_script

SCRIPT = "lesson6_rag/03_vector_db_build/build_vector_store.py"
# fork 子进程、按"第几次写"杀掉它的机械只写一次：借用第 7 课 03（增量更新的崩溃试验）旁边的 _kill_child.py
KILL = run.import_sibling(REPO / "lesson7_hybrid_rag/03_incremental_updates/update_strategy.py", "_kill_child")
SEED = 7
TRIALS = 12
WRITES = {"execute", "executemany", "commit", "replace", "write_index", "replacement_add_with_ids",
          "replacement_remove_ids", "add_with_ids", "remove_ids"}


class CachedEmbedder:
    """真实向量模型 + 按文本缓存：父进程里算过的文本，子进程直接取（不再调用 torch）。"""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def get_embedding_dimension(self):
        return self.model.get_embedding_dimension()

    def encode(self, texts, **kw):
        miss = [t for t in texts if t not in self.cache]
        if miss:
            assert os.getpid() == PARENT, "子进程里不该再调用向量模型"
            for t, v in zip(miss, self.model.encode(miss, **kw)):
                self.cache[t] = v
        return np.stack([self.cache[t] for t in texts])


PARENT = os.getpid()


class Log:
    def info(self, *a):
        pass

    warning = error = info


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    mod = load_script(SCRIPT)
    root = tmp_path_factory.mktemp("kb")
    v1, v2 = root / "v1", root / "v2"
    docs = data.load_documents(data.DATA_DIR / "kb" / "docs")[::4][:10]
    for d in docs:
        (v1 / d.id).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(d.path, v1 / d.id)
    shutil.copytree(v1, v2)
    # 一次典型的增量更新：新增 2 篇、改 2 篇（一篇末尾追加、一篇开头插入：后者让所有块错位）、删 1 篇
    edits = mod.edits   # 第 6 课 03 的改动素材（新增的两篇、追加的一段）在它旁边的 _edits.py
    for name, text in edits.NEW_DOCS.items():
        (v2 / name).write_text(text, encoding="utf-8")
    a, b = docs[0].id, docs[1].id
    (v2 / a).write_text((v2 / a).read_text(encoding="utf-8") + "\n\n" + edits.EDIT["zh"] + "\n", encoding="utf-8")
    (v2 / b).write_text(edits.EDIT["en"] + "\n\n" + (v2 / b).read_text(encoding="utf-8"), encoding="utf-8")
    (v2 / docs[-1].id).unlink()
    # 另一种更新：把一篇文档挪到别的文件夹（= 删 1 篇 + 增 1 篇，块数不变：只比条数的一致性检查看不出半途崩溃）
    v3 = root / "v3"
    shutil.copytree(v1, v3)
    (v3 / "moved").mkdir()
    os.rename(v3 / docs[2].id, v3 / "moved" / os.path.basename(docs[2].id))
    args = mod.Args(smoke=True, chunk_size=300, chunk_overlap=50)
    emb = CachedEmbedder(retrieval.load_embedder(None, "cpu"))
    base = root / "base"
    mod.sync(v1, base, emb, args, True, Log())
    refs = {}
    for name, target in (("update", v2), ("move", v3)):
        refs[name] = (target, root / f"ref-{name}")
        mod.sync(target, refs[name][1], emb, args, True, Log())    # 同一最终状态的全量重建 = 标准答案
    return mod, refs, base, emb, args


def _snapshot(mod, store):
    index, meta = mod.load_store(store)
    ids = [int(index.id_map.at(i)) for i in range(index.ntotal)]
    vecs = {i: index.reconstruct(i) for i in ids}
    return ids, meta, vecs


def _profile_writes(switch, frame, event, arg):
    """sys.setprofile 的钩子：每个名字在 WRITES 里的调用（Python 或 C 函数）算一次写，交给 KillSwitch 数。"""
    name = getattr(arg, "__name__", None) if event == "c_call" else frame.f_code.co_name
    if event in ("call", "c_call") and name in WRITES:
        switch.tick()


def _sync_counting_writes(mod, target, store, emb, args, crash_at: int = 0) -> int:
    """跑一次 sync，数出其中的写动作；crash_at > 0 时在第 crash_at 个写动作之前 SIGKILL 自己。"""
    switch = KILL.KillSwitch(crash_at)
    sys.setprofile(functools.partial(_profile_writes, switch))
    try:
        mod.sync(target, store, emb, args, False, Log())
    finally:
        sys.setprofile(None)
    return switch.ops


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["update", "move"])
def test_sigkill_during_incremental_update_then_rerun_equals_rebuild(setup, tmp_path, scenario):
    mod, refs, base, emb, args = setup
    v2, ref = refs[scenario]
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    total = _sync_counting_writes(mod, v2, probe, emb, args)
    rng = random.Random(SEED)
    # 均匀抽 TRIALS 个写动作，外加最后几个（写索引、改名、提交之间的窗口最危险）
    points = sorted(set(rng.sample(range(1, total + 1), min(TRIALS - 3, total)) + list(range(max(1, total - 2),
                                                                                         total + 1))))
    want_ids, want_meta, want_vecs = _snapshot(mod, ref)
    report = []
    for k in points:
        store = tmp_path / f"trial-{k}"
        shutil.copytree(base, store)
        # fork 出的子进程在第 k 个写动作前 SIGKILL 自己；run_in_child 对被杀的子进程返回 None
        done = KILL.run_in_child(_sync_counting_writes, mod, v2, store, emb, args, k)
        assert done is None, f"第 {k} 个写动作前没有被杀（子进程跑完了，共 {done} 个写动作）"
        res = mod.sync(v2, store, emb, args, False, Log())      # 崩溃后照常再跑一次
        ids, meta, vecs = _snapshot(mod, store)
        assert len(ids) == len(set(ids)), f"第 {k} 点：索引里有重复 id"
        assert sorted(ids) == sorted(meta), f"第 {k} 点：索引与元数据不一致"
        assert meta == want_meta, f"第 {k} 点：元数据与全量重建不同"
        assert set(ids) == set(want_ids), f"第 {k} 点：块 id 与全量重建不同"
        assert all(np.allclose(vecs[i], want_vecs[i], atol=1e-5) for i in ids), f"第 {k} 点：向量与重建不同"
        docs_now = {d for d, _ in meta.values()}
        assert docs_now == {d for d, _ in want_meta.values()}, f"第 {k} 点：丢了文档"
        report.append((k, res["chunks_embedded"]))
    con = sqlite3.connect(ref / "meta.sqlite")
    n_ref = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    con.close()
    print(f"\n[{scenario}] {len(points)} 次 SIGKILL（共 {total} 个写动作，杀在 {points}）；"
          f"重跑后全部等于全量重建（{n_ref} 块），0 篇丢失、0 个重复 id；重跑时向量化的块数 {[c for _, c in report]}")
    assert len(points) >= (10 if scenario == "update" else 5)
