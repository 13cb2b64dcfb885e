"""全参数 SFT 脚手架：用 YAML 配置驱动 TRL SFTTrainer，学会一次"靠谱训练"该有的工程零件。

零件：每 N 步在验证集上评估 -> 按 eval_loss 保留最好的检查点（load_best_model_at_end）-> 验证损失
连续不降就早停（EarlyStoppingCallback）-> 进程被杀后 --resume 从最后一个检查点续训，结果与没中断时一致
-> --report-to tensorboard|mlflow|wandb 把曲线写到输出目录（mlflow 用本地 sqlite，wandb 离线）。

超参数来自 YAML：默认读 configs/lesson1/hf_finetune_scaffold.yaml（CPU 规模，与下面 Args 的默认值相同），
--config 换成别的配置；命令行参数再覆盖 YAML。

运行：
  python lesson1_sft/03_hf_finetune/hf_finetune_scaffold.py            # CPU，smollm2-135m 全参数 12 步
  python lesson1_sft/03_hf_finetune/hf_finetune_scaffold.py --smoke    # 极小模型
  python lesson1_sft/03_hf_finetune/hf_finetune_scaffold.py --model Qwen/Qwen2.5-0.5B-Instruct --source hf \\
      --config configs/lesson1/hf_finetune_scaffold_gpu.yaml --report-to tensorboard     # GPU，bf16 混合精度
  演练断点续训：先加 --stop-after-steps 8（第 8 步的检查点写完就硬退出，像被 kill），再加 --resume 接着跑。

你会看到：训练损失和留出集 eval_loss 都下降（训练前后用同一个验证集量）；best_checkpoint 指向验证损失最低的检查点，
训练结束时 load_best_model_at_end 装回的就是它（装回后再评估一次，与训练中最低的 eval_loss 相同）——它不一定是
最后一个检查点；train_tokens_per_s 是纯训练吞吐。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.3 分钟，5.1 GB，结论 3/3 成立
  ✓ 全参数 SFT 降低留出集损失：训练后 / 训练前 eval_loss：0.865（≤ 0.93）
  ✓ load_best_model_at_end 装回的是验证损失最低的检查点：装回后的 eval_loss − 训练中各次评估的最低值：0（≤ 0.001）
  ✓ 优化器在训练集上起作用：后三分之一记录的训练损失均值 / 前三分之一的：0.833（≤ 0.95）
<!-- /results -->
"""
import os
import time
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, run, train
from common.errors import UserError

# 原子检查点只有这一课用：放在脚本旁边（_checkpoint.py），不在 common/
checkpoints = run.import_sibling(__file__, "_checkpoint")
# 默认就读这份 YAML：学生第一次运行看到的超参数，和他打开配置文件读到的是同一份
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "lesson1" / "hf_finetune_scaffold.yaml"


@dataclass
class Args(cli.CommonArgs):
    config: str = cli.arg(str(DEFAULT_CONFIG), "YAML 配置（默认就是 CPU 规模的那份）；键必须是本脚本的参数名")
    learning_rate: float = cli.arg(5e-5, "峰值学习率：全参数微调要比 LoRA 小一个数量级，否则会冲掉预训练知识")
    lr_scheduler_type: str = cli.arg("cosine", "学习率调度：cosine / linear / constant ...")
    warmup_steps: int = cli.arg(2, "预热步数：AdamW 的二阶矩估计刚开始不准，先用小步长", min=0)
    max_steps: int = cli.arg(12, "优化器步数；0 = 改按 num_train_epochs 训练", min=0)
    num_train_epochs: float = cli.arg(1.0, "max_steps=0 时训练几轮", min=0.01)
    per_device_train_batch_size: int = cli.arg(4, "每步每卡几条样本（受内存限制）", min=1)
    gradient_accumulation_steps: int = cli.arg(1, "梯度累积：有效 batch = 单步 batch x 累积步数 x 卡数", min=1)
    max_length: int = cli.arg(256, "每条样本最多多少 token（CPU 上越短越快）", min=8)
    eval_steps: int = cli.arg(4, "每多少步评估一次验证集（同时存一次检查点，best 检查点才有得选）", min=1)
    logging_steps: int = cli.arg(1, "每多少步记一次训练损失", min=1)
    save_total_limit: int = cli.arg(1, "最多留几个检查点；load_best 时另外保证 best 不被删", min=1)
    early_stopping_patience: int = cli.arg(2, "验证损失连续几次评估没有变好就停", min=1)
    early_stopping_threshold: float = cli.arg(0.0, "变好多少才算变好（绝对值）", min=0)
    val_fraction: float = cli.arg(0.1, "切多少比例作验证集", min=0.01, max=0.9)
    max_eval_samples: int = cli.arg(16, "验证集最多多少条（评估也要花时间）", min=1)
    gradient_checkpointing: bool = cli.arg(False, "用重算换显存：大模型在 GPU 上打开，CPU 小模型关着更快")
    resume: bool = cli.arg(False, "从输出目录里最后一个 checkpoint-* 续训（优化器、调度器、随机数状态一起恢复）")
    stop_after_steps: int = cli.arg(0, "演练崩溃：第 N 步的检查点写完后立刻硬退出进程（os._exit，像被 kill）；"
                                       "0=不演练", min=0)


# --smoke：极小模型上几秒钟能看到效果的规模；小网络承受得住大得多的学习率
SMOKE = dict(learning_rate=2e-3, max_steps=12, eval_steps=4, max_length=128, per_device_train_batch_size=4,
             gradient_accumulation_steps=1, max_eval_samples=16, warmup_steps=1)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（训练前、各次评估、全程用时）在同一次运行里量
CLAIMS = [
    run.Claim("全参数 SFT 降低留出集损失：训练后 / 训练前 eval_loss", "eval_loss_after / eval_loss_before", "<=",
              0.995, 0.93),
    run.Claim("load_best_model_at_end 装回的是验证损失最低的检查点：装回后的 eval_loss − 训练中各次评估的最低值",
              "eval_loss_after - min(e[1] for e in eval_history)", "<=", 0.001, 0.001),
    # 每次记录的是不同批次的损失（批 4），单看最后一步 / 第一步是在比两个批次：参考运行里 0.998，而留出损失同时降了
    # 13%。比前三分之一与后三分之一记录的均值，批次间的起伏才平均掉；冒烟只有极小模型的 12 步，只在默认模式检查
    run.Claim("优化器在训练集上起作用：后三分之一记录的训练损失均值 / 前三分之一的",
              "train_loss_last_third / train_loss_first_third", "<=", None, 0.95),
]


def load_conversations(args: Args) -> list[list[dict]]:
    """默认：data/sft/*.jsonl + data/identity/train.jsonl；--data：用户自己的文件。"""
    # sorted：glob 的顺序随文件系统而变；对话顺序固定，data.split 按 seed 切出的验证集才每次相同
    files = [Path(args.data)] if args.data else [*sorted((data.DATA_DIR / "sft").glob("*.jsonl")),
                                                 data.DATA_DIR / "identity" / "train.jsonl"]
    return [conv for f in files for conv in data.load_sft(f)]


def prepare_checkpoints(args: Args, out: run.Run) -> str | None:
    """--resume：返回最后一个完好的检查点；从头开始：清掉旧检查点，返回 None。"""
    # 检查点先写临时目录、写完才改名（_checkpoint.py），续训时跳过损坏的（被 kill 在保存半途、磁盘满），
    # 改用更早的完好检查点并说明；从头开始时清掉旧检查点，免得和这次的混在一起被"续"上
    if not args.resume:
        checkpoints.clear(out.dir)
        return None
    last = checkpoints.last_intact(out.dir, out.log)
    if last is None:
        raise UserError(f"--resume: {out.dir} 里没有完好的 checkpoint-* 目录；先不带 --resume 训练一次")
    return last


def encode(tok, convs: list[list[dict]], max_length: int, log):
    """对话 -> 已分词的数据集（labels 只在助手回复上，其余 -100）；回复被截光的样本跳过并提醒。"""
    from datasets import Dataset

    rows = [data.tokenize_chat(tok, c, max_length) for c in convs]
    kept = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows if any(x != -100 for x in r["labels"])]
    if len(kept) < len(rows):   # 助手回复整段被截断的样本没有损失可算，说明 max_length 太短
        log.warning(f"{len(rows) - len(kept)} 条样本的助手回复被 max_length={max_length} 截掉，已跳过")
    return Dataset.from_list(kept)


def sft_config(args: Args, out: run.Run, model):
    """评估与保存同频（best 检查点只能从存过的检查点里选），数据顺序由 seed/data_seed 固定（续训才能对上）。"""
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out.dir), run_name=out.dir.name, seed=args.seed, data_seed=args.seed,
        learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
        # Trainer 的约定是 max_steps=-1（它的默认值）表示按 num_train_epochs 训练：本脚本的 0 翻译成它的写法
        max_steps=args.max_steps if args.max_steps > 0 else -1, num_train_epochs=args.num_train_epochs,
        per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=8,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
        eval_strategy="steps", eval_steps=args.eval_steps, save_strategy="steps", save_steps=args.eval_steps,
        # 按 eval_loss 挑最好的一步；save_total_limit 删旧检查点时 Trainer 会留下 best 那个，不会把它删掉
        save_total_limit=args.save_total_limit, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=False, restore_callback_states_from_checkpoint=True,   # 早停计数也随检查点恢复
        prediction_loss_only=True,   # 评估只要损失：否则每批 batch×长度×词表 的 logits 被收集拼接，评估比训练还慢
        logging_steps=args.logging_steps, report_to=out.trainer_report_to(),
        **train.trainer_flags(model, gradient_checkpointing=args.gradient_checkpointing),   # bf16 / use_cpu / 检查点
        # 只数非填充 token：吞吐按"真正学到的 token"算，批里填充多少不该让数字变好看
        # dataloader_num_workers=0：数据已分词好放在内存里，开子进程取数据的开销比省下的还多
        include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, disable_tqdm=False,
    )


def throughput_meter():
    """只计前向+反向+优化器的时间（不含评估和存盘）的回调：这才是"训练吞吐"，评估多几次不该让它变差。"""
    from transformers import TrainerCallback  # 重的库在函数里导入：坏数据在加载 transformers 之前就报错

    class Throughput(TrainerCallback):
        seconds, tokens = 0.0, 0

        def on_step_begin(self, a, state, control, **kw):
            # num_input_tokens_seen 是累计值（sft_config 里打开 include_num_input_tokens_seen 才有）：
            # 步前步后相减才是这一步的 token
            self.t, self.n = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            self.seconds += time.perf_counter() - self.t
            self.tokens += state.num_input_tokens_seen - self.n

    return Throughput()


def crash_after(stop_after_steps: int):
    """模拟进程被杀的回调：第 N 步检查点落盘之后直接 os._exit，不走任何清理（不写 metrics、不关 tracker）。"""
    from transformers import TrainerCallback

    class CrashAfterStep(TrainerCallback):
        def on_save(self, a, state, control, **kw):
            # os._exit 而不是 sys.exit：不跑 finally / atexit，和 kill -9 一样什么都来不及收拾
            if stop_after_steps and state.global_step >= stop_after_steps:
                print(f"[stop_after_steps] 第 {state.global_step} 步检查点已保存，模拟崩溃退出", flush=True)
                os._exit(3)

    return CrashAfterStep()


def train_or_restore(trainer, last_ckpt: str | None, max_steps: int, log) -> None:
    """训练；--resume 时从检查点恢复权重、优化器、调度器、随机数与已跳过的数据。"""
    if last_ckpt:
        log.info(f"--resume：从 {last_ckpt} 续训")
    # max_steps > 0 才能这样比；按 epoch 训练（-1）时总步数由 Trainer 算，照常交给它续训
    if last_ckpt and int(Path(last_ckpt).name.split("-")[1]) >= max_steps > 0:
        # 上次被杀在最后一步存盘之后（最终评估 / 保存时）：Trainer 从这样的检查点"续训"会多走一步，
        # 这里直接装回状态与最好的权重
        from transformers import TrainerState

        trainer.state = TrainerState.load_from_json(str(Path(last_ckpt) / "trainer_state.json"))
        # 先装回最后一步的权重，再按 trainer_state 里记的 best_model_checkpoint 装回最好的一步，与正常跑完时
        # load_best_model_at_end 的结果相同。两个都是 Trainer 的私有方法：升级 transformers 时先查这里
        trainer._load_from_checkpoint(last_ckpt)
        trainer._load_best_model()
    else:
        trainer.train(resume_from_checkpoint=last_ckpt)


def plot_losses(out: run.Run, state, before: float, best: str | None) -> None:
    """训练损失 + 每次评估的验证损失（第 0 步是训练前那次）：看得出 best 是哪一步、早停停在哪。"""
    fig, save = out.plot("loss_curve.png")
    ax = fig.add_subplot(111)
    ax.plot([h["step"] for h in state.log_history if "loss" in h],
            [h["loss"] for h in state.log_history if "loss" in h], label="train loss", alpha=0.7)
    evals = [(h["step"], h["eval_loss"]) for h in state.log_history if "eval_loss" in h][:-1]   # 去掉训练后那次
    ax.plot(*zip(*([(0, before)] + evals)), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"full-parameter SFT: {out.model_name} (best = {best})")   # 英文标签：不依赖系统里有中文字体
    ax.legend()
    save()


def thirds(losses: list[float]) -> dict:
    """前三分之一与后三分之一记录的训练损失均值（至少各一条）：比单步稳，单步只是某一个批次。"""
    n = max(1, len(losses) // 3)
    return {"train_loss_first_third": round(sum(losses[:n]) / n, 4),
            "train_loss_last_third": round(sum(losses[-n:]) / n, 4)} if losses else {}


def main(args: Args) -> dict:
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    args = cli.with_smoke(args, SMOKE)   # 冒烟：小规模超参数（只换你没改过的），单线程（见 common.run）
    out = run.start(__file__, args)

    # 1. 断点续训还是从头开始：先处理检查点，--resume 却没有可用的检查点时，加载模型之前就报错
    last_ckpt = prepare_checkpoints(args, out)

    # 2. 数据：对话模板渲染，只在助手回复上算损失（labels 其余位置为 -100）
    convs = load_conversations(args)
    # for_training=True：CPU 上保留 fp32 主权重（bf16 的 8 位尾数会吞掉 AdamW 的小更新，见 models.pick_dtype）
    model, tok = models.load_args(args, for_training=True)
    train_convs, eval_convs = data.split(convs, args.val_fraction, args.seed)
    train_ds = encode(tok, train_convs, args.max_length, out.log)
    eval_ds = encode(tok, eval_convs[: args.max_eval_samples], args.max_length, out.log)
    out.log.info(f"训练 {len(train_ds)} 条，验证 {len(eval_ds)} 条（来自 {args.data or 'data/sft + data/identity'}）")

    # 3. 训练器：评估与保存同频；早停；检查点先写 tmp-checkpoint-N/ 再原子改名（kill 在保存半途也不留半成品）
    cfg = sft_config(args, out, model)
    speed = throughput_meter()
    trainer = checkpoints.atomic(SFTTrainer)(
        model=model, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
        callbacks=[EarlyStoppingCallback(args.early_stopping_patience, args.early_stopping_threshold), speed,
                   crash_after(args.stop_after_steps)])

    # 4. 训练前先量一次验证损失：没有"之前"，就说不清训练带来了什么
    before = trainer.evaluate()["eval_loss"]
    out.log.info(f"训练前 eval_loss = {before:.4f}")

    # 5. 训练（或续训）；步数没走满说明早停生效了：告诉学生为什么停
    train_or_restore(trainer, last_ckpt, cfg.max_steps, out.log)
    state = trainer.state
    if state.global_step < (args.max_steps if args.max_steps > 0 else state.max_steps):
        out.log.info(f"早停：第 {state.global_step} 步停下（验证损失连续 {args.early_stopping_patience} 次没有变好）")

    # 6. 训练后：load_best_model_at_end 已把最好的检查点装回来，用同一把尺子再量一次。别的脚本读训练中那次的记录
    #    （train.kept_metrics）省掉这次评估；这一节教的正是"装回了"，所以真的再量：它等于最低值才算证明
    after = trainer.evaluate()["eval_loss"]
    # 此时模型已是装回的最好一步：另存一份权重 + 分词器、不带优化器与随机数状态的，部署时加载它
    trainer.save_model(str(out.path("best_model")))
    # 只留目录名：绝对路径随机器而变，写进 metrics.json 就没法跨机器比
    best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
    train_losses = [h["loss"] for h in state.log_history if "loss" in h]

    # 7. 曲线：训练损失与每次评估的验证损失
    plot_losses(out, state, before, best)
    return out.finish({
        "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4),
        "train_loss_first": round(train_losses[0], 4) if train_losses else None,
        "train_loss_last": round(train_losses[-1], 4) if train_losses else None,
        **thirds(train_losses),
        "train_tokens_per_s": round(speed.tokens / speed.seconds, 1) if speed.seconds else None,
        "train_tokens": speed.tokens, "global_step": state.global_step, "best_checkpoint": best,
        # 训练中每次评估的 (步, eval_loss)；最后一条是上面训练后的那次 evaluate，去掉
        "eval_history": [[h["step"], round(h["eval_loss"], 4)] for h in state.log_history if "eval_loss" in h][:-1],
        "best_eval_loss": round(state.best_metric, 4) if state.best_metric is not None else None,
        "resumed_from": Path(last_ckpt).name if last_ckpt else None, "report_to": out.report_to,
        "train_examples": len(train_ds), "eval_examples": len(eval_ds),
    }, summary=f"eval_loss {before:.3f} -> {after:.3f}，{state.global_step} 步，best = {best}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
