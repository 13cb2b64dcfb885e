"""第 6 课 01 的全文检索后端与计时工具（只有选型对比用到，所以放在这一课旁边，不进 common/）。

两个后端都按 jieba 预分词后的词建索引、search 返回 [(块下标, 分数)]，与 common.retrieval.BM25Index 同一个接口，
选型脚本才能用同一段计时代码测所有库。
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from common import retrieval
from common.errors import UserError

# 全文检索引擎的功能对比（向量库的那几行由选型脚本实测得出；这几行来自各自的文档）
FULLTEXT_FEATURES = {
    "elasticsearch": {"过滤": "bool/filter 查询", "持久化": "有（分片落盘）", "更新": "按 _id 覆盖写",
                      "删除": "DELETE /_doc/<id>", "服务模式": "有（本身就是服务）"},
    "sqlite_fts5": {"过滤": "SQL WHERE（可 JOIN 元数据表）", "持久化": "单个 .sqlite 文件", "更新": "UPDATE",
                    "删除": "DELETE", "服务模式": "无（进程内的库）"},
    "rank_bm25": {"过滤": "无（只能查完再筛）", "持久化": "无（自己 pickle）", "更新": "无：整体重建",
                  "删除": "无：整体重建", "服务模式": "无（纯 Python 库）"}}


def rss() -> int:
    """本进程当前常驻内存（字节）：建库前后各量一次，差值就是索引在内存里的代价。"""
    return __import__("psutil").Process().memory_info().rss


def _match_query(query: str) -> str:
    """FTS5 查询串：每个词加引号再 OR。

    FTS5 默认 AND：一个问题十几个词全都要出现，几乎什么都搜不到；不加引号时 "-"、":" 会被当成查询语法而报错。
    """
    # 词里自带的双引号要写成两个（SQL 字符串的转义规则），否则它会提前结束引号、整条 MATCH 报语法错误
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in retrieval.bm25_tokens(query))


class FTS5Index:
    """SQLite FTS5：单个 .sqlite 文件，bm25() 排序（分数越小越相关，这里取负号，越大越好）。"""

    def __init__(self, texts: list[str], db_path: str | Path):
        import sqlite3

        self.path = Path(db_path)
        self.path.unlink(missing_ok=True)   # 上次运行留下的库：不删会在旧表上再建一次而报错
        # sqlite3 默认只许建连接的那个线程用它；关掉检查，别的线程拿到这个索引查询时不会抛 ProgrammingError
        self.con = sqlite3.connect(self.path, check_same_thread=False)
        self.con.execute("CREATE VIRTUAL TABLE fts USING fts5(text)")
        # FTS5 自带的分词器按空白/标点切，不认识中文词：先用 jieba 切好、空格拼接再写进去
        # rowid 直接用块下标：MATCH 查回来的 rowid 就是块下标，和向量库的结果同一种编号，不用再建映射表
        self.con.executemany("INSERT INTO fts(rowid, text) VALUES (?, ?)",
                             ((i, " ".join(retrieval.bm25_tokens(t))) for i, t in enumerate(texts)))
        self.con.commit()   # 不提交时写入可能还在内存里：下面 bytes 量的文件大小会偏小

    @property
    def bytes(self) -> int:
        """库文件大小。"""
        return self.path.stat().st_size

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        """按 bm25() 取前 k；查询没有可用的词时返回空（空的 MATCH 串是语法错误）。"""
        match = _match_query(query)
        sql = "SELECT rowid, bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY bm25(fts) LIMIT ?"
        return [(int(i), -float(s)) for i, s in self.con.execute(sql, (match, k))] if match else []


class ElasticIndex:
    """Elasticsearch（REST API，httpx）：whitespace 分析器 + jieba 预分词，不依赖 IK 之类的中文分词插件。"""

    def __init__(self, url: str, texts: list[str], name: str = "course-kb"):
        import httpx

        self.http, self.name = httpx.Client(base_url=url.rstrip("/"), timeout=60), name   # 认证写进 URL
        # 先 GET / 探活：地址或认证写错时这里就给一行点名 --es-url 的错误，而不是建索引时冒出 httpx 的长 traceback
        try:
            self.http.get("/").raise_for_status()
        except httpx.HTTPError as e:
            raise UserError(f"--es-url {url}: 连不上 Elasticsearch（{type(e).__name__}: {e}）") from None
        self.http.delete(f"/{name}")   # 上次留下的同名索引（不存在时 404，无妨）
        # whitespace 分析器只按空格切、不转小写：bm25_tokens 已小写并分好词，ES 与 rank-bm25 看到的是同一串词
        # 1 个分片、0 个副本：单机演示，副本永远分配不出去，集群会一直是 yellow
        mappings = {"properties": {"text": {"type": "text", "analyzer": "whitespace"}}}
        self.http.put(f"/{name}", json={"settings": {"number_of_shards": 1, "number_of_replicas": 0},
                                        "mappings": mappings}).raise_for_status()
        # _bulk 吃 NDJSON：一行动作一行文档、最后也要换行；ensure_ascii=False 让中文原样写入，不膨胀成 \uXXXX
        bulk = "".join(json.dumps({"index": {"_id": str(i)}}) + "\n" +
                       json.dumps({"text": " ".join(retrieval.bm25_tokens(t))}, ensure_ascii=False) + "\n"
                       for i, t in enumerate(texts))
        # refresh=true：写完立刻可搜；否则最多 1 秒后才可见，紧接着的查询会漏掉刚写的块
        r = self.http.post(f"/{name}/_bulk?refresh=true", content=bulk.encode(),
                           headers={"Content-Type": "application/x-ndjson"})
        r.raise_for_status()
        # _bulk 部分失败时 HTTP 仍是 200，错误藏在 items 里：不查就会拿残缺的索引去比
        if r.json().get("errors"):
            raise UserError(f"--es-url {url}: _bulk 写入有错误：{str(r.json()['items'][:1])[:200]}")

    @property
    def bytes(self) -> int:
        """主分片在磁盘上的大小。"""
        stats = self.http.get(f"/{self.name}/_stats/store").json()
        return stats["indices"][self.name]["primaries"]["store"]["size_in_bytes"]

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        """match 查询取前 k。"""
        # _source=False：只要 _id（即块下标），不回传原文，延迟里少一份序列化；match 默认按 OR 组合各词，与 FTS5 一致
        body = {"size": k, "_source": False, "query": {"match": {"text": " ".join(retrieval.bm25_tokens(query))}}}
        hits = self.http.post(f"/{self.name}/_search", json=body).json()["hits"]["hits"]
        return [(int(h["_id"]), float(h["_score"])) for h in hits]


def time_queries(search, n_queries: int, repeats: int) -> tuple[list[list[int]], list[float]]:
    """search(i) -> 第 i 个问题的排序结果。返回 (结果, 每次延迟 ms)。

    先每题查一次当预热（顺便拿结果）：第一次查询有一次性开销（SQLite 编译语句、数据读进页缓存、HTTP 建连接），
    算进延迟会让 p95 虚高。
    """
    ranked = [search(i) for i in range(n_queries)]
    lat = []
    for _ in range(repeats):
        for i in range(n_queries):
            # perf_counter 单调且分辨率最高：FAISS 一次查询只有微秒级，time.time 还会被系统校时拨动
            t = time.perf_counter()
            search(i)
            lat.append((time.perf_counter() - t) * 1000)
    return ranked, lat
