"""第 3 课 03 的 MFU 量法（由 acceleration_tricks.py 用 run.import_sibling 加载，不单独运行）。

MFU（Model FLOPs Utilization，PaLM 论文附录 B）= 训练里"有用"的模型 FLOPs ÷ 用时 ÷ 硬件峰值。
分子只按真实 token 算，分母在同一进程里实测：这样不同招数的 MFU 才能并排比较。
"""
from __future__ import annotations

import time


def matmul_peak_flops(n: int, device) -> float:
    """实测矩阵乘峰值：n×n fp32 矩阵乘，取 3 次里最快的；MFU 的分母用同一进程、同样线程数测出的这个数。

    不用芯片手册上的峰值：共享的 2 核机器、不同的 BLAS 与线程数下，手册数字能差几倍，MFU 就失去了比较意义。
    """
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b   # 第一次调用要初始化 BLAS 线程池、分配工作区：不计时
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()   # CUDA 是异步的：不同步的话计到的只是"发射内核"的时间
        t0 = time.perf_counter()
        # 一次计时里连乘 4 次取平均：把计时本身的开销和偶发抖动摊薄
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)   # 取最快：别的进程抢走的 CPU 只会让它变慢
    return 2 * n ** 3 / best   # 一次 n×n 矩阵乘 = n³ 次乘加 = 2n³ FLOPs：与 6N 同一口径（乘、加各算一次）


def model_flops(model, rows: list[dict]) -> float:
    """训练一遍这些样本的"有用" FLOPs：每 token 6N（前向 2N + 反向 4N）+ 注意力 12·层数·d·ℓ（PaLM 附录 B 的算法）。

    只按真实 token 数算：填充位和梯度检查点的重算也耗算力，但不算"有用"——这样 MFU 才会奖励不做无用功的招数。
    """
    cfg = model.config
    # N 含词嵌入：权重共享（tied）时这份参数正好对应 lm_head 的矩阵乘；不共享时输入嵌入只是查表，6N 会略微高估
    n_params = sum(p.numel() for p in model.parameters())
    # 头数 × head_dim 而不是 hidden_size：有的架构（如 Gemma）单独设定 head_dim，两者不相等
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    lens = [len(r["input_ids"]) for r in rows]
    # 注意力项按每条样本自己的长度平方算：打包后样本互相看不见，跨样本的那部分不是有用功
    return sum(6 * n_params * ell + 12 * cfg.num_hidden_layers * d_attn * ell * ell for ell in lens)
