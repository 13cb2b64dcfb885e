"""DPO（直接偏好优化）：不训练奖励模型、不做强化学习，直接用偏好对训练策略。

推导（Bradley–Terry -> DPO）：
  1. RLHF 的目标：max_π E[r(x,y)] − β·KL(π‖π_ref)。它的最优解有闭式：π*(y|x) = π_ref(y|x)·exp(r(x,y)/β) / Z(x)。
  2. 反过来把奖励写成策略的函数：r(x,y) = β·log(π*(y|x)/π_ref(y|x)) + β·log Z(x)（"隐式奖励"）。
  3. 代入 Bradley–Terry：P(y_c ≻ y_r | x) = σ(r(x,y_c) − r(x,y_r))，两个回答共享的 β·log Z(x) 正好相减消掉：
     P = σ(β·[log π(y_c|x)/π_ref(y_c|x) − log π(y_r|x)/π_ref(y_r|x)])
  4. 对偏好数据最大化对数似然：L_DPO = −log σ(β·(Δ_c − Δ_r))，Δ = 回答各 token 的 log π 之和 − 同样的 log π_ref 之和。
β 越小，允许策略离参考模型越远（KL 约束越松）；β 越大越保守。
本脚本：TRL DPOTrainer 训练；训练后在一个批次上从策略与参考模型的 logits 亲手算 L_DPO，核对与 TRL 一致（≤ 1e-4）；
β 扫描：同一起点、同样步数，不同 β 的留出隐式奖励准确率、分差和策略偏离参考的程度。

运行：
  python lesson4_alignment/04_dpo/dpo_train.py            # CPU，smollm2-135m
  python lesson4_alignment/04_dpo/dpo_train.py --smoke    # tiny-qwen2，全参数
  python lesson4_alignment/04_dpo/dpo_train.py --model Qwen/Qwen2.5-7B-Instruct --source hf \\
      --config configs/lesson4/dpo_train_gpu.yaml          # GPU：bf16 + LoRA（参考模型 = 关掉 adapter 的同一个模型）
  --data 自己的偏好文件（prompt/chosen/rejected）：脚本自己切出留出集；训练前一行说清几对超过 --max-length（TRL 截掉
  回答结尾），第 1 步后报预计用时，超过 --max-train-minutes 先评估 + 保存再停，每个 β 都留留出损失最低的一步。

你会看到（默认，smollm2-135m + LoRA，每个 β 10 步）：训练前 π = π_ref，隐式奖励全为 0、留出损失正好是 log 2；
训练后留出损失下降，隐式奖励把大多数留出偏好对排对；手算的 L_DPO 与 TRL 的损失在浮点误差内一致。
β 扫描（β=0.03/0.1/0.5）：β 越小，|log π/π_ref| 越大——KL 约束越松，策略离参考越远。LoRA 下同样的步数里策略走不远，
各 β 之间的差别比 --smoke 的全参数训练小得多。输出：beta_sweep.png、dpo_model/。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：11.9 分钟，7.6 GB（超过 10 分钟），结论 4/4 成立
  ✓ DPO 降低留出偏好损失：训练后 / 训练前（π = π_ref 时为 log 2）：0.8777（≤ 0.95）
  ✓ 隐式奖励 β·log π/π_ref 把留出偏好对排对：准确率 训练后 − 训练前（隐式奖励全为 0）：0.875（≥ 0.8）
  ✓ 手算的 −log σ(β·(Δ_c − Δ_r)) 就是 TRL DPOTrainer 的损失：同一批上 |手算 − TRL|：0（≤ 0.0001）
  ✓ β 越小 KL 约束越松、策略离参考越远：|log π/π_ref| β=0.1 / β=0.5：1.055（≥ 1.02）
<!-- /results -->
"""

import copy
from dataclasses import dataclass

from common import cli, data, lm, models, run, train


@dataclass
class Args(cli.CommonArgs):
    beta: float = cli.arg(0.1, "主实验的 β：KL 约束强度（隐式奖励 = β·log π/π_ref）", min=1e-6)
    betas: list[float] = cli.arg([0.03, 0.1, 0.5], "β 扫描的取值（主实验的 β 自动加入）", min=1e-6)
    learning_rate: float = cli.arg(1e-4, "学习率：LoRA 的量级；全参数（--lora-r 0）要小得多（~5e-6），否则很快偏离参考")
    max_steps: int = cli.arg(10, "每个 β 训练多少步（同一起点、同样步数才可比）", min=1)
    per_device_train_batch_size: int = cli.arg(4, "每步几对偏好", min=1)
    max_length: int = cli.arg(256, "prompt+回答最多多少 token", min=8)
    val_fraction: float = cli.arg(0.2, "留出多少比例的偏好对做评估", min=0.01, max=0.9)
    lora_r: int = cli.arg(16, "LoRA 秩（参考模型 = 关掉 adapter，不另占权重）；0 = 全参数（参考模型是一份冻结副本）",
                          min=0)
    lora_alpha: int = cli.arg(32, "LoRA 缩放系数", min=1)
    gradient_checkpointing: bool = cli.arg(False, "用重算换显存（大模型 GPU 上打开）")
    eval_steps: int = cli.arg(0, "每多少步在留出对上评估并保存一次；0 = 自动（评估开销 ≤ 训练的 1/10，至少 2 次）",
                             min=0)
    max_train_minutes: float = cli.arg(10.0, "每个 β 的训练时间预算（分钟，含评估）：超时先评估 + 保存再停；0 = 不限",
                                       min=0)

    smoke_model = "tiny-qwen2"


# 冒烟：极小模型承受大学习率；β=0.1（主实验）与 0.5 两次训练足以看出"β 小 -> 偏离参考大"
SMOKE = dict(lora_r=0, learning_rate=5e-4, max_steps=12, per_device_train_batch_size=8, max_length=128, betas=[0.5])

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线 = 同一次运行里训练前（π = π_ref）的留出评估
CLAIMS = [
    run.Claim("DPO 降低留出偏好损失：训练后 / 训练前（π = π_ref 时为 log 2）", "eval_loss / eval_loss_before", "<=",
              0.85, 0.95),
    run.Claim("隐式奖励 β·log π/π_ref 把留出偏好对排对：准确率 训练后 − 训练前（隐式奖励全为 0）",
              "rewards_accuracy - rewards_accuracy_before", ">=", 0.75, 0.8),
    run.Claim("手算的 −log σ(β·(Δ_c − Δ_r)) 就是 TRL DPOTrainer 的损失：同一批上 |手算 − TRL|",
              "manual_vs_trl_abs_diff", "<=", 1e-4, 1e-4),
    run.Claim("β 越小 KL 约束越松、策略离参考越远：|log π/π_ref| β=0.1 / β=0.5",
              'beta_sweep["0.1"]["mean_abs_logratio"] / beta_sweep["0.5"]["mean_abs_logratio"]', ">=", 1.1, 1.02),
]


def sequence_logps(model, batch):
    """回答部分每个 token 的 log π 之和（Δ 里的那一项）：只在 completion_mask 上求和——提示部分两个回答共享，
    算进去也会在 Δ_c − Δ_r 里抵消，但会把数值放大、掩盖回答之间的差别。"""
    return lm.sequence_logprobs(model, batch["input_ids"], batch["attention_mask"], mask=batch["completion_mask"])


def manual_dpo_loss(policy, ref, batch, beta: float):
    """L = −log σ(β·[(log π_c − log π_ref_c) − (log π_r − log π_ref_r)])；批次前一半 chosen、后一半 rejected。"""
    import torch

    with torch.no_grad():
        # DPOTrainer 的 collator 把 chosen、rejected 拼成一批（前一半 chosen）：按同样的顺序对半切回
        pc, pr = sequence_logps(policy, batch).chunk(2)
        if ref is None:   # LoRA：参考模型 = 同一个模型关掉 adapter
            with policy.disable_adapter():
                rc, rr = sequence_logps(policy, batch).chunk(2)
        else:
            rc, rr = sequence_logps(ref, batch).chunk(2)
    # logsigmoid 而不是 log(sigmoid(x))：差值很负时 sigmoid 下溢成 0、log 得 −inf；TRL 的 sigmoid 损失也这样写
    return -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()


def train_one(args: Args, out, init_model, tok, beta: float, train_ds, eval_ds, eval_start: bool = False):
    """从同一个起点（init_model 的副本）按给定 β 训练，返回 (trainer, 参考模型, 保留那一步的留出指标)。

    eval_start：训练前先在留出对上评估一次（π = π_ref），指标以 start/ 开头——训练后的数字要和它比。"""
    from trl import DPOConfig, DPOTrainer

    # 必须拷贝：全参数训练就地改权重，LoRA 时 PEFT 也是就地往模型里注入 adapter；不拷贝，下一个 β 的起点就不是原模型
    model = copy.deepcopy(init_model)
    peft_config = train.lora_config(args.lora_r, args.lora_alpha)   # LoRA：参考模型 = 关掉 adapter
    # 全参数：冻结的参考模型 π_ref = 训练起点的一份副本
    ref = None if peft_config else copy.deepcopy(init_model).eval().requires_grad_(False)
    # 评估开销 ≤ 10%：留出对与训练对来自同一份数据，token 数与对数成正比，直接按对数算
    every = args.eval_steps or train.eval_schedule(
        args.max_steps, len(eval_ds), args.per_device_train_batch_size)[1]
    # warmup_steps=0：每个 β 只训 --max-steps 步（默认 10），预热会占掉一大截；
    # disable_dropout：训练前 π 与 π_ref 是同一个网络，log π/π_ref 应恰为 0、损失恰为 log 2，dropout 会让它带噪声
    cfg = DPOConfig(
        output_dir=str(out.path(f"trainer_beta{beta:g}")), seed=args.seed, beta=beta, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=0,
        per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=16,
        max_length=args.max_length, logging_steps=5, report_to=out.trainer_report_to(), disable_dropout=True,
        **train.best_step_args(every), **train.trainer_flags(model, args.gradient_checkpointing, log=False))
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, processing_class=tok, peft_config=peft_config,
                         train_dataset=train_ds, eval_dataset=eval_ds)
    train.attach(trainer, args.max_train_minutes)
    # 训练前评估只在主实验的 β 上做一次：π = π_ref 时的数字与 β 无关（隐式奖励全为 0），每个 β 都量是白花时间
    start = {f"start/{k}": v for k, v in trainer.evaluate().items()} if eval_start else {}
    trainer.train()
    # 保留那一步的留出指标读训练中的评估记录（load_best_model_at_end 装回的就是它），不再完整评估一遍
    return trainer, ref, {**train.kept_metrics(trainer), **train.kept_step(trainer), **start}


def sweep_betas(args: Args, out, init_model, tok, train_ds, eval_ds):
    """β 扫描（主实验的 β 也在其中）：同一起点、同样步数；返回 (扫描表, 主实验的 trainer / 参考模型 / 指标)。"""
    sweep, main_run = {}, None
    # 并成集合：主实验的 β 已在 --betas 里时不训练两次；排序后图上的折线按 β 从小到大连
    for beta in sorted(set(args.betas) | {args.beta}):
        trainer, ref, ev = train_one(args, out, init_model, tok, beta, train_ds, eval_ds, eval_start=beta == args.beta)
        # 隐式奖励 / β = log π/π_ref：策略离参考模型有多远
        # TRL 记的 rewards/* 是 β·(log π − log π_ref) 的批平均：除以 β 还原成 log 比值，不同 β 才能放在一起比；
        # 注意是先平均再取绝对值（TRL 只记均值），正负相抵时会低估偏离
        drift = (abs(ev["eval_rewards/chosen"]) + abs(ev["eval_rewards/rejected"])) / (2 * beta)
        sweep[f"{beta:g}"] = {"rewards_accuracy": round(ev["eval_rewards/accuracies"], 4),
                              "rewards_margin": round(ev["eval_rewards/margins"], 4),
                              "mean_abs_logratio": round(drift, 4), "eval_loss": round(ev["eval_loss"], 4),
                              "kept_step": ev["kept_step"]}
        out.log.info(f"β={beta:g}: 留出隐式奖励准确率 {ev['eval_rewards/accuracies']:.3f}，"
                     f"分差 {ev['eval_rewards/margins']:.3f}，|log π/π_ref| 平均 {drift:.2f}"
                     f"（保留第 {ev['kept_step']} 步）")
        if beta == args.beta:
            main_run = (trainer, ref, ev)
        else:
            del trainer, ref   # 只留主实验的：下一个 β 训练时内存里不多压一份模型
    return sweep, main_run


def plot_sweep(out, args: Args, sweep: dict) -> None:
    """不同 β 的留出准确率与偏离程度：β 越小，KL 约束越松，|log π/π_ref| 越大。"""
    fig, save = out.plot("beta_sweep.png")
    ax = fig.add_subplot(111)
    xs = [float(b) for b in sweep]
    ax.plot(xs, [v["rewards_accuracy"] for v in sweep.values()], "o-", label="held-out reward accuracy")
    ax.plot(xs, [v["mean_abs_logratio"] for v in sweep.values()], "s-", label="mean |log pi/pi_ref| (drift)")
    ax.set_xscale("log")   # β 的取值跨一个多数量级（默认 0.03 到 0.5）：对数横轴才不会把小 β 挤在一起
    ax.set_xlabel("beta")
    ax.set_title(f"DPO beta sweep: {out.model_name}, {args.max_steps} steps each")
    ax.legend()
    save()


def main(args: Args) -> dict:
    # 先套冒烟参数再 run.start：config.json 记下的才是真正跑的参数
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 数据：偏好对 -> 训练 / 留出
    # chosen == rejected（规范化后）的对没有偏好信号：preference_split 去掉并记一行，全是这样的对就拒绝
    train_pairs, eval_pairs = data.preference_split(args.data, args.val_fraction, args.seed)
    import torch  # 重的库在数据检查之后再导入：坏数据一秒内报错
    from datasets import Dataset

    train_ds = Dataset.from_list(data.preference_conversational(train_pairs))
    eval_ds = Dataset.from_list(data.preference_conversational(eval_pairs))
    out.log.info(f"偏好对：训练 {len(train_pairs)}，留出 {len(eval_pairs)}")

    # 2. 起点模型（也是参考模型）：smollm2 已经过指令微调，正是 DPO 的常规起点（SFT 之后）
    init_model, tok = models.load_args(args, for_training=True)
    train.trainer_flags(init_model, args.gradient_checkpointing)   # 只为打一行日志：用了什么精度
    # 训练前一行：几对超过 --max-length（TRL 从尾部截断：被截掉的回答结尾不参与 log π，长回答的偏好信号变弱）
    stats = train.length_report(train.encode_pairs(tok, list(train_ds)), args.max_length, drop_flag=None)

    # 3. β 扫描：同一起点、同样步数；每个 β 都留留出损失最低的那一步
    sweep, (trainer, ref, ev) = sweep_betas(args, out, init_model, tok, train_ds, eval_ds)

    # 4. 核对：训练后（策略已偏离参考）在一个训练批次上亲手算 DPO 损失，和 TRL 的 compute_loss 比
    # 取训练 dataloader 的一批：与 TRL 算损失时同一个 collator、同样的截断
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.model.device) for k, v in batch.items()}
    # eval()：TRL 一次、手算一次，两次前向必须是同一个确定的函数，差值才能落在 1e-4 以内
    policy = trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(policy, dict(batch)).item()
    manual = manual_dpo_loss(policy, ref, batch, args.beta).item()
    diff = abs(manual - trl_loss)
    out.log.info(f"一个批次：手算 DPO 损失 {manual:.6f}，TRL {trl_loss:.6f}，差 {diff:.2e}")

    # 5. 图：不同 β 的留出准确率 / 偏离程度；保存主实验的模型
    plot_sweep(out, args, sweep)
    # LoRA 时只存 adapter（不含基座权重）：加载时要配同一个基座模型
    trainer.save_model(str(out.path("dpo_model")))
    acc, margin = ev["eval_rewards/accuracies"], ev["eval_rewards/margins"]
    return out.finish({
        "rewards_accuracy": round(acc, 4), "rewards_margin": round(margin, 4), "eval_loss": round(ev["eval_loss"], 4),
        "rewards_accuracy_before": round(ev["start/eval_rewards/accuracies"], 4),
        "eval_loss_before": round(ev["start/eval_loss"], 4),
        "eval_logps_chosen": round(ev["eval_logps/chosen"], 3),
        "eval_logps_rejected": round(ev["eval_logps/rejected"], 3),
        "manual_loss": round(manual, 6), "trl_loss": round(trl_loss, 6), "manual_vs_trl_abs_diff": diff,
        "beta": args.beta, "beta_sweep": sweep, **{k: ev[k] for k in ("kept_step", "steps", "eval_history")}, **stats,
    }, summary=f"β={args.beta:g}：留出隐式奖励准确率 {acc:.2f}，分差 {margin:.3f}；手算 vs TRL 损失差 {diff:.1e}",
        claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
