"""量化推理并排比：fp32、bf16、bitsandbytes int8/NF4、DeepSpeed init_inference——延迟、内存、与 fp32 的一致性、困惑度。

每个变体都重新加载同一个模型，在同样的提示上贪心生成同样多的 token：
- 延迟：每个请求（一条提示生成 max_new_tokens 个 token）的毫秒数，取 p50 / p95；
- 内存：从加载前到生成结束的峰值增量（CUDA：max_memory_allocated；CPU：进程 RSS 采样）；
- 一致性（agreement）：与 fp32 的贪心输出逐位置相同的 token 比例——量化改变了哪一步的 argmax，一眼可见；
- 同前缀一致率（tf_agreement）与 KL：把 fp32 的续写原样喂给每个变体（teacher forcing），逐位置比下一个 token 的 argmax，
  算 KL(fp32 ‖ 变体)。自由生成里一次翻转会带偏后面所有 token，这两个数只量"每一步本身差多少"；
- 困惑度：留出文本上的 ppl，看量化让模型"变笨"了多少。
DeepSpeed：deepspeed.init_inference 在 CUDA 上用 replace_with_kernel_inject=True 换成融合的推理内核（bf16/fp16）；
内核注入只有 CUDA 版，CPU 上不注入，只用它的 InferenceEngine 包装原模型（脚本会打一行说明），所以 CPU 上它和 fp32 一致。

运行：
  python lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py            # smollm2-135m，CPU
  python lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py --smoke    # tiny-llama
  python lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson2/deepspeed_quant_deploy_gpu.yaml             # GPU：DeepSpeed 内核注入

你会看到：每个变体一行（p50/p95 延迟、内存峰值增量、与 fp32 的一致率、困惑度）和 latency_vs_agreement.png。CPU 上的
DeepSpeed（不注入内核）就是原模型：与 fp32 逐 token 相同、困惑度相同；bf16 困惑度几乎不变、贪心输出大体一致；
bitsandbytes int8 的困惑度代价很小，NF4 更大（4 bit 比 8 bit 粗），贪心输出也更早偏离 fp32，但两者仍大体复现 fp32 的
回答。自由生成的一致率比困惑度敏感：某一步的 argmax 一旦翻转，后面的续写都跟着变，所以困惑度几乎不变时它也会跌得很低；
同前缀一致率才是"每一步有多少 token 选得和 fp32 一样"，int8 的 KL 比 NF4 小（8 bit 比 4 bit 细）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：8.5 分钟，1.4 GB，结论 11/11 成立
  ✓ CPU 上的 DeepSpeed（不注入内核）就是原模型：贪心输出与 fp32 一致的比例：1（≥ 0.999）
  ✓ CPU 上的 DeepSpeed 困惑度与 fp32 相同：|DeepSpeed / fp32 - 1|：0（≤ 0.001）
  ✓ bf16 几乎不改变模型：|困惑度 bf16 / fp32 - 1|：0.004512（≤ 0.01）
  ✓ bf16 的贪心输出与 fp32 大体一致：逐位置相同的 token 比例：0.8281（≥ 0.8）
  ✓ bitsandbytes int8 的困惑度代价很小：困惑度 int8 / fp32：1.02（≤ 1.05）
  ✓ NF4 的困惑度代价有限：困惑度 NF4 / fp32：1.311（≤ 1.5）
  ✓ NF4 的误差比 bf16 大：困惑度偏离 fp32 的幅度之差，(|NF4 - fp32| - |bf16 - fp32|) / fp32：0.3063（≥ 0.1）
  ✓ NF4 的误差比 bf16 大，贪心输出更早偏离：一致率 bf16 - NF4：0.7291（≥ 0.2）
  ✓ 量化后每一步仍大体选 fp32 的 token：同前缀（teacher forcing）下一个 token 一致率，int8 与 NF4 中较低者：0.7656（
    ≥ 0.7）
  ✓ 自由生成的一致率严重低估量化模型（一次翻转带偏后文）：NF4 同前缀一致率 − 自由生成一致率：0.6666（≥ 0.3）
  ✓ 8 bit 比 4 bit 细：int8 到 fp32 的 KL ≤ NF4 到 fp32 的 KL（同前缀，每个 token 平均）：-0.2659（≤ 0）
<!-- /results -->
"""
import gc
import time
from dataclasses import dataclass

from common import cli, data, lm, models, run, train
from common.errors import UserError

VARIANTS = ("fp32", "bf16", "bnb_int8", "bnb_nf4", "deepspeed")


@dataclass
class Args(cli.CommonArgs):
    variants: list[str] = cli.arg(list(VARIANTS), "要比较的变体：" + " / ".join(VARIANTS))
    # min=2：只有一条请求时 p50 与 p95 是同一个数，尾延迟无从谈起
    num_prompts: int = cli.arg(8, "请求条数（每条单独计时，取 p50/p95）", min=2)
    max_new_tokens: int = cli.arg(24, "每个请求生成的新 token 数", min=1)
    ppl_samples: int = cli.arg(24, "算困惑度的留出样本数", min=1)
    max_length: int = cli.arg(128, "算困惑度时每条最多多少 token", min=8)

    # tiny-llama 的 intermediate_size 是 352，不是 64 的倍数：冒烟也会走到 NF4 跳过 down_proj 的分支
    smoke_model = "tiny-llama"


# --smoke：6 条请求 × 16 个新 token，tiny-llama 上每个变体几秒；仍够算 p95 和逐位置一致性
SMOKE = dict(num_prompts=6, max_new_tokens=16)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线 fp32 在同一次运行里、同样的请求与文本上量
CLAIMS = [
    run.Claim("CPU 上的 DeepSpeed（不注入内核）就是原模型：贪心输出与 fp32 一致的比例",
              'deepspeed["agreement"]', ">=", 0.999, 0.999),
    run.Claim("CPU 上的 DeepSpeed 困惑度与 fp32 相同：|DeepSpeed / fp32 - 1|",
              'abs(deepspeed["ppl"] / fp32["ppl"] - 1)', "<=", 1e-3, 1e-3),
    run.Claim("bf16 几乎不改变模型：|困惑度 bf16 / fp32 - 1|", 'abs(bf16["ppl"] / fp32["ppl"] - 1)', "<=", 0.01, 0.01),
    run.Claim("bf16 的贪心输出与 fp32 大体一致：逐位置相同的 token 比例",
              'bf16["agreement"]', ">=", 0.8, 0.8),
    run.Claim("bitsandbytes int8 的困惑度代价很小：困惑度 int8 / fp32",
              'bnb_int8["ppl"] / fp32["ppl"]', "<=", 1.01, 1.05),
    run.Claim("NF4 的困惑度代价有限：困惑度 NF4 / fp32", 'bnb_nf4["ppl"] / fp32["ppl"]', "<=", 1.02, 1.5),
    run.Claim("NF4 的误差比 bf16 大：困惑度偏离 fp32 的幅度之差，(|NF4 - fp32| - |bf16 - fp32|) / fp32",
              '(abs(bnb_nf4["ppl_delta"]) - abs(bf16["ppl_delta"])) / fp32["ppl"]', ">=", 0.001, 0.1),
    # 极小模型的 logits 很平，bf16 与 NF4 的一致率都在 0.9 附近、差一两个 token，冒烟不检查
    run.Claim("NF4 的误差比 bf16 大，贪心输出更早偏离：一致率 bf16 - NF4",
              'bf16["agreement"] - bnb_nf4["agreement"]', ">=", None, 0.2),
    # 自由生成的一致率在 smollm2 上可低到 0.1（一次翻转带偏后文）：它说明"会分岔"，不说明"每一步差多少"，
    # 所以"大体复现 fp32"用同一前缀上的下一个 token 来量
    # 参考运行（smollm2）：同前缀一致率 bf16 0.97、int8 0.91、NF4 0.77；自由生成只有 0.83 / 0.34 / 0.10
    run.Claim("量化后每一步仍大体选 fp32 的 token：同前缀（teacher forcing）下一个 token 一致率，int8 与 NF4 中较低者",
              'min(bnb_int8["tf_agreement"], bnb_nf4["tf_agreement"])', ">=", 0.8, 0.7),
    run.Claim("自由生成的一致率严重低估量化模型（一次翻转带偏后文）：NF4 同前缀一致率 − 自由生成一致率",
              'bnb_nf4["tf_agreement"] - bnb_nf4["agreement"]', ">=", None, 0.3),
    run.Claim("8 bit 比 4 bit 细：int8 到 fp32 的 KL ≤ NF4 到 fp32 的 KL（同前缀，每个 token 平均）",
              'bnb_int8["kl"] - bnb_nf4["kl"]', "<=", 0.0, 0.0),
]


def load_variant(args: Args, variant: str, cuda: bool, log):
    """按变体加载（每次都从磁盘重新加载，内存从零量起）。

    不从 fp32 模型转换：转换时 fp32 原件和量化副本同时在内存里，量到的峰值是"两份"，不是部署时的一份。
    """
    import torch
    from transformers import AutoConfig, BitsAndBytesConfig

    name, kw = args.resolved_model(), {}
    # DeepSpeed 在 CUDA 上用 bf16 内核；fp32 是一致性与困惑度的参照，所以其它变体都相对它量
    dtype = "bfloat16" if variant == "bf16" or (cuda and variant == "deepspeed") else "float32"
    if variant == "bnb_int8":
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    if variant == "bnb_nf4":
        skip = ["lm_head"]   # 输出层保持原精度（transformers 的 bitsandbytes 集成默认也如此）：它直接决定 argmax
        if not cuda and AutoConfig.from_pretrained(models.resolve(name, args.source)).intermediate_size % 64:
            skip.append("down_proj")   # bitsandbytes 0.50 CPU 反量化内核的限制（见 01）
        # CPU 上计算精度用 fp32：与 fp32 基线同精度，NF4 一行的差只来自 4-bit 存储
        kw = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32, llm_int8_skip_modules=skip))
    if kw:   # bitsandbytes 在加载时逐层量化：放在哪台设备上要在加载时由 device_map 指定
        kw["device_map"] = {"": 0} if cuda else {"": "cpu"}
    # bitsandbytes 变体的非量化部分（embedding、norm、lm_head）同样按 fp32 加载：
    # 与 fp32 行的差别只剩被量化的那些 Linear
    model, tok = models.load(name, source=args.source, device=args.device, dtype=dtype,
                             trust_remote_code=args.trust_remote_code, **kw)
    model.eval()
    if variant == "deepspeed":
        import deepspeed

        if cuda:   # 融合内核（注意力、MLP、LayerNorm）替换 HF 的模块
            engine = deepspeed.init_inference(model, dtype=torch.bfloat16, replace_with_kernel_inject=True)
        else:
            log.info("CPU：DeepSpeed 的内核注入（replace_with_kernel_inject）只有 CUDA 实现，这里不注入，"
                     "只用 InferenceEngine 包装 fp32 模型")
            engine = deepspeed.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=False)
        # 内核注入是就地替换 engine.module 里的层：取出它，后面按普通 HF 模型调 generate 与前向
        model = engine.module
    return model, tok


def generate_timed(model, tok, prompts: list[str], new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """逐条请求贪心生成固定个数的新 token，返回 (新 token 序列, 每条耗时 ms)。

    逐条而不是成批：部署时的延迟是"一个用户等多久"；min_new_tokens 让每个变体生成同样多的 token，
    提前遇到 EOS 的变体不会显得更快，逐位置比较一致性时两边也等长。
    """
    import torch

    outs, times = [], []
    with torch.no_grad():
        for p in prompts:
            # add_special_tokens=False：prompt_text 已套好对话模板，模板里自带的特殊 token 不能再加一遍
            enc = tok(p, return_tensors="pt", add_special_tokens=False).to(train.device_of(model))
            # 计时从 generate 开始：分词与模型无关、各变体相同，算进去只添噪声
            t0 = time.perf_counter()
            ids = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            times.append((time.perf_counter() - t0) * 1000)
            outs.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return outs, times


def pct(xs: list[float], q: float) -> float:
    """分位数（线性插值）。"""
    import numpy as np

    # 线性插值：默认 8 条请求时 p95 落在最慢的两条之间，不等于最慢那一条
    return float(np.percentile(xs, q))


def next_token_logprobs(model, tok, prompts: list[str], conts: list[list[int]]) -> list:
    """teacher forcing：每条 提示 + 给定续写 一次前向，取续写每个位置上"下一个 token"的 log 分布（fp32，放 CPU）。"""
    import torch

    res = []
    # inference_mode 比 no_grad 更省：不记版本计数，这些分布之后只做比较、不再参与求导
    with torch.inference_mode():
        for p, c in zip(prompts, conts):
            ids = tok(p, add_special_tokens=False)["input_ids"]
            # 输入 = 提示 + 续写去掉最后一个：从位置 len(ids)-1 起，每个输出恰好预测续写的下一个 token
            x = torch.tensor([ids + c[:-1]], device=train.device_of(model))
            # 转 fp32 再 log_softmax（bf16 的误差会混进 KL，见 lm.token_logprobs）；放 CPU：模型释放后分布还要留着比
            res.append(torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1:].float(), -1).cpu())
    return res


def teacher_forced(logps: list, ref: list) -> tuple[float, float]:
    """-> (argmax 与 fp32 相同的位置比例, 平均 KL(fp32 ‖ 变体))：同一前缀上逐步比较，不受前面翻转的牵连。"""
    same = sum(int((a.argmax(-1) == r.argmax(-1)).sum()) for a, r in zip(logps, ref))
    # KL(fp32 ‖ 变体) = Σ p_fp32 · (log p_fp32 − log p_变体)：以 fp32 为真分布，
    # 量变体在 fp32 看重的 token 上丢了多少概率
    kl = sum(float((r.exp() * (r - a)).sum()) for a, r in zip(logps, ref))
    n = sum(len(r) for r in ref)
    return same / n, kl / n


def measure_variant(args: Args, v: str, cuda: bool, prompts: list[str], ppl_rows: list[dict], ref_outs, log):
    """一个变体：加载 -> 预热 -> 逐条生成计时 -> 困惑度 -> fp32 续写上的 teacher-forcing 分布（ref_outs 为 None
    时就是 fp32 自己，用它刚生成的续写）。返回 (延迟与内存, 困惑度, 生成的 token, 每步的 log 分布)。

    峰值内存把加载也算在里面：量化模型部署时的内存就是"加载 + 推理"，只量推理会漏掉反量化的临时副本。
    """
    import psutil

    gc.collect()
    train.release_memory()   # 上一个变体释放的内存还给系统，RSS 基线才不被它抬高
    rss0 = psutil.Process().memory_info().rss
    with train.PeakMemory("cuda" if cuda else "cpu") as mem:
        model, tok = load_variant(args, v, cuda, log)
        generate_timed(model, tok, prompts[:1], 2)   # 预热：第一次调用有一次性开销
        outs, times = generate_timed(model, tok, prompts, args.max_new_tokens)
    # 一条一条算（batch_size=1，不填充）：各变体的困惑度只差在权重上，不受批内填充与矩阵形状的影响
    ppl = lm.perplexity(model, ppl_rows, batch_size=1, pad_token_id=tok.pad_token_id)
    logps = next_token_logprobs(model, tok, prompts, outs if ref_outs is None else ref_outs)
    memory = mem.peak_mb if cuda else (mem.peak_abs_mb * 2**20 - rss0) / 2**20
    # 下一个变体加载前先放掉这一个：两份模型同时在内存里，下一个的峰值就被抬高
    del model
    row = {"latency_ms_p50": round(pct(times, 50), 1), "latency_ms_p95": round(pct(times, 95), 1),
           "memory_mb": round(memory, 1)}
    return row, ppl, outs, logps


def agreement(outs: list[list[int]], ref: list[list[int]]) -> float:
    """与 fp32 逐位置相同的 token 比例。

    第一次分歧后的 token 接在不同的上文后面，多半也不同：所以这个数也反映"多早偏离"。
    """
    same = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o, r))
    # 分母用参照的总长度：某个变体若提前停下，缺的位置按不一致算，一致率不会虚高
    return same / sum(len(r) for r in ref)


def plot_variants(out, table: dict, args: Args, cuda: bool) -> None:
    """延迟 vs 一致性（点的大小 = 内存）：右上角（又慢又不准）的变体没有理由部署。"""
    fig, save = out.plot("latency_vs_agreement.png")
    ax = fig.add_subplot(111)
    # or 1：所有变体都量成 0（RSS 采样没涨）时免得除以 0
    top = max(r["memory_mb"] for r in table.values()) or 1
    for v, r in table.items():   # 内存可能量出负数（RSS 采样期间库释放了缓存），画图时按 0 算
        ax.scatter(r["latency_ms_p50"], r["agreement"], s=40 + 400 * max(r["memory_mb"], 0) / top)
        ax.annotate(f"{v} (ppl {r['ppl']:.1f})", (r["latency_ms_p50"], r["agreement"]), fontsize=7)
    ax.set_xlabel(f"latency p50 per request (ms, {args.max_new_tokens} new tokens)")
    ax.set_ylabel("greedy agreement with fp32")
    ax.set_title(f"Quantized inference: {out.model_name} ({'CUDA' if cuda else 'CPU'}); marker size = memory")
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "fp32" not in args.variants:
        raise UserError(f"--variants {' '.join(args.variants)}: 只能从 {' / '.join(VARIANTS)} 里选，且必须包含 fp32"
                        "（一致性与困惑度都以它为准）")
    cuda = models.pick_device(args.device).type == "cuda"
    if "deepspeed" in args.variants:
        import deepspeed  # noqa: F401 - 先导入：库本身的内存不算进 DeepSpeed 变体的峰值

    # 1. 同样的请求（领域问题，套对话模板：聊天模型部署时看到的就是这个格式）与同样的留出文本
    convs = data.load_sft(args.data or data.DATA_DIR / "domain" / "sft.jsonl")
    _, held = data.split(convs, 0.2, args.seed)
    tok = models.load_tokenizer(out.model_name, args.source, args.trust_remote_code)
    prompts = [data.prompt_text(tok, c[:-1]) for c in held[:args.num_prompts]]
    texts = ["\n".join(m["content"] for m in c) for c in held[:args.ppl_samples]]
    ppl_rows = [{"input_ids": tok(t, truncation=True, max_length=args.max_length)["input_ids"]} for t in texts]
    # --data 的留出集太小：在这里一行报错，而不是算出 p50 = p95 的假分位数
    if len(prompts) < 2:
        raise UserError(f"--data {args.data}: 留出部分不足 2 条对话，无法计时")

    # 2. 每个变体：加载 -> 逐条生成计时 -> 困惑度；fp32 最先跑，作为一致性的参照
    table, ref, ref_logps = {}, None, None
    # fp32 必须最先跑：ref 为 None 时 measure_variant 用它自己的续写作参照，后面的变体都和它比
    for v in ["fp32"] + [x for x in args.variants if x != "fp32"]:
        row, ppl, outs, logps = measure_variant(args, v, cuda, prompts, ppl_rows, ref, out.log)
        ref, ref_logps = (outs, logps) if ref is None else (ref, ref_logps)
        # fp32 自己和自己比：一致率 = 1、KL = 0，留在表里作对照行
        same, (tf_same, kl) = agreement(outs, ref), teacher_forced(logps, ref_logps)
        table[v] = {**row, "agreement": round(same, 4), "tf_agreement": round(tf_same, 4), "kl": round(kl, 6),
                    "ppl": round(ppl, 3)}
        out.log.info(f"{v:10s} p50 {row['latency_ms_p50']:8.1f} ms  p95 {row['latency_ms_p95']:8.1f} ms  "
                     f"内存 {row['memory_mb']:8.1f} MB  与 fp32 一致：自由生成 {same:.3f} / 同前缀 {tf_same:.3f}"
                     f"（KL {kl:.4f}）  ppl {ppl:.3f}")
    # 困惑度的差（而不是比值）：量化误差小时，差值在几位小数上就看得出来
    for r in table.values():
        r["ppl_delta"] = round(r["ppl"] - table["fp32"]["ppl"], 4)

    # 3. 图：延迟 vs 一致性（点的大小 = 内存）
    plot_variants(out, table, args, cuda)
    return out.finish({**table, "device": "cuda" if cuda else "cpu", "requests": len(prompts)},
                      summary="；".join(f"{v} p50 {r['latency_ms_p50']:.0f} ms/一致 {r['agreement']:.2f}"
                                       f"/ppl {r['ppl']:.2f}" for v, r in table.items()), claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
