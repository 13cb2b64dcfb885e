"""超大模型的参考方案：DeepSeek-V3（671B MoE）与 Llama-3-70B（稠密）在 N 个节点 × 8 卡上用 ZeRO-3（± CPU offload）
每卡要多少显存、每个节点要多少内存，哪些方案放不下、为什么；为放得下的方案生成 DeepSpeed JSON、hostfile、
deepspeed / torchrun / accelerate launch 三种启动命令和 accelerate YAML，每份配置都交给 DeepSpeed / accelerate
自己的解析器校验。

参数量不是抄来的：用 transformers 的 DeepseekV3Config / LlamaConfig 在 meta 设备上把真实架构建出来数（不占内存），
671,026,404,352 与 70,553,706,496 都是这样数出来的。显存账本（每个参数 Ψ 字节数）与第 3 课 01 相同：
bf16 权重 2 + bf16 梯度 2 + fp32 主权重/动量/方差 12 + DeepSpeed 优化器前的 fp32 梯度 4，ZeRO-3 按 N×8 切分；
另加 ZeRO-3 前向/反向时临时聚齐的最大一层（4·L），以及打开激活检查点后的激活：每层只存输入（2·s·b·h），
再加一层重算时的工作集（Korthikanti et al. 2022 的 34·s·b·h，FlashAttention 省掉 s² 项；MLP 按实际中间维）
和 fp32 logits。

运行：
  python lesson3_distributed/02_8gpu_config/ds_config_builder.py           # 全部方案（纯计算 + 建 meta 模型，不训练）
  python lesson3_distributed/02_8gpu_config/ds_config_builder.py --smoke   # 同样的计算，少几个节点数
  python lesson3_distributed/02_8gpu_config/ds_config_builder.py --gpu-memory-gb 141 --node-memory-gb 2048 \\
      --config configs/lesson3/ds_config_builder.yaml                      # 换成 H200 等你的硬件
  生成的命令在 GPU 集群上直接用：deepspeed --hostfile outputs/.../hostfile ...（见输出目录的 launch_*.sh）

你会看到（默认 --gpu-memory-gb 80、--headroom 0.9、--node-memory-gb 2048、序列 4096、微批 1、打开激活检查点；
2 个模型 × 6 种节点数 × 3 档 offload = 36 个方案）：每个方案一行——每卡显存（按项拆开）、每节点内存、放不放得下、为什么。
- Llama-3-70B：单节点 ZeRO-3 不 offload 每卡要的显存远超可用，大头是优化器分片（fp32 主权重/动量/方差 + fp32 梯度）；
  offload 优化器后单节点就放得下（推荐方案），代价是把这些状态搬进节点内存、每步走 PCIe；节点多了不 offload 也放得下——
  ZeRO-3 把一切切到全部 N×8 张卡上，每卡显存随卡数下降。
- DeepSeek-V3：不 offload 时到 32 节点（256 卡）也放不下——transformers 把一层 256 个专家合成一个张量（11.27B 参数），
  ZeRO-3 前向/反向时要把这一层整个聚齐，这一项不随卡数变小，远大于 70B 稠密模型的一层；offload 优化器后 8 节点起放得下，
  节点再少时每节点内存又不够。这正是 671B MoE 实际用专家并行（EP）+ 流水线并行、而不是单靠 ZeRO-3 训练的原因。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：0.2 分钟，0.5 GB，结论 7/7 成立
  ✓ 70B 单节点 ZeRO-3 不 offload 放不下：每卡显存 / 可用显存：2.484（≥ 2）
  ✓ 放不下的主因是优化器分片：它占每卡显存的比例（70B，单节点不 offload）：0.7349（≥ 0.6）
  ✓ offload 优化器让 70B 单节点放得下：每卡显存 / 可用显存：0.4301（≤ 0.6）
  ✓ ZeRO-3 在所有卡上切分：4 节点 / 1 节点 的每卡显存（70B，不 offload）：0.311（≤ 0.4）
  ✓ MoE 把一层专家合成一个张量：ZeRO-3 聚齐一层的显存，DeepSeek-V3 / Llama-3-70B：10.74（≥ 5）
  ✓ offload 的代价是节点内存：DeepSeek-V3 4 节点 offload 优化器时每节点内存 / 可用内存：1.526（≥ 1.2）
  ✓ DeepSeek-V3 8 节点 offload 优化器放得下：每卡显存 / 可用显存：0.9744（≤ 1）
<!-- /results -->
输出：mem_per_gpu.png，每个模型推荐方案的 ds_*.json、hostfile_*、accelerate_*.yaml、launch_*.sh。
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import yaml

from common import cli, run, train
from common.errors import UserError

GB = 2**30   # 与第 3 课 01 同一单位（2**30）：两课的账本数字可以直接对照
# 两个参考架构：字段名就是 transformers 配置类的参数名（DeepseekV3Config 的默认值即 DeepSeek-V3 的官方配置）
ARCHS = {
    "deepseek-v3-671b": ("DeepseekV3Config", {}),
    # LlamaConfig 的默认值是 7B 那一档（hidden 4096、32 层），70B 的尺寸必须逐项写全；
    # num_key_value_heads=8 是 GQA：不写时默认等于注意力头数，K/V 投影的参数会多算
    "llama3-70b": ("LlamaConfig", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                       max_position_embeddings=8192, rope_theta=500000.0)),
}
# offload 的三档（优化器状态, 参数）：顺序 = 从快到慢，选方案时"同节点数下 offload 最少"就按这个顺序比
OFFLOADS = {"none": (False, False), "opt": (True, False), "opt+param": (True, True)}


@dataclass
class Args(cli.CommonArgs):
    models: list[str] = cli.arg(["deepseek-v3-671b", "llama3-70b"], "要规划的参考模型（见 ARCHS）")
    nodes: list[int] = cli.arg([1, 2, 4, 8, 16, 32], "试哪些节点数（每节点 gpus_per_node 张卡）", min=1)
    gpus_per_node: int = cli.arg(8, "每节点几张卡", min=1)
    gpu_memory_gb: float = cli.arg(80.0, "每张卡显存 GB（A100/H100 80，H200 141）", min=1)
    node_memory_gb: float = cli.arg(2048.0, "每个节点的 CPU 内存 GB（offload 用）", min=1)
    headroom: float = cli.arg(0.9, "只用显存/内存的这个比例（CUDA 上下文、碎片、通信缓冲要留余量）", min=0.1, max=1)
    seq_len: int = cli.arg(4096, "训练序列长度", min=1)
    micro_batch: int = cli.arg(1, "每卡微批大小", min=1)
    # 累积步数不进显存账本：激活按微批算，梯度在同一块缓冲里累加，它只让 train_batch_size 变大
    gradient_accumulation_steps: int = cli.arg(16, "梯度累积步数", min=1)
    master_addr: str = cli.arg("node-1", "hostfile 与 torchrun 里第一个节点的主机名")
    data: str = cli.arg(None, "本脚本不读数据文件：只按模型结构与卡数做规划，不训练")

    smoke_model = "tiny-llama"   # 本脚本不加载模型：--model 只影响 metrics 里记录的名字

    def __post_init__(self) -> None:
        if self.data:   # CommonArgs 的 --data：给了却悄悄不用，学生会以为规划和自己的数据有关
            raise UserError(f"--data {self.data}: 这个脚本不读数据文件"
                            "（只按模型结构与卡数做规划，序列长度用 --seq-len）")


SMOKE = dict(nodes=[1, 4, 16])   # 保留 1、4、16：CLAIMS 引用的 1n/4n/16n 方案都还在（8n 那条冒烟门槛为 None，不查）

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里算：不 offload、1 节点、
# 稠密模型、可用显存。账本是确定的计算（冒烟只少几个节点数），两种模式的值相同；
# 8 节点不在冒烟的节点数里，那条只在默认模式检查
CLAIMS = [
    run.Claim("70B 单节点 ZeRO-3 不 offload 放不下：每卡显存 / 可用显存",
              'plans["llama3-70b/1n/zero3+none"]["mem_per_gpu_gb"] / usable_gpu_gb', ">=", 2.0, 2.0),
    run.Claim("放不下的主因是优化器分片：它占每卡显存的比例（70B，单节点不 offload）",
              'plans["llama3-70b/1n/zero3+none"]["breakdown_gb"]["optimizer"]'
              ' / plans["llama3-70b/1n/zero3+none"]["mem_per_gpu_gb"]', ">=", 0.6, 0.6),
    run.Claim("offload 优化器让 70B 单节点放得下：每卡显存 / 可用显存",
              'plans["llama3-70b/1n/zero3+opt"]["mem_per_gpu_gb"] / usable_gpu_gb', "<=", 0.6, 0.6),
    run.Claim("ZeRO-3 在所有卡上切分：4 节点 / 1 节点 的每卡显存（70B，不 offload）",
              'plans["llama3-70b/4n/zero3+none"]["mem_per_gpu_gb"]'
              ' / plans["llama3-70b/1n/zero3+none"]["mem_per_gpu_gb"]', "<=", 0.4, 0.4),
    run.Claim("MoE 把一层专家合成一个张量：ZeRO-3 聚齐一层的显存，DeepSeek-V3 / Llama-3-70B",
              'plans["deepseek-v3-671b/16n/zero3+none"]["breakdown_gb"]["gathered_layer"]'
              ' / plans["llama3-70b/16n/zero3+none"]["breakdown_gb"]["gathered_layer"]', ">=", 5.0, 5.0),
    run.Claim("offload 的代价是节点内存：DeepSeek-V3 4 节点 offload 优化器时每节点内存 / 可用内存",
              'plans["deepseek-v3-671b/4n/zero3+opt"]["cpu_per_node_gb"] / usable_node_gb', ">=", 1.2, 1.2),
    run.Claim("DeepSeek-V3 8 节点 offload 优化器放得下：每卡显存 / 可用显存",
              'plans["deepseek-v3-671b/8n/zero3+opt"]["mem_per_gpu_gb"] / usable_gpu_gb', "<=", None, 1.0),
]


def count(arch: str) -> tuple[int, int, dict]:
    """在 meta 设备上按真实架构建模型：总参数、最大一层（ZeRO-3 一次要聚齐的）、配置。"""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise UserError(f"--models {arch}: 只认识 {', '.join(ARCHS)}")
    cls, kw = ARCHS[arch]
    # ARCHS 里只存类名字符串：模块顶层不必 import transformers，--help 与 YAML 校验不用等它加载
    cfg = getattr(transformers, cls)(**kw)
    # meta 设备：只建形状不分配内存，671B 的模型在笔记本上也能数清参数（真分配要 1.3 TB 的 bf16）
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())   # parameters() 已去掉共享（tied）的权重，不会重复计数
    # 最大一层 = 直接挂在某个模块上的参数之和：ZeRO-3 按模块聚齐参数，MoE 把一层所有专家合成一个张量时它就很大
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest, cfg.to_dict()


def activations_gb(cfg: dict, s: int, b: int) -> float:
    """打开激活检查点后每卡的激活：每层存一份输入 + 一层重算的工作集 + fp32 logits 及其梯度。"""
    h, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    # MoE：每个 token 只走 k 个路由专家 + 共享专家，激活按"实际用到的中间维"算
    inter = (cfg["moe_intermediate_size"] * (cfg["num_experts_per_tok"] + cfg.get("n_shared_experts", 0))
             if cfg.get("n_routed_experts") else cfg["intermediate_size"])
    # 检查点只存每层输入（bf16，2 字节）：反向时从它重算整层，这就是"用算力换显存"省下的地方
    checkpoints = layers * s * b * h * 2
    one_layer = s * b * (34 * h + 3 * 2 * inter)   # 注意力/LayerNorm 34·s·b·h；SwiGLU 的 gate/up/act 各 2 字节
    # logits 与它的梯度都是 fp32（交叉熵要数值稳定）：词表 12.8 万时这一项能比所有层的检查点还大
    logits = 2 * s * b * vocab * 4
    return (checkpoints + one_layer + logits) / GB


def plan(args: Args, psi: int, largest: int, cfg: dict, nodes: int, offload: str) -> dict:
    """一个方案每卡显存与每节点内存的明细，以及放不下的原因。"""
    n = nodes * args.gpus_per_node   # ZeRO-3 在所有卡上切分：节点翻倍，每卡的模型状态减半
    off_opt, off_param = OFFLOADS[offload]
    # (12 + 4)：fp32 主权重/动量/方差 12，加 DeepSpeed 优化器前的 fp32 梯度 4（即第 3 课 01 IMPL 的那一项）
    weights, grads, optim = 2 * psi / n / GB, 2 * psi / n / GB, (12 + 4) * psi / n / GB
    # offload 优化器时梯度分片也跟着去 CPU（在 CPU 上更新），与 DeepSpeed 估算器 cpu_offload 分支的卡上账目一致
    gpu = {"weights": 0.0 if off_param else weights, "grads": 0.0 if off_opt else grads,
           # 4·L：聚齐的 bf16 权重 + 梯度各 2 字节，且不除以 n——这是加节点也压不下去的那一项
           "optimizer": 0.0 if off_opt else optim, "gathered_layer": 4 * largest / GB,
           # 激活不随 ZeRO 切分：每卡算自己的微批，卡再多这一项也不变
           "activations": activations_gb(cfg, args.seq_len, args.micro_batch)}
    # offload 到 CPU 的东西不会凭空消失：搬走的每卡显存变成节点内存，8 卡的份额加起来常常超过 1 TB
    cpu_per_gpu = (weights if off_param else 0) + ((grads + optim) if off_opt else 0)
    mem, cpu_node = sum(gpu.values()), cpu_per_gpu * args.gpus_per_node
    why = []
    if mem > args.gpu_memory_gb * args.headroom:
        top = max(gpu, key=gpu.get)   # 点名最大的一项：知道是优化器还是聚齐的那一层，才知道该加节点还是该 offload
        why.append(f"每卡 {mem:.0f} GB > {args.gpu_memory_gb * args.headroom:.0f} GB 可用"
                   f"（最大项 {top} {gpu[top]:.0f} GB）")
    if cpu_node > args.node_memory_gb * args.headroom:
        why.append(f"每节点 offload 需 {cpu_node:.0f} GB 内存 > {args.node_memory_gb * args.headroom:.0f} GB 可用")
    return {"nodes": nodes, "gpus": n, "offload": offload, "mem_per_gpu_gb": round(mem, 2),
            "cpu_per_node_gb": round(cpu_node, 1), "breakdown_gb": {k: round(v, 2) for k, v in gpu.items()},
            "fits": not why, "why": "；".join(why) or "放得下"}


def ds_config(args: Args, p: dict) -> dict:
    """方案对应的 DeepSpeed JSON（train_batch_size 按 微批 × 累积 × 总卡数 推出）。"""
    off_opt, off_param = OFFLOADS[p["offload"]]
    # 桶 5e8 与 stage3_max_live_parameters 1e9 都是 DeepSpeed 的默认值，预取 = 0.9 × 桶（transformers "auto" 的比例）；
    # 常驻阈值 1e6 比默认 1e5 大：更多小参数（LayerNorm、偏置）不切分、每卡常驻，省下大量小通信，
    # 账本里没算这部分常驻参数，它们远小于 headroom 留出的余量
    zero = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 500_000_000,
            "stage3_prefetch_bucket_size": 450_000_000, "stage3_param_persistence_threshold": 1_000_000,
            "stage3_max_live_parameters": 1_000_000_000, "stage3_gather_16bit_weights_on_model_save": True}
    # pin_memory：锁页内存让 CPU<->GPU 拷贝走 DMA，offload 时 PCIe 是瓶颈，不锁页的话再慢一截
    if off_opt:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if off_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    # 只开 bf16：账本里 2 字节的权重/梯度就是按它算的；不用 fp16，也就不需要 loss scaling
    return {"train_batch_size": args.micro_batch * args.gradient_accumulation_steps * p["gpus"],
            "train_micro_batch_size_per_gpu": args.micro_batch,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "gradient_clipping": 1.0,
            "bf16": {"enabled": True}, "zero_optimization": zero, "steps_per_print": 10, "wall_clock_breakdown": False}


def write_launch(args: Args, out: run.Run, name: str, p: dict) -> dict:
    """hostfile + accelerate YAML + 三种启动命令；DeepSpeed 与 accelerate 各自解析一遍。"""
    from accelerate.commands.config.config_args import ClusterConfig

    stem = f"{name}_{p['nodes']}n_{p['offload'].replace('+', '_')}"
    cfg = ds_config(args, p)
    train.validate_ds_config(cfg, p["gpus"], f"{stem}.json")
    ds_path = out.path(f"ds_{stem}.json")
    ds_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    # hostfile 的第一行是主节点：deepspeed 启动器从它发起 pdsh，与 --master_addr 必须一致
    hosts = [f"node-{i + 1}" if i else args.master_addr for i in range(p["nodes"])]
    # slots = 每节点卡数：deepspeed 启动器按 slots 决定在每台机器上起几个进程
    out.path(f"hostfile_{stem}").write_text("".join(f"{h} slots={args.gpus_per_node}\n" for h in hosts),
                                            encoding="utf-8")
    # zero3_init_flag：from_pretrained 走 zero.Init 边读边切；不开则每个进程先在内存里放一份完整模型
    acc = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "DEEPSPEED", "mixed_precision": "bf16",
           "deepspeed_config": {"deepspeed_config_file": ds_path.name, "deepspeed_multinode_launcher": "pdsh",
                                "deepspeed_hostfile": f"hostfile_{stem}", "zero3_init_flag": True},
           # 29500 是 torchrun 的默认端口：三种启动命令用同一个，集群防火墙只需放行一个端口
           "machine_rank": 0, "main_process_ip": args.master_addr, "main_process_port": 29500,
           # rdzv_backend "static" 是 accelerate 的默认：节点按 machine_rank 固定编号，不做弹性伸缩
           "num_machines": p["nodes"], "num_processes": p["gpus"], "rdzv_backend": "static", "same_network": True,
           "main_training_function": "main", "use_cpu": False}
    acc_path = out.path(f"accelerate_{stem}.yaml")
    acc_path.write_text(yaml.safe_dump(acc, sort_keys=False), encoding="utf-8")
    try:
        ClusterConfig.from_yaml_file(str(acc_path))   # accelerate 拒绝未知键，缺键时报 TypeError
    except (ValueError, TypeError) as e:
        raise UserError(f"{acc_path}: accelerate 拒绝了这份配置：{e}") from None
    # train.py 是占位：换成你自己的训练脚本，它要接受 --deepspeed（HF TrainingArguments 自带这个参数）
    entry = "train.py --deepspeed " + ds_path.name
    cmds = {"deepspeed": f"deepspeed --hostfile hostfile_{stem} --num_nodes {p['nodes']} --num_gpus "
                         f"{args.gpus_per_node} --master_addr {args.master_addr} {entry}",
            # torchrun 没有 hostfile：要在每个节点上各跑一次、靠 $NODE_RANK 区分；
            # deepspeed 启动器则从主节点经 pdsh 一次拉起全部
            "torchrun": f"torchrun --nnodes {p['nodes']} --nproc_per_node {args.gpus_per_node} "
                        f"--node_rank $NODE_RANK "
                        f"--rdzv_backend c10d --rdzv_endpoint {args.master_addr}:29500 {entry}   # 每个节点各跑一次",
            "accelerate": f"accelerate launch --config_file {acc_path.name} --machine_rank $NODE_RANK train.py"}
    out.path(f"launch_{stem}.sh").write_text("#!/bin/bash\n# " + p["why"] + "\n" + "\n".join(
        f"# {k}\n{v}" for k, v in cmds.items()) + "\n", encoding="utf-8")
    return {"ds_config": ds_path.name, "accelerate": acc_path.name, "commands": cmds}


def recommend(args: Args, out: run.Run, name: str, plans: dict) -> dict | None:
    """一个模型最省的可行方案：节点最少，同节点数下 offload 最少（offload 走 PCIe，每步慢几倍）；生成它的启动文件。

    先比节点数：多一个节点就多 8 张卡的租金，而 offload 只是慢；两者都能放下时，少花卡比跑得快更常见的约束。
    """
    # (节点数, offload 档位序号, 键) 直接取 min：先比节点数再比 offload，正好是 docstring 里的优先级
    ok = [(p["nodes"], list(OFFLOADS).index(p["offload"]), k) for k, p in plans.items()
          if k.startswith(name + "/") and p["fits"]]
    if not ok:
        out.log.warning(f"{name}: 在给定的节点数 {args.nodes} 里没有放得下的 ZeRO-3 方案")
        return None
    key = min(ok)[2]
    best = {"plan": key, **write_launch(args, out, name, plans[key])}
    out.log.info(f"{name}: 推荐 {key}\n  " + "\n  ".join(best["commands"].values()))
    return best


def plot(args: Args, out: run.Run, names: list[str], plans: dict) -> None:
    """每卡显存随节点数（双对数轴），虚线 = 可用显存：线穿过虚线的位置就是"至少要几个节点"。"""
    fig, save = out.plot("mem_per_gpu.png")
    ax = fig.add_subplot(111)
    for name in names:
        for off in OFFLOADS:
            pts = [(p["nodes"], p["mem_per_gpu_gb"]) for k, p in plans.items()
                   if k.startswith(name + "/") and p["offload"] == off]
            ax.plot(*zip(*pts), "o-", label=f"{name} zero3+{off}")
    ax.axhline(args.gpu_memory_gb * args.headroom, color="red", ls="--", label="usable GPU memory")
    # 默认节点数都是 2 的幂：log2 轴上等距；若每卡只有被切分的项，线会是直线，
    # 越往右越平，说明不随卡数变小的聚齐层与激活开始主导
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"nodes (x{args.gpus_per_node} GPUs)")
    ax.set_ylabel("memory per GPU (GB)")
    ax.set_title(f"ZeRO-3 per-GPU memory, seq {args.seq_len}, micro-batch {args.micro_batch}")
    ax.legend(fontsize=6)
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 数参数：真实架构在 meta 设备上建出来（抄来的"671B"不告诉你最大一层有多大，而那一层决定 ZeRO-3 的下限）
    sizes = {}
    for name in args.models:
        psi, largest, cfg = count(name)
        sizes[name] = (psi, largest, cfg)
        out.log.info(f"{name}: {psi / 1e9:.2f}B 参数，最大一层 {largest / 1e9:.2f}B（ZeRO-3 一次要聚齐它）")

    # 2. 每个（模型, 节点数, offload）方案的显存/内存账本：放不下的也列出来，并写明哪一项超了
    plans = {}
    for name, (psi, largest, cfg) in sizes.items():
        for nodes in args.nodes:
            for off in OFFLOADS:
                p = plan(args, psi, largest, cfg, nodes, off)
                plans[f"{name}/{nodes}n/zero3+{off}"] = p
                out.log.info(f"{name:18s} {nodes:3d} 节点 offload={off:9s} 每卡 {p['mem_per_gpu_gb']:8.1f} GB  "
                             f"每节点内存 {p['cpu_per_node_gb']:8.0f} GB  {'✓' if p['fits'] else '✗ ' + p['why']}")

    # 3. 每个模型选最省的可行方案，生成 DeepSpeed JSON、hostfile、accelerate YAML 与启动命令
    best = {name: b for name in sizes if (b := recommend(args, out, name, plans)) is not None}

    # 4. 图：每卡显存随节点数，虚线 = 可用显存
    plot(args, out, list(sizes), plans)
    n_fit = sum(p["fits"] for p in plans.values())
    return out.finish({"params": {k: v[0] for k, v in sizes.items()},
                       "largest_layer_params": {k: v[1] for k, v in sizes.items()}, "plans": plans,
                       "recommended": best, "plans_fit": n_fit, "plans_total": len(plans),
                       # 放不放得下的基线：这台硬件扣掉余量后的可用显存 / 内存
                       "usable_gpu_gb": args.gpu_memory_gb * args.headroom,
                       "usable_node_gb": args.node_memory_gb * args.headroom}, claims=CLAIMS,
                      summary=f"{len(plans)} 个方案 {n_fit} 个放得下；推荐："
                              + "；".join(f"{k} {v['plan']}" for k, v in best.items()))


if __name__ == "__main__":
    main(cli.parse(Args))
