"""LoRA 微调对话模型（GLM 架构）：冻结原模型，只训练低秩增量，让它记住"我是灵犀"并学会领域问答。

流程：PEFT LoraConfig + get_peft_model 注入 adapter（target_modules 按架构自动选）-> 在身份数据
（data/identity/train.jsonl）+ 电动车领域数据（data/domain/sft.jsonl）上 SFT，只在助手回复上算损失
-> 保存 adapter（几 MB）-> 在新加载的原模型上 PeftModel.from_pretrained 装回 -> merge_and_unload 把
B·A 合进原权重并存成 safetensors -> 核对合并前后 logits 一致 -> 用留出的身份问法（data/identity/eval.jsonl）
贪心生成，比较训练前后的回答。

运行：
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py            # CPU，smollm2-135m，60 步，空闲 2 核实测约 6 分钟
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --smoke    # tiny-glm（GLM-4 架构极小模型），约 35 秒
  python lesson1_sft/05_lora_finetune/lora_chatglm_demo.py --model THUDM/glm-4-9b-chat-hf --source hf \\
      --config configs/lesson1/lora_chatglm_demo_gpu.yaml                 # GPU，bf16
  （zai-org/chatglm3-6b 这类带自定义代码的仓库再加 --trust-remote-code；adapter 注入 query_key_value 等层）

你会看到（smollm2-135m，60 步，空闲 2 核 CPU 实测 355 秒）：可训练参数占 1.78%（adapter 9.4 MB）；留出身份问题的准确率
0.00 -> 0.90（训练前它自称 SmolLem、LinguaLingua，训练后答 "I'm Lingxi…" / "我是灵犀…"）；eval_loss 3.35 -> 1.37；
合并模型与 adapter 的 logits 最大差 1.7e-4（fp32 舍入），重新加载的 adapter 与训练中的模型完全一致（差 0）。
--smoke（tiny-glm，实测 33 秒）：可训练 11.1%，准确率 0.00 -> 0.60，eval_loss 5.59 -> 4.38。图：loss_curve.png。
"""

from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, run
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    lora_r: int = cli.arg(8, "LoRA 秩 r：增量 ΔW = B·A 的秩；越大表达力越强、可训练参数越多")
    lora_alpha: int = cli.arg(16, "缩放系数：实际缩放 alpha / r，r 变了学习率不必重调")
    lora_dropout: float = cli.arg(0.05, "adapter 输入上的 dropout：数据只有几百条，防止死记")
    target_modules: str = cli.arg("auto", "注入哪些层：auto（按架构选，见 TARGETS）/ all-linear / 逗号分隔的名字")
    learning_rate: float = cli.arg(1e-3, "LoRA 学习率：只训练从零开始的小矩阵，可比全参数微调大 10-100 倍")
    max_steps: int = cli.arg(60, "优化器步数（CPU 默认规模：约 2 个 epoch，smollm2 记住身份、回答也变流畅）")
    per_device_train_batch_size: int = cli.arg(8, "每步几条样本")
    warmup_steps: int = cli.arg(3, "预热步数")
    max_length: int = cli.arg(256, "每条样本最多多少 token")
    eval_steps: int = cli.arg(10, "每多少步量一次验证损失（画曲线用）")
    val_fraction: float = cli.arg(0.1, "从训练数据里留出多少比例，和留出的身份问题一起算 eval_loss")
    identity_repeat: int = cli.arg(2, "身份数据重复几遍再和领域数据混合：几十条身份样本混在上百条领域样本里容易被淹没")
    eval_data: str = cli.arg(None, "留出的身份问题（alpaca/chat 格式）；默认 data/identity/eval.jsonl")
    identity_keywords: str = cli.arg("灵犀,Lingxi", "身份关键词（逗号分隔）：回答里出现期望答案所含的那个才算对")
    max_new_tokens: int = cli.arg(40, "生成回答的最大长度（贪心解码）")
    num_threads: int = cli.arg(0, "CPU 线程数；0 = torch 默认（= 核数）；机器很忙时 1 往往更快（--smoke 自动用 1）")
    gradient_checkpointing: bool = cli.arg(False, "用重算换显存：GPU 上的大模型打开；CPU 上忽略")

    smoke_model = "tiny-glm"   # 冒烟用 GLM-4 架构的极小模型，与课名里的 ChatGLM 对应


# --smoke：tiny-glm 只有约 1M 参数，承受得住大学习率；步数刚好让身份关键词稳定地学会
SMOKE = dict(learning_rate=1e-2, max_steps=120, eval_steps=30, lora_r=16, lora_alpha=32,
             max_new_tokens=24, per_device_train_batch_size=16, identity_repeat=3, lora_dropout=0.0, warmup_steps=4)
# 按架构选注入层：注意力 + MLP 的全部投影（只挂 q/v 对"记住新事实"太弱）。名字来自各模型的实现
TARGETS = {
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],  # ChatGLM2/3（自定义代码）
    "glm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],  # GLM-4（transformers 原生）
    "glm4": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def identity_targets(path: Path, convs: list[list[dict]], keywords: list[str]) -> list[str]:
    """每条留出问题期望出现的关键词 = 标准答案里含的那个（中文问"灵犀"，英文问"Lingxi"）。"""
    lines = [no for no, _ in data.read_records(path)]
    out = []
    for no, conv in zip(lines, convs):
        hit = [k for k in keywords if k.lower() in conv[-1]["content"].lower()]
        if not hit:
            raise UserError(f"{path}:{no}: 标准答案里没有任何身份关键词 {keywords}（用 --identity-keywords 指定）")
        out.append(hit[0])
    return out


def generate(model, tok, convs: list[list[dict]], max_new_tokens: int, batch: int = 10) -> list[str]:
    """贪心解码回答每个问题（左填充，批量生成）。"""
    import torch

    tok.padding_side, answers = "left", []
    model.eval()
    for i in range(0, len(convs), batch):
        texts = [data.prompt_text(tok, c) for c in convs[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        answers += [a.strip() for a in tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    tok.padding_side = "right"
    return answers


def accuracy(answers: list[str], targets: list[str]) -> float:
    """回答里（不分大小写）出现期望的身份关键词即为对。"""
    return sum(t.lower() in a.lower() for a, t in zip(answers, targets)) / len(targets)


def main(args: Args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from trl import SFTConfig, SFTTrainer

    args = cli.with_smoke(args, SMOKE)   # 冒烟：小规模超参数（只换你没改过的：--smoke --learning-rate 1e-2 仍生效）
    out = run.start(__file__, args, smoke_threads=1)   # 极小模型的矩阵太小，单线程反而最快（见 common.run）
    if args.num_threads > 0:   # 机器被别的进程占着时，torch 的多个线程互相等待，实测能慢几十倍：可手动改成 1
        torch.set_num_threads(args.num_threads)
        out.log.info(f"CPU 线程数 = {torch.get_num_threads()}")

    # 1. 数据：训练 = 身份 + 领域（或 --data），留出一部分；另有一份从没见过的身份问法
    if args.data:
        train_convs, held_convs = data.split(data.load_sft(args.data), args.val_fraction, args.seed)
    else:   # 领域数据留出一部分算 eval_loss；身份数据的留出集是下面那份从没见过的问法
        domain_train, held_convs = data.split(data.load_sft(data.DATA_DIR / "domain" / "sft.jsonl"),
                                              args.val_fraction, args.seed)
        train_convs = data.load_sft(data.DATA_DIR / "identity" / "train.jsonl") * args.identity_repeat + domain_train
    eval_path = Path(args.eval_data) if args.eval_data else data.DATA_DIR / "identity" / "eval.jsonl"
    id_convs = data.load_sft(eval_path)
    keywords = [k.strip() for k in args.identity_keywords.split(",") if k.strip()]
    targets = identity_targets(eval_path, id_convs, keywords)
    model, tok = models.load(out.model_name, source=args.source, device=args.device, dtype=args.dtype,
                             trust_remote_code=args.trust_remote_code, for_training=True)

    def encode(convs: list[list[dict]]) -> Dataset:
        rows = [data.tokenize_chat(tok, c, args.max_length) for c in convs]   # labels 只留助手回复
        return Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows
                                  if any(x != -100 for x in r["labels"])])

    train_ds, eval_ds = encode(train_convs), encode(held_convs + id_convs)
    out.log.info(f"训练 {len(train_ds)} 条；验证 {len(eval_ds)} 条（留出 {len(held_convs)} + 新身份问法 {len(id_convs)}）")

    # 2. 训练前：原模型怎么回答"你是谁"？（smollm2 会说自己是 SmolLM）
    answers_before = generate(model, tok, id_convs, args.max_new_tokens)
    acc_before = accuracy(answers_before, targets)
    out.log.info(f"训练前身份准确率 {acc_before:.2f}；例：{id_convs[0][-2]['content']} -> {answers_before[0][:60]}")

    # 3. 注入 LoRA：原权重全部冻结，只有每个目标 Linear 旁边的 A（r×d_in）、B（d_out×r）可训练
    mtype = model.config.model_type
    if args.target_modules == "auto":
        targets_mod = TARGETS.get(mtype, "all-linear")   # 不认识的架构：除 lm_head 外所有 Linear
    else:
        targets_mod = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
    out.log.info(f"架构 {mtype}：LoRA 注入 target_modules = {targets_mod}")
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=targets_mod, task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:   # 名字写错时 PEFT 的报错很长，这里说清是哪个参数
        raise UserError(f"--target-modules {args.target_modules}: {str(e).splitlines()[0][:200]}") from None
    trainable, total = model.get_nb_trainable_parameters()
    out.log.info(f"可训练参数 {trainable:,d} / {total:,d} = {trainable / total:.2%}（r={args.lora_r}）")

    # 4. 训练：B 初始化为 0，所以训练前的 eval_loss 就是原模型的
    on_gpu = next(model.parameters()).device.type == "cuda"
    if not on_gpu:
        out.log.info("CPU 训练：fp32，不开 bf16 混合精度与梯度检查点（这两项只在 CUDA 上有意义）")
    cfg = SFTConfig(
        output_dir=str(out.path("trainer")), seed=args.seed, data_seed=args.seed, max_steps=args.max_steps,
        learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=args.warmup_steps,
        per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=16,
        max_length=args.max_length, eval_strategy="steps", eval_steps=args.eval_steps, logging_steps=1,
        save_strategy="no", report_to=out.trainer_report_to(), bf16=on_gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=on_gpu and args.gradient_checkpointing, use_cpu=not on_gpu, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    out.log.info(f"eval_loss {before:.4f} -> {after:.4f}")

    # 5. 只保存 adapter：adapter_config.json + adapter_model.safetensors，原模型不用再存一份
    adapter_dir = out.path("adapter")
    model.save_pretrained(adapter_dir)
    size_mb = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20
    out.log.info(f"adapter 已保存到 {adapter_dir}（{size_mb:.2f} MB）")

    # 6. 部署时的做法：新加载原模型 -> 装上 adapter -> merge_and_unload 把 scale·B·A 加进 W，推理不再多一次矩阵乘
    probe = tok([data.prompt_text(tok, c) + c[-1]["content"] for c in id_convs[:8]], return_tensors="pt",
                padding=True, add_special_tokens=False)
    mask = probe["attention_mask"].bool()
    base, _ = models.load(out.model_name, source=args.source, device=args.device, dtype=args.dtype,
                          trust_remote_code=args.trust_remote_code, for_training=True)   # 与训练同精度
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
    out.log.info(f"max |Δlogit|：重新加载 vs 训练中 {reload_diff:.2e}；合并 vs adapter {merge_diff:.2e}")
    merged_dir = out.path("merged")
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tok.save_pretrained(merged_dir)

    # 7. 训练后：用合并好的模型（就是要部署的那个）回答同样的留出问题
    answers_after = generate(merged, tok, id_convs, args.max_new_tokens)
    acc_after = accuracy(answers_after, targets)

    # 8. 曲线：训练损失 + 每次评估的验证损失
    hist = trainer.state.log_history
    fig, save = out.plot("loss_curve.png")
    ax = fig.add_subplot(111)
    ax.plot([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h], label="train loss")
    ax.plot(*zip(*[(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens only)")   # 英文标签：不依赖系统里有中文字体（CI 与很多服务器没有）
    ax.set_title(f"LoRA SFT: {out.model_name}, r={args.lora_r}, identity accuracy {acc_before:.2f} -> {acc_after:.2f}")
    ax.legend()
    save()

    picks = sorted({0, 1, len(id_convs) // 2, len(id_convs) - 1})   # 中文、英文各几条
    samples = [{"question": id_convs[i][-2]["content"], "before": answers_before[i], "after": answers_after[i]}
               for i in picks]
    for s in samples:
        out.log.info(f"{s['question']}\n  训练前: {s['before'][:80]}\n  训练后: {s['after'][:80]}")
    return out.finish({
        "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4),
        "identity_accuracy_before": acc_before, "identity_accuracy_after": acc_after,
        "trainable_ratio": round(trainable / total, 5), "trainable_params": trainable, "total_params": total,
        "merged_matches_adapter": merge_diff, "adapter_reload_max_diff": reload_diff,
        "target_modules": targets_mod, "adapter_mb": round(size_mb, 2), "steps": trainer.state.global_step,
        "samples": samples,
    }, summary=f"身份准确率 {acc_before:.2f} -> {acc_after:.2f}，eval_loss {before:.3f} -> {after:.3f}，"
               f"可训练 {trainable / total:.2%}，合并 vs adapter max|Δlogit| {merge_diff:.1e}")


if __name__ == "__main__":
    main(cli.parse(Args))
