"""第 3 课 06 的训练进程（torchrun / deepspeed 启动，每个 rank 一个）：继续预训练（领域文档 + 一定比例的通用文本）
-> 领域指令 SFT（留验证损失最低的一步），每个混合比例各训一个模型，rank 0 保存。
不单独运行，见 domain_finetune_case.py。"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def blocks(tok, texts: list[str], size: int) -> list[list[int]]:
    """继续预训练的标准切法：全部文本首尾相连（文档间插 EOS），切成等长的块，没有一个填充位。"""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    # 不足一块的尾巴丢掉：块全部等长才能直接 torch.tensor 成批，一个填充位都不需要
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def parse_args() -> argparse.Namespace:
    """主进程传来的参数（这个文件不面向学生，用 argparse 而不是课程的 Args：torchrun 只转发命令行）。"""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", required=True, help="主进程写好的 JSON：domain / general / sft_rows / sft_eval_rows")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--mix", type=float, nargs="+", required=True, help="继续预训练数据里通用文本的占比")
    ap.add_argument("--cpt-steps", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--eval-steps", type=int, default=0, help="SFT 每多少步评估一次；0 = 自动")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    return ap.parse_args()


def sft_eval_loss(engine, rows: list[dict], pad_id: int, micro: int) -> float:
    """留出指令的平均每 token 损失（只算回答）：每个 rank 算自己那一份，all_reduce 求和再除，所有 rank 得到同一个数。"""
    import torch
    import torch.distributed as dist

    from common import lm

    rank, world = dist.get_rank(), dist.get_world_size()
    # 每个 rank 评不同的一份（rank::world），合起来正好是全部留出样本，不重不漏
    shard, model = rows[rank::world], engine.module
    # 放在 engine.device 上：NCCL 只能对 GPU 上的张量做 all_reduce；float64 累加逐批的 loss × token 数不丢精度
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    # 关掉 dropout：验证损失里不含随机性，各次评估才可比；评完下面切回 train
    model.eval()
    with torch.no_grad():
        for i in range(0, len(shard), micro):
            b = {k: v.to(engine.device) for k, v in lm.pad_right(shard[i:i + micro], pad_id).items()}
            n = (b["labels"][:, 1:] != -100).sum()   # 损失是这些 token 上的平均：乘回去才能跨批、跨 rank 加总
            total += torch.stack([model(**b).loss.double() * n, n.double()])
    model.train()
    dist.all_reduce(total)
    # 留出样本里没有回答 token 时分母取 1，不除以 0
    return (total[0] / total[1].clamp(min=1)).item()


def sft_stage(engine, a, rows: list[dict], eval_rows: list[dict], pad_id: int, micro: int) -> dict:
    """领域指令 SFT：只在回答上算损失；每 every 步在留出指令上评估，留下验证损失最低那一步的权重（不是最后一步：
    领域指令只有几百条，多训几步就开始背答案，验证损失先降后升）。"""
    import torch.distributed as dist

    from common import lm, train

    rank, world = dist.get_rank(), dist.get_world_size()
    shard, losses, history = rows[rank::world], [], []
    mean = sum(len(r["input_ids"]) for r in rows) / max(1, len(rows))
    # 没给 --eval-steps 时自动定间隔：评估开销约不超过训练的 1/10、至少评 2 次（见主脚本 --eval-steps 的说明）
    every = a.eval_steps or train.eval_schedule(
        a.sft_steps, sum(len(r["input_ids"]) for r in eval_rows), round(micro * world * mean))[1]
    best, best_state = float("inf"), None
    for step in range(1, a.sft_steps + 1):
        # 指令长短不一：右填充成批，填充位的 labels = -100 不算损失（因果模型右填充不改变真实 token 的位置）
        # 下标取模：样本不够 sft_steps × micro 条时从头循环，而不是 IndexError
        b = lm.pad_right([shard[((step - 1) * micro + j) % len(shard)] for j in range(micro)], pad_id)
        loss = engine(**{k: v.to(engine.device) for k, v in b.items()}).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        # 最后一步一定评估：否则最后几步的权重没量过，也就不可能被留下
        if eval_rows and (step % every == 0 or step == a.sft_steps):
            history.append([step, round(sft_eval_loss(engine, eval_rows, pad_id, micro), 4)])
            if history[-1][1] < best:   # ZeRO-2：每个 rank 都有完整权重，各自留一份（在 CPU 上，不占显存）
                best = history[-1][1]
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}
    if best_state is not None:   # 装回最好的那一步再交给 rank 0 保存：存下来的就是量困惑度的那个模型
        engine.module.load_state_dict(best_state)
    kept = min(history, key=lambda h: h[1])[0] if history else a.sft_steps
    return {"sft": losses, "kept_step": kept, "eval_history": history}


def train_one(a, mix: float, dom: list, gen: list, texts: dict, cfg: dict, pad_id: int, eta: bool):
    """一个混合比例：从原模型开始 CPT（领域块 + 通用块）-> SFT；返回 (engine, 结果)。"""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from common import run, train

    rank, world, micro = dist.get_rank(), dist.get_world_size(), cfg["train_micro_batch_size_per_gpu"]
    # 通用文本占比 mix：领域块全用，再补 n 个通用块使 n / (领域 + n) ≈ mix
    n_gen = min(len(gen), round(mix / (1 - mix) * len(dom))) if mix < 1 else len(gen)
    cpt = dom + gen[:n_gen]
    random.Random(a.seed).shuffle(cpt)   # 领域块与通用块打散：不然前几十步只见领域、后几步只见通用
    torch.manual_seed(a.seed)   # 每个混合比例从同一个起点、同样的随机数出发：差别只来自数据配比
    # 每个比例都从磁盘重新加载原模型：上一个比例训过的权重不能带进下一个
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    # weight_decay=0：继续预训练只训几十步，衰减项只会把预训练学到的权重往 0 拉，等于多加一份遗忘
    opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    shard, losses = cpt[rank::world], []   # 数据并行：每个 rank 训练不同的块
    for step in range(a.cpt_steps):
        t0 = time.perf_counter()
        x = torch.tensor([shard[(step * micro + j) % len(shard)] for j in range(micro)], device=engine.device)
        # 继续预训练是普通的语言模型损失：每个 token 都预测下一个（labels = input_ids，模型内部左移一位）
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if eta and step == 0:   # 长数据一步可能要几十秒：开训几秒内就该知道整个运行要等多久
            total = len(a.mix) * (a.cpt_steps + a.sft_steps)
            run.get_logger().info(train.eta_line(time.perf_counter() - t0, total) +
                                  f"（{len(a.mix)} 个混合比例 × CPT {a.cpt_steps} + SFT {a.sft_steps} 步）")
    res = sft_stage(engine, a, texts["sft_rows"], texts["sft_eval_rows"], pad_id, micro)
    return engine, {"cpt_blocks": len(cpt), "general_blocks": n_gen, "cpt": losses, **res}


def main() -> None:
    a = parse_args()
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from common import train

    on_gpu = torch.cuda.is_available()
    # 同一个 worker 两种后端：GPU 上 NCCL 走 NVLink/IB，CPU 上 gloo 走本机回环，课程的 2 进程演示就能在笔记本上跑
    train.ds_init(on_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = json.loads(Path(a.ds_config).read_text(encoding="utf-8"))
    if not on_gpu:   # CPU：fp32 + torch AdamW（不 JIT 编译 DeepSpeedCPUAdam），同 01
        cfg.pop("bf16", None), cfg.pop("fp16", None), cfg.pop("optimizer", None)
        cfg["zero_force_ds_cpu_optimizer"] = False
    texts = json.loads(Path(a.texts).read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(a.model_path)
    tok.pad_token = tok.pad_token or tok.eos_token   # 与主进程 models.load_tokenizer 一致：填充 id 两边相同
    dom, gen = blocks(tok, texts["domain"], a.block_size), blocks(tok, texts["general"], a.block_size)
    result = {}
    for i, mix in enumerate(a.mix):
        engine, res = train_one(a, mix, dom, gen, texts, cfg, tok.pad_token_id, eta=rank == 0 and i == 0)
        if rank == 0:   # ZeRO-2：每个 rank 都有完整权重，rank 0 直接存（ZeRO-3 要 engine.save_16bit_model 先聚齐）
            target = Path(a.out).parent / f"model_mix{mix:g}"
            engine.module.save_pretrained(target, safe_serialization=True)
            tok.save_pretrained(target)
            result[f"{mix:g}"] = {"path": str(target), **res}
        dist.barrier()   # rank 0 存完再进下一个混合比例：否则别的 rank 先开始、抢占 rank 0 存盘要的内存
        # 释放这个比例的引擎（优化器状态、梯度分片）：下一个比例还要建一份，不删内存就翻倍
        del engine
    if rank == 0:
        Path(a.out).write_text(json.dumps({"world_size": world, "runs": result}, indent=2), encoding="utf-8")
    # 等 rank 0 写完结果再一起退出：否则 torchrun 可能在文件写完前就收掉进程组
    dist.barrier()
    train.ds_exit()


if __name__ == "__main__":
    main()
