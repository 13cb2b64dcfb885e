"""第 3 课 06 的训练进程（torchrun / deepspeed 启动，每个 rank 一个）：继续预训练（领域文档 + 一定比例的通用文本）
-> 领域指令 SFT，每个混合比例各训一个模型，rank 0 保存。不单独运行，见 domain_finetune_case.py。"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def blocks(tok, texts: list[str], size: int) -> list[list[int]]:
    """继续预训练的标准切法：全部文本首尾相连（文档间插 EOS），切成等长的块，没有一个填充位。"""
    ids: list[int] = []
    for t in texts:
        ids += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", required=True, help="主进程写好的 JSON：domain / general / sft")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--ds-config", required=True)
    ap.add_argument("--mix", type=float, nargs="+", required=True, help="继续预训练数据里通用文本的占比")
    ap.add_argument("--cpt-steps", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import data

    on_gpu = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = json.loads(Path(a.ds_config).read_text(encoding="utf-8"))
    if not on_gpu:   # CPU：fp32 + torch AdamW（不 JIT 编译 DeepSpeedCPUAdam），同 01
        cfg.pop("bf16", None), cfg.pop("fp16", None), cfg.pop("optimizer", None)
        cfg["zero_force_ds_cpu_optimizer"] = False
    texts = json.loads(Path(a.texts).read_text(encoding="utf-8"))
    tok = AutoTokenizer.from_pretrained(a.model_path)
    tok.pad_token = tok.pad_token or tok.eos_token
    dom, gen = blocks(tok, texts["domain"], a.block_size), blocks(tok, texts["general"], a.block_size)
    sft = [data.tokenize_chat(tok, c, a.block_size * 2) for c in texts["sft"]]
    micro = cfg["train_micro_batch_size_per_gpu"]
    result = {}
    for mix in a.mix:
        # 通用文本占比 mix：领域块全用，再补 n 个通用块使 n / (领域 + n) ≈ mix
        n_gen = min(len(gen), round(mix / (1 - mix) * len(dom))) if mix < 1 else len(gen)
        cpt = dom + gen[:n_gen]
        random.Random(a.seed).shuffle(cpt)
        torch.manual_seed(a.seed)
        model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
        opt = torch.optim.AdamW(model.parameters(), lr=a.learning_rate, weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        losses = {"cpt": [], "sft": []}
        shard = cpt[rank::world]   # 数据并行：每个 rank 训练不同的块
        for step in range(a.cpt_steps):
            rows = [shard[(step * micro + j) % len(shard)] for j in range(micro)]
            x = torch.tensor(rows, device=engine.device)
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()
            losses["cpt"].append(loss.item())
        shard = sft[rank::world]   # 第二阶段：领域指令 SFT，只在回答上算损失
        for step in range(a.sft_steps):
            rows = [shard[(step * micro + j) % len(shard)] for j in range(micro)]
            n = max(len(r["input_ids"]) for r in rows)
            ids = torch.tensor([r["input_ids"] + [tok.pad_token_id] * (n - len(r["input_ids"])) for r in rows])
            lab = torch.tensor([r["labels"] + [-100] * (n - len(r["labels"])) for r in rows])
            att = torch.tensor([[1] * len(r["input_ids"]) + [0] * (n - len(r["input_ids"])) for r in rows])
            loss = engine(input_ids=ids.to(engine.device), attention_mask=att.to(engine.device),
                          labels=lab.to(engine.device)).loss
            engine.backward(loss)
            engine.step()
            losses["sft"].append(loss.item())
        if rank == 0:   # ZeRO-2：每个 rank 都有完整权重，rank 0 直接存（ZeRO-3 要 engine.save_16bit_model 先聚齐）
            target = Path(a.out).parent / f"model_mix{mix:g}"
            engine.module.save_pretrained(target, safe_serialization=True)
            tok.save_pretrained(target)
            result[f"{mix:g}"] = {"path": str(target), "cpt_blocks": len(cpt), "general_blocks": n_gen, **losses}
        dist.barrier()
        del engine, model, opt
    if rank == 0:
        Path(a.out).write_text(json.dumps({"world_size": world, "runs": result}, indent=2), encoding="utf-8")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
