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
      --config configs/lesson2/qlora_trainer_gpu.yaml                          # GPU：7B QLoRA 单卡（显存估算见 06）
  --data my_sft.jsonl：你自己的 SFT 数据（alpaca 或 chat messages，格式见 data/README.md）。训练前一行说清条数、长度、
  几条超过 --max-length；第 1 步后报预计用时，超过 --max-train-minutes 先评估 + 保存再停；按验证损失留最好的一步。

你会看到：4-bit 加载后数出的底座字节只有同一模型 fp32 的一小部分（footprint_ratio_4bit；比 4/32 高，因为 embedding、
norm 不量化，每块还要存 absmax）；梯度穿过反量化的 4-bit 权重训练 LoRA，留出集 eval_loss 明显下降（训练前 = 4-bit 底座
本身），按验证损失保留最好的一步；可训练参数只占底座的一小部分；adapter 存盘后装回一个新加载的 4-bit 底座，
输出与训练中的模型一致。训练时的峰值内存增量与吞吐在 metrics.json（peak_mem_mb、tokens_per_s）。
图：loss_curve.png（竖线 = 保留的那一步）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：2.8 分钟，2.2 GB，结论 4/4 成立
  ✓ 4-bit 底座省内存：4-bit 加载后实际存储的字节 / 同一模型 fp32 的字节：0.2072（≤ 0.3）
  ✓ 梯度穿过 4-bit 权重训练 LoRA，降低留出集损失：训练后 / 训练前（训练前 = 4-bit 底座本身）：0.5545（≤ 0.7）
  ✓ 只训练一小部分参数：LoRA 可训练参数 / 底座参数：0.03631（≤ 0.05）
  ✓ adapter 存盘后装回新的 4-bit 底座复现训练中的模型：装回误差 / adapter 本身带来的变化（max|Δlogit|）：0（≤ 0.05）
<!-- /results -->
"""
import math
from dataclasses import dataclass

from common import cli, data, models, run, train
from common.errors import UserError, brief


@dataclass
class Args(cli.CommonArgs):
    lora_r: int = cli.arg(16, "LoRA 秩（QLoRA 论文用 64；小模型 16 足够）", min=1)
    # alpha = 2r（缩放 2，与 06 里 lora_alpha=2·r 同一约定）：只改 r 不改 alpha，缩放 alpha/r 跟着变，
    # 等于悄悄换了学习率
    lora_alpha: int = cli.arg(32, "缩放系数，实际缩放 alpha / r", min=1)
    lora_dropout: float = cli.arg(0.05, "adapter 输入上的 dropout", min=0, max=1)
    learning_rate: float = cli.arg(5e-4, "LoRA 学习率（QLoRA 论文：7B/13B 用 2e-4，模型越小可以越大）")
    max_steps: int = cli.arg(30, "优化器步数", min=1)
    per_device_train_batch_size: int = cli.arg(4, "每步几条样本（打包时按 token 数换算成行数）", min=1)
    gradient_accumulation_steps: int = cli.arg(1, "梯度累积：显存不够放大 batch 时用", min=1)
    micro_batch_tokens: int = cli.arg(1024, "一次前向最多多少 token，多了就拆成几次前向累积梯度（长数据省激活内存）",
                                      min=16)
    max_length: int = cli.arg(256, "每条样本最多多少 token", min=8)
    over_length: str = cli.arg("truncate", "超过 --max-length 的样本：truncate 截断（回答结尾丢失）/ drop 丢弃",
                               choices=["truncate", "drop"])
    packing: bool = cli.arg(False, "padding-free 打包（第 1 课 05）；默认关，与 QLoRA 论文的逐条填充一致")
    val_fraction: float = cli.arg(0.1, "留出多少比例算 eval_loss", min=0, max=1)
    eval_steps: int = cli.arg(0, "每多少步评估并存一次 adapter；0 = 自动（评估开销 ≤ 训练的 1/10，至少 2 次）", min=0)
    max_train_minutes: float = cli.arg(10.0, "训练时间预算（分钟，含评估）：超时先评估 + 保存再停；0 = 不限", min=0)
    gradient_checkpointing: bool = cli.arg(True, "梯度检查点：QLoRA 的标配，用重算换激活内存")
    optim: str = cli.arg("paged_adamw_8bit", "优化器；paged_* 只在 CUDA 上有，CPU 上自动换成 adamw_torch",
                         choices=["paged_adamw_8bit", "paged_adamw_32bit", "adamw_torch", "adamw_8bit"])
    double_quant: bool = cli.arg(True, "双重量化：absmax 常数再量化成 8 bit，每参数再省约 0.37 bit")

    # tiny-llama 的 intermediate_size 是 352，不是 64 的倍数：冒烟时 skip_modules_for_cpu 的 down_proj 分支也被走到
    smoke_model = "tiny-llama"


# --smoke：1M 参数的 tiny-llama 承受得住大学习率；步数刚好让 eval_loss 明显下降
SMOKE = dict(learning_rate=1e-2, max_steps=30, per_device_train_batch_size=8, max_length=128)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测
CLAIMS = [
    # 理想是 4.127/32 ≈ 0.13；embedding、norm（CPU 上还有跳过的 down_proj）不量化，门槛放到 0.3；
    # 极小模型词表 3072 × 128 的 embedding 占全部参数的三分之一左右，冒烟再放宽到 0.35
    run.Claim("4-bit 底座省内存：4-bit 加载后实际存储的字节 / 同一模型 fp32 的字节",
              "footprint_mb_4bit / footprint_mb_fp32", "<=", 0.35, 0.3),
    run.Claim("梯度穿过 4-bit 权重训练 LoRA，降低留出集损失：训练后 / 训练前（训练前 = 4-bit 底座本身）",
              "eval_loss_after / eval_loss_before", "<=", 0.95, 0.7),
    # 极小模型 hidden 只有 128，r=16 的低秩增量相对就大（约 13%）；smollm2 上约 3.6%
    run.Claim("只训练一小部分参数：LoRA 可训练参数 / 底座参数",
              "trainable_params / base_params", "<=", 0.2, 0.05),
    run.Claim("adapter 存盘后装回新的 4-bit 底座复现训练中的模型：装回误差 / adapter 本身带来的变化（max|Δlogit|）",
              "reload_max_diff / adapter_effect_max_diff", "<=", 0.05, 0.05),
]


def skip_modules_for_cpu(args: Args, blocksize: int = 64) -> list[str]:
    """bitsandbytes 0.50 的 CPU 反量化内核在每行长度不是 blocksize 倍数时算错（见第 2 课 01）：这些层不量化。"""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    # 先查模型目录（FIFO、坏 JSON、万层嵌套、没有权重都是一行），再读 config：这里比加载模型还早
    path = models.check_dir(models.resolve(args.resolved_model(), args.source),
                            trust_remote_code=args.trust_remote_code)
    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers 对坏配置（NaN 尺寸、不认识的 model_type）抛的异常各不相同
        raise UserError(f"--model {args.resolved_model()}: config.json 不是能用的模型配置"
                        f"（{brief(e)}）") from None
    with init_empty_weights():   # 只建结构（meta 张量），不占内存
        meta = AutoModelForCausalLM.from_config(cfg)
    # 只留最后一段名字（如 down_proj）：transformers 按后缀匹配 llm_int8_skip_modules，各层同名的 Linear 一起跳过；
    # 看 in_features（每行的长度）：bitsandbytes CPU 内核按行反量化，行长不是 64 倍数的层才出错
    names = {n.split(".")[-1] for n, m in meta.named_modules()
             if isinstance(m, torch.nn.Linear) and m.in_features % blocksize}
    # lm_head 一并列上：给了 llm_int8_skip_modules，transformers 就不再加它默认跳过的输出层，不写就会被量化
    return sorted(names | {"lm_head"})


def load_4bit(args: Args, log):
    """按 QLoRA 配方 4-bit 加载；CPU 上计算精度用 fp32（没有 bf16 矩阵核的 CPU 上 bf16 更慢）。"""
    import torch
    from transformers import BitsAndBytesConfig

    cuda = models.pick_device(args.device).type == "cuda"
    compute = torch.bfloat16 if cuda else torch.float32
    skip = None if cuda else skip_modules_for_cpu(args)
    if skip and skip != ["lm_head"]:
        log.info(f"CPU：bitsandbytes 的 CPU 反量化内核对行长不是 64 倍数的矩阵有错，{skip} 保持 bf16 不量化")
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=args.double_quant,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    # 非量化部分（embedding、norm）按 QLoRA 的做法用 bf16 存；prepare_model_for_kbit_training 训练前再升到 fp32
    model, tok = models.load(args.resolved_model(), source=args.source, device=args.device,
                             dtype="bfloat16" if args.dtype == "auto" else args.dtype,
                             trust_remote_code=args.trust_remote_code, quantization_config=qcfg,
                             # device_map 必须在加载时给：bitsandbytes 边加载边量化，models.load 对量化模型不再 .to()
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
                # 存的是打包的 4-bit 码（两个一字节）+ 每 64 个数一个 absmax：只数 numel 会把 4-bit 算成 8-bit
                st = p.quant_state
                params += math.prod(st.shape)
                nbytes += p.numel() * p.element_size() + st.absmax.numel() * st.absmax.element_size()
                if st.nested:   # 双重量化：absmax 自己再量化成 8 bit，另存一组二级常数
                    nbytes += st.state2.absmax.numel() * 4 + 4
            else:
                # 非 4-bit 的参数（embedding、norm、跳过的层）按实际 dtype 的字节数算
                params += p.numel()
                nbytes += p.numel() * p.element_size()
    return nbytes, params


def encode(args: Args, tok, convs: list, path, report: bool = False) -> tuple[list[dict], dict]:
    """对话 -> 只在助手回复上算损失的 token 行。先不截断：训练集先数清几条超过 --max-length（一行日志），再按
    --over-length 截断或丢弃——截掉的是回答的结尾，模型学不会收尾，所以要让人看见。"""
    # 10**9 当作不截断：length_report 要看到原始长度，才说得清几条超长、丢掉多少回答 token
    encoded = [data.tokenize_chat(tok, c, 10**9) for c in convs]
    stats = train.length_report(encoded, args.max_length, args.over_length) if report else {}
    # 留出集只截断不丢：--over-length drop 是训练集的选择，留出集的条数不该跟着它变
    rows = train.truncate(encoded, args.max_length, args.over_length if report else "truncate")
    if not rows:
        raise UserError(f"{path}: 截断到 --max-length {args.max_length} 后没有一条样本还留着助手回复")
    return rows, stats


def qlora_model(model, args: Args, log):
    """QLoRA 准备：冻结 4-bit 底座、非量化参数升 fp32、梯度检查点；LoRA 挂在所有 Linear 上。"""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    # 非重入检查点：底座冻结、只有 LoRA 要梯度时，重入实现可能让梯度传不回 adapter（见 train.trainer_flags）
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False   # 打包时必须：有 KV 缓存时 transformers 不按 position_ids 识别段落边界
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    # PEFT 数 Params4bit 时把打包的字节数 ×2 还原成参数个数：total 与 fp32 模型的参数量同口径
    trainable, total = model.get_nb_trainable_parameters()
    log.info(f"可训练 {trainable:,d} / {total:,d} = {trainable / total:.2%}")
    return model, trainable


def build_trainer(args: Args, out, model, tok, rows: list[dict], eval_rows: list[dict]):
    """SFTTrainer：一次前向 ≤ --micro-batch-tokens（多的梯度累积），评估开销 ≤ 10%，按 eval_loss 留最好的一步。"""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    flags = train.trainer_flags(model, gradient_checkpointing=args.gradient_checkpointing)
    # 分页优化器靠 CUDA 统一内存在显存尖峰时把优化器状态换页到 CPU；CPU 上没有这回事，换成普通 AdamW
    optim = args.optim
    if optim.startswith(("paged_", "adamw_8bit")) and flags["use_cpu"]:   # paged AdamW 只在 CUDA 上有
        optim = "adamw_torch"
        out.log.info(f"CPU：{args.optim} 需要 CUDA（分页内存 / 8-bit 优化器内核），改用 adamw_torch")
    mean = sum(len(r["input_ids"]) for r in rows) / len(rows)
    # 打包后一行装 max_length 个 token：按 token 数换算行数，一步看到的样本数与不打包时相当，学习率不用重调
    per_step = max(1, round(args.per_device_train_batch_size * mean / args.max_length)) if args.packing \
        else args.per_device_train_batch_size
    # 不打包时按最长的一条估：批内右填充到最长，最长的那条决定一次前向的 token 数
    width = args.max_length if args.packing else max(len(r["input_ids"]) for r in rows)
    # 长回答数据一次前向的 logits 是 token 数 × 词表：超过 --micro-batch-tokens 就拆成几次前向、累积梯度，一步的梯度不变
    per_fwd, accum = train.micro_batches(per_step, width, args.micro_batch_tokens)
    every = args.eval_steps or train.eval_schedule(
        args.max_steps, sum(len(r["input_ids"]) for r in eval_rows), round(per_step * mean))[1]
    cfg = SFTConfig(output_dir=str(out.path("trainer")), seed=args.seed, data_seed=args.seed, max_steps=args.max_steps,
                    learning_rate=args.learning_rate, lr_scheduler_type="cosine", warmup_steps=2, optim=optim,
                    per_device_train_batch_size=per_fwd, per_device_eval_batch_size=8,
                    gradient_accumulation_steps=accum * args.gradient_accumulation_steps,
                    # 打包时 max_length=None：行已由 train.pack 装到 ≤ max_length，不必再截；只数非填充 token，
                    # main 里的 tokens_per_s 才不被 padding 抬高；打包时 Trainer 不许删 seq_lengths 列
                    # （remove_unused_columns=False），PackedCollator 要靠它给每段的 position_ids 归零；
                    # skip_prepare_dataset：行已经是 token，别让 TRL 再分词一遍
                    max_length=None if args.packing else args.max_length, logging_steps=1,
                    report_to=out.trainer_report_to(), include_num_input_tokens_seen="non_padding",
                    dataloader_num_workers=0, remove_unused_columns=not args.packing,
                    dataset_kwargs={"skip_prepare_dataset": True} if args.packing else None,
                    **train.best_step_args(every), **flags)
    trainer = SFTTrainer(model=model, args=cfg, processing_class=tok, eval_dataset=Dataset.from_list(eval_rows),
                         train_dataset=train.pack(rows, args.max_length) if args.packing else Dataset.from_list(rows),
                         **({"data_collator": train.PackedCollator(tok.pad_token_id)} if args.packing else {}))
    return trainer, optim


def reload_check(args: Args, out, model, eval_rows: list[dict]) -> dict:
    """只存 adapter，在新加载的 4-bit 底座上装回：输出应与训练中的模型一致（差异远小于 adapter 本身带来的变化）。"""
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training

    adapter_dir = out.path("adapter")
    model.save_pretrained(adapter_dir)
    base, _ = load_4bit(args, out.log)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)   # 与训练时同样的精度
    reloaded = PeftModel.from_pretrained(base, adapter_dir).eval()
    probe = [r["input_ids"] for r in eval_rows[:4]]
    with torch.no_grad():
        # eval 关掉 LoRA dropout：否则两次前向的差里混着随机的 dropout，量不出真正的装回误差
        model.eval()
        # 都截成 32 个 token：等长才能堆成一个批、不用填充，填充位的 logits 不会混进 max|Δ|
        ids = torch.tensor([p[:32] for p in probe if len(p) >= 32] or [probe[0]], device=train.device_of(model))
        trained = model(input_ids=ids).logits.float()
        diff = (trained - reloaded(input_ids=ids).logits.float()).abs().max().item()
        with reloaded.disable_adapter():   # 同一个底座去掉 adapter：看 adapter 本身改变了多少
            effect = (trained - reloaded(input_ids=ids).logits.float()).abs().max().item()
    adapter_mb = sum(f.stat().st_size for f in adapter_dir.iterdir()) / 2**20
    out.log.info(f"adapter {adapter_mb:.2f} MB；重新加载到新 4-bit 底座后 max|Δlogit| = {diff:.2e}"
                 f"（adapter 本身带来的变化 {effect:.2f}）")
    return {"adapter_mb": round(adapter_mb, 2), "reload_max_diff": diff, "adapter_effect_max_diff": effect}


def plot_curve(out, hist: list[dict], m: dict, ratio: float) -> None:
    """训练损失 + 训练前 / 每次评估的验证损失；竖线 = 装回的那一步。"""
    fig, save = out.plot("loss_curve.png")
    ax = fig.add_subplot(111)
    ax.plot([h["step"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h], label="train loss")
    # 训练前的 eval_loss 画在第 0 步：曲线从 4-bit 底座本身出发，看得出 LoRA 改了多少
    ax.plot(*zip(*([(0, m["eval_loss_before"])] + [tuple(e) for e in m["eval_history"]])), "o-", label="eval loss")
    ax.axvline(m["kept_step"], color="gray", ls="--", label=f"kept step {m['kept_step']}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(f"QLoRA (NF4 base, LoRA all-linear): {out.model_name}, 4-bit/fp32 = {ratio:.2f}")
    ax.legend()
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 数据：SFT（alpaca 或 chat），先读先校验（坏数据在加载模型前就报错），只在助手回复上算损失
    path = args.data or data.DATA_DIR / "domain" / "sft.jsonl"
    train_convs, eval_convs = data.split(data.load_sft(path), args.val_fraction, args.seed)
    if not args.data:   # 默认：领域问答 + 身份认知（训练两遍），验证 = 留出的领域问答 + 从没见过的身份问法
        train_convs += data.load_sft(data.DATA_DIR / "identity" / "train.jsonl") * 2
        eval_convs += data.load_sft(data.DATA_DIR / "identity" / "eval.jsonl")

    # 2. 4-bit 加载，量权重占多少：4-bit vs 同一模型的 fp32 / bf16
    model, tok = load_4bit(args, out.log)
    nbytes, params = footprint(model)
    # fp32 / bf16 按原参数个数 × 4 / 2 字节推算，不必再加载两遍：稠密存储没有别的开销
    fp32, bf16 = params * 4, params * 2
    ratio = nbytes / fp32
    out.log.info(f"权重占用：4-bit {nbytes / 2**20:.1f} MB，bf16 {bf16 / 2**20:.1f} MB，fp32 {fp32 / 2**20:.1f} MB"
                 f"（4-bit / fp32 = {ratio:.3f}；没量化的 embedding 与 norm 占了剩下的大头）")
    rows, stats = encode(args, tok, train_convs, path, report=True)   # 训练前一行：几条超长、会怎样、怎么改
    eval_rows, _ = encode(args, tok, eval_convs, path)

    # 3. QLoRA 准备：冻结 4-bit 底座、非量化参数升 fp32、梯度检查点；LoRA 挂在所有 Linear 上
    model, trainable = qlora_model(model, args, out.log)

    # 4. 训练：第 1 步后报预计用时；超过 --max-train-minutes 先评估 + 保存再停；结束时装回验证损失最低的一步
    trainer, optim = build_trainer(args, out, model, tok, rows, eval_rows)
    clock = train.attach(trainer, args.max_train_minutes)
    # 训练前量一次：LoRA 的 B 初始化为 0，这就是 4-bit 底座本身的 eval_loss（量化带来的损失也在里面）
    before = trainer.evaluate()["eval_loss"]
    # 只包住 trainer.train()：加载和训练前评估不算，peak_mem_mb 是训练本身带来的增量
    with train.PeakMemory(train.device_of(model)) as mem:
        trainer.train()
    kept = train.kept_step(trainer)
    after = train.kept_metrics(trainer)["eval_loss"]   # 保留下来的那一步训练中评估时的记录，不再评估一遍
    tps = trainer.state.num_input_tokens_seen / max(clock.train_s - clock.eval_s, 1e-9)   # 真实 token，不含评估
    out.log.info(f"eval_loss {before:.4f} -> {after:.4f}（保留第 {kept['kept_step']} 步）；训练峰值内存 "
                 f"+{mem.peak_mb:.0f} MB；{tps:.0f} token/s")

    # 5. 只存 adapter，在新加载的 4-bit 底座上装回：输出应与训练中的模型一致
    check = reload_check(args, out, model, eval_rows)
    m = {"eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4), **kept}
    plot_curve(out, trainer.state.log_history, m, ratio)
    return out.finish({
        "footprint_ratio_4bit": round(ratio, 4), "footprint_mb_4bit": round(nbytes / 2**20, 2),
        "footprint_mb_bf16": round(bf16 / 2**20, 2), "footprint_mb_fp32": round(fp32 / 2**20, 2), **m, **stats,
        "peak_mem_mb": round(mem.peak_mb, 1), "peak_rss_mb": round(train.peak_rss_mb()), "tokens_per_s": round(tps, 1),
        "optim": optim,
        "trainable_params": trainable, "base_params": params, **check,
        "first_step_seconds": round(clock.first_step_s, 2),
    }, summary=f"4-bit 权重 = fp32 的 {ratio:.2f}；eval_loss {before:.3f} -> {after:.3f}"
               f"（保留第 {kept['kept_step']} 步）；"
               f"峰值内存 +{mem.peak_mb:.0f} MB；{tps:.0f} token/s", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
