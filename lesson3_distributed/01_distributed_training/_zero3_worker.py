"""第 3 课 01 的训练进程：由 torchrun / deepspeed 启动器拉起，每个 rank 一个（不单独运行）。

  python -m torch.distributed.run --nproc_per_node 2 _zero3_worker.py --ds-config ds.json --model-path DIR \\
      --data data/domain/sft.jsonl --steps 4 --out result.json
GPU 上同一个文件、同一份 JSON 用 `deepspeed --num_gpus 8 _zero3_worker.py ...` 启动（通信后端自动换成 NCCL）。
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def batches(tok, path: str, micro: int, max_length: int, rank: int, world: int, seed: int, limit: int = 0):
    """按 rank 交错切分数据（每个 rank 看不同的样本 = 数据并行），右填充成批，labels 只留助手回复。

    limit > 0：每个 rank 只用前 limit 条反复训练。"同一批数据过拟合几步，loss 必须降"是检查分布式配置
    没有把梯度弄丢（没 all-reduce、累积错了）的标准做法；换批次的 loss 抖动会把这个信号淹没。
    """
    import random

    from common import data, lm

    convs = data.load_sft(path)
    random.Random(seed).shuffle(convs)   # 每个 rank 用同一个种子洗牌：洗出同一个顺序，再按 rank 交错切，互不重叠
    rows = [data.tokenize_chat(tok, c, max_length) for c in convs[rank::world]]
    rows = rows[:limit] if limit else rows
    while True:   # 数据比步数少时从头再来：这里要的是"跑满 N 步"，不是"过一遍数据"
        # 只产出满的微批，凑不满的尾巴丢掉；所以 rows 少于 micro 条时一个批也产不出，while True 会空转——
        # zero3_configurator 的 check_data 事先挡住了这种数据
        for i in range(0, len(rows) - micro + 1, micro):
            yield lm.pad_right(rows[i:i + micro], tok.pad_token_id)


def parse_args() -> argparse.Namespace:
    """启动器给每个 rank 同样的命令行：rank 号不在这里，由 torchrun 通过环境变量（RANK/LOCAL_RANK）告诉进程。"""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--fixed-batch", action="store_true", help="每个 rank 反复训练同一个全局 batch（检查配置用）")
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def init_process_group(a: argparse.Namespace) -> tuple[int, int, dict]:
    """(rank, world, 本机可用的 DeepSpeed 配置)。GPU 用 NCCL；CPU 上 DeepSpeed 走 gloo（同一份 JSON，不改一个键）。"""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import logger as ds_logger

    from common import train

    for h in [ds_logger, *ds_logger.handlers]:   # DeepSpeed 默认只打 WARNING；INFO 里有每步的 step/lr（3 课 04 读它）
        h.setLevel("INFO")
    on_gpu = torch.cuda.is_available()
    train.ds_init(on_gpu)
    if on_gpu:   # 每个进程只用自己那张卡：不设的话所有 rank 都挤在 cuda:0 上
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(a.seed)   # 各 rank 同一个种子：初始权重一致，数据并行才是在训"同一个模型"
    cfg = json.loads(Path(a.ds_config).read_text(encoding="utf-8"))
    if not on_gpu:
        # CPU 上没有 bf16/fp16 混合精度的意义（也没有 fused kernel）：用 fp32；
        # offload 时 DeepSpeed 默认要 JIT 编译 DeepSpeedCPUAdam（几分钟），这里改用 torch 的 AdamW
        cfg.pop("bf16", None), cfg.pop("fp16", None), cfg.pop("optimizer", None)
        cfg["zero_force_ds_cpu_optimizer"] = False
    return dist.get_rank(), dist.get_world_size(), cfg


def build_engine(a: argparse.Namespace, cfg: dict):
    """(DeepSpeed 引擎, 分词器, HfDeepSpeedConfig)。ZeRO-3 时 HfDeepSpeedConfig 让 from_pretrained 走 zero.Init：
    每个 rank 一边读权重一边只留自己那一片（70B 模型不会在每个进程里先完整地放一份，那要 280 GB 的 fp32）。"""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    # transformers 只用弱引用记住它：调用方要一直拿着，from_pretrained 与之后的 ZeRO-3 判断才看得到
    keep = HfDeepSpeedConfig(cfg) if cfg["zero_optimization"]["stage"] == 3 else None
    tok = AutoTokenizer.from_pretrained(a.model_path)
    # 不少 base 模型的分词器没有 pad token，右填充又必须有个 id：借 eos；填充位 mask 为 0、labels 为 -100，不进损失
    tok.pad_token = tok.pad_token or tok.eos_token
    # 按 fp32 加载：GPU 上的 bf16/fp16 由 DeepSpeed 按 JSON 统一转换，CPU 上混合精度节已在 init_process_group 里删掉
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    if a.gradient_checkpointing:   # 激活检查点：反向时重算每层的前向，激活只存层边界
        # use_reentrant=False：重入版要求段的输入带梯度，否则段内参数拿不到梯度；新版 torch 不显式指定还会告警
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    # JSON 里有 optimizer 节（GPU）就由 DeepSpeed 建优化器；CPU 上那一节已删，改交一个 torch AdamW
    client_opt = None if "optimizer" in cfg else torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=client_opt, config=cfg)
    return engine, tok, keep


def count_params(engine, stage: int) -> tuple[int, int]:
    """(本 rank 持有的参数, 完整参数)：ZeRO-3 下 p.ds_tensor 是本 rank 的那一片，p.ds_numel 是完整大小。"""
    if stage == 3:
        local = sum(p.ds_tensor.numel() for p in engine.module.parameters())
        return local, sum(p.ds_numel for p in engine.module.parameters())
    total = sum(p.numel() for p in engine.module.parameters())   # ZeRO-1/2 只切优化器状态（和梯度），参数是完整的
    return total, total


def train_steps(engine, it, steps: int, world: int) -> tuple[list[float], float]:
    """(每个微批的全局平均损失, 秒)。engine 负责梯度累积、reduce-scatter、优化器分片更新。"""
    import torch.distributed as dist

    losses, t0 = [], time.perf_counter()
    for _ in range(steps * engine.gradient_accumulation_steps()):
        batch = {k: v.to(engine.device) for k, v in next(it).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()   # 只在累积满 gradient_accumulation_steps 个微批时真正更新
        # all_reduce 原地改写张量，而 detach() 与 loss 共享存储：不 clone 会把 loss 本身也改成各 rank 之和
        avg = loss.detach().clone()
        dist.all_reduce(avg)   # 各 rank 的损失取平均，才是全局 batch 的损失（每个 rank 只看到自己那份数据）
        losses.append(avg.item() / world)   # all_reduce 默认是求和（ReduceOp.SUM）：除以 world 才是平均
    return losses, time.perf_counter() - t0


def main() -> None:
    import psutil
    import torch.distributed as dist

    from common import train

    a = parse_args()
    # 1. 进程组：GPU 用 NCCL；CPU 上 DeepSpeed 走 gloo
    rank, world, cfg = init_process_group(a)
    stage = cfg["zero_optimization"]["stage"]

    # 2. 加载模型并交给 DeepSpeed：ZeRO-3 时边读边切
    engine, tok, _hf_ds_config = build_engine(a, cfg)   # 第三项必须活到进程结束（见 build_engine）

    # 3. 每个 rank 实际持有多少参数：ZeRO-3 下应约为完整大小 / world
    local, total = count_params(engine, stage)

    # 4. 训练几步；--fixed-batch 时每个 rank 反复训练同一个全局 batch，loss 必须降
    micro, ga = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    # limit = micro × ga：恰好一个优化器步的样本，每步都重训这一批
    it = batches(tok, a.data, micro, a.max_length, rank, world, a.seed, limit=micro * ga if a.fixed_batch else 0)
    losses, secs = train_steps(engine, it, a.steps, world)

    # 5. 汇总到 rank 0 写结果：每个 rank 的持有量与内存只有它自己知道，要 all_gather 一次
    mine = {"rank": rank, "params_local": local, "rss_mb": psutil.Process().memory_info().rss / 2**20}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        Path(a.out).write_text(json.dumps({
            "world_size": world, "stage": stage, "total_params": total, "per_rank": gathered, "losses": losses,
            "train_seconds": secs, "backend": dist.get_backend()}, indent=2), encoding="utf-8")
    dist.barrier()   # 等 rank 0 写完再一起退出：否则 torchrun 可能在文件写完前就收掉整组进程
    train.ds_exit()


if __name__ == "__main__":
    main()
