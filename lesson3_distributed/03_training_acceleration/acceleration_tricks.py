"""训练加速的每一招，同一个模型、同一批数据、同一进程里并排测量：吞吐（真实 token/s）、MFU、峰值内存、填充比例。

招数：填充（padded，按批内最长补齐）vs 打包（packed：common.train.pack 用 TRL 的 BFD 把样本装进
max_length 的行，train.PackedCollator 让 position_ids 在每个样本开头归零，transformers 据此只让样本看见自己）
vs 无填充拼接（padding_free：一批样本首尾相连成一行，即 TRL 的 padding_free / DataCollatorWithFlattening）；
打包 + 梯度检查点；注意力实现 eager vs sdpa（CUDA 上装了 flash-attn 时再加 flash_attention_2）；梯度累积；
bf16 autocast（CPU 支持时）；torch.compile；线程数。MFU = 模型 FLOPs（每 token 6N + 注意力 12·层数·d·序列长）
/ 同一次运行里测出的矩阵乘峰值，梯度检查点的重算与填充位置都不算"有用的 FLOPs"。默认数据是长回答 SFT 文件
（data/longform/sft_long.jsonl），--data 可换成任何 SFT 文件：长短越不齐，打包越赚。

运行：
  python lesson3_distributed/03_training_acceleration/acceleration_tricks.py           # smollm2-135m，8 条，CPU
  python lesson3_distributed/03_training_acceleration/acceleration_tricks.py --smoke   # tiny-llama，32 条
  python lesson3_distributed/03_training_acceleration/acceleration_tricks.py --model Qwen/Qwen2.5-0.5B-Instruct \\
      --source hf --config configs/lesson3/acceleration_tricks_gpu.yaml   # GPU：bf16、flash_attention_2、compile

你会看到：每一招一行（真实 token/s、MFU、峰值内存、填充比例、前向位置数），图 acceleration_tricks.png。
打包与填充的损失一样、打包后的样本互相看不见（position_ids 归零起了作用）——打包只省算力、不改结果；
长短不齐的数据按批内最长补齐时，大量位置是填充，打包把填充比例压到很低，前向要算的位置明显变少，所以打包比填充快；
梯度检查点把峰值内存降下来、每步变慢（反向时重算前向）；eager 要存 s×s 的注意力分数，峰值内存比 sdpa 高；
无填充拼接在 CPU 上没有变长注意力 kernel，一整行的 T² 注意力反而慢——在 GPU 上配 flash_attention_2 才是它的主场。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：4.4 分钟，12.3 GB（超过 8 GB），结论 8/8 成立
  ✓ 打包不改结果：同两条样本打包成一行 vs 填充成矩形的损失差：0（≤ 0.0001）
  ✓ 打包的样本互相看不见：拼成一行 vs 各自单独前向的 logits 最大差：0（≤ 0.001）
  ✓ 打包去掉填充：打包 / 填充 的填充比例：0.3746（≤ 0.5）
  ✓ 打包省下前向要算的位置：打包 / 填充 的前向位置数（真实 token 一样多）：0.7155（≤ 0.8）
  ✓ 打包更快：打包 / 填充 的真实 token 吞吐：1.806（≥ 1.1）
  ✓ 梯度检查点降低峰值内存：打包 + 检查点 / 打包：0.6014（≤ 0.8）
  ✓ 梯度检查点的代价是反向时重算：打包 + 检查点 / 打包 的用时：1.255（≥ 1.05）
  ✓ sdpa 不存 s×s 的注意力分数：eager / sdpa 的峰值内存（填充）：1.346（≥ 1.1）
<!-- /results -->
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, replace

from common import cli, data, lm, models, run, train
from common.errors import UserError

# MFU 的分子（有用 FLOPs）与分母（实测峰值）：只属于这一课的量法，放在旁边的 _mfu.py
mfu = run.import_sibling(__file__, "_mfu")

TRICKS = ["padded", "packed", "packed_ckpt", "padding_free", "padded_eager", "packed_accum", "packed_bf16",
          "packed_compile", "packed_1thread", "packed_flash_attn2"]


@dataclass
class Args(cli.CommonArgs):
    tricks: list[str] = cli.arg([t for t in TRICKS if t not in ("packed_flash_attn2", "packed_compile",
                                                                 "packed_1thread")],
                                "要比较的招数（见 TRICKS；packed_compile 在 2 核上编译要几分钟，"
                                "packed_1thread 需多核才有意义，默认不跑，用 --tricks 加上）")
    n_samples: int = cli.arg(8, "每招训练多少条样本（同一批样本，过一遍；smollm2 在 2 核上每招约 1-2 分钟）", min=2)
    per_device_train_batch_size: int = cli.arg(4, "填充时每批几条样本；打包时每批的行数按相同 token 数折算", min=1)
    max_length: int = cli.arg(1024, "每条样本截断长度 = 打包行长度；要大于数据里大多数样本，否则截断抹平了长短差异，"
                                    "打包就没什么可省的（smollm2 分词下长回答 100-800 token）", min=16)
    learning_rate: float = cli.arg(1e-5, "学习率（这里比速度，不比效果）")
    matmul_size: int = cli.arg(1024, "测峰值用的方阵边长", min=64, max=16384,
                               why="3 个 n×n fp32 矩阵共 12·n² 字节：16384 时 3.2 GB")

    smoke_model = "tiny-llama"


# 冒烟：极小模型 + 32 条；不测 compile（2 核上编译要几十秒）和单线程（冒烟本来就是单线程）
SMOKE = dict(n_samples=32, per_device_train_batch_size=8, max_length=512,
             tricks=["padded", "packed", "packed_ckpt", "padding_free", "padded_eager", "packed_accum"])

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线是同一进程、同一批样本里的 padded / packed 那一招。
# 每招只跑一遍，计时比值在繁忙的共享 CPU 上会翻转（冒烟实测的差距都不到 2 倍）：冒烟只查不随机器忙闲变的量
# （数值、填充、前向位置数、峰值内存），吞吐与用时只在默认模式（空闲机器上录参考运行）检查。
# CPU 上的峰值内存也随分配器的状态起伏（eager / sdpa 冒烟实测 1.26–1.82），门槛取低的那头再留余量
CLAIMS = [
    run.Claim("打包不改结果：同两条样本打包成一行 vs 填充成矩形的损失差",
              "packed_vs_padded_loss_diff", "<=", 1e-5, 1e-4),
    run.Claim("打包的样本互相看不见：拼成一行 vs 各自单独前向的 logits 最大差",
              "packed_max_logit_diff", "<=", 1e-4, 1e-3),
    run.Claim("打包去掉填充：打包 / 填充 的填充比例",
              'tricks["packed"]["padding_fraction"] / tricks["padded"]["padding_fraction"]', "<=", 0.25, 0.5),
    run.Claim("打包省下前向要算的位置：打包 / 填充 的前向位置数（真实 token 一样多）",
              'tricks["packed"]["forward_tokens"] / tricks["padded"]["forward_tokens"]', "<=", 0.75, 0.8),
    run.Claim("打包更快：打包 / 填充 的真实 token 吞吐", "packing_speedup", ">=", None, 1.1),
    run.Claim("梯度检查点降低峰值内存：打包 + 检查点 / 打包", "ckpt_mem_ratio", "<=", 0.95, 0.8),
    run.Claim("梯度检查点的代价是反向时重算：打包 + 检查点 / 打包 的用时", "ckpt_time_ratio", ">=", None, 1.05),
    run.Claim("sdpa 不存 s×s 的注意力分数：eager / sdpa 的峰值内存（填充）",
              'tricks["padded_eager"]["peak_mem_mb"] / tricks["padded"]["peak_mem_mb"]', ">=", 1.1, 1.1),
]


def load_rows(args: Args, convs: list, tok) -> list[dict]:
    """SFT 样本 -> token（只在回答上算损失），按种子打乱后取前 n_samples 条。

    所有招数吃同一份 rows：招数之间只差"怎么组织成批"，吞吐的差别才能归到招数本身。
    """
    import random

    # 先按种子打乱再取前 n_samples 条：不总是文件开头那几条（长短可能偏向一边），重跑又取到同一批
    random.Random(args.seed).shuffle(convs)
    rows = [data.tokenize_chat(tok, c, args.max_length) for c in convs[:args.n_samples]]
    # 丢掉 attention_mask 等其余字段：打包/无填充拼接只有在"不给 attention_mask"时，
    # transformers 才按 position_ids 认出样本边界
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def batches(trick: str, rows: list[dict], args: Args, pad_id: int) -> list[dict]:
    """把同一批样本按招数组织成批。返回的每批都是 {input_ids, labels, [attention_mask | position_ids]}。"""
    from transformers import DataCollatorWithFlattening

    b = args.per_device_train_batch_size
    if trick.startswith("padded"):
        # 按批内最长补齐：长回答 100-800 token 混在一批里，短样本后面全是白算的填充位（冒烟数据约 40%）
        return [lm.pad_right(rows[i:i + b], pad_id) for i in range(0, len(rows), b)]
    if trick == "padding_free":
        # 一批 b 条首尾相连成一行：一个填充位都没有；用的是 transformers 自带的 collator（TRL 的 padding_free）
        # 默认 separator_id=-100：每段第一个 token 的 label 置 -100，与 PackedCollator 同理，不学跨样本的"下一个 token"
        flat = DataCollatorWithFlattening(return_position_ids=True)
        # 只留这三个键，与 PackedCollator 的输出同形：两招只差"怎么拼"；不给 attention_mask，边界全靠 position_ids
        return [{k: v for k, v in flat(rows[i:i + b]).items() if k in ("input_ids", "labels", "position_ids")}
                for i in range(0, len(rows), b)]
    # 打包：train.pack 用 BFD（Best-Fit-Decreasing）把样本装进 max_length 的行，每行记下各段长度 seq_lengths；
    # PackedCollator 据此让 position_ids 在每段开头归零——transformers 靠它推出块对角掩码，段与段互相看不见
    packed = train.pack(rows, args.max_length).to_list()
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    # 每批行数按"与填充时每批的真实 token 数相当"折算：否则打包的每步 token 多、步数少，比的就不是同一件事
    per = max(1, round(b * mean_len / args.max_length))
    collate = train.PackedCollator(pad_id)
    return [collate(packed[i:i + per]) for i in range(0, len(packed), per)]


def _has_flash_attn() -> bool:
    import importlib.util

    # 只查包在不在、不 import：flash_attn 的导入要加载 CUDA 扩展，CPU 机器上可能直接报错
    return importlib.util.find_spec("flash_attn") is not None


def attn_of(trick: str) -> str:
    """招数用的注意力实现：默认 sdpa（PyTorch 的融合注意力，不存 s×s 分数矩阵），eager 作对照。"""
    return {"padded_eager": "eager", "packed_flash_attn2": "flash_attention_2"}.get(trick, "sdpa")


def prepare(trick: str, base, out: run.Run):
    """按招数准备一份模型（同一份初始权重的副本）；这台机器上没意义的招数返回 None 并说明为什么。"""
    dev = train.device_of(base)
    attn = attn_of(trick)
    if attn == "flash_attention_2" and (dev.type != "cuda" or not _has_flash_attn()):
        out.log.info(f"{trick}：需要 CUDA + flash-attn 包，跳过（CPU 上用 sdpa）")
        return None
    if trick == "packed_bf16" and dev.type == "cpu" and not models.cpu_has_bf16():
        out.log.info(f"{trick}：这颗 CPU 没有原生 bf16（AVX512-BF16/AMX），模拟 bf16 只会更慢，跳过")
        return None
    # 深拷贝：每招都从同一份权重出发，前一招的优化器更新不会让后一招的 loss/速度"占便宜"
    model = copy.deepcopy(base)
    model.set_attn_implementation(attn)   # 同一份权重，只换注意力实现
    if trick == "packed_ckpt":
        # 非重入实现：重入版在输入不需要梯度时会悄悄不回传（见 torch.utils.checkpoint 文档）
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    # 有 KV 缓存时 transformers 不按 position_ids 识别打包边界，整行当成一段：样本互相看见，悄悄算错
    model.config.use_cache = False
    # packing_is_exact 调过 base.eval()，deepcopy 会把这个状态带过来：
    # 不切回 train，dropout 等训练期行为不生效，量的就不是真实训练
    model.train()
    return model


def train_step(step_fn, opt, batch: dict, dev, autocast: bool, accum: int, update: bool) -> float:
    """一个微批的前向 + 反向；update=True 时才走优化器（梯度累积：accum 个微批合成一步）。"""
    import torch

    batch = {k: v.to(dev) for k, v in batch.items()}
    # autocast 只把矩阵乘等算子降到 bf16，参数与优化器状态仍是 fp32 主权重：这就是混合精度，不是纯 bf16 训练
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        # 除以 accum：累积的是梯度之和，不除的话等效学习率放大 accum 倍
        loss = step_fn(**batch).loss / accum
    loss.backward()
    if update:
        opt.step()
        opt.zero_grad(set_to_none=True)   # set_to_none：省一次清零写内存，也让峰值内存更低
    return loss.item() * accum   # 乘回 accum：记下的是真实损失，各招的 loss_mean 才能直接比


def measure(trick: str, base, rows: list[dict], args: Args, tok, out: run.Run) -> dict | None:
    """从同一份初始权重出发，按招数训练一遍同一批样本：时间、峰值内存、真实 token/s、填充比例、前向位置数。"""
    import torch

    model = prepare(trick, base, out)
    if model is None:
        return None
    dev = train.device_of(model)
    # compile 返回的包装模块与 model 共享参数：优化器建在 model.parameters() 上，更新对两者同时生效
    step_fn = torch.compile(model) if trick == "packed_compile" else model
    accum = 2 if trick == "packed_accum" else 1
    # set_num_threads 是进程级的全局设置：先记下，测完恢复，否则后面的招数都变成单线程
    threads = torch.get_num_threads()
    if trick == "packed_1thread":
        torch.set_num_threads(1)
    # 累积 2 步时每个微批减半：每个优化器步看到的样本数不变，省下的是一次前向的激活内存
    micro = replace(args, per_device_train_batch_size=max(1, args.per_device_train_batch_size // accum))
    bs = batches(trick, rows, micro, tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    autocast = trick == "packed_bf16"
    # 预热一步（compile 的编译、线程池、分配器）：不计时，否则第一招总是吃亏。这一步也走优化器：
    # AdamW 在第一次 step 时才分配动量/方差两份状态，放在计时段外，各招的峰值内存才都不含这次一次性分配
    train_step(step_fn, opt, bs[0], dev, autocast, accum, update=True)
    opt.zero_grad(set_to_none=True)
    train.release_memory()   # 把上一招释放的堆还给系统：各招的峰值内存从同一起点量
    with train.PeakMemory(dev) as mem:
        t0 = time.perf_counter()
        # 最后一批也要 update：批数不是 accum 的倍数时，尾部累积的梯度不会悬着不用
        losses = [train_step(step_fn, opt, b, dev, autocast, accum, (i + 1) % accum == 0 or i == len(bs) - 1)
                  for i, b in enumerate(bs)]
        # CUDA 是异步的：不同步的话计时截在内核还没跑完的时候，GPU 上的吞吐会虚高
        if dev.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    torch.set_num_threads(threads)
    # 真实 token 数只看 rows、与招数无关：吞吐的分子对所有招数相同，差别全落在用时上
    real = sum(len(r["input_ids"]) for r in rows)
    slots = sum(b["input_ids"].numel() for b in bs)   # 前向真正算了多少个位置（含填充）：填充的代价就在这里
    return {"tokens_per_s": real / secs, "seconds": secs, "peak_mem_mb": mem.peak_mb, "steps": len(bs),
            "padding_fraction": 1 - real / slots, "forward_tokens": slots, "loss_mean": sum(losses) / len(losses),
            "attn": attn_of(trick)}


def one_row(rows: list[dict]) -> dict:
    """几条样本首尾相接成一行，seq_lengths 记下边界：train.pack 装出来的每一行就是这个样子。"""
    return {"input_ids": sum((list(r["input_ids"]) for r in rows), []),
            "labels": sum((list(r["labels"]) for r in rows), []), "seq_lengths": [len(r["input_ids"]) for r in rows]}


def packing_is_exact(model, rows: list[dict], pad_id: int) -> tuple[float, float]:
    """打包正确性，两把尺子：(拼成一行 vs 各自单独前向的 logits 最大差, 打包 vs 填充的损失差)。两者都应 ≈ 0。

    logits 差 ≈ 0 说明块对角掩码起作用、样本互相看不见；损失差 ≈ 0 说明 PackedCollator 把每段开头的 label
    置 -100 是对的（那个位置会被上一段的末尾"预测"，不置的话损失里混进一个不该学的跨样本 token）。
    """
    import torch

    # 比 logits 只取前 64 个 token：逐位置比较不需要长样本，两次前向都快
    short = [{"input_ids": r["input_ids"][:64], "labels": r["labels"][:64]} for r in rows[:2]]
    collate = train.PackedCollator(pad_id)
    model.eval()   # 关掉 dropout：两次前向要可比
    dev = train.device_of(model)
    to = lambda batch: {k: v.to(dev) for k, v in batch.items()}   # noqa: E731
    with torch.no_grad():
        # use_cache=False：有 KV 缓存时 transformers 不从 position_ids 推断打包边界（那是生成场景）
        alone = torch.cat([model(input_ids=torch.tensor([r["input_ids"]], device=dev), use_cache=False).logits[0]
                           for r in short])
        row = collate([one_row(short)])
        # 只给 position_ids、不给 attention_mask：transformers 只在这种情况（且无 KV 缓存）下
        # 按 position_ids 切出块对角掩码
        together = model(input_ids=row["input_ids"].to(dev), position_ids=row["position_ids"].to(dev),
                         use_cache=False).logits[0]
        # 损失用整条样本：前 64 个 token 多半是提示，labels 全是 -100，没有可比的损失
        padded = model(**to(lm.pad_right(rows[:2], pad_id)), use_cache=False).loss.item()
        packed = model(**to(collate([one_row(rows[:2])])), use_cache=False).loss.item()
    return (alone - together).abs().max().item(), abs(padded - packed)


def run_tricks(args: Args, base, rows: list[dict], tok, out: run.Run, flops: float, peak: float) -> dict:
    """逐招训练、逐招记一行；MFU = 有用 FLOPs / 用时 / 同一进程实测的峰值。"""
    results = {}
    for trick in args.tricks:
        r = measure(trick, base, rows, args, tok, out)
        if r is None:
            continue
        # flops 对每招都一样（只按真实 token 算）：MFU 的高低全由用时决定，检查点的重算、填充位都算不上有用功
        r["mfu"] = flops / r["seconds"] / peak
        # 只保留 4 位小数：metrics.json 是给人比的，7 位有效数字的计时噪声只会干扰阅读
        results[trick] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        out.log.info(f"{trick:16s} {r['tokens_per_s']:9.0f} tok/s  峰值内存 +{r['peak_mem_mb']:7.1f} MB  "
                     f"填充 {r['padding_fraction']:5.1%}  MFU {r['mfu']:.2%}  {r['steps']} 步 {r['seconds']:.2f} s")
    return results


def plot(out: run.Run, results: dict, n_rows: int, peak: float) -> None:
    """吞吐与峰值内存并排：加速招数往往拿内存换时间（或反过来），只看一边会选错。"""
    names = list(results)
    fig, save = out.plot("acceleration_tricks.png")
    ax1, ax2 = fig.add_subplot(121), fig.add_subplot(122)
    ax1.barh(names, [results[n]["tokens_per_s"] for n in names], color="tab:blue")
    ax1.set_xlabel("trained tokens / s (non-pad)")
    ax2.barh(names, [results[n]["peak_mem_mb"] for n in names], color="tab:orange")
    # PeakMemory 量的是相对进入 with 时的增量：模型权重与预热分配的状态不在里面，条形只比各招自己多用的内存
    ax2.set_xlabel("peak memory increase (MB)")
    ax2.set_yticks([])
    fig.suptitle(f"{out.model_name}: {n_rows} samples, matmul peak {peak / 1e9:.1f} GFLOP/s", fontsize=9)
    save()


def summarize(results: dict, peak: float, exact: tuple[float, float], lens: list[int]) -> dict:
    """招数两两的比值：都是同一进程、同一批样本里量的，才可比（不同进程、不同时刻的机器负载不同）。"""
    def ratio(a: str, b: str, k: str):
        return results[a][k] / results[b][k] if a in results and b in results else None

    metrics = {"tricks": results, "packing_speedup": ratio("packed", "padded", "tokens_per_s"),
               "padding_free_speedup": ratio("padding_free", "padded", "tokens_per_s"),
               "ckpt_mem_ratio": ratio("packed_ckpt", "packed", "peak_mem_mb"),
               "ckpt_time_ratio": ratio("packed_ckpt", "packed", "seconds"),
               "sdpa_vs_eager_speedup": ratio("padded", "padded_eager", "tokens_per_s"),
               # 汇总的 MFU 取 packed（课程推荐的组织方式）；没选 packed 时退而取第一招，保证这个键总有值
               "mfu": results.get("packed", next(iter(results.values())))["mfu"],
               "matmul_peak_gflops": round(peak / 1e9, 2), "packed_max_logit_diff": exact[0],
               "packed_vs_padded_loss_diff": exact[1],
               "padding_fraction_padded": results.get("padded", {}).get("padding_fraction"),
               "n_samples": len(lens), "real_tokens": sum(lens)}
    # 没跑的招数（跳过的或没选的）不写 None：metrics.json 里出现的每个数都是真量出来的
    return {k: v for k, v in metrics.items() if v is not None}


def main(args: Args) -> dict:
    import torch

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    unknown = sorted(set(args.tricks) - set(TRICKS))
    if unknown:   # 加载模型之前就报错：拼错一个招数名不该白等一分钟
        raise UserError(f"--tricks {' '.join(unknown)}: 不认识；可选 {', '.join(TRICKS)}")

    # 1. 数据与模型：先读数据（坏文件不等模型加载完才报）；fp32 主权重；所有招数从同一份初始权重出发、吃同一批样本
    convs = data.load_sft(args.data or data.DATA_DIR / "longform" / "sft_long.jsonl")
    # for_training=True：CPU 上即使有原生 bf16 也保留 fp32 主权重，
    # bf16 的 8 位尾数会吞掉 AdamW 的小更新（见 models.pick_dtype）
    base, tok = models.load_args(args, for_training=True)
    rows = load_rows(args, convs, tok)
    lens = [len(r["input_ids"]) for r in rows]
    out.log.info(f"{len(rows)} 条样本，长度 {min(lens)}-{max(lens)}（中位 {sorted(lens)[len(lens) // 2]}），"
                 f"CPU 线程 {torch.get_num_threads()}（os.cpu_count={os.cpu_count()}）")

    # 2. 打包是对的吗：先证明它不改结果，再谈它快多少——一个"更快"但让样本互相看见的打包只是更快地学错
    exact = packing_is_exact(base, rows, tok.pad_token_id)
    out.log.info(f"打包 vs 单独前向 max|Δlogit| = {exact[0]:.2e}，打包 vs 填充 |Δloss| = {exact[1]:.2e}")

    # 3. 同一进程里测矩阵乘峰值（MFU 的分母），再逐招训练：别的进程抢 CPU 时，分子分母一起变慢，比值仍可比
    peak = mfu.matmul_peak_flops(args.matmul_size, train.device_of(base))
    results = run_tricks(args, base, rows, tok, out, mfu.model_flops(base, rows), peak)

    # 4. 表 + 图：吞吐与峰值内存并排
    plot(out, results, len(rows), peak)
    metrics = summarize(results, peak, exact, lens)
    return out.finish(metrics, claims=CLAIMS, summary=(
        f"打包/填充 吞吐 {metrics.get('packing_speedup', float('nan')):.2f}x，检查点峰值内存比 "
        f"{metrics.get('ckpt_mem_ratio', float('nan')):.2f}，MFU {metrics['mfu']:.2%}"
        f"（峰值 {peak / 1e9:.0f} GFLOP/s）"))


if __name__ == "__main__":
    main(cli.parse(Args))
