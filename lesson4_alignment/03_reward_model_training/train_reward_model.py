"""奖励模型（RM）训练：在语言模型上接一个输出标量的打分头，用成对偏好数据教它给"更好的回答"打更高的分。

原理（Bradley–Terry）：人类在 (chosen, rejected) 里选 chosen 的概率建模为 P = σ(r(x, y_c) − r(x, y_r))，
最大化对数似然就是最小化 loss = −log σ(r_c − r_r)。r 只由分数差决定，所以 RM 的绝对分数没有意义、可以整体平移。
实现：AutoModelForSequenceClassification(num_labels=1) = 因果语言模型主干 + 一个 hidden→1 的线性 score 头，
取序列里最后一个非 pad token 的隐状态打分（它"看过"整段 prompt + 回答）。TRL 的 RewardTrainer 负责把
chosen/rejected 拼成一个批次（前一半 chosen、后一半 rejected）并算上面的损失；本脚本在一个批次上
亲手从隐状态算一遍打分和损失，核对与训练器的损失一致。

运行：
  python lesson4_alignment/03_reward_model_training/train_reward_model.py            # CPU，smollm2-135m + LoRA
  python lesson4_alignment/03_reward_model_training/train_reward_model.py --smoke    # tiny-llama，全参数
  python lesson4_alignment/03_reward_model_training/train_reward_model.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson4/train_reward_model_gpu.yaml                # GPU，bf16 + LoRA
  --data 自己的偏好文件（prompt/chosen/rejected，JSON/JSONL）：脚本自己切出留出集；训练前一行说清几对超过 --max-length
  （TRL 会整对丢掉），第 1 步后报预计用时，超过 --max-train-minutes 先评估 + 保存再停，按留出损失留最好的一步。

你会看到（默认，smollm2-135m + LoRA r=16，60 步 × 4 对）：训练前（随机初始化的打分头）留出准确率在随机猜的水平、
chosen 与 rejected 的分数分不开；训练后准确率明显升高，平均分差 r_c − r_r 拉开——Bradley–Terry 损失只管分差，
所以看分差与准确率，不看绝对分数。手算的 −log σ(r_c − r_r) 与 TRL 的损失在浮点误差内一致。
输出：score_hist.png、margin_hist.png（训练后留出集的分数与分差分布，0 右边 = 排对了）、reward_model/（可被 02 复用）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：5.6 分钟，5.0 GB，结论 3/3 成立
  ✓ RM 学会排序留出偏好对：准确率 训练后 − 训练前（随机打分头）：0.3997（≥ 0.25）
  ✓ RM 给 chosen 的分数高于 rejected：留出平均分差 r_c − r_r 训练后 − 训练前：2.537（≥ 1.5）
  ✓ 手算的 −log σ(r_c − r_r) 就是 TRL RewardTrainer 的损失：同一批上 |手算 − TRL|：0（≤ 0.0001）
<!-- /results -->
详见同目录 README.md。
"""

from dataclasses import dataclass

from common import cli, data, models, run, train
from common.errors import UserError, brief


@dataclass
class Args(cli.CommonArgs):
    learning_rate: float = cli.arg(2e-4, "学习率：LoRA 只训练从零开始的小矩阵与新的打分头，可比全参数（~1e-5）大得多")
    max_steps: int = cli.arg(60, "优化器步数", min=1)
    # 默认 4 对：8 对时 2 核上 60 步用了 11.7 分钟、峰值 10.3 GB（16 条 × 256 token 的激活），超出笔记本标准
    per_device_train_batch_size: int = cli.arg(4, "每步几对偏好（实际前向 2 倍条数：chosen + rejected）", min=1)
    max_length: int = cli.arg(256, "prompt+回答最多多少 token（更长的样本被 TRL 过滤掉）", min=8)
    val_fraction: float = cli.arg(0.2, "留出多少比例的偏好对做评估", min=0.01, max=0.9)
    warmup_steps: int = cli.arg(5, "学习率预热步数", min=0)
    center_rewards_coefficient: float = cli.arg(0.01, "把分数拉向 0 的正则系数（只影响绝对值，不影响排序）", min=0)
    lora_r: int = cli.arg(16, "LoRA 秩（打分头仍全参数训练）；0 = 全参数训练主干（权重+梯度+AdamW 状态≈4 倍权重）",
                          min=0)
    lora_alpha: int = cli.arg(32, "LoRA 缩放系数", min=1)
    gradient_checkpointing: bool = cli.arg(False, "用重算换显存（大模型 GPU 上打开）")
    eval_steps: int = cli.arg(0, "每多少步在留出集上评估并保存一次；0 = 自动（评估开销 ≤ 训练的 1/10，至少 2 次）",
                             min=0)
    max_train_minutes: float = cli.arg(10.0, "训练时间预算（分钟，含评估）：超时先评估 + 保存再停；0 = 不限", min=0)

    smoke_model = "tiny-llama"


# 冒烟：极小模型承受得住大学习率；步数让留出准确率稳定地高于随机
SMOKE = dict(lora_r=0, learning_rate=1e-3, max_steps=30, per_device_train_batch_size=16, max_length=160)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线 = 同一次运行里训练前（随机打分头）的评估
CLAIMS = [
    run.Claim("RM 学会排序留出偏好对：准确率 训练后 − 训练前（随机打分头）",
              "eval_accuracy - eval_accuracy_before", ">=", 0.2, 0.25),
    run.Claim("RM 给 chosen 的分数高于 rejected：留出平均分差 r_c − r_r 训练后 − 训练前",
              "mean_margin - mean_margin_before", ">=", 1.0, 1.5),
    run.Claim("手算的 −log σ(r_c − r_r) 就是 TRL RewardTrainer 的损失：同一批上 |手算 − TRL|",
              "manual_loss_abs_diff", "<=", 1e-4, 1e-4),
]


def load_reward_model(args: Args, name: str):
    """因果 LM 主干 + 随机初始化的 1 维 score 头；pad_token_id 告诉它"最后一个真实 token"在哪。"""
    from transformers import AutoModelForSequenceClassification

    # 先查目录（config、权重、自定义代码），再加载：坏目录一行点名 --model，不留 transformers 的 traceback
    path = models.check_dir(models.resolve(name, args.source), trust_remote_code=args.trust_remote_code)
    dev = models.pick_device(args.device)
    try:
        # 打分头 score（hidden→1）在原模型里没有，transformers 随机初始化它并提示"newly initialized"：这是预期的
        # for_training=True：CPU 上留 fp32 主权重，bf16 的 8 位尾数会吞掉 AdamW 的小更新（models.pick_dtype）
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, dtype=models.pick_dtype(args.dtype, dev, for_training=True), use_safetensors=True,
            trust_remote_code=args.trust_remote_code).to(dev)
        # 从已解析的本地目录读分词器：不按名字再下载一次，分词器与权重一定是同一份
        tok = models.load_tokenizer(str(path), "local", args.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - config 的值不对、权重文件坏了……对学生都是同一件事：这个模型加载不了
        raise UserError(f"--model {name}: 无法加载（{type(e).__name__}: {brief(e)}）") from None
    # 不设它，transformers 的序列分类前向在批大小 > 1 时直接报错
    # "Cannot handle batch sizes > 1 if no padding token is defined."
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def manual_scores(model, input_ids, attention_mask, pad_id: int):
    """亲手打分：主干隐状态 -> 取最后一个非 pad token -> score 线性层（与 HF 的池化规则一致）。"""
    import torch

    model = model.get_base_model() if hasattr(model, "get_base_model") else model   # LoRA：拆掉 PeftModel 外壳
    backbone = getattr(model, model.base_model_prefix)
    # RewardTrainer 的 collator 右填充：真实 token 从位置 0 起，不必像 02 那样自己传 position_ids
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    # 右填充时最后一个真实 token 的位置随样本变：位置 × 是否真实 token，取最大值的下标
    pos = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = ((input_ids != pad_id).int() * pos).argmax(-1)   # 最右边的非 pad token
    return model.score(hidden[torch.arange(len(input_ids)), last]).squeeze(-1)


def score_pairs(trainer, dataset) -> tuple[list[float], list[float]]:
    """留出集每一对的 (r_chosen, r_rejected)：用训练器自己的 collator 组批（前一半 chosen，后一半 rejected）。"""
    import torch

    model = trainer.model.eval()   # 关掉 dropout：同一对打两次分要一样
    rc, rr = [], []
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader(dataset):
            scores = model(input_ids=batch["input_ids"].to(model.device),
                           attention_mask=batch["attention_mask"].to(model.device)).logits.squeeze(-1)
            c, r = scores.float().chunk(2)   # collator 把一批拼成 [全部 chosen; 全部 rejected]，对半切回成对
            rc += c.tolist()
            rr += r.tolist()
    return rc, rr


def build_trainer(args: Args, out, model, tok, train_pairs: list[dict], eval_pairs: list[dict]):
    """TRL RewardTrainer：tokenize（套对话模板）、成对拼批、−log σ(r_c − r_r)；按留出损失留最好的一步。"""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    # 评估开销 ≤ 10%：留出对与训练对来自同一份数据，token 数与对数成正比，直接按对数算
    every = args.eval_steps or train.eval_schedule(
        args.max_steps, len(eval_pairs), args.per_device_train_batch_size)[1]
    # 预热 warmup_steps 步：打分头随机初始化，开头几步的梯度大而乱，一上来就用满学习率容易把主干带偏；
    # center_rewards_coefficient 为 0 时传 None：TRL 只在它不是 None 时才加这一项（check_loss 同样用 if 判断）；
    # disable_dropout：chosen 与 rejected 在同一批前向，两边不同的 dropout 掩码会给分差加噪声
    cfg = RewardConfig(
        output_dir=str(out.path("trainer")), seed=args.seed, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="linear", warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=16,
        max_length=args.max_length, center_rewards_coefficient=args.center_rewards_coefficient or None,
        logging_steps=5, report_to=out.trainer_report_to(), disable_dropout=True, **train.best_step_args(every),
        **train.trainer_flags(model, gradient_checkpointing=args.gradient_checkpointing))
    # LoRA（--lora-r > 0）：SEQ_CLS 让 score 头保持全参数可训练（modules_to_save）；0 = 全参数
    return RewardTrainer(model=model, args=cfg, processing_class=tok,
                         peft_config=train.lora_config(args.lora_r, args.lora_alpha, "SEQ_CLS"),
                         train_dataset=Dataset.from_list(data.preference_conversational(train_pairs)),
                         eval_dataset=Dataset.from_list(data.preference_conversational(eval_pairs)))


def check_loss(args: Args, trainer, pad_id: int) -> dict:
    """同一批数据：亲手从隐状态算打分与损失，和训练器的 compute_loss 比——两边对上，才说明上面的原理就是它在做的事。"""
    import torch

    # 取训练 dataloader 的一批：与训练时同一个 collator，拼批方式（前一半 chosen）完全一样
    batch = next(iter(trainer.get_train_dataloader()))
    batch = {k: v.to(trainer.model.device) for k, v in batch.items()}
    # eval()：TRL 一次、手算一次，两次前向必须是同一个确定的函数，差值才能落在 1e-4 以内
    trainer.model.eval()
    with torch.no_grad():
        # 传副本：RewardTrainer.compute_loss 会往传入的字典里写 use_cache=False，batch 留给下面手算
        trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        rc, rr = manual_scores(trainer.model, batch["input_ids"], batch["attention_mask"], pad_id).chunk(2)
        manual = -torch.nn.functional.logsigmoid(rc - rr).mean()
        if args.center_rewards_coefficient:   # TRL 的中心化正则：coef · mean((r_c + r_r)^2)
            manual = manual + args.center_rewards_coefficient * torch.mean((rc + rr) ** 2)
    diff = abs(manual.item() - trl_loss)
    return {"manual_loss": round(manual.item(), 6), "trl_loss": round(trl_loss, 6), "manual_loss_abs_diff": diff,
            "manual_loss_matches": bool(diff <= 1e-4)}


def plot_scores(out, sc: list[float], sr: list[float], acc: float) -> None:
    """留出集的分数分布（chosen / rejected 两堆）与分差分布（0 右边 = 排对了）。"""
    margins = [c - r for c, r in zip(sc, sr)]
    fig, save = out.plot("score_hist.png")
    ax = fig.add_subplot(111)
    ax.hist(sc, bins=20, alpha=0.6, label="chosen")
    ax.hist(sr, bins=20, alpha=0.6, label="rejected")
    ax.set_xlabel("reward score")
    ax.set_ylabel("count")
    ax.set_title(f"Held-out reward scores ({out.model_name}), accuracy {acc:.2f}")
    ax.legend()
    save()
    fig, save = out.plot("margin_hist.png")
    ax = fig.add_subplot(111)
    ax.hist(margins, bins=20, color="tab:green")
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel("r_chosen - r_rejected")
    ax.set_ylabel("count")
    ax.set_title("Held-out margin: right of 0 = ranked correctly")
    save()


def main(args: Args) -> dict:
    # 先套冒烟参数再 run.start：config.json 记下的才是真正跑的参数
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 数据：偏好对，自己切出留出集（RM 的好坏只看它没见过的对）
    # chosen == rejected（规范化后）的对没有偏好信号：preference_split 去掉并记一行，全是这样的对就拒绝
    train_pairs, eval_pairs = data.preference_split(args.data, args.val_fraction, args.seed)
    out.log.info(f"偏好对：训练 {len(train_pairs)}，留出 {len(eval_pairs)}")

    # 2. 模型：因果 LM + 打分头；训练前一行说清几对超过 --max-length（TRL 会把它们整对丢掉，不是截断）
    model, tok = load_reward_model(args, out.model_name)
    # 按 TRL 的方式套对话模板再数：超长的判定与 RewardTrainer 过滤时用的是同一种 token 数
    stats = train.length_report(train.encode_pairs(tok, data.preference_conversational(train_pairs)),
                                args.max_length, "drop", drop_flag=None)

    # 3. 训练：第 1 步后报预计用时；超过 --max-train-minutes 先评估 + 保存再停；结束时装回留出损失最低的一步
    trainer = build_trainer(args, out, model, tok, train_pairs, eval_pairs)
    train.attach(trainer, args.max_train_minutes)
    # 训练前先评估一次：随机打分头的准确率就是“没学”时的基线，训练后的数字只和它比
    before = trainer.evaluate()
    out.log.info(f"训练前（score 头随机）：留出准确率 {before['eval_accuracy']:.3f}")
    trainer.train()
    kept = train.kept_step(trainer)
    # load_best_model_at_end 已装回留出损失最低的一步（不一定是最后一步）：读它训练中评估时的记录，不再评估一遍
    after = train.kept_metrics(trainer)
    out.log.info(f"训练后（保留第 {kept['kept_step']} 步）：留出准确率 {after['eval_accuracy']:.3f}，"
                 f"平均差 r_c − r_r = {after['eval_margin']:.3f}")

    # 4. 核对：同一批数据，亲手从隐状态算打分与损失，和训练器的 compute_loss 比
    check = check_loss(args, trainer, tok.pad_token_id)
    out.log.info(f"一个批次：手算损失 {check['manual_loss']:.6f}，TRL 损失 {check['trl_loss']:.6f}，"
                 f"差 {check['manual_loss_abs_diff']:.2e}")

    # 5. 留出集的分数分布与差值分布
    # 用训练器处理过的留出集（已按 max_length 过滤）：与 eval_accuracy 是同一批对，两个准确率可以直接比
    sc, sr = score_pairs(trainer, trainer.eval_dataset)
    margins = [c - r for c, r in zip(sc, sr)]
    acc = sum(m > 0 for m in margins) / len(margins)
    plot_scores(out, sc, sr, acc)

    # 6. 保存：02 的 PPO 可以直接拿它当冻结的奖励模型（LoRA 时先把 adapter 合并进权重，存成普通的序列分类模型）
    rm_dir = out.path("reward_model")   # load_best_model_at_end 已装回留出损失最低的一步：存的就是它
    (trainer.model.merge_and_unload() if args.lora_r else trainer.model).save_pretrained(rm_dir)
    # 分词器一起存：目录自成一个完整的模型，AutoTokenizer / from_pretrained 都能直接从它加载
    tok.save_pretrained(rm_dir)
    return out.finish({
        "eval_accuracy": round(acc, 4), "eval_accuracy_before": round(before["eval_accuracy"], 4),
        "mean_margin": round(sum(margins) / len(margins), 4), "mean_margin_before": round(before["eval_margin"], 4),
        "eval_loss": round(after["eval_loss"], 4),
        **check, **kept, **stats,
        "chosen_score_mean": round(sum(sc) / len(sc), 4), "rejected_score_mean": round(sum(sr) / len(sr), 4),
        "train_pairs": len(train_pairs), "eval_pairs": len(trainer.eval_dataset),
    }, summary=f"留出准确率 {before['eval_accuracy']:.2f} -> {acc:.2f}，平均分差 {sum(margins) / len(margins):.2f}，"
               f"手算 vs TRL 损失差 {check['manual_loss_abs_diff']:.1e}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
