"""QLoRA 监督微调：底座以 4-bit NF4 存放并冻结，只训练挂在所有 Linear 上的 LoRA（梯度穿过反量化的权重）。

QLoRA 配方（Dettmers et al. 2023）的每一项都在这里：
- BitsAndBytesConfig(load_in_4bit, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=bf16)：权重 4-bit 存放，矩阵乘时逐块反量化成计算精度；
- prepare_model_for_kbit_training：冻结底座、把非量化参数（norm、embedding）升到 fp32、打开梯度检查点；
- LoRA target_modules="all-linear"：论文发现只挂 q/v 不够，所有 Linear 都挂才追上 16-bit 全参数微调；
- paged AdamW（optim="paged_adamw_8bit"）：优化器状态放在统一内存里，显存峰值时自动换页到 CPU——只有 CUDA 有，
  CPU 上改用 adamw_torch 并打一行日志；
- TRL SFTTrainer，只在助手回复上算损失；保存 adapter，再在一个新加载的 4-bit 底座上装回，核对输出一致。

运行：
  python lesson2_qlora_ptuning/02_qlora_pipeline/qlora_trainer.py            # smollm2-135m 4-bit，CPU
  python lesson2_qlora_ptuning/02_qlora_pipeline/qlora_trainer.py --smoke    # tiny-llama 4-bit
  python lesson2_qlora_ptuning/02_qlora_pipeline/qlora_trainer.py --model Qwen/Qwen2.5-7B-Instruct --source hf \\
      --config configs/lesson2/qlora_trainer_gpu.yaml                          # GPU：7B QLoRA，单卡 24 GB 够用
  --data my_sft.jsonl：你自己的 SFT 数据（alpaca 或 chat messages，格式见 data/README.md）

你会看到（实测）：smollm2-135m 的 4-bit 权重 106 MB，bf16 257 MB，fp32 513 MB（footprint_ratio_4bit = 0.207）。
--smoke（tiny-llama）：footprint 0.317，eval_loss 5.59 -> 5.02，峰值内存 +69 MB，adapter 0.30 MB 装回新 4-bit 底座后
max|Δlogit| ≈ 1e-2。默认（smollm2，30 步，空闲 2 核 CPU 4 分钟）：eval_loss 3.76 -> 2.09，峰值内存 +926 MB，46 token/s，
adapter 9.4 MB 装回新 4-bit 底座后 max|Δlogit| 6e-3。图：loss_curve.png。
"""
import math
import time
from dataclasses import dataclass

from common import cli, data, models, run, train
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    lora_r: int = cli.arg(16, "LoRA 秩（QLoRA 论文用 64；小模型 16 足够）", min=1)
    lora_alpha: int = cli.arg(32, "缩放系数，实际缩放 alpha / r", min=1)
    lora_dropout: float = cli.arg(0.05, "adapter 输入上的 dropout", min=0, max=1)
    learning_rate: float = cli.arg(5e-4, "LoRA 学习率（QLoRA 论文：7B/13B 用 2e-4，模型越小可以越大）", min=0)
    max_steps: int = cli.arg(30, "优化器步数", min=1)
    per_device_train_batch_size: int = cli.arg(4, "每步几条样本", min=1)
    gradient_accumulation_steps: int = cli.arg(1, "梯度累积：显存不够放大 batch 时用", min=1)
    max_length: int = cli.arg(256, "每条样本最多多少 token", min=8)
    val_fraction: float = cli.arg(0.1, "留出多少比例算 eval_loss", min=0, max=1)
    gradient_checkpointing: bool = cli.arg(True, "梯度检查点：QLoRA 的标配，用重算换激活内存")
    optim: str = cli.arg("paged_adamw_8bit", "优化器；paged_* 只在 CUDA 上有，CPU 上自动换成 adamw_torch",
                         choices=["paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_8bit"])
    double_quant: bool = cli.arg(True, "双重量化：absmax 常数再量化成 8 bit，每参数再省约 0.37 bit")

    smoke_model = "tiny-llama"


# --smoke：1M 参数的 tiny-llama 承受得住大学习率；步数刚好让 eval_loss 明显下降
SMOKE = dict(learning_rate=1e-2, max_steps=30, per_device_train_batch_size=8, max_length=128)


def skip_modules_for_cpu(path, blocksize: int = 64) -> list[str]:
    """bitsandbytes 0.50 的 CPU 反量化内核在每行长度不是 blocksize 倍数时算错（见第 2 课 01）：这些层不量化。"""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():   # 只建结构（meta 张量），不占内存
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    names = {n.split(".")[-1] for n, m in meta.named_modules()
             if isinstance(m, torch.nn.Linear) and m.in_features % blocksize}
    return sorted(names | {"lm_head"})


def load_4bit(args: Args, log):
    """按 QLoRA 配方 4-bit 加载；CPU 上计算精度用 fp32（没有 bf16 矩阵核的 CPU 上 bf16 更慢）。"""
    import torch
    from transformers import BitsAndBytesConfig

    cuda = models.pick_device(args.device).type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    skip = None if cuda else skip_modules_for_cpu(models.resolve(args.resolved_model(), args.source))
    if skip and skip != ["lm_head"]:
        log.info(f"CPU：bitsandbytes 的 CPU 反量化内核对行长不是 64 倍数的矩阵有错，{skip} 保持 bf16 不量化")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=args.double_quant,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    # 非量化部分（embedding、norm）按 QLoRA 的做法用 bf16 存；prepare_model_for_kbit_training 训练前再升到 fp32
    model, tok = models.load(args.resolved_model(), source=args.source, device=args.device,
                             dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                             trust_remote_code=args.trust_remote_code, quantization_config=qcfg,
                             device_map={"": 0} if cuda else {"": "cpu"})
    if not cuda:
        # bitsandbytes 0.50 在 CPU 上第一次"推理式"前向（eval + no_grad，比如训练前的 evaluate）时会把权重永久改成
        # AVX512-BF16 的打包格式，之后的前向都走没有注册反向的 gemv_4bit：梯度不再穿过底座权重，LoRA 学不动。
        # 训练用的模型关掉这条推理快路径，始终走可反向的"反量化 + 矩阵乘"
        import bitsandbytes as bnb

        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        log.info("CPU：关闭 bitsandbytes 的 AVX512-BF16 推理打包（它之后的前向不能反向传播），始终走反量化 + 矩阵乘")
    return model, tok


def footprint(model) -> tuple[float, int]:
    """模型权重实际占的字节（4-bit 层：打包的码 + absmax + 二级常数）与原始参数个数。"""
    import bitsandbytes as bnb

    nbytes, params, seen = 0, 0, set()
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if id(p) in seen:   # 绑定的 embedding / lm_head 是同一个张量，只算一次
                continue
            seen.add(id(p))
            if isinstance(m, bnb.nn.Linear4bit) and p is m.weight:
                st = p.quant_state
                params += math.prod(st.shape)
                nbytes += p.numel() * p.element_size() + st.absmax.numel() * st.absmax.element_size()
                if st.nested:
                    nbytes += st.state2.absmax.numel() * 4 + 4
            else:
                params += p.numel()
                nbytes += p.numel() * p.element_size()
    return nbytes, params


def main(args: Args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)

    # 1. 数据：SFT（alpaca 或 chat），先读先校验（坏数据在加载模型前就报错），只在助手回复上算损失
    path = args.data or data.DATA_DIR / "domain" / "sft.jsonl"
    train_convs, eval_convs = data.split(data.load_sft(path), args.val_fraction, args.seed)
    if not args.data:   # 默认：领域问答 + 身份认知（训练两遍），验证 = 留出的领域问答 + 从没见过的身份问法
        train_convs += data.load_sft(data.DATA_DIR / "identity" / "train.jsonl") * 2
        eval_convs += data.load_sft(data.DATA_DIR / "identity" / "eval.jsonl")

    # 2. 4-bit 加载，量权重占多少：4-bit vs 同一模型的 fp32 / bf16
    model, tok = load_4bit(args, out.log)
    nbytes, params = footprint(model)
    fp32, bf16 = params * 4, params * 2
    ratio = nbytes / fp32
    out.log.info(f"权重占用：4-bit {nbytes / 2**20:.1f} MB，bf16 {bf16 / 2**20:.1f} MB，fp32 {fp32 / 2**20:.1f} MB"
                 f"（4-bit / fp32 = {ratio:.3f}；没量化的 embedding 与 norm 占了剩下的大头）")

    def encode(convs):
        rows = [data.tokenize_chat(tok, c, args.max_length) for c in convs]
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows if any(x != -100 for x in r["labels"])]
        if not rows:
            raise UserError(f"{path}: 截断到 --max-length {args.max_length} 后没有一条样本还留着助手回复")
        return Dataset.from_list(rows)

    train_ds, eval_ds = encode(train_convs), encode(eval_convs)

    # 3. QLoRA 准备：冻结 4-bit 底座、非量化参数升 fp32、梯度检查点；LoRA 挂在所有 Linear 上
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    out.log.info(f"可训练 {trainable:,d} / {total:,d} = {trainable / total:.2%}")

    # 4. 训练：paged AdamW 只在 CUDA 上有
    flags = train.trainer_flags(model, gradient_checkpointing=args.gradient_checkpointing)
    optim = args.optim
    if optim.startswith(("paged_", "adamw_8bit")) and flags["use_cpu"]:
        optim = "adamw_torch"
        out.log.info(f"CPU：{args.optim} 需要 CUDA（分页内存 / 8-bit 优化器内核），改用 adamw_torch")
    cfg = SFTConfig(output_dir=str(out.path("trainer")), seed=args.seed, data_seed=args.seed, max_steps=args.max_steps,
                    learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=2, optim=optim,
                    per_device_train_batch_size=args.per_device_train_batch_size, per_device_eval_batch_size=8,
                    gradient_accumulation_steps=args.gradient_accumulation_steps, max_length=args.max_length,
                    logging_steps=1, eval_strategy="no", save_strategy="no", report_to=out.trainer_report_to(),
                    include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, **flags)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok)
    before = trainer.evaluate()["eval_loss"]
    with train.PeakMemory(train.device_of(model)) as mem:
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
    after = trainer.evaluate()["eval_loss"]
    tps = trainer.state.num_input_tokens_seen / secs
    out.log.info(f"eval_loss {before:.4f} -> {after:.4f}；训练峰值内存 +{mem.peak_mb:.0f} MB；{tps:.0f} token/s")

    # 5. 只存 adapter，在新加载的 4-bit 底座上装回：输出应与训练中的模型一致
    adapter_dir = out.path("adapter")
    model.save_pretrained(adapter_dir)
    adapter_mb = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20
    base, _ = load_4bit(args, out.log)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)   # 与训练时同样的精度
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    probe = eval_ds[:4]["input_ids"]
    with torch.no_grad():
        model.eval()
        ids = torch.tensor([p[:32] for p in probe if len(p) >= 32] or [probe[0]], device=train.device_of(model))
        trained = model(input_ids=ids).logits.float()
        diff = (trained - reloaded(input_ids=ids).logits.float()).abs().max().item()
        with reloaded.disable_adapter():   # 同一个底座去掉 adapter：看 adapter 本身改变了多少
            effect = (trained - reloaded(input_ids=ids).logits.float()).abs().max().item()
    out.log.info(f"adapter {adapter_mb:.2f} MB；重新加载到新 4-bit 底座后 max|Δlogit| = {diff:.2e}"
                 f"（adapter 本身带来的变化 {effect:.2f}）")

    hist = trainer.state.log_history
    fig, save = out.plot("loss_curve.png")
    ax = fig.add_subplot(111)
    ax.plot([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h], label="train loss")
    ax.axhline(before, color="C1", ls=":", label=f"eval loss before {before:.2f}")
    ax.axhline(after, color="C2", ls="--", label=f"eval loss after {after:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"QLoRA (NF4 base, LoRA all-linear): {out.model_name}, 4-bit/fp32 = {ratio:.2f}")
    ax.legend()
    save()
    return out.finish({
        "footprint_ratio_4bit": round(ratio, 4), "footprint_mb_4bit": round(nbytes / 2**20, 2),
        "footprint_mb_bf16": round(bf16 / 2**20, 2), "footprint_mb_fp32": round(fp32 / 2**20, 2),
        "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4),
        "peak_mem_mb": round(mem.peak_mb, 1), "tokens_per_s": round(tps, 1), "optim": optim,
        "trainable_params": trainable, "adapter_mb": round(adapter_mb, 2), "reload_max_diff": diff,
        "adapter_effect_max_diff": effect,
        "steps": trainer.state.global_step,
    }, summary=f"4-bit 权重 = fp32 的 {ratio:.2f}；eval_loss {before:.3f} -> {after:.3f}；峰值内存 +{mem.peak_mb:.0f} MB；"
               f"{tps:.0f} token/s")


if __name__ == "__main__":
    main(cli.parse(Args))
