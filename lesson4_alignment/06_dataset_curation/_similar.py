"""什么算"同一条"：规范化文本、MinHash 近似重复、prompt 分组、训练/评估泄漏计数。

dataset_curation.py 的去重、分组切分、泄漏统计都站在这几个函数上：同一个"相同"的定义用在所有地方，
否则去重认为不同的两条，泄漏统计却认为相同，报告里的数字就对不上。只有 06 用，所以放在本课旁边，不进 common/。
"""
from __future__ import annotations

import functools

from common.data import norm_text as norm  # 规范化与第 4、5 课的训练脚本共用一个定义

_SCHEME = "affine32"   # datasketch 默认的哈希方案；传现成的排列时必须写明（与生成它的 MinHash 一致）


def minhash(text: str, num_perm: int):
    """字符 3-gram 集合的 MinHash 签名（中英文都适用，不需要分词）。

    seed 固定：签名要在不同的 LSH 之间可比（去重、分组、泄漏统计各建一个 LSH）。
    """
    from datasketch import MinHash

    # 那组哈希函数（num_perm 对随机排列）只生成一次：datasketch 默认每条文本都用 seed 重新生成一遍，
    # 短文本时它比算签名的哈希还慢（1.1 万条实测 2.0 秒 vs 1.1 秒）
    m = MinHash(num_perm=num_perm, seed=1, permutations=_permutations(num_perm), scheme=_SCHEME)
    # 不到 3 个字时整段当一个 gram：否则一个 gram 都没有，签名停在初始值，所有短文本的签名都相同、
    # 会被当成彼此的重复；encode()：datasketch 对 bytes 求哈希
    m.update_batch([text[k:k + 3].encode() for k in range(max(1, len(text) - 2))])
    return m


@functools.lru_cache(maxsize=4)
def _permutations(num_perm: int):
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=1, scheme=_SCHEME).permutations


def minhash_dups(items: list[tuple[int, str]], threshold: float, num_perm: int) -> set[int]:
    """近似重复：MinHash + LSH；每组只留第一条，返回要删的下标。

    两两比较是 O(n²)；LSH 把签名分桶，只和同桶的候选比，几十万条也是线性时间。
    """
    from datasketch import MinHashLSH

    # LSH 按 threshold 选分桶参数，query 返回的是同桶的候选、不是算过 Jaccard 的结果：阈值附近会有少量误判，
    # 所以 num_perm 越大越准（见 dataset_curation 的 SMOKE）
    lsh, drop = MinHashLSH(threshold=threshold, num_perm=num_perm), set()
    for i, text in items:
        m = minhash(text, num_perm)
        # 先查后插：只和已经留下的比，每组留下的是第一次出现的那条
        if lsh.query(m):
            drop.add(i)
        else:
            lsh.insert(str(i), m)   # 只插入留下的：重复的那条不再当别人的"原件"
    return drop


def find(parent: list[int], i: int) -> int:
    """并查集找根（路径减半：顺手把沿途节点挂到祖父上，下次找得更快）。"""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def prompt_groups(prompts: list[str], threshold: float, num_perm: int) -> list[int]:
    """把精确或近似相同的 prompt 并成一组（并查集）：切分时整组只进训练或评估一边。

    要用并查集而不是"和第一条比"：A≈B、B≈C 时 A 与 C 可能不够像，但三条都得进同一边，否则 C 就把 A 的题漏给了评估。
    """
    from datasketch import MinHashLSH

    parent = list(range(len(prompts)))
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, text in enumerate(prompts):
        m = minhash(text, num_perm)
        for j in lsh.query(m):
            # 和每个候选的根都合并（不只是第一个）：一条 prompt 可能同时像两个已有的组，要把两组连成一组
            parent[find(parent, int(j))] = find(parent, i)
        lsh.insert(str(i), m)   # 每条都插入（与去重不同）：组里任何一条都可能是后来者的近邻
    return [find(parent, i) for i in range(len(prompts))]


def leaks(train: list[dict], evals: list[dict], threshold: float, num_perm: int) -> int:
    """评估集里有多少 prompt 在训练集里出现过（精确或近似）：LSH 里只放训练集，逐个查评估 prompt。"""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    exact = set()   # 精确匹配单独查：极短的 prompt 3-gram 太少，MinHash 估计的 Jaccard 不可靠
    # LSH 里只放训练集：问的是“评估 prompt 在训练里有没有近邻”，评估集内部的重复不算泄漏
    for i, p in enumerate(train):
        t = norm(p["prompt"])
        exact.add(t)
        lsh.insert(str(i), minhash(t, num_perm))
    return sum(1 for p in evals if norm(p["prompt"]) in exact or lsh.query(minhash(norm(p["prompt"]), num_perm)))
