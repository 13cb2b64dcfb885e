"""数一数真正被向量化了多少段文本：增量更新省了多少，就看这个数。

LangChain 的 index() 只报告 num_added / num_skipped，而"加了几块"不等于"算了几次向量"：
套上 CacheBackedEmbeddings 后命中缓存的块不再过模型。所以在模型外面包一层，直接数 embed_documents 收到的文本。
只有 03 用它，所以放在本节旁边，不进 common/。
"""
from __future__ import annotations

from pathlib import Path

from langchain_core.embeddings import Embeddings

from common import retrieval


# 继承 LangChain 的 Embeddings 基类：Chroma 与 CacheBackedEmbeddings 只认这个接口（embed_documents / embed_query）
class CountingEmbeddings(Embeddings):
    """LangChain Embeddings：转给 HuggingFace 向量模型，同时累计 embed_documents 的文本数（count）。

    模型第一次真正要算向量时才加载：父进程只构造这个对象，加载留给 fork 出的子进程——
    父进程里先起了 torch 的线程池，fork 之后子进程可能死锁。
    """

    def __init__(self, name: str | None, cache_dir: Path | None = None):
        self.name, self.cache_dir, self.count, self._inner = name, cache_dir, 0, None

    def _model(self):
        if self._inner is None:
            from langchain_huggingface import HuggingFaceEmbeddings

            # 没传 device：由 sentence-transformers 自己挑（有 CUDA 用 CUDA，否则 CPU）
            # 单位向量的 L2 距离² = 2 − 2·余弦：Chroma 默认按 L2 排序，归一化后次序与余弦相似度一致
            self._inner = HuggingFaceEmbeddings(model_name=self.name or retrieval.default_embedding_model(),
                                                encode_kwargs={"normalize_embeddings": True})
        return self._inner

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.count += len(texts)
        return self._model().embed_documents(texts)

    # 查询不计数：count 只衡量建库时的向量化，检索时算查询向量与增量更新省没省无关
    def embed_query(self, text: str) -> list[float]:
        return self._model().embed_query(text)

    def for_index(self) -> Embeddings:
        """交给向量库的 Embeddings：给了 cache_dir 时套上磁盘缓存（按文本的 sha256）。

        崩溃试验要把同一批块在几十个子进程里反复写入：不缓存的话每个子进程都要加载模型、重算全部向量；
        缓存命中的文本不经过 embed_documents，所以 count 仍只数真正算过的。
        """
        # 不缓存时返回自己：update_rounds 要数真实的向量化次数，缓存会把重算藏起来
        if self.cache_dir is None:
            return self
        from langchain_classic.embeddings import CacheBackedEmbeddings
        from langchain_classic.storage import LocalFileStore

        # namespace 写死：换向量模型前必须清掉缓存目录（main 每次运行都先删 embed_cache）；
        # key_encoder 默认是 sha1，LangChain 会警告它不抗碰撞，所以显式用 sha256
        return CacheBackedEmbeddings.from_bytes_store(self, LocalFileStore(str(self.cache_dir)), namespace="minilm",
                                                      key_encoder="sha256")
