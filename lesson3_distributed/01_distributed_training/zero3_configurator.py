"""DeepSpeed ZeRO 配置器：按模型大小和硬件算出 ZeRO-1/2/3 每张卡要多少显存，生成经 DeepSpeed 校验的 JSON，
再在本机用 2 个真实进程（gloo）跑几步 ZeRO-3 + CPU offload，亲眼看到参数被切成两半。

显存从混合精度 Adam 的账本算起（每个参数 Ψ）：fp16/bf16 权重 2Ψ + 梯度 2Ψ + fp32 主权重/动量/方差 12Ψ = 16Ψ；
ZeRO-1 把 12Ψ 切到 N 张卡，ZeRO-2 再切梯度，ZeRO-3 连权重也切。DeepSpeed 的实现还多两项（下文 IMPL 说明）：
优化器前把梯度转成 fp32 的那一份（4Ψ/N），ZeRO-3 前向/反向时临时聚齐的最大一层（4·L）。估算与 DeepSpeed 自己的
estimate_zero2/3_model_states_mem_needs_all_cold 对照。每份配置都交给 DeepSpeed 的配置解析器校验（未知键拒绝），
并强制 train_batch_size = train_micro_batch_size_per_gpu × gradient_accumulation_steps × world_size。

运行：
  python lesson3_distributed/01_distributed_training/zero3_configurator.py           # smollm2-135m 账本 + 2 进程
  python lesson3_distributed/01_distributed_training/zero3_configurator.py --smoke   # tiny-llama（1.13M 参数），2 进程
  python lesson3_distributed/01_distributed_training/zero3_configurator.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson3/zero3_configurator_gpu.yaml   # 8 张 80G 卡的方案；--run 用 NCCL 跑
  GPU 上用生成的 ds_config.json：deepspeed --num_gpus 8 <本目录>/_zero3_worker.py \\
      --ds-config outputs/.../ds_config.json --model-path <模型目录> --data data/domain/sft.jsonl --out r.json

你会看到：ZeRO-1/2/3（± offload）每卡显存的账本，论文 16Ψ、算进实现项的估算与 DeepSpeed 估算器并排
（图 zero_memory.png），然后 2 个 gloo 进程各自报告持有多少参数、同一 batch 上逐步的 loss。
算进实现项后，估算与 DeepSpeed 的估算器对得上；只用论文的 16Ψ 会少算，而且 ZeRO-3 少得最多：它的总账最小，
漏掉的 fp32 梯度（4Ψ/N）与聚齐的那一层（4·L，不随卡数切分）占比最大，模型越小越明显。
ZeRO-3 下每个 rank 只持有约 1/N 的参数（2 个 rank 各一半）；同一 batch 反复训几步 loss 下降，说明梯度在
reduce-scatter 与分片更新里没有丢。CPU 上用 gloo + torch AdamW，不 JIT 编译 DeepSpeed 的共享内存通信算子
与 DeepSpeedCPUAdam。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.3 分钟，5.2 GB，结论 4/4 成立
  ✓ 算进 DeepSpeed 的实现项，每卡显存估算与 DeepSpeed 自己的估算器一致：|估算 − DeepSpeed| / DeepSpeed（%）：0（≤
    1）
  ✓ 只用论文的 16Ψ 会少算：ZeRO-3（不 offload）论文公式相对 DeepSpeed 估算器（%）：-35.31（≤ -10）
  ✓ ZeRO-3 把参数切到各个 rank：每个 rank 持有的参数 / 总参数（rank 数越多越小）：0.5（≤ 0.51）
  ✓ 分布式训练没丢梯度：同一 batch 训几步后 loss / 第一步 loss：0.3663（≤ 0.98）
<!-- /results -->
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, run, services, train
from common.errors import UserError, brief

HERE = Path(__file__).resolve().parent   # worker 按文件路径交给 torchrun：从任何工作目录运行都找得到
GB = 2**30   # DeepSpeed 估算器返回字节：三列都除以同一个 2**30，对照的百分比里才不会混进单位差


@dataclass
class Args(cli.CommonArgs):
    zero_stage: int = cli.arg(3, "ZeRO 阶段：1 切优化器状态，2 再切梯度，3 再切参数", choices=[1, 2, 3])
    num_gpus: int = cli.arg(8, "每个节点几张卡（规划用）", min=1)
    num_nodes: int = cli.arg(1, "节点数（规划用）", min=1)
    gpu_memory_gb: float = cli.arg(80.0, "每张卡显存 GB（判断放不放得下）", min=1)
    precision: str = cli.arg("bf16", "混合精度：bf16（A100/H100）/ fp16（V100/T4，需要 loss scaling）",
                             choices=["bf16", "fp16"])
    offload_optimizer: bool = cli.arg(True, "把优化器状态（和 fp32 梯度）放到 CPU 内存：省显存，换 PCIe 带宽")
    offload_param: bool = cli.arg(True, "ZeRO-3 时把参数分片也放到 CPU：最省显存，最慢")
    train_micro_batch_size_per_gpu: int = cli.arg(4, "每张卡每个微批几条样本", min=1)
    gradient_accumulation_steps: int = cli.arg(4, "梯度累积步数", min=1)
    train_batch_size: int = cli.arg(0, "全局 batch；0 = 按公式推出；填了就必须等于 微批 × 累积 × 卡数", min=0)
    # 5e8 就是 DeepSpeed ZeRO 配置里 reduce_bucket_size 的默认值；桶太小通信次数多、带宽吃不满
    reduce_bucket_size: float = cli.arg(5e8, "梯度通信桶大小（元素数）：大桶通信效率高，但要更多显存", min=1)
    activation_checkpointing: bool = cli.arg(True, "激活检查点：用重算换激活显存（长序列/大模型必开）；"
                                                   "transformers 模型用 activation_checkpointing_enable() 打开")
    run: bool = cli.arg(True, "真的启动多进程跑几步（CPU 上 gloo，GPU 上 NCCL）；--no-run 只生成配置")
    run_ranks: int = cli.arg(2, "真实运行的进程数（CPU 上每个进程一个 rank）", min=1, max=16)
    run_steps: int = cli.arg(4, "真实运行的优化器步数", min=1)
    run_micro_batch: int = cli.arg(4, "真实运行的微批大小", min=1)
    run_grad_accum: int = cli.arg(2, "真实运行的梯度累积步数", min=1)
    max_length: int = cli.arg(128, "真实运行时每条样本最多多少 token", min=8)
    learning_rate: float = cli.arg(1e-4, "真实运行的学习率")

    smoke_model = "tiny-llama"


# 极小模型承受得住大学习率：几步就能看到 loss 下降
SMOKE = dict(learning_rate=1e-3, run_steps=6, max_length=96)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里量：
# DeepSpeed 估算器、总参数、第一步 loss。前两条是账本，--no-run 也检查；后两条要真的起进程跑（--run，默认开）
PLAN_CLAIMS = [
    run.Claim("算进 DeepSpeed 的实现项，每卡显存估算与 DeepSpeed 自己的估算器一致：|估算 − DeepSpeed| / DeepSpeed（%）",
              "abs(estimate_vs_deepspeed_pct)", "<=", 1.0, 1.0),
    run.Claim("只用论文的 16Ψ 会少算：ZeRO-3（不 offload）论文公式相对 DeepSpeed 估算器（%）",
              "paper_vs_deepspeed_pct_zero3", "<=", -10.0, -10.0),
]
CLAIMS = PLAN_CLAIMS + [
    run.Claim("ZeRO-3 把参数切到各个 rank：每个 rank 持有的参数 / 总参数（rank 数越多越小）",
              "max(params_per_rank) / run_total_params", "<=", 0.51, 0.51),
    # 同一个 batch 反复训：loss 必须降，否则梯度在 reduce-scatter / 分片更新里丢了。smollm2 的默认值没有实测，
    # lr 1e-4、4 步的下降比极小模型（lr 1e-3）小，门槛放宽
    run.Claim("分布式训练没丢梯度：同一 batch 训几步后 loss / 第一步 loss",
              "loss_last / loss_first", "<=", 0.95, 0.98),
]

# DeepSpeed 实现比论文多出的项（都按每个参数的字节数计）
IMPL = {"fp32_grad_partition": 4,   # 优化器更新前把梯度分片转成 fp32：4Ψ/N（ZeRO-2/3 都有）
        "gathered_layer": 4}        # ZeRO-3 前向/反向时把一层的 fp16 权重 + 梯度临时聚齐：4·L（L = 最大一层）


def count_params(args: Args) -> tuple[int, int, str]:
    """在 meta 设备上按 config 建模型（不占内存、不读权重）：总参数量、最大一层的参数量、架构名。"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # 先查模型目录（FIFO、坏 JSON、万层嵌套、没有权重都是一行）：torchrun 的各个 rank 之后还要加载它
    path = models.check_dir(models.resolve(args.resolved_model(), args.source),
                            trust_remote_code=args.trust_remote_code)
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers 对坏配置（NaN 尺寸、不认识的 model_type）抛的异常各不相同
        raise UserError(f"--model {args.resolved_model()}: config.json 不是能用的模型配置"
                        f"（{brief(e)}）") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=args.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())   # parameters() 已去掉共享（tied）的权重
    # 与 DeepSpeed 的 model_to_params 同一算法（逐模块、recurse=False）：两边的 L 一致，4·L 这一项才对得上
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest, cfg.model_type


def check_data(args: Args) -> None:
    """--data 在本进程先读一遍：坏文件交给 torchrun 的 rank 去读，要等进程拉起、失败，错误还埋在 run.log 里。"""
    if not args.data:
        return
    n = len(data.load_sft(args.data))
    # 每个 rank 至少要凑出一个微批：否则 worker 取批的循环一个批也产不出，永远等下去
    if args.run and n < args.run_ranks * args.run_micro_batch:
        raise UserError(f"--data {args.data}: 只有 {n} 条对话，{args.run_ranks} 个 rank × 微批 "
                        f"{args.run_micro_batch} 至少要 {args.run_ranks * args.run_micro_batch} 条")


def estimate_gb(psi: int, largest: int, stage: int, n: int, off_opt: bool, off_param: bool, paper: bool = False):
    """每张卡的模型状态显存（GB）。paper=True：只用 ZeRO 论文的 2Ψ+2Ψ+12Ψ；否则再加 DeepSpeed 实现项。"""
    g32 = 0 if paper else IMPL["fp32_grad_partition"]
    live = 0 if paper else IMPL["gathered_layer"] * largest
    if stage == 1:
        # ZeRO-1：fp16 权重与梯度每卡各一份完整的（4Ψ），只有优化器状态（和 fp32 梯度）被切成 1/N
        b = 2 * psi + 2 * psi + (0 if off_opt else (12 + g32) * psi / n)
    elif stage == 2:
        # offload 时梯度分片也搬到 CPU（优化器在 CPU 上更新），卡上只剩 fp16 权重
        b = 2 * psi + (0 if off_opt else (2 + 12 + g32) * psi / n)
    elif off_param:
        b = live                           # 权重也在 CPU：卡上只有正在算的那一层
    elif off_opt:
        b = live + 2 * psi / n             # 卡上：fp16 权重分片
    else:
        # ZeRO-3 的 fp16 梯度 reduce-scatter 后直接进 fp32 分片（不再另存 2Ψ/N），所以是 2 + 4 + 12
        b = live + (2 + (g32 if not paper else 2) + 12) * psi / n
    return b / GB


def deepspeed_gb(psi: int, largest: int, stage: int, n_gpu: int, n_node: int, off_opt: bool, off_param: bool):
    """DeepSpeed 自己的估算器（ZeRO-1 没有单独的估算器，返回 None）。"""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 2:
        _, gpu = estimate_zero2_model_states_mem_needs(psi, n_gpu, n_node, cpu_offload=off_opt)
    elif stage == 3:
        # 估算器只在 cpu_offload 为真的分支里读 cpu_offload_params：这里按同样的规则传，与方案名的含义一致
        _, gpu, _ = estimate_zero3_model_states_mem_needs(psi, largest, n_gpu, n_node, cpu_offload=off_opt,
                                                          cpu_offload_params=off_opt and off_param)
    else:
        return None
    return gpu / GB


def build_config(args: Args, world_size: int, stage: int | None = None) -> dict:
    """生成 DeepSpeed JSON：batch 三个数自洽，ZeRO 各阶段只放它认识的键。"""
    stage = stage or args.zero_stage
    # DeepSpeed 初始化时断言 train_batch_size == 微批 × 累积 × world_size，不等直接抛 AssertionError；
    # 在这里先算，报错就能指出该改哪个参数
    tbs = args.train_micro_batch_size_per_gpu * args.gradient_accumulation_steps * world_size
    if args.train_batch_size and args.train_batch_size != tbs:
        raise UserError(f"--train-batch-size {args.train_batch_size}: 必须等于 微批 "
                        f"{args.train_micro_batch_size_per_gpu} × 累积 {args.gradient_accumulation_steps} × 卡数 "
                        f"{world_size} = {tbs}（或填 0 自动推出）")
    # overlap_comm 在 DeepSpeed 里默认只对 ZeRO-3 打开：显式写 True，ZeRO-1/2 的梯度通信也与反向计算重叠，
    # 代价是通信桶要额外占一块显存缓冲
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": int(args.reduce_bucket_size)}
    if args.offload_optimizer:
        # pin_memory：锁页内存让 CPU↔GPU 拷贝走异步 DMA，不锁页时每次拷贝要先过一道中转缓冲；
        # 代价是这块主机内存不能被换出
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # ZeRO-3 独有：预取下一层的桶、常驻阈值（小参数不切，省通信）、保存时把分片合成完整的 16 位权重
        # 0.9 × 桶、10 × 4096 沿用 transformers 对 "auto" 的取法（0.9 × hidden²、10 × hidden_size），
        # 4096 是 Llama-7B 这一档的 hidden_size；DeepSpeed 自己的默认值与模型大小无关
        zero.update(stage3_prefetch_bucket_size=int(0.9 * args.reduce_bucket_size),
                    stage3_param_persistence_threshold=int(10 * 4096), stage3_gather_16bit_weights_on_model_save=True)
        if args.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    else:
        # ZeRO-1/2 各卡更新完自己的分片后要 all-gather 回完整权重；ZeRO-3 按层现取参数，用的是上面的预取桶
        zero["allgather_bucket_size"] = int(args.reduce_bucket_size)
    cfg = {"train_batch_size": tbs, "train_micro_batch_size_per_gpu": args.train_micro_batch_size_per_gpu,
           # gradient_clipping 1.0 与 HF Trainer 的 max_grad_norm 默认值相同：两边训练行为可比
           "gradient_accumulation_steps": args.gradient_accumulation_steps, "gradient_clipping": 1.0,
           # bf16 的指数位与 fp32 一样多，小梯度不会下溢成 0，不需要 loss scaling；fp16 不缩放会丢掉小梯度
           args.precision: {"enabled": True} if args.precision == "bf16" else
           {"enabled": True, "loss_scale": 0, "initial_scale_power": 16},   # fp16：动态 loss scaling
           # weight_decay 0：与 worker 在 CPU 上换用的 torch AdamW 一致，GPU/CPU 两条路径训的是同一个优化器
           "optimizer": {"type": "AdamW", "params": {"lr": args.learning_rate, "weight_decay": 0.0}},
           # steps_per_print 100：集群上每步打印会刷屏；launch() 真跑时改成 1 以便第 3 课 04 读日志
           "zero_optimization": zero, "steps_per_print": 100, "wall_clock_breakdown": False}
    # 注意：JSON 里的 "activation_checkpointing" 节只对调用 deepspeed.checkpointing 的（Megatron 式）模型生效；
    # transformers 模型的激活检查点由 model.activation_checkpointing_enable() 打开（worker 的 --gradient-checkpointing）
    return cfg


def launch(args: Args, out: run.Run, cfg: dict) -> dict:
    """用 torchrun 拉起 run_ranks 个进程跑 _zero3_worker.py；CPU 上每个进程 1 个线程（2 核机器正好一人一核）。"""
    cfg_path = out.path("ds_config_run.json")
    # 每步打印一次 step/lr：run.log 就是一份真实的 DeepSpeed 日志，第 3 课 04 的日志体检默认会读到它
    cfg_path.write_text(json.dumps({**cfg, "steps_per_print": 1}, indent=2), encoding="utf-8")
    result = out.path("run_result.json")
    # 先删旧结果：否则这次 rank 0 没写出结果时，train.launch 会把上一次的文件当成这次的读回来
    result.unlink(missing_ok=True)
    # 端口取随机空闲的：用 torchrun 默认的固定端口，两次运行或测试并行时会撞端口而启动失败
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.run_ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(services.free_port()), str(HERE / "_zero3_worker.py"),
           "--ds-config", str(cfg_path), "--model-path", str(models.resolve(args.resolved_model(), args.source)),
           "--data", str(args.data or data.DATA_DIR / "domain" / "sft.jsonl"), "--steps", str(args.run_steps),
           "--max-length", str(args.max_length), "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
           # --fixed-batch：每步训同一批，loss 下降才能归因到梯度同步正确（对应 CLAIMS 的最后一条）
           "--out", str(result), "--fixed-batch"]
    if args.activation_checkpointing:   # transformers 模型的检查点要在模型上打开，JSON 里的那一节管不到它
        cmd.append("--gradient-checkpointing")
    out.log.info("启动：" + " ".join(cmd[:6]) + " ...")
    return train.launch(cmd, out.path("run.log"), result)


def memory_table(args: Args, psi: int, largest: int, world: int, log) -> tuple[list[dict], dict]:
    """(各方案每卡显存, 本次选中的方案)：论文公式、加上实现项后的估算、DeepSpeed 自己的估算器三列并排。

    三列一起看才知道差在哪：只用论文的 16Ψ，ZeRO-3 会少算聚齐的那一层和 fp32 梯度分片，上线后才 OOM。
    """
    # (stage, offload 优化器, offload 参数)：参数 offload 只对 ZeRO-3 有意义，ZeRO-1/2 每卡本来就存完整的 fp16 权重
    table, plans = [], [(1, False, False), (2, False, False), (2, True, False), (3, False, False), (3, True, False),
                        (3, True, True)]
    for stage, oo, op in plans:
        ours = estimate_gb(psi, largest, stage, world, oo, op)
        paper = estimate_gb(psi, largest, stage, world, oo, op, paper=True)
        ds = deepspeed_gb(psi, largest, stage, args.num_gpus, args.num_nodes, oo, op)
        name = f"zero{stage}" + ("+offload_opt" if oo else "") + ("+offload_param" if op else "")
        table.append({"plan": name, "ours_gb": ours, "paper_gb": paper, "deepspeed_gb": ds,
                      # 只比模型状态：激活、通信桶、显存碎片都不在账内，"fits" 为真也要留余量
                      "fits": ours < args.gpu_memory_gb,
                      "vs_deepspeed_pct": None if ds is None else 100 * (ours - ds) / ds,
                      "paper_vs_deepspeed_pct": None if ds is None else 100 * (paper - ds) / ds})
        log.info(f"{name:28s} 估算 {ours:8.3f} GB  论文 {paper:8.3f}  DeepSpeed "
                 f"{'   -   ' if ds is None else f'{ds:8.3f}'} GB")
    # 参数 offload 只在 ZeRO-3 且优化器也 offload 时才有（DeepSpeed 不支持只 offload 参数）
    chosen = next(t for t in table if t["plan"] == "zero{}{}{}".format(
        args.zero_stage, "+offload_opt" if args.offload_optimizer else "",
        "+offload_param" if args.offload_optimizer and args.offload_param and args.zero_stage == 3 else ""))
    return table, chosen


def write_configs(args: Args, out: run.Run, world: int) -> dict:
    """三个阶段各一份（方便对照），外加本次选中的那份；每份都先过 DeepSpeed 的解析器再落盘。"""
    for stage in (1, 2, 3):
        c = build_config(args, world, stage)
        train.validate_ds_config(c, world, f"ds_zero{stage}.json")
        out.path(f"ds_zero{stage}.json").write_text(json.dumps(c, indent=2), encoding="utf-8")
    cfg = build_config(args, world)
    train.validate_ds_config(cfg, world, "ds_config.json")
    out.path("ds_config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    out.log.info(f"train_batch_size = {args.train_micro_batch_size_per_gpu} × {args.gradient_accumulation_steps} × "
                 f"{world} = {cfg['train_batch_size']}；已通过 DeepSpeed 解析器校验")
    return cfg


def run_for_real(args: Args, out: run.Run) -> dict:
    """同一套配置缩到 run_ranks 个进程真的跑几步（batch 公式按新的卡数重算，再校验一次）。

    估算只是账本；真跑才能看到 ZeRO-3 真把参数切成了 1/N、梯度确实经过 reduce-scatter 让 loss 下降。
    """
    # 规划用的是目标集群的微批/累积：换成 run_* 的小值；train_batch_size 置 0 按 run_ranks 重推，
    # 否则会拿 8 卡的全局 batch 去过 2 个 rank 的断言
    small = Args(**{**vars(args), "train_micro_batch_size_per_gpu": args.run_micro_batch,
                    "gradient_accumulation_steps": args.run_grad_accum, "train_batch_size": 0})
    run_cfg = build_config(small, args.run_ranks)
    train.validate_ds_config(run_cfg, args.run_ranks, "ds_config_run.json")
    res = launch(args, out, run_cfg)
    per_rank = [r["params_local"] for r in sorted(res["per_rank"], key=lambda r: r["rank"])]
    ga = args.run_grad_accum   # worker 记的是每个微批的损失；每个优化器步 = ga 个微批，按步取平均
    steps = [sum(res["losses"][i:i + ga]) / ga for i in range(0, len(res["losses"]), ga)]
    out.log.info(f"{res['world_size']} 个 rank（{res['backend']}）各持有 {per_rank} 个参数，"
                 f"总 {res['total_params']:,d}；loss {steps[0]:.3f} -> {steps[-1]:.3f}")
    return dict(world_size=res["world_size"], params_per_rank=per_rank, loss_first=steps[0], loss_last=steps[-1],
                run_total_params=res["total_params"], run_losses=steps,
                run_rss_mb=[round(r["rss_mb"], 1) for r in res["per_rank"]],
                run_train_seconds=round(res["train_seconds"], 2))


def plot(args: Args, out: run.Run, table: list[dict], psi: int, world: int) -> None:
    """各方案每卡显存（对数轴：方案之间差几个数量级），红线 = 卡的显存。"""
    fig, save = out.plot("zero_memory.png")
    ax = fig.add_subplot(111)
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], [t["ours_gb"] for t in table], 0.4, label="ours (paper + DeepSpeed impl. terms)")
    # ZeRO-1 没有估算器（None）：画成 0，对数轴上这根柱就不显示（只剩"ours"一根）
    ax.bar([i + 0.2 for i in x], [t["deepspeed_gb"] or 0 for t in table], 0.4, label="DeepSpeed estimator")
    ax.axhline(args.gpu_memory_gb, color="red", ls="--", label=f"GPU memory {args.gpu_memory_gb:g} GB")
    ax.set_xticks(list(x), [t["plan"].replace("+", "\n+") for t in table], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("model-state memory per GPU (GB)")
    ax.set_title(f"{out.model_name}: {psi / 1e6:.1f}M params on {world} GPUs")
    ax.legend(fontsize=7)
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 规划按目标集群的总卡数算，与本机真跑时起几个进程（run_ranks）无关
    world = args.num_gpus * args.num_nodes
    build_config(args, world)   # 先查 batch 公式：填错的 --train-batch-size 在任何计算之前就报错
    models.pick_device(args.device)   # --device cuda 而没有 CUDA：一行报错，而不是悄悄在 CPU 上用 gloo 跑
    check_data(args)

    # 1. 模型有多大：meta 设备上建模型，只数参数，不读权重（70B 的模型也不占内存）
    psi, largest, arch = count_params(args)
    out.log.info(f"{out.model_name}（{arch}）：{psi:,d} 参数，最大一层 {largest:,d}")

    # 2. 每张卡的显存账本：论文公式、加上实现项后的估算、DeepSpeed 自己的估算器
    table, chosen = memory_table(args, psi, largest, world, out.log)

    # 3. 生成并校验配置：配错的键 DeepSpeed 只会默默忽略，上了集群才发现"配了没生效"
    cfg = write_configs(args, out, world)
    metrics = {"total_params": psi, "largest_layer_params": largest, "plans": table,
               "estimate_vs_deepspeed_pct": chosen["vs_deepspeed_pct"], "chosen_plan": chosen["plan"],
               "mem_per_gpu_gb": chosen["ours_gb"], "train_batch_size": cfg["train_batch_size"],
               # 固定拿不 offload 的 ZeRO-3 对照：offload 参数后论文公式里卡上什么都不剩（0 GB），相对误差没有意义
               "paper_vs_deepspeed_pct_zero3": next(t for t in table if t["plan"] == "zero3")["paper_vs_deepspeed_pct"]}

    # 4. 真的跑：CPU 上 2 个 gloo 进程，GPU 上 NCCL；同一份 JSON
    if args.run:
        metrics.update(run_for_real(args, out))

    # 5. 图：各方案每卡显存，红线 = 卡的显存
    plot(args, out, table, psi, world)
    extra = f"，{metrics['world_size']} 个 rank 各持有 {metrics['params_per_rank'][0]:,d}/{psi:,d} 参数，" \
            f"loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}" if args.run else ""
    # --no-run 时没有 rank 的结果，只评不需要起进程的两条账本结论
    return out.finish(metrics, claims=CLAIMS if args.run else PLAN_CLAIMS,
                      summary=f"{chosen['plan']} 每卡 {chosen['ours_gb']:.3g} GB（DeepSpeed 估算差 "
                              f"{chosen['vs_deepspeed_pct']:+.1f}%）{extra}")


if __name__ == "__main__":
    main(cli.parse(Args))
