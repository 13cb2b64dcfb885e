"""模型压缩实验台：同一个模型、同一份留出文本，把剪枝、蒸馏、量化放进一张表（困惑度、大小、生成延迟）。

- 非结构化剪枝（torch.nn.utils.prune.l1_unstructured）：每个 Linear 里绝对值最小的 s% 权重置 0。稠密存储不会变小，
  要稀疏格式 + 稀疏内核才省；
- 结构化剪枝（prune.ln_structured，按输出行的 L2 范数）：整行置 0，可以真的删掉这些行，所以大小按剩下的行算；
- 知识蒸馏：学生 = 老师隔一层取一层（层数减半，权重从老师拷贝），同样步数、同样数据，比较
  ① 温度 T 下对老师 logits 的 KL（Hinton 2015，乘 T² 保持梯度量级）+ 交叉熵 与 ② 只用交叉熵；distill_gain = ②的困惑度 / ①的；
- 动态 int8（torch.ao.quantization.quantize_dynamic）：Linear 权重按通道 int8，激活运行时量化；
- bitsandbytes 8-bit（LLM.int8()）与 4-bit NF4（BitsAndBytesConfig）。
大小 = state_dict 序列化后的字节（各方法同一把尺子）；延迟 = 贪心生成每个新 token 的毫秒数（中位数）。

运行：
  python lesson2_qlora_ptuning/04_model_compression/compression_lab.py            # smollm2-135m，CPU
  python lesson2_qlora_ptuning/04_model_compression/compression_lab.py --smoke    # tiny-llama
  python lesson2_qlora_ptuning/04_model_compression/compression_lab.py --model Qwen/Qwen2.5-0.5B-Instruct \\
      --source hf --config configs/lesson2/compression_lab_gpu.yaml               # GPU

你会看到（--smoke，tiny-llama，实测）：fp32 ppl 527.5 / 4.33 MB；结构化剪枝 60% 删到 2.63 MB 但 ppl 631；非结构化剪枝
大小不变；动态 int8 2.62 MB、bnb int8 2.26 MB、NF4 2.55 MB，ppl 都在 ±0.3% 内；同 40 步的 2 层学生 KD ppl 367 vs 纯 CE 684
（distill_gain 1.87）。默认（smollm2-135m，2 核 CPU 约 2.6 分钟）：fp32 ppl 36.4 / 513 MB；bnb int8 36.7 / 210 MB；
NF4 47.7 / 161 MB；动态 int8 142 / 237 MB；结构化剪枝 30% 就崩（ppl 1.9e8）；KD 学生 832 vs CE 998（1.20）。图：ppl_vs_size.png。
"""
import copy
import io
import math
import statistics
import time
import warnings
from dataclasses import dataclass

from common import cli, data, models, run, train


@dataclass
class Args(cli.CommonArgs):
    sparsities: list[float] = cli.arg([0.3, 0.5], "剪枝比例（非结构化与结构化各跑一遍）", min=0, max=0.95)
    temperature: float = cli.arg(2.0, "蒸馏温度 T：越高，老师分布越平，非最大类的信息越多", min=0.1)
    kd_alpha: float = cli.arg(0.5, "蒸馏损失里 KL 的权重（其余是交叉熵）", min=0, max=1)
    distill_steps: int = cli.arg(30, "学生训练步数（KD 与纯交叉熵相同）", min=1)
    learning_rate: float = cli.arg(1e-4, "学生的学习率", min=0)
    per_device_train_batch_size: int = cli.arg(4, "学生训练的批大小", min=1)
    max_length: int = cli.arg(128, "每条文本最多多少 token", min=8)
    eval_samples: int = cli.arg(24, "算困惑度的留出样本数", min=1)
    max_new_tokens: int = cli.arg(16, "测延迟时生成的新 token 数", min=1)
    repeats: int = cli.arg(3, "延迟重复次数（取中位数）", min=1)

    smoke_model = "tiny-llama"


# --smoke：1M 参数的学生承受得住大学习率；步数让两种训练拉开差距
SMOKE = dict(sparsities=[0.3, 0.6], distill_steps=40, learning_rate=3e-3, per_device_train_batch_size=8,
             max_new_tokens=8, repeats=2)


def texts_from(path) -> tuple[list[str], list[str]]:
    """SFT 对话 -> 完整文本（训练用 / 留出用）。"""
    convs = data.load_sft(path)
    train_c, held_c = data.split(convs, 0.2, 42)
    return (["\n".join(m["content"] for m in c) for c in train_c],
            ["\n".join(m["content"] for m in c) for c in held_c])


def perplexity(model, batches) -> float:
    """留出文本上逐 token 的困惑度 = exp(平均负对数似然)。"""
    import torch

    model.eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for enc in batches:
            enc = {k: v.to(train.device_of(model)) for k, v in enc.items()}
            logits = model(**enc).logits[:, :-1].float()
            tgt = enc["input_ids"][:, 1:]
            m = enc["attention_mask"][:, 1:].bool()
            nll += torch.nn.functional.cross_entropy(logits[m], tgt[m], reduction="sum").item()
            n += m.sum().item()
    return math.exp(nll / n)


def size_mb(model) -> float:
    """state_dict 序列化后的大小（共享的张量只存一次；量化模型含它的缩放常数）。"""
    import torch

    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


def latency_ms(model, tok, prompt: str, new_tokens: int, repeats: int) -> float:
    """贪心生成每个新 token 的毫秒数（先预热一次，再取 repeats 次的中位数）。"""
    import torch

    enc = tok(prompt, return_tensors="pt").to(train.device_of(model))
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            if i:
                times.append((time.perf_counter() - t0) * 1000 / new_tokens)
    return statistics.median(times)


def prune_copy(model, amount: float, structured: bool):
    """剪枝一个副本：prune 先挂 mask，prune.remove 再把 mask 乘进权重（变成普通张量）。"""
    import torch
    from torch.nn.utils import prune

    m = copy.deepcopy(model)
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and "lm_head" not in name:
            if structured:   # 按输出行的 L2 范数，整行去掉
                prune.ln_structured(mod, "weight", amount=amount, n=2, dim=0)
            else:
                prune.l1_unstructured(mod, "weight", amount=amount)
            prune.remove(mod, "weight")
    return m


def structured_size_mb(model) -> float:
    """结构化剪枝后真正删掉全零行能剩下多少（fp32）。"""
    import torch

    total, seen = 0, set()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, torch.nn.Linear) and p is mod.weight and p.dim() == 2:
                total += int((p.abs().sum(1) > 0).sum()) * p.shape[1]
            else:
                total += p.numel()
    return total * 4 / 2**20


def make_student(teacher):
    """学生 = 老师的偶数层（层数减半），embedding/norm/lm_head 也从老师拷贝：蒸馏常用的初始化（DistilBERT）。"""
    import torch

    cfg = copy.deepcopy(teacher.config)
    keep = list(range(0, cfg.num_hidden_layers, 2))
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    student = type(teacher)(cfg)
    sd = teacher.state_dict()
    remap = {}
    for k, v in sd.items():
        if ".layers." in k:
            pre, rest = k.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            if int(idx) in keep:
                remap[f"{pre}.layers.{keep.index(int(idx))}.{tail}"] = v.clone()
        else:
            remap[k] = v.clone()
    student.load_state_dict(remap, strict=False)
    student.tie_weights()
    return student.to(torch.float32)


def train_student(teacher, student, batches, args: Args, use_kd: bool) -> list[float]:
    """同样的批、同样的步数；use_kd 时损失 = α·T²·KL(老师_T ‖ 学生_T) + (1-α)·CE，否则只有 CE。"""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(student.parameters(), lr=args.learning_rate)
    student.train()
    losses = []
    for step in range(args.distill_steps):
        enc = batches[step % len(batches)]
        out = student(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100))
        loss = out.loss
        if use_kd:
            with torch.no_grad():
                t_logits = teacher(**enc).logits
            m = enc["attention_mask"].bool()
            T = args.temperature
            kl = F.kl_div(F.log_softmax(out.logits[m] / T, -1), F.log_softmax(t_logits[m] / T, -1),
                          log_target=True, reduction="batchmean") * T * T
            loss = args.kd_alpha * kl + (1 - args.kd_alpha) * loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def load_bnb(args: Args, bits: int, log):
    """bitsandbytes 8-bit / 4-bit NF4 加载（CPU 上行长不是 64 倍数的层不做 4-bit，原因见 01）。"""
    import torch
    from transformers import BitsAndBytesConfig

    cuda = models.pick_device(args.device).type == "cuda"
    if bits == 8:
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        skip = None
        if not cuda:
            from transformers import AutoConfig

            c = AutoConfig.from_pretrained(models.resolve(args.resolved_model(), args.source))
            skip = ["lm_head"] + (["down_proj"] if c.intermediate_size % 64 else [])
            if len(skip) > 1:
                log.info("CPU：bitsandbytes 0.50 的 CPU 反量化对行长不是 64 倍数的矩阵有错，down_proj 保持不量化")
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32,
                               llm_int8_skip_modules=skip)
    model, _ = models.load(args.resolved_model(), source=args.source, device=args.device,
                           dtype="float32" if args.dtype == "auto" else args.dtype,
                           trust_remote_code=args.trust_remote_code, quantization_config=q,
                           device_map={"": 0} if cuda else {"": "cpu"})
    return model


def main(args: Args) -> dict:
    import torch

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)

    # 1. 同一份留出文本（领域问答，或 --data 的 SFT 数据）
    train_texts, held = texts_from(args.data or data.DATA_DIR / "domain" / "sft.jsonl")
    model, tok = models.load(args.resolved_model(), source=args.source, device=args.device,   # 基线统一 fp32
                             dtype="float32" if args.dtype == "auto" else args.dtype,
                             trust_remote_code=args.trust_remote_code)

    def batches(texts, bs):
        return [tok(texts[i:i + bs], return_tensors="pt", padding=True, truncation=True, max_length=args.max_length)
                for i in range(0, len(texts), bs)]

    eval_b = batches(held[:args.eval_samples], 8)
    prompt = held[0][:200]
    table = {}

    def record(name, m, size=None):
        table[name] = {"ppl": round(perplexity(m, eval_b), 3), "size_mb": round(size or size_mb(m), 2),
                       "latency_ms": round(latency_ms(m, tok, prompt, args.max_new_tokens, args.repeats), 2)}
        out.log.info(f"{name:24s} ppl {table[name]['ppl']:9.3f}  {table[name]['size_mb']:8.2f} MB  "
                     f"{table[name]['latency_ms']:7.2f} ms/token")

    # 2. 基线 fp32
    record("fp32", model)

    # 3. 剪枝：非结构化（大小不变）vs 结构化（删行后的大小）
    for s in args.sparsities:
        record(f"prune_unstructured_{s:g}", prune_copy(model, s, structured=False))
        pm = prune_copy(model, s, structured=True)
        record(f"prune_structured_{s:g}", pm, structured_size_mb(pm))

    # 4. 动态 int8（torch 2.13 标记弃用但仍走 fbgemm/oneDNN 的 int8 GEMM）
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record("dynamic_int8", quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8))

    # 5. bitsandbytes 8-bit 与 4-bit NF4
    record("bnb_int8", load_bnb(args, 8, out.log))
    record("bnb_nf4", load_bnb(args, 4, out.log))

    # 6. 蒸馏：同一个半深度学生、同样的批与步数，KD vs 纯交叉熵
    train_b = batches(train_texts, args.per_device_train_batch_size)
    curves = {}
    for use_kd, name in ((True, "student_kd"), (False, "student_ce")):
        torch.manual_seed(args.seed)
        student = make_student(model)
        curves[name] = train_student(model, student, train_b, args, use_kd)
        record(name, student)
    gain = table["student_ce"]["ppl"] / table["student_kd"]["ppl"]
    out.log.info(f"蒸馏：学生困惑度 KD {table['student_kd']['ppl']:.2f} vs 纯 CE {table['student_ce']['ppl']:.2f}"
                 f"（distill_gain = {gain:.3f}，>1 表示 KD 更好）")

    # 7. 图：困惑度 vs 大小
    fig, save = out.plot("ppl_vs_size.png")
    ax = fig.add_subplot(111)
    for name, r in table.items():
        ax.scatter(r["size_mb"], r["ppl"])
        ax.annotate(name, (r["size_mb"], r["ppl"]), fontsize=7)
    ax.set_xlabel("size (MB, serialized state_dict)")
    ax.set_ylabel("perplexity on held-out text")
    ax.set_yscale("log")
    ax.set_title(f"Compression trade-offs: {out.model_name}")
    save()
    best = min((n for n in table if n != "fp32"), key=lambda n: table[n]["ppl"] * table[n]["size_mb"])
    return out.finish({**table, "distill_gain": round(gain, 4), "eval_samples": len(held[:args.eval_samples])},
                      summary=f"fp32 ppl {table['fp32']['ppl']:.2f}/{table['fp32']['size_mb']:.1f} MB；"
                              f"nf4 {table['bnb_nf4']['ppl']:.2f}/{table['bnb_nf4']['size_mb']:.1f} MB；"
                              f"int8 {table['dynamic_int8']['ppl']:.2f}；distill_gain {gain:.3f}；ppl×MB 最优 {best}")


if __name__ == "__main__":
    main(cli.parse(Args))
