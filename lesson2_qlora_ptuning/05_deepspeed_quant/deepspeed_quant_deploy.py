"""量化推理并排比：fp32、bf16、bitsandbytes int8 与 NF4、DeepSpeed init_inference——延迟、内存、和 fp32 的一致性、困惑度。

每个变体都重新加载同一个模型，在同样的提示上贪心生成同样多的 token：
- 延迟：每个请求（一条提示生成 max_new_tokens 个 token）的毫秒数，取 p50 / p95；
- 内存：从加载前到生成结束的峰值增量（CUDA：max_memory_allocated；CPU：进程 RSS 采样）；
- 一致性（agreement）：与 fp32 的贪心输出逐位置相同的 token 比例——量化改变了哪一步的 argmax，一眼可见；
- 困惑度：留出文本上的 ppl，看量化让模型"变笨"了多少。
DeepSpeed：deepspeed.init_inference 在 CUDA 上用 replace_with_kernel_inject=True 换成融合的推理内核（bf16/fp16）；
内核注入只有 CUDA 版，CPU 上不注入，只用它的 InferenceEngine 包装原模型（脚本会打一行说明），所以 CPU 上它和 fp32 一致。

运行：
  python lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py            # smollm2-135m，CPU
  python lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py --smoke    # tiny-llama
  python lesson2_qlora_ptuning/05_deepspeed_quant/deepspeed_quant_deploy.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson2/deepspeed_quant_deploy_gpu.yaml             # GPU：DeepSpeed 内核注入

你会看到（--smoke，tiny-llama，实测）：bf16 与 fp32 输出完全一致（agreement 1.00），bnb int8 0.84、NF4 0.89，
困惑度变化都 < 0.3%；CPU 上的 DeepSpeed（不注入）与 fp32 完全一致。默认（smollm2，1.4 分钟）：
bf16 一致 0.58、int8 0.25（ppl +2%）、NF4 0.10（ppl +31%），DeepSpeed（CPU 不注入）与 fp32 相同。图：latency_vs_agreement.png。
"""
import gc
import math
import time
from dataclasses import dataclass

from common import cli, data, models, run, train
from common.errors import UserError

VARIANTS = ("fp32", "bf16", "bnb_int8", "bnb_nf4", "deepspeed")


@dataclass
class Args(cli.CommonArgs):
    variants: list[str] = cli.arg(list(VARIANTS), "要比较的变体：" + " / ".join(VARIANTS))
    num_prompts: int = cli.arg(8, "请求条数（每条单独计时，取 p50/p95）", min=2)
    max_new_tokens: int = cli.arg(24, "每个请求生成的新 token 数", min=1)
    ppl_samples: int = cli.arg(24, "算困惑度的留出样本数", min=1)
    max_length: int = cli.arg(128, "算困惑度时每条最多多少 token", min=8)

    smoke_model = "tiny-llama"


SMOKE = dict(num_prompts=6, max_new_tokens=16)



def load_variant(args: Args, variant: str, cuda: bool, log):
    """按变体加载（每次都从磁盘重新加载，内存从零量起）。"""
    import torch
    from transformers import AutoConfig, BitsAndBytesConfig

    name, kw = args.resolved_model(), {}
    dtype = "bfloat16" if variant == "bf16" or (cuda and variant == "deepspeed") else "float32"
    if variant == "bnb_int8":
        kw = dict(quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    if variant == "bnb_nf4":
        skip = ["lm_head"]
        if not cuda and AutoConfig.from_pretrained(models.resolve(name, args.source)).intermediate_size % 64:
            skip.append("down_proj")   # bitsandbytes 0.50 CPU 反量化内核的限制（见 01）
        kw = dict(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if cuda else torch.float32, llm_int8_skip_modules=skip))
    if kw:
        kw["device_map"] = {"": 0} if cuda else {"": "cpu"}
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
        model = engine.module
    return model, tok


def generate_timed(model, tok, prompts: list[str], new_tokens: int) -> tuple[list[list[int]], list[float]]:
    """逐条请求贪心生成固定个数的新 token，返回 (新 token 序列, 每条耗时 ms)。"""
    import torch

    outs, times = [], []
    with torch.no_grad():
        for p in prompts:
            enc = tok(p, return_tensors="pt", add_special_tokens=False).to(train.device_of(model))
            t0 = time.perf_counter()
            ids = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            times.append((time.perf_counter() - t0) * 1000)
            outs.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    return outs, times


def perplexity(model, tok, texts: list[str], max_length: int) -> float:
    """留出文本的困惑度。"""
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            ids = ids.to(train.device_of(model))
            if ids.shape[1] < 2:
                continue
            logits = model(input_ids=ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    return math.exp(nll / n)


def pct(xs: list[float], q: float) -> float:
    """分位数（线性插值）。"""
    import numpy as np

    return float(np.percentile(xs, q))


def main(args: Args) -> dict:
    import psutil

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad or "fp32" not in args.variants:
        raise UserError(f"--variants {' '.join(args.variants)}: 只能从 {' / '.join(VARIANTS)} 里选，且必须包含 fp32"
                        "（一致性与困惑度都以它为准）")
    cuda = models.pick_device(args.device).type == "cuda"
    if "deepspeed" in args.variants:
        import deepspeed  # noqa: F401 - 先导入：库本身的内存不算进 DeepSpeed 变体的峰值

    # 1. 同样的请求（领域问题，套对话模板）与同样的留出文本
    convs = data.load_sft(args.data or data.DATA_DIR / "domain" / "sft.jsonl")
    _, held = data.split(convs, 0.2, args.seed)
    tok = models.load_tokenizer(out.model_name, args.source, args.trust_remote_code)
    prompts = [data.prompt_text(tok, c[:-1]) for c in held[:args.num_prompts]]
    texts = ["\n".join(m["content"] for m in c) for c in held[:args.ppl_samples]]
    if len(prompts) < 2:
        raise UserError(f"--data {args.data}: 留出部分不足 2 条对话，无法计时")

    # 2. 每个变体：加载 -> 逐条生成计时 -> 困惑度；fp32 最先跑，作为参照
    table, ref = {}, None
    for v in ["fp32"] + [x for x in args.variants if x != "fp32"]:
        gc.collect()
        train.release_memory()
        rss0 = psutil.Process().memory_info().rss
        with train.PeakMemory("cuda" if cuda else "cpu") as mem:
            model, tok = load_variant(args, v, cuda, out.log)
            generate_timed(model, tok, prompts[:1], 2)   # 预热：第一次调用有一次性开销
            outs, times = generate_timed(model, tok, prompts, args.max_new_tokens)
        ppl = perplexity(model, tok, texts, args.max_length)
        memory = mem.peak_mb if cuda else (mem.peak_abs_mb * 2**20 - rss0) / 2**20
        if ref is None:
            ref = outs
        same = sum(a == b for o, r in zip(outs, ref) for a, b in zip(o, r))
        agreement = same / sum(len(r) for r in ref)
        table[v] = {"latency_ms_p50": round(pct(times, 50), 1), "latency_ms_p95": round(pct(times, 95), 1),
                    "memory_mb": round(memory, 1), "agreement": round(agreement, 4), "ppl": round(ppl, 3)}
        out.log.info(f"{v:10s} p50 {table[v]['latency_ms_p50']:8.1f} ms  p95 {table[v]['latency_ms_p95']:8.1f} ms  "
                     f"内存 {memory:8.1f} MB  与 fp32 一致 {agreement:.3f}  ppl {ppl:.3f}")
        del model
    for r in table.values():
        r["ppl_delta"] = round(r["ppl"] - table["fp32"]["ppl"], 4)

    # 3. 图：延迟 vs 一致性（点的大小 = 内存）
    fig, save = out.plot("latency_vs_agreement.png")
    ax = fig.add_subplot(111)
    top = max(r["memory_mb"] for r in table.values()) or 1
    for v, r in table.items():
        ax.scatter(r["latency_ms_p50"], r["agreement"], s=40 + 400 * max(r["memory_mb"], 0) / top)
        ax.annotate(f"{v} (ppl {r['ppl']:.1f})", (r["latency_ms_p50"], r["agreement"]), fontsize=7)
    ax.set_xlabel(f"latency p50 per request (ms, {args.max_new_tokens} new tokens)")
    ax.set_ylabel("greedy agreement with fp32")
    ax.set_title(f"Quantized inference: {out.model_name} ({'CUDA' if cuda else 'CPU'}); marker size = memory")
    save()
    return out.finish({**table, "device": "cuda" if cuda else "cpu", "requests": len(prompts)},
                      summary="；".join(f"{v} p50 {r['latency_ms_p50']:.0f} ms/一致 {r['agreement']:.2f}/ppl {r['ppl']:.2f}"
                                       for v, r in table.items()))


if __name__ == "__main__":
    main(cli.parse(Args))
