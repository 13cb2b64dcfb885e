"""模型压缩实验台：同一个模型、同一份留出文本，把剪枝、蒸馏、量化放进一张表（困惑度、大小、生成延迟）。

- 非结构化剪枝（torch.nn.utils.prune.l1_unstructured）：每个 Linear 里绝对值最小的 s% 权重置 0。稠密存储不会变小，
  要稀疏格式 + 稀疏内核才省；
- 结构化剪枝（prune.ln_structured，按输出行的 L2 范数）：整行置 0，可以真的删掉这些行，所以大小按剩下的行算；
- 知识蒸馏：学生 = 老师隔一层取一层（层数减半，权重从老师拷贝），同样步数、同样数据，比较
  ① 温度 T 下对老师 logits 的 KL（Hinton 2015，乘 T² 保持梯度量级）+ 交叉熵 与 ② 只用交叉熵；
  distill_gain = ②的困惑度 / ①的；
- 动态 int8（torch.ao.quantization.quantize_dynamic）：Linear 权重按通道 int8，激活运行时量化；
- bitsandbytes 8-bit（LLM.int8()）与 4-bit NF4（BitsAndBytesConfig）。
大小 = state_dict 序列化后的字节（各方法同一把尺子）；延迟 = 贪心生成每个新 token 的毫秒数（中位数）。

运行：
  python lesson2_qlora_ptuning/04_model_compression/compression_lab.py            # smollm2-135m，CPU
  python lesson2_qlora_ptuning/04_model_compression/compression_lab.py --smoke    # tiny-llama
  python lesson2_qlora_ptuning/04_model_compression/compression_lab.py --model Qwen/Qwen2.5-0.5B-Instruct \\
      --source hf --config configs/lesson2/compression_lab_gpu.yaml               # GPU

你会看到：一张表（每种方法的困惑度、大小、每 token 延迟）和 ppl_vs_size.png。非结构化剪枝在稠密存储下大小一点不变；
结构化剪枝真的删掉整行、模型变小，但不重新训练就让困惑度急剧恶化（剪得越多越崩）；bitsandbytes int8（LLM.int8，离群
维度留在高精度）把模型压小而几乎无损；NF4 更小，困惑度有一定代价；动态 int8 同样变小、生成更快（int8 GEMM），但不处理
离群维度，困惑度比 LLM.int8 差得多；同样步数、同样数据，KD 训出的半层学生困惑度低于只用交叉熵的（distill_gain > 1：
老师的整条输出分布比一个 one-hot 标签带的信息多）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：2.5 分钟，3.2 GB，结论 11/11 成立
  ✓ 蒸馏胜过同样步数的纯交叉熵：学生困惑度 纯 CE / KD：1.2（≥ 1.1）
  ✓ NF4 把模型压小：大小 NF4 / fp32：0.3138（≤ 0.4）
  ✓ NF4 的困惑度代价有限：困惑度 NF4 / fp32：1.312（≤ 1.5）
  ✓ bitsandbytes int8 把模型压小：大小 int8 / fp32：0.4096（≤ 0.5）
  ✓ bitsandbytes int8（LLM.int8）几乎无损：困惑度 int8 / fp32：1.011（≤ 1.05）
  ✓ LLM.int8 把离群维度留在高精度，胜过不做这件事的动态 int8：困惑度 动态 int8 / bnb int8：3.875（≥ 2）
  ✓ 动态 int8 把模型压小：大小 动态 int8 / fp32：0.4611（≤ 0.5）
  ✓ 动态 int8 生成更快（int8 GEMM）：每 token 延迟 动态 int8 / fp32：0.685（≤ 0.8）
  ✓ 非结构化剪枝在稠密存储下一点不省：大小 剪枝后（最小的一行）/ fp32：1（≥ 0.999）
  ✓ 结构化剪枝删掉整行真的变小：大小 剪得最多的一行 / fp32：0.6052（≤ 0.8）
  ✓ 结构化剪枝不重新训练就伤困惑度：困惑度 最差的一行 / fp32：6.171e+06（≥ 10）
<!-- /results -->
"""
import copy
import warnings
from dataclasses import dataclass

from common import cli, data, models, run

bench_lib = run.import_sibling(__file__, "_bench")   # 尺子（困惑度、大小、延迟）与图：每种方法量法完全相同


@dataclass
class Args(cli.CommonArgs):
    sparsities: list[float] = cli.arg([0.3, 0.5], "剪枝比例（非结构化与结构化各跑一遍）", min=0, max=0.95)
    temperature: float = cli.arg(2.0, "蒸馏温度 T：越高，老师分布越平，非最大类的信息越多", min=0.1)
    kd_alpha: float = cli.arg(0.5, "蒸馏损失里 KL 的权重（其余是交叉熵）", min=0, max=1)
    distill_steps: int = cli.arg(30, "学生训练步数（KD 与纯交叉熵相同）", min=1)
    learning_rate: float = cli.arg(1e-4, "学生的学习率")
    per_device_train_batch_size: int = cli.arg(4, "学生训练的批大小", min=1)
    max_length: int = cli.arg(128, "每条文本最多多少 token", min=8)
    eval_samples: int = cli.arg(24, "算困惑度的留出样本数", min=1)
    max_new_tokens: int = cli.arg(16, "测延迟时生成的新 token 数", min=1)
    repeats: int = cli.arg(3, "延迟重复次数（取中位数）", min=1)

    # tiny-llama 与 smollm2 同为 Llama 架构、都绑定 embedding 与 lm_head：make_student 的层号重映射、
    # prune_copy 跳过 lm_head 的理由在冒烟里同样成立
    smoke_model = "tiny-llama"


# --smoke：1M 参数的学生承受得住大学习率；步数让两种训练拉开差距
SMOKE = dict(sparsities=[0.3, 0.6], distill_steps=40, learning_rate=3e-3, per_device_train_batch_size=8,
             max_new_tokens=8, repeats=2)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（fp32、纯 CE 学生）都在同一次运行里用同一把尺子量
# 剪枝的行名带比例（随 --sparsities 变）：表达式在 m 里按前缀找出这几行
CLAIMS = [
    run.Claim("蒸馏胜过同样步数的纯交叉熵：学生困惑度 纯 CE / KD",
              'student_ce["ppl"] / student_kd["ppl"]', ">=", 1.2, 1.1),
    # 冒烟的大小门槛松（0.7 对默认的 0.4 / 0.5）：极小模型里不量化的 embedding 约占三分之一参数，
    # CPU 上 NF4 还跳过了 down_proj（load_bnb）
    run.Claim("NF4 把模型压小：大小 NF4 / fp32", 'bnb_nf4["size_mb"] / fp32["size_mb"]', "<=", 0.7, 0.4),
    run.Claim("NF4 的困惑度代价有限：困惑度 NF4 / fp32", 'bnb_nf4["ppl"] / fp32["ppl"]', "<=", 1.05, 1.5),
    run.Claim("bitsandbytes int8 把模型压小：大小 int8 / fp32",
              'bnb_int8["size_mb"] / fp32["size_mb"]', "<=", 0.7, 0.5),
    run.Claim("bitsandbytes int8（LLM.int8）几乎无损：困惑度 int8 / fp32",
              'bnb_int8["ppl"] / fp32["ppl"]', "<=", 1.05, 1.05),
    # 激活离群值只在真实模型上出现（tiny 上两者的困惑度都与 fp32 相同），冒烟不检查
    run.Claim("LLM.int8 把离群维度留在高精度，胜过不做这件事的动态 int8：困惑度 动态 int8 / bnb int8",
              'dynamic_int8["ppl"] / bnb_int8["ppl"]', ">=", None, 2.0),
    run.Claim("动态 int8 把模型压小：大小 动态 int8 / fp32",
              'dynamic_int8["size_mb"] / fp32["size_mb"]', "<=", 0.7, 0.5),
    # 极小模型的延迟由 Python 开销主导（tiny 上动态 int8 比 fp32 还慢），冒烟不检查
    run.Claim("动态 int8 生成更快（int8 GEMM）：每 token 延迟 动态 int8 / fp32",
              'dynamic_int8["latency_ms"] / fp32["latency_ms"]', "<=", None, 0.8),
    run.Claim("非结构化剪枝在稠密存储下一点不省：大小 剪枝后（最小的一行）/ fp32",
              'min(m[k]["size_mb"] for k in m if k.startswith("prune_unstructured_")) / fp32["size_mb"]',
              ">=", 0.999, 0.999),
    run.Claim("结构化剪枝删掉整行真的变小：大小 剪得最多的一行 / fp32",
              'min(m[k]["size_mb"] for k in m if k.startswith("prune_structured_")) / fp32["size_mb"]',
              "<=", 0.85, 0.8),
    # 默认门槛 10 其实很宽：_bench 里记着 smollm2 结构化剪 30% 时 ppl 能到 1e8；冒烟只要求变差
    run.Claim("结构化剪枝不重新训练就伤困惑度：困惑度 最差的一行 / fp32",
              'max(m[k]["ppl"] for k in m if k.startswith("prune_structured_")) / fp32["ppl"]', ">=", 1.1, 10),
]


def texts_from(path) -> tuple[list[str], list[str]]:
    """SFT 对话 -> 完整文本（训练用 / 留出用）。

    切分种子固定为 42（不随 --seed 变）：换种子比较蒸馏时，留出文本不变，困惑度才能跨运行比。
    """
    convs = data.load_sft(path)
    train_c, held_c = data.split(convs, 0.2, 42)
    return (["\n".join(m["content"] for m in c) for c in train_c],
            ["\n".join(m["content"] for m in c) for c in held_c])


def token_batches(tok, texts: list[str], bs: int, max_length: int) -> list:
    """学生训练用的批：批内右填充到最长（tokenizer 的默认），截断到 max_length 控制每步的计算量。"""
    return [tok(texts[i:i + bs], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            for i in range(0, len(texts), bs)]


def prune_copy(model, amount: float, structured: bool):
    """剪枝一个副本：prune 先挂 mask，prune.remove 再把 mask 乘进权重（变成普通张量）。

    不 remove 的话 state_dict 里同时有 weight_orig 与 weight_mask，大小反而翻倍，和别的方法没法比。
    lm_head 不剪：它常和 embedding 绑定（tiny-llama、smollm2 都是），剪它等于把输入端的词向量也剪了。
    """
    import torch
    from torch.nn.utils import prune

    # 深拷贝：prune 就地给模块挂 mask、改权重，直接剪 model，后面每一行就都量在剪过的模型上了
    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            if structured:   # 按输出行的 L2 范数，整行去掉
                # dim=0 是 nn.Linear.weight（out × in）的输出维：整行置 0 = 去掉这个输出神经元
                prune.ln_structured(mod, "weight", amount=amount, n=2, dim=0)
            else:
                prune.l1_unstructured(mod, "weight", amount=amount)
            prune.remove(mod, "weight")
    return m


def prune_rows(model, bench, sparsities: list[float]) -> dict:
    """每个剪枝比例两行：非结构化（稠密存储，大小不变）与结构化（删掉零行后的大小）。"""
    rows = {}
    for s in sparsities:
        # 非结构化不传 size：按 state_dict 的稠密字节量，那些 0 照样各占 4 字节，这正是要展示的'一点不省'
        rows[f"prune_unstructured_{s:g}"] = bench.measure(f"prune_unstructured_{s:g}",
                                                          prune_copy(model, s, structured=False))
        pm = prune_copy(model, s, structured=True)
        rows[f"prune_structured_{s:g}"] = bench.measure(f"prune_structured_{s:g}", pm,
                                                        bench_lib.structured_size_mb(pm))   # 删掉零行后的大小
    return rows


def dynamic_int8(model):
    """Linear 权重按通道 int8、激活运行时量化（副本，不动老师）。

    torch 2.13 把 quantize_dynamic 标成弃用，但仍走 fbgemm/oneDNN 的 int8 GEMM；警告对学生没有信息，屏蔽掉。
    """
    import torch
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 只换 nn.Linear：embedding、norm 保持 fp32，这也是它的压缩比到不了 int8/fp32 = 0.25 的原因
        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


def make_student(teacher):
    """学生 = 老师的偶数层（层数减半），embedding/norm/lm_head 也从老师拷贝：蒸馏常用的初始化（DistilBERT）。

    随机初始化的学生要从零学语言，几十步内两种损失都还停在很高的困惑度；从老师拷贝层，起点就接近老师。
    """
    import torch

    cfg = copy.deepcopy(teacher.config)
    # 隔一层取一层（DistilBERT 的做法）：从浅到深每段都留一层，不像只取前一半那样把深层整段丢掉
    keep = list(range(0, cfg.num_hidden_layers, 2))
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):   # 新版 config 逐层记注意力类型，长度要跟着层数改
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    # 同一个类、只改层数：参数名与老师一致，下面按层号改个名字就能直接加载
    student = type(teacher)(cfg)
    sd = teacher.state_dict()
    remap = {}
    for k, v in sd.items():
        if ".layers." in k:   # model.layers.<老师层号>.xxx -> model.layers.<学生层号>.xxx
            pre, rest = k.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            if int(idx) in keep:
                remap[f"{pre}.layers.{keep.index(int(idx))}.{tail}"] = v.clone()
        else:
            remap[k] = v.clone()
    student.load_state_dict(remap, strict=False)
    student.tie_weights()   # config 要求绑定时，让 lm_head 与 embedding 重新共用一个张量（与老师一致）
    return student.to(torch.float32)


def train_student(teacher, student, batches, args: Args, use_kd: bool) -> list[float]:
    """同样的批、同样的步数；use_kd 时损失 = α·T²·KL(老师_T ‖ 学生_T) + (1-α)·CE，否则只有 CE。

    乘 T²（Hinton 2015）：温度 T 下软目标的梯度缩小约 1/T²，不乘回来，KL 项在总损失里几乎不起作用。
    """
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(student.parameters(), lr=args.learning_rate)
    student.train()
    losses = []
    for step in range(args.distill_steps):
        # 步数多于批数时按顺序循环：KD 与纯 CE 两次训练看到的批次序列完全一样
        enc = batches[step % len(batches)]
        # 填充位不算交叉熵：否则批内短文本后面的一串填充也在被"学"，步数花在了不是文本的 token 上
        out = student(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
        loss = out.loss
        if use_kd:
            with torch.no_grad():   # 老师冻结：只要它的 logits，不为它建计算图、不存它的激活
                t_logits = teacher(**enc).logits
            # logits[m] 展平成 (真实 token 数, V)：batchmean 就成了按 token 平均，填充位不进 KL
            m = enc["attention_mask"].bool()
            T = args.temperature
            # 老师也传 log 概率（log_target=True）：极小的概率 exp 后会下溢成 0，留在 log 空间里才保得住准确值
            kl = F.kl_div(F.log_softmax(out.logits[m] / T, -1), F.log_softmax(t_logits[m] / T, -1),
                          log_target=True, reduction="batchmean") * T * T
            loss = args.kd_alpha * kl + (1 - args.kd_alpha) * loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def distill_rows(teacher, tok, train_texts: list[str], bench, args: Args) -> dict:
    """同一个半深度学生、同样的批与步数，训练两次：KD 与纯交叉熵。种子相同，差别只来自损失函数。"""
    import torch

    train_b = token_batches(tok, train_texts, args.per_device_train_batch_size, args.max_length)
    rows = {}
    for use_kd, name in ((True, "student_kd"), (False, "student_ce")):
        # type(teacher)(cfg) 先随机初始化、再装老师的权重（strict=False，没装上的保持随机）：
        # 每个学生前重设同一个种子，两次建出的学生逐位相同
        torch.manual_seed(args.seed)
        student = make_student(teacher)
        train_student(teacher, student, train_b, args, use_kd)
        rows[name] = bench.measure(name, student)
    return rows


def load_bnb(args: Args, bits: int, log):
    """bitsandbytes 8-bit / 4-bit NF4 加载（CPU 上行长不是 64 倍数的层不做 4-bit，原因见 01）。"""
    import torch
    from transformers import BitsAndBytesConfig

    cuda = models.pick_device(args.device).type == "cuda"
    if bits == 8:
        # LLM.int8()：激活里超过阈值（BitsAndBytesConfig 默认 llm_int8_threshold=6.0）的离群维度
        # 走高精度矩阵乘，其余 int8——这就是它胜过动态 int8 的地方
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        skip = None
        if not cuda:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(models.resolve(args.resolved_model(), args.source))
            # lm_head 要自己写上：给了 llm_int8_skip_modules，transformers 就不再加它默认跳过的输出层
            skip = ["lm_head"] + (["down_proj"] if c.intermediate_size % 64 else [])
            if len(skip) > 1:
                log.info("CPU：bitsandbytes 0.50 的 CPU 反量化对行长不是 64 倍数的矩阵有错，down_proj 保持不量化")
        # 双重量化：absmax 再量化成 8 bit，每参数 4.5 -> 4.127 bit（01 实测）；CPU 上按 fp32 计算，
        # 与 fp32 基线同精度，表里的差只来自 4-bit 存储
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
                               llm_int8_skip_modules=skip)
    # bitsandbytes 边加载边量化：设备只能在加载时由 device_map 给定，models.load 对量化模型不再 .to()
    model, _ = models.load_args(args, dtype=fp32_unless_set(args), quantization_config=q,
                                device_map={"": 0} if cuda else {"": "cpu"})
    return model


def fp32_unless_set(args: Args) -> str:
    """基线统一 fp32：auto 在 GPU（和有 AMX 的 CPU）上会选 bf16，"量化前"就已丢了精度，表里的差被低估。"""
    return "float32" if args.dtype == "auto" else args.dtype


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 同一份留出文本（领域问答，或 --data 的 SFT 数据）与同一个 fp32 模型：每种方法都从它出发
    train_texts, held = texts_from(args.data or data.DATA_DIR / "domain" / "sft.jsonl")
    # 只取前 eval_samples 条：十来行方法每行都要算一遍困惑度，CPU 上全量留出集太慢
    held = held[:args.eval_samples]
    model, tok = models.load_args(args, dtype=fp32_unless_set(args))
    rows = [{"input_ids": tok(t, truncation=True, max_length=args.max_length)["input_ids"]} for t in held]
    # 测延迟的提示固定为第一条留出文本的前 200 个字符：每种方法同一条提示、同样的 prefill 长度
    bench = bench_lib.Bench(tok, rows, held[0][:200], args.max_new_tokens, args.repeats, out.log)

    # 2. 基线 fp32：后面每一行都和它比
    table = {"fp32": bench.measure("fp32", model)}

    # 3. 剪枝：非结构化（大小不变）vs 结构化（删行后的大小）；同样的比例，看"省不省空间"与"伤不伤困惑度"
    table.update(prune_rows(model, bench, args.sparsities))

    # 4. 动态 int8：不用校准数据，激活的缩放在运行时算，所以能直接套在任何模型上
    table["dynamic_int8"] = bench.measure("dynamic_int8", dynamic_int8(model))

    # 5. bitsandbytes 8-bit（LLM.int8()，离群维度保持 fp16）与 4-bit NF4（QLoRA 的存储格式）
    table["bnb_int8"] = bench.measure("bnb_int8", load_bnb(args, 8, out.log))
    table["bnb_nf4"] = bench.measure("bnb_nf4", load_bnb(args, 4, out.log))

    # 6. 蒸馏：同一个半深度学生、同样的批与步数，KD vs 纯交叉熵（只比一种训练会分不清是"蒸馏"还是"多训练了"的功劳）
    table.update(distill_rows(model, tok, train_texts, bench, args))
    # 用比值而不是差：换模型时困惑度量级不同，比值仍可直接比较（门槛见 CLAIMS 第一条）
    gain = table["student_ce"]["ppl"] / table["student_kd"]["ppl"]
    out.log.info(f"蒸馏：学生困惑度 KD {table['student_kd']['ppl']:.2f} vs 纯 CE {table['student_ce']['ppl']:.2f}"
                 f"（distill_gain = {gain:.3f}，>1 表示 KD 更好）")

    # 7. 图：困惑度 vs 大小；"最优"按 ppl×MB 选：只看一项，剪光或不压缩就会赢
    bench_lib.plot_tradeoffs(out, table)
    best = min((n for n in table if n != "fp32"), key=lambda n: table[n]["ppl"] * table[n]["size_mb"])
    return out.finish({**table, "distill_gain": round(gain, 4), "eval_samples": len(held)},
                      summary=f"fp32 ppl {table['fp32']['ppl']:.2f}/{table['fp32']['size_mb']:.1f} MB；"
                              f"nf4 {table['bnb_nf4']['ppl']:.2f}/{table['bnb_nf4']['size_mb']:.1f} MB；"
                              f"int8 {table['dynamic_int8']['ppl']:.2f}；distill_gain {gain:.3f}；ppl×MB 最优 {best}",
                      claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
