"""LoRA 微调对话模型（GLM 架构）：冻结原模型，只训练低秩增量；换成你自己的数据也能训得明白、停在最好的一步。

流程：PEFT LoraConfig + get_peft_model 注入 adapter（target_modules 按架构自动选）-> 在身份数据
（data/identity/train.jsonl）+ 电动车领域数据（data/domain/sft.jsonl）或 --data 你自己的数据上 SFT，只在助手回复上
算损失 -> 训练前一行说清：多少条、多长、几条超过 --max-length 会被截断、多少步多少 epoch、第 1 步实测后预计多久
-> padding-free 打包（不同长度的样本拼进同一行，position_ids 标出边界；先核对打包与填充的损失相同）-> 按估计的
激活内存决定是否开梯度检查点 -> 按验证损失保存并留下最好的一步、不再改善就提前停 -> 保存 adapter -> 合并
（merge_and_unload）并核对 logits -> 用留出的问题比较训练前后的回答。

运行：
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py            # CPU，smollm2-135m，身份 + 领域数据 60 步
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --smoke    # tiny-glm（GLM-4 架构极小模型）
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --data data/longform/sft_long.jsonl   # 你自己的数据
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --model THUDM/glm-4-9b-chat-hf --source hf \\
      --config configs/lesson1/lora_chatglm_demo_gpu.yaml                 # GPU，bf16
  （zai-org/chatglm3-6b 这类带自定义代码的仓库再加 --trust-remote-code；adapter 注入 query_key_value 等层）

你会看到（smollm2-135m，60 步，空闲 2 核 CPU 实测 355 秒，改成打包之前）：可训练参数占 1.78%（adapter 9.4 MB）；
留出身份问题的准确率 0.00 -> 0.90；eval_loss 3.35 -> 1.37；合并模型与 adapter 的 logits 最大差 1.7e-4（fp32 舍入）。
--smoke（tiny-glm，120 步）：身份准确率 0.00 -> 0.60，eval_loss 5.59 -> 4.44，打包 vs 填充损失差 4.8e-7，峰值 RSS 834 MB。
--data data/longform/sft_long.jsonl：训练前一行报出 198 条、token 平均 385 / p90 600 / 最大 1021、43 条超过 512 被截断
（丢掉 8% 的回答 token）；激活内存估计 8.9 GB > 预算 -> 自动开梯度检查点（估计 2.1 GB）；不再出现身份准确率，
metrics.json 里有截断条数、保留的是第几步、训练吞吐（token/s）和峰值内存。图：loss_curve.png（竖线 = 保留的那一步）。
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, run, train
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    lora_r: int = cli.arg(8, "LoRA 秩 r：增量 ΔW = B·A 的秩；越大表达力越强、可训练参数越多", min=1)
    lora_alpha: int = cli.arg(16, "缩放系数：实际缩放 alpha / r，r 变了学习率不必重调", min=1)
    lora_dropout: float = cli.arg(0.05, "adapter 输入上的 dropout：数据只有几百条，防止死记", min=0, max=1)
    target_modules: str = cli.arg("auto", "注入哪些层：auto（按架构选，见 TARGETS）/ all-linear / 逗号分隔的名字")
    learning_rate: float = cli.arg(1e-3, "LoRA 学习率：只训练从零开始的小矩阵，可比全参数微调大 10-100 倍", min=0)
    max_steps: int = cli.arg(0, "优化器步数；0 = 自动：自带数据 60 步（约 2 个 epoch），--data 按 --num-train-epochs", min=0)
    num_train_epochs: float = cli.arg(3.0, "--data 时最多训练几个 epoch（验证损失不再下降会提前停）", min=0.01)
    per_device_train_batch_size: int = cli.arg(8, "每步约几条样本（打包时按 token 数换算成行数）", min=1)
    warmup_steps: int = cli.arg(3, "预热步数", min=0)
    max_length: int = cli.arg(512, "每条样本最多多少 token；打包时也是一行的长度", min=16)
    over_length: str = cli.arg("truncate", "超过 --max-length 的样本：truncate 截断（回答结尾丢失）/ drop 丢弃",
                               choices=["truncate", "drop"])
    packing: bool = cli.arg(True, "padding-free 打包：样本首尾相接装满一行，不再为填充 token 付计算")
    eval_steps: int = cli.arg(0, "每多少步评估一次；0 = 自动，使评估开销不超过训练的 1/10", min=0)
    early_stopping_patience: int = cli.arg(3, "连续几次评估没有改善就停；0 = 不提前停（仍然留下最好的一步）", min=0)
    val_fraction: float = cli.arg(0.1, "从训练数据里留出多少比例算 eval_loss", min=0, max=0.5)
    identity_repeat: int = cli.arg(2, "身份数据重复几遍再和领域数据混合：几十条身份样本混在上百条领域样本里容易被淹没", min=1)
    eval_data: str = cli.arg(None, "额外的验证集（alpaca/chat）；不给 --data 时默认 data/identity/eval.jsonl")
    identity_keywords: str = cli.arg("灵犀,Lingxi", "身份关键词（逗号分隔）：验证集的答案都含其一时才算身份准确率")
    max_new_tokens: int = cli.arg(40, "生成回答的最大长度（贪心解码）", min=1)
    num_threads: int = cli.arg(0, "CPU 线程数；0 = torch 默认（= 核数）；机器很忙时 1 往往更快（--smoke 自动用 1）", min=0)
    gradient_checkpointing: str = cli.arg("auto", "梯度检查点：auto（估计的激活内存超过预算才开）/ on / off",
                                          choices=["auto", "on", "off"])
    memory_budget_gb: float = cli.arg(0.0, "激活内存预算（GB）；0 = 本机可用内存的 1/4", min=0)

    smoke_model = "tiny-glm"   # 冒烟用 GLM-4 架构的极小模型，与课名里的 ChatGLM 对应


# --smoke：tiny-glm 只有约 1M 参数，承受得住大学习率；步数刚好让身份关键词稳定地学会
SMOKE = dict(learning_rate=1e-2, max_steps=120, eval_steps=30, lora_r=16, lora_alpha=32, max_length=256,
             max_new_tokens=24, per_device_train_batch_size=16, identity_repeat=3, lora_dropout=0.0, warmup_steps=4)
# 按架构选注入层：注意力 + MLP 的全部投影（只挂 q/v 对"记住新事实"太弱）。名字来自各模型的实现
TARGETS = {
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],  # ChatGLM2/3（自定义代码）
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],  # GLM-4（transformers 原生）
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def identity_targets(convs: list[list[dict]], keywords: list[str]) -> list[str] | None:
    """验证问题的答案都含某个身份关键词时，返回每条期望的关键词；否则 None（这不是身份数据，不算身份准确率）。"""
    hits = [[k for k in keywords if k.lower() in c[-1]["content"].lower()] for c in convs]
    return [h[0] for h in hits] if convs and all(hits) else None


def accuracy(answers: list[str], targets: list[str]) -> float:
    """回答里（不分大小写）出现期望的身份关键词即为对。"""
    return sum(t.lower() in a.lower() for a, t in zip(answers, targets)) / len(targets)


def load_data(args: Args, keywords: list[str]):
    """-> (训练对话, 留出对话, 身份问题 或 [])。--data 就是学生自己的数据：验证集从它切出来（+ --eval-data）。"""
    if args.data:
        train_convs, held = data.split(data.load_sft(args.data), args.val_fraction, args.seed)
        extra = data.load_sft(args.eval_data) if args.eval_data else []
        is_identity = identity_targets(train_convs, keywords) is not None   # 训练的就是身份数据
        ident = extra if identity_targets(extra, keywords) else (held if is_identity else [])
        return train_convs, held + extra, ident
    domain_train, held = data.split(data.load_sft(data.DATA_DIR / "domain" / "sft.jsonl"), args.val_fraction,
                                    args.seed)   # 领域数据留出一部分算 eval_loss；身份数据另有一份从没见过的问法
    train_convs = data.load_sft(data.DATA_DIR / "identity" / "train.jsonl") * args.identity_repeat + domain_train
    ident = data.load_sft(args.eval_data or data.DATA_DIR / "identity" / "eval.jsonl")
    if identity_targets(ident, keywords) is None:
        raise UserError(f"--eval-data {args.eval_data}: 不给 --data 时它应是身份问题，答案里要有 {keywords} 之一")
    return train_convs, held + ident, ident


def add_lora(model, args: Args, log):
    """原权重全部冻结，只有每个目标 Linear 旁边的 A（r×d_in）、B（d_out×r）可训练。"""
    from peft import LoraConfig, get_peft_model

    mtype = model.config.model_type
    if args.target_modules == "auto":
        mods = TARGETS.get(mtype, "all-linear")   # 不认识的架构：除 lm_head 外所有 Linear
    else:
        mods = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    log.info(f"架构 {mtype}：LoRA 注入 target_modules = {mods}")
    try:
        return get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, task_type="CAUSAL_LM",
                                                lora_dropout=args.lora_dropout, target_modules=mods)), mods
    except ValueError as e:   # 名字写错时 PEFT 的报错很长，这里说清是哪个参数
        raise UserError(f"--target-modules {args.target_modules}: {str(e).splitlines()[0][:200]}") from None


def plan(args: Args, rows: list[dict], eval_tokens: int, own_data: bool) -> dict:
    """每步多少行、总步数、评估间隔：打包时按 token 数换算，让一步看到的样本数与不打包时相当。"""
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    n_rows = len(rows)
    per_step = args.per_device_train_batch_size
    if args.packing:
        n_rows = len(train.pack(rows, args.max_length))
        per_step = max(1, round(args.per_device_train_batch_size * mean / args.max_length))
    steps_per_epoch = max(1, -(-n_rows // per_step))
    steps = args.max_steps or (round(steps_per_epoch * args.num_train_epochs) if own_data else 60)
    step_tokens = min(sum(len(r["input_ids"]) for r in rows), round(per_step * (args.max_length if args.packing
                                                                                else mean)))
    every = args.eval_steps or min(max(1, steps // 4), train.eval_interval(eval_tokens, step_tokens))
    return {"rows_per_step": per_step, "steps": steps, "epochs": steps / steps_per_epoch, "eval_steps": every,
            "step_tokens": step_tokens, "width": args.max_length if args.packing else round(mean)}


def main(args: Args) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import EarlyStoppingCallback
    from trl import SFTConfig, SFTTrainer

    args = cli.with_smoke(args, SMOKE)   # 冒烟：小规模超参数（只换你没改过的：--smoke --learning-rate 1e-2 仍生效）
    out = run.start(__file__, args, smoke_threads=1)   # 极小模型的矩阵太小，单线程反而最快（见 common.run）
    if args.num_threads > 0:   # 机器被别的进程占着时，torch 的多个线程互相等待，实测能慢几十倍：可手动改成 1
        torch.set_num_threads(args.num_threads)

    # 1. 数据：训练 / 留出；身份问题只在数据真的是身份数据时才有
    keywords = [k.strip() for k in args.identity_keywords.split(",") if k.strip()]
    train_convs, held_convs, id_convs = load_data(args, keywords)
    model, tok = models.load_args(args, for_training=True)
    model.config.use_cache = False   # 训练不需要 KV 缓存；有缓存时 transformers 不按 position_ids 识别打包的段落

    encoded = [data.tokenize_chat(tok, c, 10**9) for c in train_convs]   # 先不截断：要数清有多少条超长
    stats = train.length_stats(encoded, args.max_length)
    out.log.info(train.describe_lengths(stats, args.max_length, args.over_length))
    rows = train.truncate(encoded, args.max_length, args.over_length)
    eval_rows = train.truncate([data.tokenize_chat(tok, c, 10**9) for c in held_convs], args.max_length)
    p = plan(args, rows, sum(len(r["input_ids"]) for r in eval_rows), bool(args.data))
    gone = f"（{len(encoded) - len(rows)} 条被丢弃或截断后不剩回答 token）" if len(rows) < len(encoded) else ""
    out.log.info(f"{len(rows)} 条{gone} -> {'打包' if args.packing else '填充'}，每步 {p['rows_per_step']} 行 × ≤{p['width']} "
                 f"token，共 {p['steps']} 步 ≈ {p['epochs']:.1f} 个 epoch；每 {p['eval_steps']} 步在 "
                 f"{len(eval_rows)} 条验证样本上评估一次")

    # 2. 训练前：原模型怎么回答留出的问题？（smollm2 会说自己是 SmolLM）
    probes = id_convs or held_convs[:3]
    answers_before = models.generate(model, tok, [data.prompt_text(tok, c) for c in probes], args.max_new_tokens)

    # 3. 注入 LoRA；核对打包与填充在同一批样本上的损失一致（段落边界处理错了，这里就对不上）
    model, targets_mod = add_lora(model, args, out.log)
    trainable, total = model.get_nb_trainable_parameters()
    out.log.info(f"可训练参数 {trainable:,d} / {total:,d} = {trainable / total:.2%}（r={args.lora_r}）")
    loss_padded, loss_packed = train.packed_vs_padded_loss(model, rows[:8], tok.pad_token_id)
    out.log.info(f"同一批 {min(8, len(rows))} 条：填充损失 {loss_padded:.6f}，打包损失 {loss_packed:.6f}")

    # 4. 内存：估计一步的激活内存，超过预算就开梯度检查点（CPU 上一样省内存，代价是多一次前向）
    budget = train.memory_budget_gb(args.memory_budget_gb)
    ckpt, why = train.auto_checkpointing(model.config, p["step_tokens"], p["rows_per_step"], p["width"], budget,
                                         args.gradient_checkpointing)
    out.log.info(why)

    # 5. 训练：按评估间隔保存 adapter，结束时装回验证损失最低的那一步；连续 patience 次没改善就提前停
    collator = train.PackedCollator(tok.pad_token_id)
    train_ds = Dataset.from_list(rows)
    if args.packing:
        train_ds = train.pack(rows, args.max_length)
    cfg = SFTConfig(
        output_dir=str(out.path("trainer")), seed=args.seed, data_seed=args.seed, max_steps=p["steps"],
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
        per_device_train_batch_size=p["rows_per_step"], per_device_eval_batch_size=8, max_length=None,
        eval_strategy="steps", eval_steps=p["eval_steps"], save_strategy="steps", save_steps=p["eval_steps"],
        save_total_limit=2, save_only_model=True, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        logging_steps=1, report_to=out.trainer_report_to(), dataloader_num_workers=0, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, **train.trainer_flags(model, ckpt, log=False))
    timer = train.step_timer(sum(len(r["input_ids"]) for r in rows))   # 一个 epoch 的真实 token 数（不含填充）
    patience = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_ds, eval_dataset=Dataset.from_list(eval_rows),
                         processing_class=tok, data_collator=collator if args.packing else _padded(tok),
                         callbacks=[timer, *patience])
    before = trainer.evaluate()["eval_loss"]
    with train.PeakMemory(train.device_of(model)) as mem:
        trainer.train()
    shutil.rmtree(out.path("trainer"), ignore_errors=True)   # 中间检查点：最好的那一步已经装回模型，不必留着
    hist = list(trainer.state.log_history)
    evals = [(h["step"], round(h["eval_loss"], 4)) for h in hist if "eval_loss" in h and h["step"] > 0]
    after = trainer.evaluate()["eval_loss"]   # load_best_model_at_end：这里量的是保留下来的那一步
    kept = int(Path(trainer.state.best_model_checkpoint).name.split("-")[-1]) if trainer.state.best_model_checkpoint \
        else trainer.state.global_step
    stopped = trainer.state.global_step < p["steps"]
    tps = timer.tokens_per_s(trainer.state.epoch)
    why_stop = (f"，之后 {args.early_stopping_patience} 次评估没有改善，提前停在第 {trainer.state.global_step} 步"
                if stopped else "")
    out.log.info(f"eval_loss {before:.4f} -> {after:.4f}；保留第 {kept} 步（验证损失最低{why_stop}）；训练 "
                 f"{timer.train_s:.0f} 秒（评估占 {timer.eval_s / max(timer.train_s, 1e-9):.0%}），{tps:.0f} token/s，"
                 f"峰值内存 +{mem.peak_mb:.0f} MB（进程峰值 RSS {train.peak_rss_mb():.0f} MB）")

    # 6. 只保存 adapter；部署时新加载原模型 -> 装上 adapter -> merge_and_unload 把 scale·B·A 加进 W
    adapter_dir = out.path("adapter")
    model.save_pretrained(adapter_dir)
    size_mb = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20
    probe = tok([data.prompt_text(tok, c) + c[-1]["content"] for c in probes[:8]], return_tensors="pt",
                padding=True, truncation=True, max_length=args.max_length, add_special_tokens=False)
    mask = probe["attention_mask"].bool()
    base, _ = models.load_args(args, for_training=True)   # 与训练同精度
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    model.eval()
    with torch.no_grad():
        probe = probe.to(reloaded.device)
        logits_trained = model(**probe).logits[mask]
        logits_adapter = reloaded(**probe).logits[mask]
        merged = reloaded.merge_and_unload()
        logits_merged = merged(**probe).logits[mask]
    reload_diff = (logits_trained - logits_adapter).abs().max().item()
    merge_diff = (logits_merged - logits_adapter).abs().max().item()
    merge_tol = 1e-3 if logits_adapter.dtype == torch.float32 else 5e-2   # bf16 权重合并多一次舍入（~1e-2）
    out.log.info(f"max |Δlogit|：重新加载 vs 训练中 {reload_diff:.2e}；合并 vs adapter {merge_diff:.2e}")
    merged.save_pretrained(out.path("merged"), safe_serialization=True)
    tok.save_pretrained(out.path("merged"))

    # 7. 训练后：用合并好的模型（就是要部署的那个）回答同样的留出问题
    answers_after = models.generate(merged, tok, [data.prompt_text(tok, c) for c in probes], args.max_new_tokens)
    targets = identity_targets(id_convs, keywords)
    acc = {"identity_accuracy_before": accuracy(answers_before, targets),
           "identity_accuracy_after": accuracy(answers_after, targets)} if targets else {}

    # 8. 曲线：训练损失 + 每次评估的验证损失；竖线 = 保留下来的那一步
    fig, save = out.plot("loss_curve.png")
    ax = fig.add_subplot(111)
    ax.plot([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h], label="train loss")
    ax.plot(*zip(*([(0, before)] + evals)), "o-", label="eval loss")
    ax.axvline(kept, color="gray", linestyle="--", label=f"kept step {kept}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens only)")   # 英文标签：不依赖系统里有中文字体（CI 与很多服务器没有）
    ax.set_title(f"LoRA SFT: {out.model_name}, r={args.lora_r}" + (", identity accuracy {:.2f} -> {:.2f}".format(
        acc["identity_accuracy_before"], acc["identity_accuracy_after"]) if acc else ""))
    ax.legend()
    save()

    picks = sorted({0, 1, len(probes) // 2, len(probes) - 1})   # 中文、英文各几条
    samples = [{"question": probes[i][-2]["content"][:200], "before": answers_before[i], "after": answers_after[i]}
               for i in picks]
    for s in samples:
        out.log.info(f"{s['question'][:60]}\n  训练前: {s['before'][:80]}\n  训练后: {s['after'][:80]}")
    acc_line = f"身份准确率 {acc['identity_accuracy_before']:.2f} -> {acc['identity_accuracy_after']:.2f}，" if acc else ""
    return out.finish({
        "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4), **acc,
        "kept_step": kept, "steps": trainer.state.global_step, "planned_steps": p["steps"], "stopped_early": stopped,
        "eval_history": evals, "epochs": round(trainer.state.epoch, 2), **stats,
        "packing": args.packing, "packed_vs_padded_loss_diff": abs(loss_packed - loss_padded),
        "train_tokens_per_s": round(tps, 1), "train_seconds": round(timer.train_s, 1),
        "eval_seconds": round(timer.eval_s, 1), "first_step_seconds": round(timer.first_step_s, 2),
        "gradient_checkpointing": ckpt, "memory_budget_gb": round(budget, 2), "peak_train_mem_mb": round(mem.peak_mb),
        "peak_rss_mb": round(train.peak_rss_mb()), **({"cuda_peak_mb": round(mem.peak_abs_mb)} if mem.cuda else {}),
        "trainable_ratio": round(trainable / total, 5), "trainable_params": trainable, "total_params": total,
        "merge_max_abs_logit_diff": merge_diff, "merge_matches_adapter": merge_diff < merge_tol,
        "adapter_reload_max_diff": reload_diff, "target_modules": targets_mod, "adapter_mb": round(size_mb, 2),
        "samples": samples,
    }, summary=f"{acc_line}eval_loss {before:.3f} -> {after:.3f}（保留第 {kept}/{trainer.state.global_step} 步），"
               f"{tps:.0f} token/s，峰值 RSS {train.peak_rss_mb():.0f} MB，合并 vs adapter max|Δlogit| {merge_diff:.1e}")


def _padded(tok):
    """--no-packing 时的对照：右填充到批内最长（TRL 的 collator），attention_mask 标出真实 token。"""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)


if __name__ == "__main__":
    main(cli.parse(Args))
