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
        # 一个打包行装约 max_length / mean 条样本：行数按这个比例缩小，一步看到的样本数才与不打包时相当；
        # 样本很短时比例会舍入成 0，至少留一行，否则一步没有数据
        n_rows = len(train.pack(rows, args.max_length))
        per_step = max(1, round(args.per_device_train_batch_size * mean / args.max_length))
    # 一次前向 ≤ --micro-batch-tokens：logits 有 token 数 × 词表那么大，一步的行数拆成几次前向、梯度累积，
    # 数学上仍是同一步（common.train.micro_batches）
    per_fwd, accum = train.micro_batches(per_step, args.max_length, args.micro_batch_tokens)
    # -(-a // b) 是整数的向上取整：最后那批不满也算一步
    steps_per_epoch = max(1, -(-n_rows // (per_fwd * accum)))
    # 自带数据固定 60 步（Args 帮助里写的约 2 个 epoch）；--data 的大小事先不知道，只能按 epoch 数换算
    planned = args.max_steps or (round(steps_per_epoch * args.num_train_epochs) if own_data else 60)
    # 显式给了 --max-steps 就照办、不按预算砍；第一次调用时还没实测（step_s=0），也先不砍
    steps = planned if args.max_steps or not step_s else min(planned, budget_steps(step_s, args.max_train_minutes))
    # 一次前向的 token 数：打包行都装到 max_length，填充批按平均长度估；数据总共没那么多时以总量为上限。
    # 它既是 eval_schedule 衡量"一步多少 token"的单位，也是 auto_checkpointing 估激活内存的输入
    fwd_tokens = min(sum(len(r["input_ids"]) for r in rows),
                     round(per_fwd * (args.max_length if args.packing else mean)))
    # 评估只有前向，开销 ≤ 训练的 10%：实测了就按实测的秒数，否则按 token 数估
    measured = max(1, math.ceil(eval_s / (0.1 * step_s))) if eval_s and step_s else 0
    # 自动间隔保证至少评估 2 次（只评估一次就无从挑最好的一步）；round_steps：自动步数取间隔的整数倍，
    # 否则最后一次评估之后多训的步会被 load_best_model_at_end 白白丢掉。用户给了 --max-steps 就不改他的步数
    steps, every = (steps, args.eval_steps) if args.eval_steps else train.eval_schedule(
        steps, eval_tokens, fwd_tokens * accum, measured, round_steps=not args.max_steps)
    return {"rows_per_fwd": per_fwd, "accum": accum, "steps": steps, "planned": planned,
            "epochs": steps / steps_per_epoch, "eval_steps": every, "fwd_tokens": fwd_tokens,
            "eval_tokens": eval_tokens,
            # 填充批的真实宽度随批内最长样本变化，这里取平均长度，只用于日志与激活内存的粗估
            "width": args.max_length if args.packing else round(mean)}


def fit_budget(args, out, trainer, rows, eval_rows, p: dict, ckpt: bool) -> tuple[float, float, dict]:
    """训练前实测一步（用训练器自己的损失，两次取后一次）和一次评估，按 --max-train-minutes 重定步数与评估间隔。"""
    ds, collate = trainer.train_dataset, trainer.data_collator
    # 用训练集真实的第一批、训练器自己的 collator 来测：打包 / 填充的形状与训练一致，测出的时间才对得上
    first = [ds[i] for i in range(min(p["rows_per_fwd"], len(ds)))]
    # 一步 = accum 次前向 + 反向，所以乘累积次数；repeats=2 取第二次，第一次含分配器与线程池的预热
    step_s = step_cost(trainer.model, collate(first), ckpt, repeats=2,
                       loss_fn=trainer.compute_loss)[0] * p["accum"]
    t0 = time.perf_counter()
    before = trainer.evaluate()["eval_loss"]   # 训练前的验证损失；顺便实测一次评估要多久
    # 有了实测的每步秒数和评估秒数，重排一次计划：按 --max-train-minutes 减步数，按实测定评估间隔
    p = plan(args, rows, sum(len(r["input_ids"]) for r in eval_rows), bool(args.data), step_s,
             time.perf_counter() - t0)
    # 训练器已按首次计划建好，直接改它的 args：学习率调度器在 train() 开始时才按 max_steps 建，所以来得及。
    # save_steps 与 eval_steps 一起改：load_best_model_at_end 要求保存步是评估步的整数倍，TrainingArguments
    # 只在构造时检查这一条，事后改要自己保持一致
    trainer.args.max_steps, trainer.args.eval_steps, trainer.args.save_steps = p["steps"], *[p["eval_steps"]] * 2
    out.log.info(budget_line(step_s, p, args.max_train_minutes))
    return before, step_s, p


def budget_steps(step_s: float, minutes: float, eval_fraction: float = 0.1) -> int:
    """时间预算（分钟）内能跑几步：每步实测 step_s 秒，评估再占 eval_fraction。minutes <= 0 表示不限。"""
    # 评估按步数的 eval_fraction 另算时间（与 plan 里"评估开销 ≤ 10%"的目标一致）；预算再紧也至少训一步
    return 10**9 if minutes <= 0 else max(1, int(minutes * 60 / (step_s * (1 + eval_fraction))))


def budget_line(step_s: float, p: dict, minutes: float) -> str:
    """一行中文：训练前实测一步多久、预计总时长、是否因 --max-train-minutes 减了步数（评估另占约 10%）。"""
    # 1.1 = 1 + 评估约占的 10%，与 budget_steps 的 eval_fraction 默认值一致
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
        # 非重入实现：LoRA 冻结了底座参数，重入式检查点在输入不需要梯度时会让 adapter 收不到梯度
        # （common.train.trainer_flags 同理）
        enable({"use_reentrant": False})
    else:
        # 不开时也显式关掉：测的必须是这一种设置，不能带着模型上此前打开的状态
        disable()
    was_training = model.training
    # 训练模式下测：dropout 开着，transformers 的梯度检查点也只在 self.training 时生效，与真实的训练步一致
    model.train()
    dev = train.device_of(model)
    batch = {k: v.to(dev) for k, v in batch.items()}
    for _ in range(repeats):
        with train.PeakMemory(dev) as m:
            t0 = time.perf_counter()
            # 传副本：TRL 的 compute_loss 会往输入里写键（inputs["use_cache"] = False），两轮要用同样的批
            loss = loss_fn(model, dict(batch)) if loss_fn else model(**batch, use_cache=False).loss
            loss.backward()
            del loss
            if m.cuda:
                # CUDA 核是异步提交的：不等它们跑完，perf_counter 量到的只是提交时间
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        # 测量产生的梯度清掉（set_to_none 连梯度张量一起释放）：下一轮从同样的状态开始，也不把它们带进训练
        model.zero_grad(set_to_none=True)
    # 测完关掉检查点：训练时开不开由 Trainer 的 gradient_checkpointing 参数决定（train.trainer_flags），这里不留副作用
    disable()
    model.train(was_training)
    return seconds, m.peak_mb


def activation_gb(config, tokens: int, rows: int, width: int, checkpointing: bool = False, bytes_per: int = 4) -> float:
    """一步前向 + 反向要留着的激活量的粗估（GB）：决定要不要开梯度检查点。

    每层每 token 存约 10·hidden + 4·intermediate 个数（归一化输入、q/k/v、注意力输出、MLP 的 gate/up/激活/乘积…），
    外加注意力分数 heads·width² 每行（带掩码时 CPU 的 sdpa 走显式实现，要存概率矩阵），再加 logits 及其梯度
    约 3·tokens·vocab 个数。梯度检查点只保留每层的输入（hidden 个数/token），反向时一次重算一层。
    """
    # 多模态模型的 hidden_size、层数在文本子配置里；普通模型的 get_text_config() 返回自身
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers = c.hidden_size, c.num_hidden_layers
    # 没有 intermediate_size 或它是 None 的配置（ChatGLM 叫 ffn_hidden_size）：按经典 Transformer 的 4·hidden 估
    inter = getattr(c, "intermediate_size", 4 * h) or 4 * h
    per_layer = tokens * (10 * h + 4 * inter) + 2 * rows * c.num_attention_heads * width * width
    # 开检查点：各层只留输入，反向时同一时刻只有一层在重算，所以只加一层的 per_layer；不开则每层都留着
    total = (layers * tokens * h + per_layer if checkpointing else layers * per_layer) + 3 * tokens * c.vocab_size
    # bytes_per 默认 4（fp32：CPU 训练保留 fp32 主权重，见 models.pick_dtype）；GPU 上 bf16 时估计偏大一倍，
    # 只会让检查点更早打开，不会爆内存
    return total * bytes_per / 2**30


def memory_budget_gb(requested: float = 0.0) -> float:
    """激活内存预算：用户给了就用；否则取本机当前可用内存（psutil）的四分之一——其余留给权重、优化器、
    分配器碎片（实测 RSS 峰值约为激活估计的 1.2-1.5 倍）和同一台机器上的别的程序。"""
    import psutil

    # 用 available 而不是 total：机器上别的进程已经占掉的内存不能算进预算
    return float(requested) if requested and requested > 0 else psutil.virtual_memory().available / 2**30 / 4


def auto_checkpointing(config, p: dict, budget_gb: float, requested: str = "auto") -> tuple[bool, str]:
    """按预算决定是否开梯度检查点；返回 (开不开, 一行说明)。requested：auto / on / off（用户强制时照办）。"""
    # 两种都估出来写进日志：学生看得到开检查点能省多少，再判断值不值
    full = activation_gb(config, p["fwd_tokens"], p["rows_per_fwd"], p["width"], False)
    ckpt = activation_gb(config, p["fwd_tokens"], p["rows_per_fwd"], p["width"], True)
    est = (f"一步约 {p['fwd_tokens']} token，激活内存估计 {full:.2f} GB（开检查点 {ckpt:.2f} GB），"
           f"预算 {budget_gb:.1f} GB")
    # 用户强制时照办，但一行里仍给出估计，强制得对不对一眼可见
    if requested in ("on", "off"):
        state = "开" if requested == "on" else "关"
        return requested == "on", f"{est} -> 梯度检查点{state}（--gradient-checkpointing {requested}）"
    # 只看不开时的估计：放得下就不付约 30% 的重算代价
    on = full > budget_gb
    return on, f"{est} -> 梯度检查点{'自动打开：用约 30% 的重算换激活内存' if on else '不需要，关'}"


def packed_vs_padded_loss(model, rows: list[dict], pad_token_id: int) -> tuple[float, float]:
    """同一批样本：填充成矩形算一次损失，首尾相接打包成一行再算一次。两者应相等（fp32 下差 ~1e-6）：
    段落边界处理错了（position_ids 没归零、模型建了 KV 缓存），这里就对不上，训练会悄悄学错。"""
    import torch

    # 打包：几条首尾相接成一行，seq_lengths 让 collator 给每段从 0 开始的 position_ids，模型据此隔开段落
    packed = train.PackedCollator(pad_token_id)([{"input_ids": sum((r["input_ids"] for r in rows), []),
                                                  "labels": sum((r["labels"] for r in rows), []),
                                                  "seq_lengths": [len(r["input_ids"]) for r in rows]}])
    # 对照：右填充成矩形，attention_mask 挡住填充位（右填充不改变真实 token 的位置编号，结果与逐条算相同）
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
    # 第 0 步放训练前的 eval_loss：曲线从起点画起，训练一共降了多少一眼可见
    ax.plot(*zip(*([(0, m["eval_loss_before"])] + [tuple(e) for e in m["eval_history"]])), "o-", label="eval loss")
    ax.axvline(m["kept_step"], color="gray", linestyle="--", label=f"kept step {m['kept_step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens only)")   # 英文标签：不依赖系统里有中文字体（CI 与很多服务器没有）
    ax.set_title(f"LoRA SFT: {out.model_name}, r={args.lora_r}" + (", identity accuracy {:.2f} -> {:.2f}".format(
        m["identity_accuracy_before"], m["identity_accuracy_after"]) if "identity_accuracy_after" in m else ""))
    ax.legend()
    save()
