"""第 2 课 04 的"尺子"与图（由 compression_lab.py 用 run.import_sibling 加载，不单独运行）。

每种压缩方法都用同一份留出文本的困惑度、同一种大小口径（state_dict 序列化的字节）、同一条提示的生成延迟量一行。
尺子不同（例如量化模型用另一份文本、大小用参数个数 × 位宽）时，表里的差就混进了口径差，结论不可信。
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from common import lm, train


def latency_ms(model, tok, prompt: str, new_tokens: int, repeats: int) -> float:
    """贪心生成每个新 token 的毫秒数（先预热一次，再取 repeats 次的中位数）。

    min_new_tokens = max_new_tokens：不让某个变体提前遇到 EOS 而"显得快"；中位数不被偶发的调度抖动带偏。
    """
    import torch

    # 分词放在计时之外：它与模型无关、各方法相同，算进去只会增加噪声
    enc = tok(prompt, return_tensors="pt").to(train.device_of(model))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            if i:   # 第 0 次是预热：首次调用要分配 KV 缓存、选内核，不代表稳态速度
                # 除以 new_tokens 得每 token 延迟，但其中摊着一次提示的 prefill：new_tokens 很小时，prefill 占比会很大
                times.append((time.perf_counter() - t0) * 1000 / new_tokens)
    return statistics.median(times)


def structured_size_mb(model) -> float:
    """结构化剪枝后真正删掉全零行能剩下多少（fp32）。

    只数 Linear 权重里非零的行；其它参数照数。按 id 去重：绑定的 embedding / lm_head 只存一份。
    """
    import torch

    total, seen = 0, set()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, torch.nn.Linear) and p is mod.weight and p.dim() == 2:
                # 只删全 0 的输出行（× 每行 in_features 个元素），不算下一层随之可删的输入列：
                # 这是真删之后大小的保守上界
                total += int((p.abs().sum(1) > 0).sum()) * p.shape[1]
            else:
                total += p.numel()
    # × 4 字节：按 fp32 算，与默认的 fp32 基线同口径（--dtype 换了精度，这里不跟着变）
    return total * 4 / 2**20


@dataclass
class Bench:
    """同一把尺子：留出文本的 token、测延迟的提示与生成长度都固定下来，每种方法调一次 measure 得到一行。"""
    tok: Any
    rows: list[dict]   # 留出文本的 token：[{input_ids}]，每种方法完全相同
    prompt: str
    max_new_tokens: int
    repeats: int
    log: Any

    def measure(self, name: str, model, size: float | None = None) -> dict:
        """一行：ppl / size_mb / latency_ms。size 给了就用它（结构化剪枝按删掉零行后的大小算）。"""
        # 困惑度按 token 加权（lm.perplexity）：长短文本混在一起时，按样本平均会让短文本的权重过大
        row = {"ppl": round(lm.perplexity(model, self.rows, batch_size=8, pad_token_id=self.tok.pad_token_id), 3),
               # 没给 size 就序列化 state_dict 量字节（lm.size_mb）：int8 / NF4 的缩放常数、
               # 剪枝留下的稠密 0 都如实算进去
               "size_mb": round(size or lm.size_mb(model), 2),
               "latency_ms": round(latency_ms(model, self.tok, self.prompt, self.max_new_tokens, self.repeats), 2)}
        self.log.info(f"{name:24s} ppl {row['ppl']:9.3f}  {row['size_mb']:8.2f} MB  {row['latency_ms']:7.2f} ms/token")
        return row


def plot_tradeoffs(out, table: dict) -> None:
    """困惑度（对数轴）vs 大小：左下角是好的压缩，右上角是又大又笨的。"""
    fig, save = out.plot("ppl_vs_size.png")
    ax = fig.add_subplot(111)
    for name, r in table.items():
        # 每个点旁直接标名字而不用图例：matplotlib 默认的颜色循环只有 10 种，
        # --sparsities 多给几个，颜色就重复、图例对不上
        ax.scatter(r["size_mb"], r["ppl"])
        ax.annotate(name, (r["size_mb"], r["ppl"]), fontsize=7)
    ax.set_xlabel("size (MB, serialized state_dict)")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_yscale("log")   # 结构化剪枝过头时 ppl 能到 1e8（smollm2 剪 30%），线性轴上其它点会挤成一条线
    ax.set_title(f"Compression trade-offs: {out.model_name}")
    save()
