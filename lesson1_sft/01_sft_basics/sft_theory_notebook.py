"""SFT 到底在优化什么：只在助手回复上算损失 vs 整段序列都算损失。

这是一个 jupytext（percent 格式）笔记本，也是一个普通脚本：
  jupytext --to notebook lesson1_sft/01_sft_basics/sft_theory_notebook.py   # 转成 .ipynb 在 Jupyter 里逐格运行

运行：
  python lesson1_sft/01_sft_basics/sft_theory_notebook.py            # CPU，smollm2-135m，两次各 8 步
  python lesson1_sft/01_sft_basics/sft_theory_notebook.py --smoke    # 极小模型，各 10 步
  python lesson1_sft/01_sft_basics/sft_theory_notebook.py \
      --model Qwen/Qwen2.5-0.5B-Instruct --source hf --config configs/lesson1/sft_theory_notebook.yaml   # GPU

你会看到：一条对话按模板渲染后，只有助手回复那一段 token 带 loss（label_token_fraction 远小于 1）；
同一初始化、同样步数、同样数据顺序训练两次（assistant-only 与 full-sequence），用同一把尺子（留出集上只算回复 token
的损失）量。两种训练都让回复损失下降；差别在 prompt 损失：full-sequence 把它压得很低（力气大多花在学写用户问题和系统
提示上），assistant-only 的 prompt 损失留在高处。而在这份"回复比提示长"的数据上，两者的回复损失相差在噪声量级、谁领先
会随步数（--max-steps）换：模板标记、格式、领域词两边都在学。assistant-only 真正的好处是不去模仿用户，以及 prompt
远长于回复（RAG、长系统提示）时梯度不被 prompt 稀释——这正是 TRL 默认 completion/assistant-only loss 的理由。
曲线图 curves.png：左边训练损失，右边留出集回复损失。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：5.4 分钟，4.7 GB，结论 3/3 成立
  ✓ assistant-only 训练降低留出集回复损失：训练后 / 训练前：0.8877（≤ 0.95）
  ✓ full-sequence 也学 prompt：它的 prompt 损失比 assistant-only 低（nat）：2.389（≥ 1）
  ✓ assistant-only 只在回复上算损失：带损失 token 的比例：0.3528（< 0.6）
<!-- /results -->
"""

# %% [markdown]
# # SFT 到底在优化什么
#
# 监督微调（SFT）就是在"对话模板渲染后的 token 序列"上做下一个 token 预测。区别只在**哪些位置计入损失**：
#
# $$\mathcal{L} = -\frac{1}{|A|}\sum_{t \in A} \log p_\theta(x_t \mid x_{<t})$$
#
# - **assistant-only**：$A$ = 助手回复的 token（其余位置的 label 设为 -100，交叉熵忽略它们）；
# - **full-sequence**：$A$ = 全部 token（系统提示、用户问题、模板标记也要预测）。
#
# 我们关心的是模型"回答得好不好"，所以两种做法都用同一把尺子衡量：**留出集上只算回复 token 的损失**。

# %%

from dataclasses import dataclass

from common import cli, data, lm, models, run, train


@dataclass
class Args(cli.CommonArgs):
    max_steps: int = cli.arg(8, "每种做法训练的步数（--smoke 时为 10）", min=1)
    per_device_train_batch_size: int = cli.arg(4, "每步几条对话", min=1)
    learning_rate: float = cli.arg(5e-5, "学习率（--smoke 的极小模型用 1e-3：参数少、从头预训练不久，"
                                         "容得下大步长）", max=0.01,
                                   why="再大就发散：冒烟时 0.1 让留出损失从 5.6 升到 8-10，1e12 时损失全是 NaN")
    max_length: int = cli.arg(256, "每条对话最多多少 token（超出截断）", min=8)
    val_fraction: float = cli.arg(0.15, "留出多少对话做评估（不参与训练）", min=0.01, max=0.9)
    eval_every: int = cli.arg(4, "每隔多少步在留出集上量一次回复损失（画右图）", min=1)
    max_eval_samples: int = cli.arg(16, "留出集最多用多少条对话来量损失（评估也要花时间）", min=1)


# --smoke：极小模型几秒内能看出差别的规模；1M 参数、预训练很短的小网络承受得住大得多的学习率
SMOKE = dict(max_steps=10, learning_rate=1e-3, per_device_train_batch_size=8, max_length=128, eval_every=5,
             max_eval_samples=32)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测
CLAIMS = [
    run.Claim("assistant-only 训练降低留出集回复损失：训练后 / 训练前",
              "assistant_only_eval_loss / eval_loss_before", "<=", 0.997, 0.95),
    run.Claim("full-sequence 也学 prompt：它的 prompt 损失比 assistant-only 低（nat）",
              "assistant_only_prompt_loss - full_sequence_prompt_loss", ">=", 0.05, 1.0),
    run.Claim("assistant-only 只在回复上算损失：带损失 token 的比例",
              "label_token_fraction", "<", 0.6, 0.6),
]


# %% [markdown]
# ## 1. 对话模板与损失掩码
#
# `common.data.tokenize_chat` 用"前缀差分"找出助手回复的 token：分别渲染"到这条回复之前 + 生成提示"
# 和"到这条回复为止"，两者长度之差就是回复所占的区间。它对任何对话模板都成立。
# 下面把一条对话逐 token 上色：**绿色**的 token 在 assistant-only 模式下计入损失，灰色的只在 full-sequence 模式下计入。

# %%
def show_loss_mask(tok, messages: list[dict], max_length: int) -> None:
    """逐 token 上色打印一条对话：绿色 = 助手回复（assistant-only 下计入损失），灰色 = 其余。"""
    from rich.console import Console
    from rich.text import Text

    enc = data.tokenize_chat(tok, messages, max_length)
    text = Text()
    for tid, m in zip(enc["input_ids"], enc["assistant_masks"]):
        piece = tok.decode([tid]).replace("\n", "⏎\n")
        text.append(piece, style="bold black on green3" if m else "grey50")
    console = Console(width=119)
    console.rule("一条对话按模板渲染后的 token（绿色 = 计入 assistant-only 损失）")
    console.print(text)
    n, k = len(enc["input_ids"]), sum(enc["assistant_masks"])
    console.print(f"共 {n} 个 token：assistant-only 只在 {k} 个上算损失（{k / n:.0%}），"
                  f"full-sequence 在全部 {n} 个上算。")


# %% [markdown]
# ## 2. 两份训练集：token 完全相同，只有 labels 不同
#
# TRL 的 `SFTConfig(assistant_only_loss=True)` 靠模板里的 `{% generation %}` 标记找回复；SmolLM2 的模板没有这个标记，
# TRL 1.16 也没有它的训练版模板。所以我们自己算好掩码，交给 `SFTTrainer` 一份已分词的数据：
# 带 `assistant_masks` 列时 TRL 据此把回复以外的 label 设为 -100（与 `assistant_only_loss=True` 内部做法相同），
# 不带时 label = input_ids（填充位置由 collator 设为 -100）。这样两次训练看到的 token 一模一样，唯一的变量是损失掩码。

# %%
def build_datasets(tok, convs: list[list[dict]], max_length: int):
    """-> (assistant-only 数据集, full-sequence 数据集, 带损失 token 的比例)。"""
    from datasets import Dataset

    encs = [data.tokenize_chat(tok, c, max_length) for c in convs]
    encs = [e for e in encs if sum(e["assistant_masks"]) > 0]     # 回复被截断光了的对话没有可学的 token
    assistant_only = Dataset.from_list([{"input_ids": e["input_ids"], "assistant_masks": e["assistant_masks"]}
                                        for e in encs])
    full = Dataset.from_list([{"input_ids": e["input_ids"]} for e in encs])
    fraction = sum(sum(e["assistant_masks"]) for e in encs) / sum(len(e["input_ids"]) for e in encs)
    return assistant_only, full, fraction


# %% [markdown]
# ## 3. 同一把尺子：留出集上的回复损失
#
# 只在留出对话的助手 token 上求平均交叉熵（按 token 加权）；顺便也量一下 prompt 部分（系统提示 + 用户问题）的损失，
# 看看 full-sequence 训练把力气花在了哪里。

# %%
def heldout_losses(model, tok, encs: list[dict], batch_size: int = 8) -> tuple[float, float]:
    """-> (回复 token 平均损失, prompt token 平均损失)，encs 来自 tokenize_chat，按 token 加权平均。

    一次前向同时量两部分：labels 不是 -100 的位置是回复，其余非填充位置是 prompt。
    """
    import torch

    was_training = model.training   # 训练中途由回调调用：量完要恢复 train 模式，否则 dropout 等被悄悄关掉
    model.eval()
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for i in range(0, len(encs), batch_size):
            b = lm.pad_right([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encs[i:i + batch_size]],
                             tok.pad_token_id)
            ids, att = b["input_ids"].to(model.device), b["attention_mask"].to(model.device)
            # 第 t 个位置的 logits 预测第 t+1 个 token：错开一位（lm.token_logprobs 在 fp32 里算 log_softmax）
            nll = -lm.token_logprobs(model(input_ids=ids, attention_mask=att).logits[:, :-1], ids[:, 1:]).cpu()
            resp, valid = b["labels"][:, 1:] != -100, b["attention_mask"][:, 1:].bool()
            for j, sel in enumerate((resp, valid & ~resp)):
                sums[j] += nll[sel].sum().item()
                counts[j] += int(sel.sum())
    model.train(was_training)
    return sums[0] / max(counts[0], 1), sums[1] / max(counts[1], 1)


# %% [markdown]
# ## 4. 训练两次：同一初始化、同样步数、同样数据顺序
#
# 每次都从磁盘重新加载同一份权重；`seed`/`data_seed` 相同，所以两次训练的批次顺序一模一样。
# 回调每隔 `eval_every` 步用上面那把尺子量一次，画出右边的曲线。

# %%
def train_once(args: Args, out: run.Run, name: str, dataset, tok, held_out: list[dict], steps: int,
               lr: float) -> dict:
    """用 TRL SFTTrainer 训练一次，返回训练损失曲线与留出集回复损失曲线。"""
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model, _ = models.load_args(args, for_training=True)
    curve = {"step": [0], "response_loss": [heldout_losses(model, tok, held_out)[0]]}

    class HeldOut(TrainerCallback):
        def on_step_end(self, targs, state, control, model=None, **kw):  # noqa: ANN001
            if state.global_step % args.eval_every == 0 or state.global_step == steps:
                curve["step"].append(state.global_step)
                curve["response_loss"].append(heldout_losses(model, tok, held_out)[0])

    config = SFTConfig(
        output_dir=str(out.path(f"ckpt-{name}")), max_steps=steps, learning_rate=lr,
        per_device_train_batch_size=args.per_device_train_batch_size, max_length=args.max_length,
        logging_steps=1, save_strategy="no", report_to=out.trainer_report_to(), seed=args.seed, data_seed=args.seed,
        disable_tqdm=False, run_name=name,
        # 设备开关（bf16 只在支持的 GPU 上开、use_cpu……）；小模型不需要梯度检查点（它用计算换显存）
        **train.trainer_flags(model, gradient_checkpointing=False, log=name == "assistant_only"),
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok,
                         callbacks=[HeldOut()])
    trainer.train()
    train_loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    resp, prompt = heldout_losses(model, tok, held_out)
    out.log.info(f"{name}: 留出集回复损失 {curve['response_loss'][0]:.3f} → {resp:.3f}，prompt 损失 {prompt:.3f}")
    return {"train_loss": train_loss, "curve": curve, "response_loss": resp, "prompt_loss": prompt}


# %% [markdown]
# ## 5. 主流程
#
# 在笔记本里运行时，最后一格用 `Args(smoke=True)` 跑极小模型；去掉 `smoke=True` 就是默认的 smollm2-135m。

# %%
def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)   # 冒烟：小规模超参数（只换你没改过的），单线程（见 common.run）
    # 在 Jupyter 里没有 __file__：按仓库里的位置算输出目录，与命令行运行时写到同一处
    out = run.start(globals().get("__file__", run.REPO_ROOT / "lesson1_sft/01_sft_basics/sft_theory_notebook.py"),
                    args)
    steps, lr = args.max_steps, args.learning_rate

    # 1. 数据：默认 alpaca 格式 + chat 格式各一份（load_sft 两种都认），切出留出集
    paths = [args.data] if args.data else [data.DATA_DIR / "sft" / "alpaca.jsonl", data.DATA_DIR / "sft" / "chat.jsonl"]
    convs = [c for p in paths for c in data.load_sft(p)]
    train_convs, held_out = data.split(convs, args.val_fraction, args.seed)
    tok = models.load_tokenizer(args.resolved_model(), args.source, args.trust_remote_code)
    out.log.info(f"{len(train_convs)} 条训练对话，{len(held_out)} 条留出")
    held_enc = [data.tokenize_chat(tok, c, args.max_length) for c in held_out[: args.max_eval_samples]]

    # 2. 看一条对话：哪些 token 带损失
    show_loss_mask(tok, train_convs[0], args.max_length)
    assistant_only_ds, full_ds, fraction = build_datasets(tok, train_convs, args.max_length)

    # 3. 两种掩码各训练一次（同一初始化、同样步数、同样数据顺序），用同一把尺子量
    runs = {name: train_once(args, out, name, ds, tok, held_enc, steps, lr)
            for name, ds in (("assistant_only", assistant_only_ds), ("full_sequence", full_ds))}

    # 4. 曲线：左边各自的训练损失（分母不同，不能直接比），右边同一把尺子量的留出集回复损失
    fig, save = out.plot("curves.png")
    left, right = fig.subplots(1, 2)
    for name, r in runs.items():
        left.plot(range(1, len(r["train_loss"]) + 1), r["train_loss"], label=name)
        right.plot(r["curve"]["step"], r["curve"]["response_loss"], marker="o", label=name)
    left.set(title="training loss (own objective)", xlabel="step", ylabel="loss")
    right.set(title="held-out response-token loss", xlabel="step")
    left.legend()
    right.legend()
    save()

    a, f = runs["assistant_only"], runs["full_sequence"]
    return out.finish({
        "assistant_only_eval_loss": round(a["response_loss"], 4),
        "full_sequence_eval_loss": round(f["response_loss"], 4),
        "eval_loss_before": round(a["curve"]["response_loss"][0], 4), "label_token_fraction": round(fraction, 4),
        "assistant_only_prompt_loss": round(a["prompt_loss"], 4),
        "full_sequence_prompt_loss": round(f["prompt_loss"], 4),
        "steps": steps, "train_conversations": len(train_convs), "held_out_conversations": len(held_out),
    }, summary=f"留出集回复损失：assistant-only {a['response_loss']:.3f} vs full-sequence {f['response_loss']:.3f}"
               f"（训练前 {a['curve']['response_loss'][0]:.3f}）；带损失 token 比例 {fraction:.1%}",
        claims=CLAIMS)


# %%
if __name__ == "__main__":
    import sys

    # 在 Jupyter 里 sys.argv 是内核的参数，不是本脚本的：笔记本里直接用冒烟配置运行
    main(Args(smoke=True) if "ipykernel" in sys.modules else cli.parse(Args))
