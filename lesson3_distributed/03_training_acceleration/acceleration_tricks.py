"""训练加速的每一招，同一个模型、同一批数据、同一进程里并排实测：吞吐（真实 token/s）、MFU、峰值内存、填充比例。

招数：填充（padded，按批内最长补齐）vs 打包（packed：TRL 的 pack_dataset 用 BFD 把样本装进 max_length 的行，
position_ids 在每个样本开头归零，transformers 据此只让样本看见自己）vs 无填充拼接（padding_free：一批样本
首尾相连成一行，即 TRL 的 padding_free / DataCollatorWithFlattening）；打包 + 梯度检查点；注意力实现
eager vs sdpa（CUDA 上装了 flash-attn 时再加 flash_attention_2）；梯度累积；bf16 autocast（CPU 支持时）；
torch.compile；线程数。MFU = 模型 FLOPs（每 token 6N + 注意力 12·层数·d·序列长）/ 同一次运行里实测的矩阵乘峰值，
梯度检查点的重算与填充位置都不算"有用的 FLOPs"。默认数据是长回答 SFT 文件（data/longform/sft_long.jsonl），
--data 可换成任何 SFT 文件：长短越不齐，打包越赚。

运行：
  python lesson3_distributed/03_training_acceleration/acceleration_tricks.py           # smollm2-135m，8 条，CPU
  python lesson3_distributed/03_training_acceleration/acceleration_tricks.py --smoke   # tiny-llama，约 30 秒
  python lesson3_distributed/03_training_acceleration/acceleration_tricks.py --model Qwen/Qwen2.5-0.5B-Instruct \\
      --source hf --config configs/lesson3/acceleration_tricks_gpu.yaml   # GPU：bf16、flash_attention_2、compile

你会看到（--smoke，tiny-llama，64 条长回答，见 README 的实测表）：打包比填充快（packing_speedup > 1），
填充比例从约 40% 降到个位数；梯度检查点把峰值内存降下来、每步变慢；无填充拼接在 CPU 上没有变长注意力 kernel，
一整行的 T² 注意力反而慢——在 GPU 上配 flash_attention_2 才是它的主场。图：acceleration_tricks.png。
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

from common import cli, data, models, run, train

TRICKS = ["padded", "packed", "packed_ckpt", "padding_free", "padded_eager", "packed_accum", "packed_bf16",
          "packed_compile", "packed_1thread", "packed_flash_attn2"]


@dataclass
class Args(cli.CommonArgs):
    tricks: list[str] = cli.arg([t for t in TRICKS if t not in ("packed_flash_attn2", "packed_compile", "packed_1thread")],
                                "要比较的招数（见 TRICKS；packed_compile 在 2 核上编译要几分钟，packed_1thread 需多核才有意义，"
                                "默认不跑，用 --tricks 加上）")
    n_samples: int = cli.arg(8, "每招训练多少条样本（同一批样本，过一遍；smollm2 在 2 核上每招约 1-2 分钟）", min=2)
    per_device_train_batch_size: int = cli.arg(4, "填充时每批几条样本；打包时每批的行数按相同 token 数折算", min=1)
    max_length: int = cli.arg(1024, "每条样本截断长度 = 打包行长度；要大于数据里大多数样本，否则截断抹平了长短差异，"
                                    "打包就没什么可省的（smollm2 分词下长回答 100-800 token）", min=16)
    learning_rate: float = cli.arg(1e-5, "学习率（这里比速度，不比效果）", min=0)
    matmul_size: int = cli.arg(1024, "测峰值用的方阵边长", min=64)

    smoke_model = "tiny-llama"


# 冒烟：极小模型 + 64 条；不测 compile（2 核上编译要几十秒）和单线程（冒烟本来就是单线程）
SMOKE = dict(n_samples=32, per_device_train_batch_size=8, max_length=512,
             tricks=["padded", "packed", "packed_ckpt", "padding_free", "padded_eager", "packed_accum"])


def load_rows(args: Args, tok) -> list[dict]:
    """SFT 样本 -> token（只在回答上算损失），按种子打乱后取前 n_samples 条。"""
    import random

    convs = data.load_sft(args.data or data.DATA_DIR / "longform" / "sft_long.jsonl")
    random.Random(args.seed).shuffle(convs)
    rows = [data.tokenize_chat(tok, c, args.max_length) for c in convs[:args.n_samples]]
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def batches(trick: str, rows: list[dict], args: Args, pad_id: int) -> list[dict]:
    """把同一批样本按招数组织成批。返回的每批都是 {input_ids, labels, [attention_mask | position_ids]}。"""
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithFlattening
    from trl.data_utils import pack_dataset

    b = args.per_device_train_batch_size
    if trick.startswith("padded"):
        out = []
        for i in range(0, len(rows), b):
            chunk = rows[i:i + b]
            n = max(len(r["input_ids"]) for r in chunk)
            out.append({"input_ids": torch.tensor([r["input_ids"] + [pad_id] * (n - len(r["input_ids"])) for r in chunk]),
                        "labels": torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in chunk]),
                        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"]))
                                                        for r in chunk])})
        return out
    if trick == "padding_free":   # 一批 b 条首尾相连成一行：没有一个填充位
        flat = DataCollatorWithFlattening(return_position_ids=True)
        return [{k: v for k, v in flat(rows[i:i + b]).items() if k in ("input_ids", "labels", "position_ids")}
                for i in range(0, len(rows), b)]
    # 打包：BFD 把样本装进 max_length 的行；每行的 seq_lengths 给出样本边界 -> position_ids 在边界归零
    packed = pack_dataset(Dataset.from_list(rows), args.max_length, strategy="bfd",
                          map_kwargs={"keep_in_memory": True}).to_list()
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    per = max(1, round(b * mean_len / args.max_length))   # 每批行数：与填充时每批的真实 token 数相当
    out = []
    for i in range(0, len(packed), per):
        chunk = packed[i:i + per]
        n = max(len(r["input_ids"]) for r in chunk)
        pos = [[p for s in r["seq_lengths"] for p in range(s)] for r in chunk]
        # 行尾不足 max_length 的几个位置：labels -100，position_ids 接着数，当作最后一个"样本"的尾巴
        out.append({"input_ids": torch.tensor([r["input_ids"] + [pad_id] * (n - len(r["input_ids"])) for r in chunk]),
                    "labels": torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in chunk]),
                    "position_ids": torch.tensor([p + list(range(len(p), len(p) + n - len(p))) for p in pos])})
    return out


def matmul_peak_flops(n: int, device) -> float:
    """实测矩阵乘峰值：n×n fp32 矩阵乘，取 3 次里最快的；MFU 的分母用同一进程、同样线程数测出的这个数。"""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 4)
    return 2 * n ** 3 / best


def model_flops(model, rows: list[dict]) -> float:
    """训练一遍这些样本的"有用" FLOPs：每 token 6N（前向 2N + 反向 4N）+ 注意力 12·层数·d·ℓ（PaLM 附录 B 的算法）。"""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    d_attn = cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    lens = [len(r["input_ids"]) for r in rows]
    return sum(6 * n_params * ell + 12 * cfg.num_hidden_layers * d_attn * ell * ell for ell in lens)


def measure(trick: str, base, rows: list[dict], args: Args, tok, out: run.Run) -> dict | None:
    """从同一份初始权重出发，按招数训练一遍同一批样本：时间、峰值内存、真实 token/s、填充比例。"""
    import torch

    dev = train.device_of(base)
    attn = {"padded_eager": "eager", "packed_flash_attn2": "flash_attention_2"}.get(trick, "sdpa")
    if attn == "flash_attention_2" and (dev.type != "cuda" or not _has_flash_attn()):
        out.log.info(f"{trick}：需要 CUDA + flash-attn 包，跳过（CPU 上用 sdpa）")
        return None
    autocast = trick == "packed_bf16"
    if autocast and dev.type == "cpu" and not models.cpu_has_bf16():
        out.log.info(f"{trick}：这颗 CPU 没有原生 bf16（AVX512-BF16/AMX），模拟 bf16 只会更慢，跳过")
        return None
    model = copy.deepcopy(base)
    model.set_attn_implementation(attn)   # 同一份权重，只换注意力实现
    if trick == "packed_ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    step_fn = torch.compile(model) if trick == "packed_compile" else model
    accum = 2 if trick == "packed_accum" else 1
    threads = torch.get_num_threads()
    if trick == "packed_1thread":
        torch.set_num_threads(1)
    bs = batches(trick, rows, args if accum == 1 else
                 Args(**{**vars(args), "per_device_train_batch_size": max(1, args.per_device_train_batch_size // 2)}),
                 tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)

    def step(i: int, batch: dict) -> float:
        batch = {k: v.to(dev) for k, v in batch.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            loss = step_fn(**batch).loss / accum
        loss.backward()
        if (i + 1) % accum == 0 or i == len(bs) - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item() * accum

    step(0, bs[0])   # 预热一步（compile 的编译、线程池、分配器）：不计时
    opt.zero_grad(set_to_none=True)
    train.release_memory()
    with train.PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        losses = [step(i, b) for i, b in enumerate(bs)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    torch.set_num_threads(threads)
    real = sum(len(r["input_ids"]) for r in rows)
    slots = sum(b["input_ids"].numel() for b in bs)
    return {"tokens_per_s": real / secs, "seconds": secs, "peak_mem_mb": mem.peak_mb, "steps": len(bs),
            "padding_fraction": 1 - real / slots, "loss_mean": sum(losses) / len(losses), "attn": attn}



def _has_flash_attn() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def packed_matches_unpacked(model, rows: list[dict]) -> float:
    """打包正确性：两条样本拼成一行（position_ids 归零）与各自单独前向的 logits 最大差；≈0 说明样本互相看不见。"""
    import torch

    a, b = rows[0]["input_ids"][:64], rows[1]["input_ids"][:64]
    model.eval()
    with torch.no_grad():
        dev = train.device_of(model)
        alone = torch.cat([model(input_ids=torch.tensor([x], device=dev), use_cache=False).logits[0] for x in (a, b)])
        pos = torch.tensor([list(range(len(a))) + list(range(len(b)))], device=dev)
        # use_cache=False：有 KV 缓存时 transformers 不从 position_ids 推断打包边界（那是生成场景）
        together = model(input_ids=torch.tensor([a + b], device=dev), position_ids=pos, use_cache=False).logits[0]
    return (alone - together).abs().max().item()


def main(args: Args) -> dict:
    import torch

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)
    unknown = sorted(set(args.tricks) - set(TRICKS))
    if unknown:
        from common.errors import UserError

        raise UserError(f"--tricks {' '.join(unknown)}: 不认识；可选 {', '.join(TRICKS)}")

    # 1. 模型与数据：fp32 主权重；所有招数从同一份初始权重出发
    base, tok = models.load_args(args, for_training=True)
    rows = load_rows(args, tok)
    lens = [len(r["input_ids"]) for r in rows]
    out.log.info(f"{len(rows)} 条样本，长度 {min(lens)}-{max(lens)}（中位 {sorted(lens)[len(lens) // 2]}），"
                 f"CPU 线程 {torch.get_num_threads()}（os.cpu_count={os.cpu_count()}）")

    # 2. 打包是对的吗：拼在一行里的样本与单独前向的 logits 一致（transformers 从 position_ids 推出块对角掩码）
    pack_diff = packed_matches_unpacked(base, rows)
    out.log.info(f"打包 vs 单独前向 max|Δlogit| = {pack_diff:.2e}")

    # 3. 同一进程里测矩阵乘峰值（MFU 的分母），再逐招训练
    dev = train.device_of(base)
    peak = matmul_peak_flops(args.matmul_size, dev)
    flops = model_flops(base, rows)
    results = {}
    for trick in args.tricks:
        r = measure(trick, base, rows, args, tok, out)
        if r is None:
            continue
        r["mfu"] = flops / r["seconds"] / peak
        results[trick] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        out.log.info(f"{trick:16s} {r['tokens_per_s']:9.0f} tok/s  峰值内存 +{r['peak_mem_mb']:7.1f} MB  "
                     f"填充 {r['padding_fraction']:5.1%}  MFU {r['mfu']:.2%}  {r['steps']} 步 {r['seconds']:.2f} s")

    # 4. 表 + 图：吞吐与峰值内存并排
    names = list(results)
    fig, save = out.plot("acceleration_tricks.png")
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    ax1.barh(names, [results[n]["tokens_per_s"] for n in names], color="tab:blue")
    ax1.set_xlabel("trained tokens / s (non-pad)")
    ax2.barh(names, [results[n]["peak_mem_mb"] for n in names], color="tab:orange")
    ax2.set_xlabel("peak memory increase (MB)")
    ax2.set_yticks([])
    fig.suptitle(f"{out.model_name}: {len(rows)} samples, matmul peak {peak / 1e9:.1f} GFLOP/s", fontsize=9)
    save()
    get = lambda a, b, k: results[a][k] / results[b][k] if a in results and b in results else None   # noqa: E731
    metrics = {"tricks": results, "packing_speedup": get("packed", "padded", "tokens_per_s"),
               "padding_free_speedup": get("padding_free", "padded", "tokens_per_s"),
               "ckpt_mem_ratio": get("packed_ckpt", "packed", "peak_mem_mb"),
               "ckpt_time_ratio": get("packed_ckpt", "packed", "seconds"),
               "sdpa_vs_eager_speedup": get("padded", "padded_eager", "tokens_per_s"),
               "mfu": results.get("packed", next(iter(results.values())))["mfu"],
               "matmul_peak_gflops": round(peak / 1e9, 2), "packed_max_logit_diff": pack_diff,
               "padding_fraction_padded": results.get("padded", {}).get("padding_fraction"),
               "n_samples": len(rows), "real_tokens": sum(lens)}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return out.finish(metrics, summary=(
        f"打包/填充 吞吐 {metrics.get('packing_speedup', float('nan')):.2f}x，检查点峰值内存比 "
        f"{metrics.get('ckpt_mem_ratio', float('nan')):.2f}，MFU {metrics['mfu']:.2%}（峰值 {peak / 1e9:.0f} GFLOP/s）"))


if __name__ == "__main__":
    main(cli.parse(Args))
