"""LoRA 微调对话模型（GLM 架构）：冻结原模型，只训练低秩增量；换成你自己的数据也能训得明白、停在最好的一步。

流程：注入 LoRA（target_modules 按架构选）-> 身份 + 领域数据或 --data 你的数据（验证集从它切出），只在回复上算损失 ->
一行说清条数、长度、几条超过 --max-length、步数与 epoch、量完第一步后的预计时间（超过 --max-train-minutes 就减步数）->
打包（先核对与填充损失相同）、一次前向 ≤ --micro-batch-tokens（梯度累积）、按激活内存估计自动开梯度检查点 ->
按验证损失留最好的一步、不再改善就停 -> 保存 adapter、合并并核对 logits -> 比较训练前后的回答。

运行：
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py            # CPU，smollm2-135m，身份 + 领域数据 60 步
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --smoke    # tiny-glm（GLM-4 架构极小模型）
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --data data/longform/sft_long.jsonl   # 你自己的数据
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --model THUDM/glm-4-9b-chat-hf --source hf \\
      --config configs/lesson1/lora_chatglm_demo_gpu.yaml     # GPU，bf16（chatglm3-6b 这类再加 --trust-remote-code）

你会看到：可训练参数只占全部的一小部分；留出身份问题（训练时没见过的问法）的准确率从 0 附近大幅升高，eval_loss
明显下降；打包与填充算出的损失相同；最后留下的是验证损失最低的那一步；合并进 W 后与外挂 adapter 的输出只差浮点舍入
（max|Δlogit| 远小于 adapter 本身对 logits 的改变）。--data data/longform/sft_long.jsonl（198 条长回复）：开头一行数出
几条超过 --max-length 被截断；量完第一步若预计超过 --max-train-minutes 就按预算减步数，eval_loss 照样下降，没有身份
准确率；吞吐与峰值内存在 metrics.json（train_tokens_per_s、peak_rss_mb）。--smoke：身份准确率同样从 0 升上去。
图：loss_curve.png（竖线 = 保留的那一步）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：4.0 分钟，3.3 GB，结论 8/8 成立
  ✓ LoRA 降低留出集损失（领域问答 + 身份问题）：训练后 / 训练前 eval_loss：0.4571（≤ 0.6）
  ✓ LoRA 教会新身份：留出身份问法的准确率，训练后 − 训练前：0.95（≥ 0.7）
  ✓ 结束时留下的是验证损失最低的那一步：保留那一步的 eval_loss − 训练中各次评估的最低值：0（≤ 0.001）
  ✓ 合并进 W 与外挂 adapter 输出相同：合并误差 / adapter 对 logits 的改变（max|Δlogit| 之比）：5e-06（≤ 0.001）
  ✓ 打包不改变损失：同一批样本 |打包 − 填充| / 填充损失：0（≤ 1e-05）
  ✓ LoRA 只训练一小部分参数：可训练参数 / 全部参数：0.01783（≤ 0.025）
  ✓ 评估只前向、只要损失：评估 / 训练的 token/s：2.877（≥ 2）
  ✓ 自动评估间隔让评估开销约为训练的 1/10：评估 / 训练用时：0.05227（≤ 0.15）
<!-- /results -->
"""

import shutil
from dataclasses import dataclass

from common import cli, data, models, run, train
from common.errors import UserError, brief

_plan = run.import_sibling(__file__, "_plan")   # 这一课独有的训练计划：步数、预算、梯度检查点、打包核对


@dataclass
class Args(cli.CommonArgs):
    lora_r: int = cli.arg(8, "LoRA 秩 r：增量 ΔW = B·A 的秩；越大表达力越强、可训练参数越多", min=1)
    lora_alpha: int = cli.arg(16, "缩放系数：实际缩放 alpha / r，r 变了学习率不必重调", min=1)
    lora_dropout: float = cli.arg(0.05, "adapter 输入上的 dropout：数据只有几百条，防止死记", min=0, max=1)
    target_modules: str = cli.arg("auto", "注入哪些层：auto（按架构选，见 TARGETS）/ all-linear / 逗号分隔的名字")
    learning_rate: float = cli.arg(1e-3, "LoRA 学习率：只训练从零开始的小矩阵，可比全参数微调大 10-100 倍")
    max_steps: int = cli.arg(0, "优化器步数；0 = 自动：自带数据 60 步（约 2 个 epoch），--data 按 epoch 数", min=0)
    num_train_epochs: float = cli.arg(3.0, "--data 时最多训练几个 epoch（验证损失不再下降会提前停）", min=0.01)
    per_device_train_batch_size: int = cli.arg(8, "每步约几条样本（打包时按 token 数换算成行数）", min=1)
    micro_batch_tokens: int = cli.arg(512, "一次前向最多多少 token（多了就梯度累积；省 token×词表的 logits）", min=16)
    max_train_minutes: float = cli.arg(6.0, "训练时间预算（分钟，含评估），按实测一步减自动步数；0 = 不限", min=0)
    warmup_steps: int = cli.arg(3, "预热步数", min=0)
    max_length: int = cli.arg(512, "每条样本最多多少 token；打包时也是一行的长度", min=16)
    over_length: str = cli.arg("truncate", "超过 --max-length 的样本：truncate 截断（回答结尾丢失）/ drop 丢弃",
                               choices=["truncate", "drop"])
    packing: bool = cli.arg(True, "padding-free 打包：样本首尾相接装满一行，不再为填充 token 付计算")
    eval_steps: int = cli.arg(0, "每多少步评估一次；0 = 自动，使评估开销不超过训练的 1/10", min=0)
    early_stopping_patience: int = cli.arg(3, "连续几次评估没有改善就停；0 = 不提前停（仍然留下最好的一步）", min=0)
    val_fraction: float = cli.arg(0.1, "从训练数据里留出多少比例算 eval_loss", min=0, max=0.5)
    identity_repeat: int = cli.arg(2, "身份数据重复几遍再混入领域数据：几十条身份样本容易被上百条领域样本淹没", min=1)
    eval_data: str = cli.arg(None, "额外的验证集（alpaca/chat）；不给 --data 时默认 data/identity/eval.jsonl")
    identity_keywords: str = cli.arg("灵犀,Lingxi", "身份关键词（逗号分隔）：验证集的答案都含其一时才算身份准确率")
    max_new_tokens: int = cli.arg(40, "生成回答的最大长度（贪心解码）", min=1)
    num_threads: int = cli.arg(0, "CPU 线程数；0 = torch 默认（= 核数）；机器很忙时 1 往往更快（--smoke 用 1）",
                               min=0)
    gradient_checkpointing: str = cli.arg("auto", "梯度检查点：auto（估计的激活内存超过预算才开）/ on / off",
                                          choices=["auto", "on", "off"])
    memory_budget_gb: float = cli.arg(0.0, "激活内存预算（GB）；0 = 本机可用内存的 1/4", min=0)

    smoke_model = "tiny-glm"   # 冒烟用 GLM-4 架构的极小模型，与课名里的 ChatGLM 对应


# --smoke：tiny-glm 只有约 1M 参数，承受得住大学习率；步数刚好让身份关键词稳定地学会
SMOKE = dict(max_train_minutes=0.0, learning_rate=1e-2, max_steps=120, eval_steps=30, lora_r=16, lora_alpha=32,
             max_length=256, max_new_tokens=24, per_device_train_batch_size=16, identity_repeat=3, lora_dropout=0.0,
             warmup_steps=4)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（训练前、原模型、填充批）都在同一次运行里量
_MECHANICS = [
    run.Claim("结束时留下的是验证损失最低的那一步：保留那一步的 eval_loss − 训练中各次评估的最低值",
              "eval_loss_after - min(e[1] for e in eval_history)", "<=", 0.001, 0.001),
    run.Claim("合并进 W 与外挂 adapter 输出相同：合并误差 / adapter 对 logits 的改变（max|Δlogit| 之比）",
              "merge_max_abs_logit_diff / lora_logit_change", "<=", 1e-3, 1e-3),
    run.Claim("打包不改变损失：同一批样本 |打包 − 填充| / 填充损失", "packed_vs_padded_loss_diff / padded_loss", "<=",
              1e-5, 1e-5),
    run.Claim("LoRA 只训练一小部分参数：可训练参数 / 全部参数", "trainable_params / total_params", "<=", 0.15, 0.025),
    # 评估只有前向（≈ 训练的 1/3 算量），只要损失时应快 2 倍以上（曾经慢到 1/5）；极小模型固定开销说了算，冒烟不查
    run.Claim("评估只前向、只要损失：评估 / 训练的 token/s", "eval_tokens_per_s / train_tokens_per_s", ">=", None, 2.0),
]
CLAIMS = [   # 自带的身份 + 领域数据（不给 --data）
    run.Claim("LoRA 降低留出集损失（领域问答 + 身份问题）：训练后 / 训练前 eval_loss",
              "eval_loss_after / eval_loss_before", "<=", 0.9, 0.6),
    run.Claim("LoRA 教会新身份：留出身份问法的准确率，训练后 − 训练前",
              "identity_accuracy_after - identity_accuracy_before", ">=", 0.4, 0.7),
    *_MECHANICS,
    run.Claim("自动评估间隔让评估开销约为训练的 1/10：评估 / 训练用时", "eval_seconds/train_seconds", "<=", None, 0.15),
]
# --data 换成你自己的数据：没有身份问题，损失降多少由数据决定（长回答数据实测 1.94 -> 1.61），只要求降下来
OWN_DATA_CLAIMS = [
    run.Claim("LoRA 降低你的数据的留出损失：训练后 / 训练前 eval_loss", "eval_loss_after / eval_loss_before", "<=",
              0.99, 0.95),
    *_MECHANICS,
]
# 按架构选注入层：注意力 + MLP 的全部投影（只挂 q/v 对"记住新事实"太弱）。名字来自各模型的实现
# GLM-4 的 MLP 把 gate 与 up 合成一个 gate_up_proj（transformers 的 Glm4 实现），Llama 式的名字在它身上对不上
_GLM4 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = {"chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],  # ChatGLM2/3（自定义代码）
           "glm": _GLM4, "glm4": _GLM4, "llama": _LLAMA, "qwen2": _LLAMA}   # GLM-4 是 transformers 原生实现


def identity_targets(convs: list[list[dict]], keywords: list[str]) -> list[str] | None:
    """验证问题的答案都含某个身份关键词时，返回每条期望的关键词；否则 None（这不是身份数据，不算身份准确率）。"""
    hits = [[k for k in keywords if k.lower() in c[-1]["content"].lower()] for c in convs]
    # 要求每条都含关键词：哪怕一条没有，它就无从判对错，这份数据不当身份集用
    return [h[0] for h in hits] if convs and all(hits) else None


def load_data(args: Args, keywords: list[str]):
    """-> (训练对话, 留出对话, 身份问题 或 [])。--data 就是学生自己的数据：验证集从它切出来（+ --eval-data）。"""
    if args.data:
        train_convs, held = data.split(data.load_sft(args.data), args.val_fraction, args.seed)
        extra = data.load_sft(args.eval_data) if args.eval_data else []
        is_identity = identity_targets(train_convs, keywords) is not None   # 训练的就是身份数据
        # 身份准确率优先用 --eval-data；训练的本就是身份数据时用切出的留出集；都不是就只报 eval_loss
        ident = extra if identity_targets(extra, keywords) else (held if is_identity else [])
        return train_convs, held + extra, ident
    # 领域数据留出一部分算 eval_loss；身份数据另有一份从没见过的问法
    domain_train, held = data.split(data.load_sft(data.DATA_DIR / "domain" / "sft.jsonl"), args.val_fraction,
                                    args.seed)
    train_convs = data.load_sft(data.DATA_DIR / "identity" / "train.jsonl") * args.identity_repeat + domain_train
    ident = data.load_sft(args.eval_data or data.DATA_DIR / "identity" / "eval.jsonl")
    if identity_targets(ident, keywords) is None:   # 没给 --eval-data 时用的是自带身份集：问题出在关键词上
        flag = f"--eval-data {args.eval_data}" if args.eval_data else f"--identity-keywords {args.identity_keywords}"
        raise UserError(f"{flag}: 不给 --data 时身份验证集的答案里要有 {keywords} 之一")
    return train_convs, held + ident, ident


def prepare(args: Args, out, tok, train_convs, held_convs) -> tuple[list[dict], list[dict], dict, dict]:
    """编码 -> 先不截断，数清几条超长（一行日志）-> 按 --over-length 处理 -> 训练计划（每步几行、几步、多久评估）。"""
    # 先不截断（10**9）：length_report 要数清真实长度、会被截掉多少回答 token，截了就数不出来
    encoded = [data.tokenize_chat(tok, c, 10**9) for c in train_convs]
    stats = train.length_report(encoded, args.max_length, args.over_length)
    rows = train.truncate(encoded, args.max_length, args.over_length)
    # 验证集超长的一律截断、不整条丢：--over-length 只管训练数据，换策略时验证集不变，eval_loss 才可比
    eval_rows = train.truncate([data.tokenize_chat(tok, c, 10**9) for c in held_convs], args.max_length)
    p = _plan.plan(args, rows, sum(len(r["input_ids"]) for r in eval_rows), bool(args.data))
    # 截断后只剩提示的样本没有可学的 token，也一并去掉：条数变了要说出来，不然学生对不上自己的数据
    gone = f"（{len(encoded) - len(rows)} 条被丢弃或截断后不剩回答 token）" if len(rows) < len(encoded) else ""
    out.log.info(f"{len(rows)} 条{gone} -> {'打包' if args.packing else '填充'}，每步 {p['rows_per_fwd'] * p['accum']} "
                 f"行（一次前向 {p['rows_per_fwd']} 行）× ≤{p['width']} token；验证 {len(eval_rows)} 条")
    return rows, eval_rows, p, stats


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
        raise UserError(f"--target-modules {args.target_modules}: {brief(e, 200)}") from None


def build_trainer(args: Args, out, model, tok, rows: list[dict], eval_rows: list[dict], p: dict, ckpt: bool):
    """SFTTrainer：按评估间隔保存 adapter，结束时装回验证损失最低的那一步；第 1 步后报预计用时，超时先评估再停。"""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as PadCollator  # --no-packing：右填充对照

    collator = train.PackedCollator(tok.pad_token_id) if args.packing else PadCollator(pad_token_id=tok.pad_token_id)
    cfg = SFTConfig(
        output_dir=str(out.path("trainer")), seed=args.seed, data_seed=args.seed, max_steps=p["steps"],
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
        per_device_train_batch_size=p["rows_per_fwd"], gradient_accumulation_steps=p["accum"],
        per_device_eval_batch_size=2 * p["rows_per_fwd"], max_length=None,   # 评估只前向，不存反向要的激活
        logging_steps=1, report_to=out.trainer_report_to(), dataloader_num_workers=0, remove_unused_columns=False,
        # max_length=None + skip_prepare_dataset：数据已由本脚本分词、截断、打包好，不让 TRL 按它的默认
        # （max_length=1024）再处理一遍
        dataset_kwargs={"skip_prepare_dataset": True}, **train.best_step_args(p["eval_steps"]),
        **train.trainer_flags(model, ckpt, log=False))
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tok, data_collator=collator,
                         train_dataset=train.pack(rows, args.max_length) if args.packing else Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(eval_rows))
    # 用了自带的步数（--max-steps）就不按预算减，超时兜底也关掉：要的就是那么多步
    clock = train.attach(trainer, 0 if args.max_steps else args.max_train_minutes, args.early_stopping_patience,
                         tokens=sum(len(r["input_ids"]) for r in rows))
    return trainer, clock


def train_and_keep(out, trainer, clock, before: float, step_s: float, p: dict) -> dict:
    """训练；load_best_model_at_end 装回验证损失最低的那一步，再量一次 eval_loss（量的就是保留下来的那一步）。"""
    with train.PeakMemory(train.device_of(trainer.model)) as mem:
        trainer.train()
    shutil.rmtree(out.path("trainer"), ignore_errors=True)   # 中间检查点：最好的那一步已经装回模型，不必留着
    kept = train.kept_step(trainer)
    # 保留那一步训练中已评估过：读记录，不再评估一遍（"装回后再量一次等于最低值"的证明在第 1 课 03）
    after = train.kept_metrics(trainer)["eval_loss"]
    tps, eval_tps = clock.tokens_per_s(trainer.state.epoch), p["eval_tokens"] * clock.evals / max(clock.eval_s, 1e-9)
    out.log.info(f"eval_loss {before:.4f} -> {after:.4f}；保留第 {kept['kept_step']} 步（验证损失最低"
                 f"{'，之后没再改善，提前停止' if kept['stopped_early'] else ''}）；训练 {clock.train_s:.0f} 秒（评估 "
                 f"{clock.eval_s / max(clock.train_s, 1e-9):.0%}，{eval_tps:.0f} token/s），"
                 f"训练 {tps:.0f} token/s，峰值内存 +{mem.peak_mb:.0f} MB"
                 f"（进程峰值 RSS {train.peak_rss_mb():.0f} MB）")
    return {"eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4), **kept,
            "planned_steps": p["steps"], "steps_before_time_budget": p["planned"],
            "measured_step_seconds": round(step_s, 2), "gradient_accumulation_steps": p["accum"],
            "epochs": round(trainer.state.epoch, 2), "train_tokens_per_s": round(tps, 1),
            "train_seconds": round(clock.train_s, 1), "eval_seconds": round(clock.eval_s, 1),
            "eval_tokens_per_s": round(eval_tps, 1), "first_step_seconds": round(clock.first_step_s, 2),
            "peak_train_mem_mb": round(mem.peak_mb),
            **({"cuda_peak_mb": round(mem.peak_abs_mb)} if mem.cuda else {})}


def adapter_logits(args: Args, out, model, tok, probes):
    """只存 adapter（几 MB）；记下训练中的模型在几条留出对话上的 logits，之后与重新加载、合并的模型逐一对比。"""
    import torch

    model.save_pretrained(out.path("adapter"))
    # add_special_tokens=False：prompt_text 已由对话模板加好特殊 token；再加一次，有的分词器会多出一个 BOS，
    # 与训练时的序列对不上
    probe = tok([data.prompt_text(tok, c) + c[-1]["content"] for c in probes[:8]], return_tensors="pt", padding=True,
                truncation=True, max_length=min(128, args.max_length), add_special_tokens=False).to(model.device)
    with torch.no_grad():   # 128 token 足以核对；logits 是 token 数 × 词表，长了很占内存
        # eval() 关掉 LoRA 的 dropout：这组 logits 要与重新加载的模型逐一比较，不能带随机性
        return probe, model.eval()(**probe).logits[probe["attention_mask"].bool()]


def merge_and_check(args: Args, out, tok, probe, trained) -> tuple:
    """部署的做法：新加载原模型 -> 装上 adapter -> merge_and_unload 把 scale·B·A 加进 W。logits 应与训练中的一致。"""
    import torch
    from peft import PeftModel

    train.release_memory()   # 调用方已放掉训练中的模型：再加载一份新的原模型，峰值内存不叠加两份
    adapter_dir = out.path("adapter")
    # 用与训练时相同的精度加载底座（CPU 上 fp32）：精度一变，logits 的差就不只是合并误差了
    reloaded = PeftModel.from_pretrained(models.load_args(args, for_training=True)[0], adapter_dir).eval()
    mask = probe["attention_mask"].bool()
    with torch.no_grad():
        adapter = reloaded(**probe).logits[mask]
        with reloaded.disable_adapter():   # 同一个底座去掉 adapter：合并误差要和 adapter 本身的改变比，才看得出大小
            base = reloaded(**probe).logits[mask]
        # scale·B·A 加进 W 并去掉 LoRA 包装：部署时和原模型一样快，每个注入的 Linear 不再多算两次小矩阵乘
        merged = reloaded.merge_and_unload()
        merge_diff = (merged(**probe).logits[mask] - adapter).abs().max().item()
    tol = 1e-3 if adapter.dtype == torch.float32 else 5e-2   # bf16 权重合并多一次舍入（~1e-2）
    merged.save_pretrained(out.path("merged"), safe_serialization=True)
    tok.save_pretrained(out.path("merged"))
    check = {"merge_max_abs_logit_diff": merge_diff, "merge_matches_adapter": merge_diff < tol,
             "lora_logit_change": (adapter - base).abs().max().item(),
             "adapter_reload_max_diff": (trained - adapter).abs().max().item(),
             "adapter_mb": round(sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20, 2)}
    out.log.info(f"max |Δlogit|：重新加载 vs 训练中 {check['adapter_reload_max_diff']:.2e}；合并 vs adapter "
                 f"{merge_diff:.2e}")
    return merged, check


def compare_answers(args: Args, out, tok, probes, id_convs, before: list[str], merged, keywords) -> dict:
    """用合并好的模型（就是要部署的那个）回答同样的留出问题；身份数据上算准确率（回答里含期望的关键词即对）。"""
    after = models.generate(merged, tok, [data.prompt_text(tok, c) for c in probes], args.max_new_tokens)
    targets = identity_targets(id_convs, keywords)
    acc = {f"identity_accuracy_{k}": sum(t.lower() in a.lower() for a, t in zip(ans, targets)) / len(targets)
           for k, ans in (("before", before), ("after", after))} if targets else {}
    picks = sorted({0, 1, len(probes) // 2, len(probes) - 1})   # 中文、英文各几条
    samples = [{"question": probes[i][-2]["content"][:200], "before": before[i], "after": after[i]} for i in picks]
    for s in samples:
        out.log.info(f"{s['question'][:60]}\n  训练前: {s['before'][:80]}\n  训练后: {s['after'][:80]}")
    return {**acc, "samples": samples}


def main(args: Args) -> dict:
    import torch

    args = cli.with_smoke(args, SMOKE)   # 冒烟：小规模超参数（只换你没改过的：--smoke --learning-rate 1e-2 仍生效）
    out = run.start(__file__, args)
    if args.num_threads > 0:   # 机器被别的进程占着时，torch 的多个线程互相等待，实测能慢几十倍：可手动改成 1
        torch.set_num_threads(args.num_threads)

    # 1. 数据：训练 / 留出（身份问题只在数据真的是身份数据时才有）；超长的先数清再截断，训练前一行说清
    keywords = [k.strip() for k in args.identity_keywords.split(",") if k.strip()]
    if not keywords:   # "," 或空串：一个关键词都没有，身份准确率无从算起
        raise UserError(f"--identity-keywords {args.identity_keywords!r}: 至少要有一个非空的关键词（逗号分隔）")
    train_convs, held_convs, id_convs = load_data(args, keywords)
    model, tok = models.load_args(args, for_training=True)
    model.config.use_cache = False   # 训练不需要 KV 缓存；有缓存时 transformers 不按 position_ids 识别打包的段落
    rows, eval_rows, p, m = prepare(args, out, tok, train_convs, held_convs)

    # 2. 训练前：原模型怎么回答留出的问题？（smollm2 会说自己是 SmolLM）
    # --data 没有身份问题：从留出集取几条，训练前后照样能对比回答
    probes = id_convs or held_convs[:3]
    answers_before = models.generate(model, tok, [data.prompt_text(tok, c) for c in probes], args.max_new_tokens)

    # 3. 注入 LoRA；核对打包与填充在同一批样本上的损失一致（段落边界处理错了，这里就对不上）
    model, m["target_modules"] = add_lora(model, args, out.log)
    trainable, total = model.get_nb_trainable_parameters()
    out.log.info(f"可训练参数 {trainable:,d} / {total:,d} = {trainable / total:.2%}（r={args.lora_r}）")
    padded, packed = _plan.packed_vs_padded_loss(model, rows[:4], tok.pad_token_id)
    out.log.info(f"同一批 {min(4, len(rows))} 条：填充损失 {padded:.6f}，打包损失 {packed:.6f}")

    # 4. 内存：估计一步的激活内存，超过预算就开梯度检查点（CPU 上一样省内存，代价是多一次前向）
    budget = _plan.memory_budget_gb(args.memory_budget_gb)
    ckpt, why = _plan.auto_checkpointing(model.config, p, budget, args.gradient_checkpointing)
    out.log.info(why)

    # 5. 训练器 + 预算：开训前实测一步，按 --max-train-minutes 定步数（步数定了余弦学习率曲线，开训后不能再改）
    trainer, clock = build_trainer(args, out, model, tok, rows, eval_rows, p, ckpt)
    before, step_s, p = _plan.fit_budget(args, out, trainer, rows, eval_rows, p, ckpt)

    # 6. 训练：每次评估存一次 adapter，结束时装回验证损失最低的那一步（不是最后一步），不再改善就提前停
    m.update(train_and_keep(out, trainer, clock, before, step_s, p))
    hist = trainer.state.log_history

    # 7. 只存 adapter；放掉训练器与模型，新加载原模型装回 adapter、合并，逐一核对 logits
    probe, trained = adapter_logits(args, out, model, tok, probes)
    del trainer, model
    merged, check = merge_and_check(args, out, tok, probe, trained)

    # 8. 训练后：合并好的模型回答同样的留出问题；9. 曲线（竖线 = 保留的那一步）
    m.update(compare_answers(args, out, tok, probes, id_convs, answers_before, merged, keywords))
    _plan.plot_curve(out, args, hist, m)
    acc = (f"身份准确率 {m['identity_accuracy_before']:.2f} -> {m['identity_accuracy_after']:.2f}，"
           if "identity_accuracy_after" in m else "")
    return out.finish({
        **m, **check, "packing": args.packing, "packed_vs_padded_loss_diff": abs(packed - padded),
        "padded_loss": padded,
        "gradient_checkpointing": ckpt, "memory_budget_gb": round(budget, 2), "peak_rss_mb": round(train.peak_rss_mb()),
        "trainable_ratio": round(trainable / total, 5), "trainable_params": trainable, "total_params": total,
    }, summary=f"{acc}eval_loss {m['eval_loss_before']:.3f} -> {m['eval_loss_after']:.3f}（保留第 {m['kept_step']}/"
               f"{m['steps']} 步），{m['train_tokens_per_s']:.0f} token/s，峰值 RSS {train.peak_rss_mb():.0f} MB，"
               f"合并 vs adapter max|Δlogit| {check['merge_max_abs_logit_diff']:.1e}",
        claims=CLAIMS if not args.data else OWN_DATA_CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
