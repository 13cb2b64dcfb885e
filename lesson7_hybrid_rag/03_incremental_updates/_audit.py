"""增量更新的审计日志：只追加的 JSONL，先写"要做什么"，索引写完再写一行 commit（预写日志的思路）。

"已提交状态" = 按顺序回放有 commit 的更新；被 SIGKILL 的那次没有 commit，下次更新和已提交状态一比，
会把它再做一遍——而 LangChain index() 的写入是幂等的（同 id upsert，删不存在的 id 无害），所以重跑一定收敛。
日志本身只做追加，不改写旧行：崩溃最多留下最后半行，读的时候跳过它。
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def sha(text: str) -> str:
    """文档内容的指纹：审计日志按它判断"改没改"，比修改时间可靠（复制、解压都会改 mtime）。"""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read(path: Path) -> tuple[list[dict], dict[str, str]]:
    """读审计日志；最后一行可能被 SIGKILL 写了一半，跳过它。返回 (全部记录, 已提交状态 doc_id -> hash)。"""
    if not path.exists():
        return [], {}
    recs = []
    # 逐行解析、坏行跳过：崩溃只可能弄坏正在写的那一行，前面 fsync 过的记录不受影响
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    # 没有 commit 行的更新被当作没发生过：它的索引写入可能只做了一半，下次更新会把它再做一遍
    committed = {r["update"] for r in recs if r["action"] == "commit"}
    state: dict[str, str] = {}
    # 必须按日志顺序回放：同一篇先改后删、删了又加，顺序一换回放出的状态就不同
    for r in recs:
        if r["update"] in committed and r["action"] in ("add", "modify"):
            state[r["doc_id"]] = r["hash"]
        elif r["update"] in committed and r["action"] == "delete":
            # pop 带默认值：全量重建那次的 rebuild 行先清空了状态，排在后面的 delete 行要删的文档已经不在里面
            state.pop(r["doc_id"], None)
        elif r["update"] in committed and r["action"] == "rebuild":
            state = {}   # 重建清空了索引：它之前的已提交状态不再算数，只看它之后的动作
    return recs, state


def append(path: Path, rec: dict) -> None:
    """追加一行并 fsync：日志只增不改，崩溃最多留下半行（读时跳过）。"""
    # O_APPEND：每次 write 都落在文件末尾，不会覆盖前面的记录；不 fsync 的话断电时操作系统缓存里的几行会一起丢
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # 一次 write 写整行（含换行）：分几次写的话，被杀在两次之间就留下半行
        os.write(fd, (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_actions(committed: dict[str, str], current: dict[str, str], rebuild: bool) -> list[tuple[str, str, str]]:
    """与已提交状态比出 (动作, doc_id, hash)：新增 / 修改 / 删除；全量重建时每篇都重写。

    比的是"已提交状态"而不是磁盘上的索引：索引可能停在被杀的那一半，日志回放出的状态才可信。
    """
    # rebuild 行排在最前：回放到它时清空状态，后面逐篇的 add 才不会被它一起清掉
    return (([("rebuild", "*", "")] if rebuild else [])
            + [("add" if d not in committed else "modify", d, h) for d, h in current.items()
               if rebuild or committed.get(d) != h]
            + [("delete", d, h) for d, h in committed.items() if d not in current])
