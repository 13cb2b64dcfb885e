"""第 1 课 05 的训练计划：每步几行、几次梯度累积、步数与时间预算、评估间隔、要不要开梯度检查点；核对打包；损失曲线。

只有这一课在开训前实测一步来定步数（其它脚本在第 1 步后报预计用时、超时兜底停下，见 common.train.attach）：
这里的步数默认按 epoch 自动算，而步数决定了余弦学习率曲线的形状，只能在开训前定下来。
"""
from __future__ import annotations

import math
import time

from common import lm, train


def plan(args, rows: list[dict], eval_tokens: int, own_data: bool, step_s: float = 0.0, eval_s: float = 0.0) -> dict:
    """每步多少行、分几次前向（梯度累积）、总步数、评估间隔。

    打包时按 token 数换算行数，让一步看到的样本数与不打包时相当（学习率、步数的经验值不用改）。给了实测的每步秒数
    step_s 时，自动步数不超过 --max-train-minutes 的预算（planned = 不限时的步数）；再给了实测的一次评估秒数 eval_s，
    评估间隔按实测算——评估批次小、TRL 还顺手算熵和 token 准确率，按 token 数估的评估开销偏低。
    """
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    n_rows, per_step = len(rows), args.per_device_train_batch_size
    if args.packing:
        n_rows = len(train.pack(rows, args.max_length))
        per_step = max(1, round(args.per_device_train_batch_size * mean / args.max_length))
    per_fwd, accum = train.micro_batches(per_step, args.max_length, args.micro_batch_tokens)
    steps_per_epoch = max(1, -(-n_rows // (per_fwd * accum)))
    planned = args.max_steps or (round(steps_per_epoch * args.num_train_epochs) if own_data else 60)
    steps = planned if args.max_steps or not step_s else min(planned, budget_steps(step_s, args.max_train_minutes))
    fwd_tokens = min(sum(len(r["input_ids"]) for r in rows),
                     round(per_fwd * (args.max_length if args.packing else mean)))
    # 评估只有前向，开销 ≤ 训练的 10%：实测了就按实测的秒数，否则按 token 数估
    measured = max(1, math.ceil(eval_s / (0.1 * step_s))) if eval_s and step_s else 0
    steps, every = (steps, args.eval_steps) if args.eval_steps else train.eval_schedule(
        steps, eval_tokens, fwd_tokens * accum, measured, round_steps=not args.max_steps)
    return {"rows_per_fwd": per_fwd, "accum": accum, "steps": steps, "planned": planned,
            "epochs": steps / steps_per_epoch, "eval_steps": every, "fwd_tokens": fwd_tokens,
            "eval_tokens": eval_tokens,
            "width": args.max_length if args.packing else round(mean)}


def fit_budget(args, out, trainer, rows, eval_rows, p: dict, ckpt: bool) -> tuple[float, float, dict]:
    """训练前实测一步（用训练器自己的损失，两次取后一次）和一次评估，按 --max-train-minutes 重定步数与评估间隔。"""
    ds, collate = trainer.train_dataset, trainer.data_collator
    first = [ds[i] for i in range(min(p["rows_per_fwd"], len(ds)))]
    step_s = step_cost(trainer.model, collate(first), ckpt, repeats=2,
                       loss_fn=trainer.compute_loss)[0] * p["accum"]
    t0 = time.perf_counter()
    before = trainer.evaluate()["eval_loss"]   # 训练前的验证损失；顺便实测一次评估要多久
    p = plan(args, rows, sum(len(r["input_ids"]) for r in eval_rows), bool(args.data), step_s,
             time.perf_counter() - t0)
    trainer.args.max_steps, trainer.args.eval_steps, trainer.args.save_steps = p["steps"], *[p["eval_steps"]] * 2
    out.log.info(budget_line(step_s, p, args.max_train_minutes))
    return before, step_s, p


def budget_steps(step_s: float, minutes: float, eval_fraction: float = 0.1) -> int:
    """时间预算（分钟）内能跑几步：每步实测 step_s 秒，评估再占 eval_fraction。minutes <= 0 表示不限。"""
    return 10**9 if minutes <= 0 else max(1, int(minutes * 60 / (step_s * (1 + eval_fraction))))


def budget_line(step_s: float, p: dict, minutes: float) -> str:
    """一行中文：训练前实测一步多久、预计总时长、是否因 --max-train-minutes 减了步数（评估另占约 10%）。"""
    capped = (f"；{p['planned']} 步要约 {p['planned'] * step_s * 1.1 / 60:.0f} 分钟（含评估），"
              f"超过 --max-train-minutes {minutes:g}，减到 {p['steps']} 步 ≈ {p['epochs']:.2f} 个 epoch"
              f"（要训满：加大它或换 GPU）"
              if p["steps"] < p["planned"] else "")
    # 步数已按预算减过：不再传 minutes，免得同一行又说一遍"约在第几步停下"
    return train.eta_line(step_s, p["steps"], when="训练前实测一步") + f"{capped}；每 {p['eval_steps']} 步评估一次"


def step_cost(model, batch: dict, checkpointing: bool, repeats: int = 1, loss_fn=None) -> tuple[float, float]:
    """实测一次前向 + 反向 -> (秒, 峰值内存增量 MB)。repeats > 1 时取最后一次：第一次有分配器、线程池的预热开销。
    loss_fn(model, batch) 默认 model(**batch).loss；训练器的 compute_loss 更准（TRL 的分块 lm_head、token 级指标
    都在里面，实测比裸的 model(**batch).loss 慢 10-30%）。"""
    import torch

    # transformers 5 把它改名为 activation_checkpointing_*（旧名仍可用但会告警）
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
    if checkpointing:
        enable({"use_reentrant": False})
    else:
        disable()
    was_training = model.training
    model.train()
    dev = train.device_of(model)
    batch = {k: v.to(dev) for k, v in batch.items()}
    for _ in range(repeats):
        with train.PeakMemory(dev) as m:
            t0 = time.perf_counter()
            loss = loss_fn(model, dict(batch)) if loss_fn else model(**batch, use_cache=False).loss
            loss.backward()
            del loss
            if m.cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
    disable()
    model.train(was_training)
    return seconds, m.peak_mb


def activation_gb(config, tokens: int, rows: int, width: int, checkpointing: bool = False, bytes_per: int = 4) -> float:
    """一步前向 + 反向要留着的激活量的粗估（GB）：决定要不要开梯度检查点。

    每层每 token 存约 10·hidden + 4·intermediate 个数（归一化输入、q/k/v、注意力输出、MLP 的 gate/up/激活/乘积…），
    外加注意力分数 heads·width² 每行（带掩码时 CPU 的 sdpa 走显式实现，要存概率矩阵），再加 logits 及其梯度
    约 3·tokens·vocab 个数。梯度检查点只保留每层的输入（hidden 个数/token），反向时一次重算一层。
    """
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = c.hidden_size, c.num_hidden_layers
    inter = getattr(c, "intermediate_size", 4 * h) or 4 * h
    per_layer = tokens * (10 * h + 4 * inter) + 2 * rows * c.num_attention_heads * width * width
    total = (layers * tokens * h + per_layer if checkpointing else layers * per_layer) + 3 * tokens * c.vocab_size
    return total * bytes_per / 2**30


def memory_budget_gb(requested: float = 0.0) -> float:
    """激活内存预算：用户给了就用；否则取本机当前可用内存（psutil）的四分之一——其余留给权重、优化器、
    分配器碎片（实测 RSS 峰值约为激活估计的 1.2-1.5 倍）和同一台机器上的别的程序。"""
    import psutil

    return float(requested) if requested and requested > 0 else psutil.virtual_memory().available / 2**30 / 4


def auto_checkpointing(config, p: dict, budget_gb: float, requested: str = "auto") -> tuple[bool, str]:
    """按预算决定是否开梯度检查点；返回 (开不开, 一行说明)。requested：auto / on / off（用户强制时照办）。"""
    full = activation_gb(config, p["fwd_tokens"], p["rows_per_fwd"], p["width"], False)
    ckpt = activation_gb(config, p["fwd_tokens"], p["rows_per_fwd"], p["width"], True)
    est = (f"一步约 {p['fwd_tokens']} token，激活内存估计 {full:.2f} GB（开检查点 {ckpt:.2f} GB），"
           f"预算 {budget_gb:.1f} GB")
    if requested in ("on", "off"):
        state = "开" if requested == "on" else "关"
        return requested == "on", f"{est} -> 梯度检查点{state}（--gradient-checkpointing {requested}）"
    on = full > budget_gb
    return on, f"{est} -> 梯度检查点{'自动打开：用约 30% 的重算换激活内存' if on else '不需要，关'}"


def packed_vs_padded_loss(model, rows: list[dict], pad_token_id: int) -> tuple[float, float]:
    """同一批样本：填充成矩形算一次损失，首尾相接打包成一行再算一次。两者应相等（fp32 下差 ~1e-6）：
    段落边界处理错了（position_ids 没归零、模型建了 KV 缓存），这里就对不上，训练会悄悄学错。"""
    import torch

    packed = train.PackedCollator(pad_token_id)([{"input_ids": sum((r["input_ids"] for r in rows), []),
                                                  "labels": sum((r["labels"] for r in rows), []),
                                                  "seq_lengths": [len(r["input_ids"]) for r in rows]}])
    padded = lm.pad_right(rows, pad_token_id)
    dev, was_training = train.device_of(model), model.training
    model.eval()   # 关掉 dropout：两次前向要可比
    with torch.no_grad():
        # use_cache=False：有 KV 缓存时 transformers 不会按 position_ids 识别打包
        a = model(**{k: v.to(dev) for k, v in padded.items()}, use_cache=False).loss.item()
        b = model(**{k: v.to(dev) for k, v in packed.items()}, use_cache=False).loss.item()
    model.train(was_training)
    return a, b


def plot_curve(out, args, hist: list[dict], m: dict) -> None:
    """训练损失 + 每次评估的验证损失；竖线 = 保留下来的那一步（不一定是最后一步）。"""
    fig, save = out.plot("loss_curve.png")
    ax = fig.add_subplot(111)
    ax.plot([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h], label="train loss")
    ax.plot(*zip(*([(0, m["eval_loss_before"])] + [tuple(e) for e in m["eval_history"]])), "o-", label="eval loss")
    ax.axvline(m["kept_step"], color="gray", linestyle="--", label=f"kept step {m['kept_step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens only)")   # 英文标签：不依赖系统里有中文字体（CI 与很多服务器没有）
    ax.set_title(f"LoRA SFT: {out.model_name}, r={args.lora_r}" + (", identity accuracy {:.2f} -> {:.2f}".format(
        m["identity_accuracy_before"], m["identity_accuracy_after"]) if "identity_accuracy_after" in m else ""))
    ax.legend()
    save()
