"""回答多样性诊断：不同解码设置（温度、top-p、top-k、重复惩罚）与不同模型（SFT vs DPO）下，同一个问题
采样多次，回答彼此有多不一样？用它发现"模式坍缩"（对齐后模型对什么问题都给几乎同一套话）。

指标（每个设置、每个问题采样 --num-samples 次，再对问题取平均）：
- distinct-1 / distinct-2：所有回答里不同的 1-gram / 2-gram 占比（中文按字、英文按词）；
- self-BLEU：每个回答以同一问题的其它回答为参考算 BLEU（sacrebleu，zh 分词），越高越雷同（0..1）；
- 句向量离散度：同一问题各回答的 all-MiniLM 向量两两余弦距离的平均，语义层面的多样性；
- 重复率：单个回答内部重复的 3-gram 占比（复读机）。
模式坍缩标记：distinct-2 < --collapse-distinct2 或 self-BLEU > --collapse-self-bleu。
SFT vs DPO：起点模型（smollm2-135m-Instruct 已做过 SFT）与在偏好对上用 TRL DPOTrainer 训练 --dpo-steps 步后的
模型，用同一个解码设置比较；学习率过大的 DPO 是常见的坍缩来源。

运行：
  python lesson5_deployment_monitoring/06_diversity_debug/diversity_evaluation.py            # CPU，smollm2-135m
  python lesson5_deployment_monitoring/06_diversity_debug/diversity_evaluation.py --smoke    # tiny-qwen2
  python lesson5_deployment_monitoring/06_diversity_debug/diversity_evaluation.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson5/diversity_evaluation_gpu.yaml                     # GPU

你会看到：贪心解码每次回答完全相同（distinct 最低、self-BLEU 为满分 1，被标为坍缩）；温度采样后 distinct-2 明显
升高、self-BLEU 明显下降，句向量离散度也升高（不只是换词，语义上也分散开）；温度越高、top-p/top-k 越宽，
distinct 越高、self-BLEU 越低；这次 DPO（学习率适中）没有造成坍缩，同一解码设置下 distinct-2 与 SFT 相近；
图 diversity.png。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：3.1 分钟，5.9 GB，结论 5/5 成立
  ✓ 温度采样比贪心多样：distinct-2 温度 1.0 − 贪心：0.7669（≥ 0.3）
  ✓ 贪心每次回答相同、采样不再雷同：self-BLEU 贪心 − 温度 1.0：0.952（≥ 0.5）
  ✓ 采样的回答在语义上也分散开：句向量离散度 温度 1.0 − 贪心：0.6809（≥ 0.1）
  ✓ 温度越高越多样：distinct-2 温度 1.0 − 温度 0.7：0.0808（> 0.02）
  ✓ 这次 DPO 没有造成模式坍缩：同一解码设置下 distinct-2 DPO / SFT：1.003（≥ 0.8）
<!-- /results -->
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from common import cli, data, models, run, train

# 名字 -> generate 的采样参数。温度 0.7 与 1.0 对照"温度越高越散"；top-p / top-k 在温度 1.0 上截尾，看截掉长尾
# 能否保住多样性又少出怪词；重复惩罚治的是单个回答内部的复读（repetition_rate），不是回答之间的雷同
SETTINGS = {
    "greedy": dict(do_sample=False),
    "temp_0.7": dict(do_sample=True, temperature=0.7),
    "temp_1.0": dict(do_sample=True, temperature=1.0),
    "top_p_0.9": dict(do_sample=True, temperature=1.0, top_p=0.9),
    "top_k_20": dict(do_sample=True, temperature=1.0, top_k=20),
    "rep_penalty_1.3": dict(do_sample=True, temperature=0.7, repetition_penalty=1.3),
}
# 中文按字、英文按词：中文没有空格，按字切才能和英文的"词"放在同一把尺子上比 distinct-n
_TOKEN = re.compile(r"[\u4e00-\u9fff]|[A-Za-z0-9']+")


@dataclass
class Args(cli.CommonArgs):
    num_prompts: int = cli.arg(8, "用多少个问题（取自 data/sft/chat.jsonl 的用户消息）", min=1)
    num_samples: int = cli.arg(5, "每个问题采样几次", min=2, max=64,
                               why="所有问题的样本一批生成：批 = 问题数 × 样本数，KV 缓存随批增长")
    max_new_tokens: int = cli.arg(48, "每个回答生成多少 token", min=1)
    compare_setting: str = cli.arg("temp_1.0", "SFT vs DPO 比较用哪个解码设置", choices=list(SETTINGS))
    # 每步 4 对 ×（chosen + rejected）再加一次参考前向：2 核上原来的 20 步 × 8 对占了 21 分钟运行的大半、峰值 11 GB
    dpo_steps: int = cli.arg(12, "DPO 训练步数（0 = 不比较模型）", min=0)
    dpo_learning_rate: float = cli.arg(5e-5, "DPO 学习率")
    beta: float = cli.arg(0.1, "DPO beta", min=0)
    collapse_distinct2: float = cli.arg(0.3, "distinct-2 低于它算坍缩", min=0, max=1)
    collapse_self_bleu: float = cli.arg(0.7, "self-BLEU 高于它算坍缩", min=0, max=1)

    smoke_model = "tiny-qwen2"


# --smoke：4 个问题 × 4 次采样、短回答；DPO 用大学习率几步（极小模型上足以看到分布变化）
SMOKE = dict(num_prompts=4, num_samples=4, max_new_tokens=16, dpo_steps=8, dpo_learning_rate=5e-3)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测（同一模型的贪心解码）
CLAIMS = [
    run.Claim("温度采样比贪心多样：distinct-2 温度 1.0 − 贪心",
              'm["temp_1.0"]["distinct_2"] - greedy["distinct_2"]', ">=", 0.3, 0.3),
    run.Claim("贪心每次回答相同、采样不再雷同：self-BLEU 贪心 − 温度 1.0",
              'greedy["self_bleu"] - m["temp_1.0"]["self_bleu"]', ">=", 0.5, 0.5),
    run.Claim("采样的回答在语义上也分散开：句向量离散度 温度 1.0 − 贪心",
              'm["temp_1.0"]["embedding_dispersion"] - greedy["embedding_dispersion"]', ">=", 0.3, 0.1),
    run.Claim("温度越高越多样：distinct-2 温度 1.0 − 温度 0.7",
              'm["temp_1.0"]["distinct_2"] - m["temp_0.7"]["distinct_2"]', ">", 0.0, 0.02),
    # 学习率适中的几步 DPO 不该让模型坍缩（学习率过大才是常见的坍缩来源）；--dpo-steps 0 时没有可比的模型
    run.Claim("这次 DPO 没有造成模式坍缩：同一解码设置下 distinct-2 DPO / SFT",
              'models["dpo"]["distinct_2"] / models["sft"]["distinct_2"]', ">=", 0.8, 0.8),
]


def tokens(text: str) -> list[str]:
    """小写后切成字/词：大小写不同不该算作"多样"。"""
    return _TOKEN.findall(text.lower())


def distinct_n(texts: list[str], n: int) -> float:
    """所有回答合起来，不同 n-gram 占全部 n-gram 的比例（Li et al. 2016）：1 = 没有任何重复的片段。"""
    grams = [tuple(t[i:i + n]) for t in map(tokens, texts) for i in range(len(t) - n + 1)]
    # 回答都短于 n 个字/词（或全空）时没有 n-gram：记 0（最不多样），而不是除以 0
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(texts: list[str]) -> float:
    """每个回答以其余回答为参考算 BLEU，再平均（Zhu et al. 2018, Texygen）：回答彼此越像越接近 1。

    tokenize="zh"：sacrebleu 的中文分词按字切、英文照常，中英混合的回答也能算。
    """
    import sacrebleu

    # sacrebleu 的分数是 0..100：除以 100，与 distinct-n 和 --collapse-self-bleu 的阈值同在 0..1
    scores = [sacrebleu.sentence_bleu(h, [r for j, r in enumerate(texts) if j != i], tokenize="zh").score / 100
              for i, h in enumerate(texts)]
    return sum(scores) / len(scores)


def repetition(text: str) -> float:
    """单个回答内部重复出现的 3-gram 占比：抓"复读机"，这种坍缩在回答之间的指标里看不出来。"""
    g = [tuple(t) for t in zip(*[tokens(text)[i:] for i in range(3)])]
    return 1 - len(set(g)) / len(g) if g else 0.0


def sample(model, tok, prompts: list[str], n: int, max_new_tokens: int, kw: dict,  # noqa: ANN001
           seed: int) -> list[list[str]]:
    """每个提示采样 n 次（num_return_sequences），固定种子可复现。"""
    import torch

    torch.manual_seed(seed)   # 每个设置从同一个种子开始：设置之间的差别来自解码参数，而不是运气
    tok.padding_side = "left"   # 左填充：生成的 token 接在每行最后一个真实 token 后面
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    # 贪心时 n 次结果必然相同：只生成 1 次、下面再复制 n 份，省掉 n−1 倍的计算
    with torch.no_grad():
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=n if kw["do_sample"] else 1,
                             pad_token_id=tok.pad_token_id, **kw)
    # 左填充后每行的提示一样宽：按提示宽度一刀切，剩下的正好是新生成的部分
    texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tok.padding_side = "right"
    if not kw["do_sample"]:   # 贪心：采样 n 次得到的就是同一个回答 n 遍
        return [[t.strip()] * n for t in texts]
    # generate 的 num_return_sequences 输出按提示排列：同一提示的 n 个样本相邻，按 n 个一组切回去
    return [[t.strip() for t in texts[i * n:(i + 1) * n]] for i in range(len(prompts))]


def measure(groups: list[list[str]], embedder, args: Args) -> dict:  # noqa: ANN001
    """五个指标都先在每个问题的一组回答内算，再对问题平均：不同问题的回答本来就该不同，不能混在一起算。"""
    import numpy as np

    from common import retrieval

    disp = []
    for g in groups:
        v = retrieval.embed(embedder, [t or "(empty)" for t in g])   # 向量已归一化：点积就是余弦相似度
        disp.append(float(np.mean([1 - float(v[i] @ v[j]) for i, j in itertools.combinations(range(len(g)), 2)])))
    m = {"distinct_1": float(np.mean([distinct_n(g, 1) for g in groups])),
         "distinct_2": float(np.mean([distinct_n(g, 2) for g in groups])),
         "self_bleu": float(np.mean([self_bleu(g) for g in groups])),
         "embedding_dispersion": float(np.mean(disp)),
         "repetition_rate": float(np.mean([repetition(t) for g in groups for t in g]))}
    m = {k: round(v, 4) + 0.0 for k, v in m.items()}   # + 0.0：把 -0.0 变成 0.0
    # 任一项越线就算坍缩：distinct-2 看用词是否单调，self-BLEU 看整句是否雷同，各能抓到对方漏掉的情况
    m["mode_collapse"] = m["distinct_2"] < args.collapse_distinct2 or m["self_bleu"] > args.collapse_self_bleu
    return m


def dpo_model(args: Args, out, model, tok):  # noqa: ANN001
    """在课程偏好对上做几步 DPO（LoRA，合并后返回）。"""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    pairs = data.load_preference(data.DATA_DIR / "preference" / "pairs.jsonl")
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": p["prompt"]}],
                             "chosen": [{"role": "assistant", "content": p["chosen"]}],
                             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs])
    # report_to=[]：这次 DPO 只为造一个对比用的模型，不往 --report-to 的跟踪里记一次与本课指标无关的训练
    cfg = DPOConfig(output_dir=str(out.path("dpo")), max_steps=args.dpo_steps, learning_rate=args.dpo_learning_rate,
                    beta=args.beta, per_device_train_batch_size=4, max_length=192, logging_steps=5,
                    save_strategy="no", report_to=[], seed=args.seed, **train.trainer_flags(model, log=False))
    # LoRA + 合并：参考模型就是关掉 adapter 的同一个模型，不必在内存里再放一份
    t = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                   peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    t.train()
    return t.model.merge_and_unload().eval()


def plot(out, results: dict) -> None:  # noqa: ANN001
    """三个指标并排画：distinct-2 与离散度越高越多样，self-BLEU 越高越雷同，坍缩的设置一眼可见。"""
    fig, save = out.plot("diversity.png")
    names = list(results)
    ax = fig.add_subplot(1, 1, 1)
    w = 0.27   # 三根柱的总宽小于 1：相邻两组之间留出空隙，不粘在一起
    for i, key in enumerate(("distinct_2", "self_bleu", "embedding_dispersion")):
        ax.bar([x + (i - 1) * w for x in range(len(names))], [results[n][key] for n in names], w, label=key)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="score", title="Answer diversity by decoding setting / model")
    ax.legend()
    save()


def load_prompts(convs: list[list[dict]], args: Args, tok) -> list[str]:  # noqa: ANN001
    """取对话数据里每段对话的第一个用户问题，套对话模板：与上线时模型看到的提示一致。"""
    questions = [[m for m in c if m["role"] == "user"][:1] for c in convs]
    # 没有用户消息的对话跳过：空提示的回答与任何问题无关，只会拉偏多样性
    return [data.prompt_text(tok, q) for q in questions if q][:args.num_prompts]


def sweep_settings(model, tok, prompts: list[str], embedder, args: Args, log) -> dict:  # noqa: ANN001
    """同一个模型、同一批问题，逐个解码设置采样并打分。"""
    results = {}
    for name, kw in SETTINGS.items():
        groups = sample(model, tok, prompts, args.num_samples, args.max_new_tokens, kw, args.seed)
        results[name] = measure(groups, embedder, args)
        log.info(f"{name:>16}: {results[name]}；例：{groups[0][0][:40]!r}")
    return results


def compare_dpo(args: Args, out, model, tok, prompts: list[str], embedder) -> dict:  # noqa: ANN001
    """DPO 后的模型用同一个解码设置、同一个种子再采样：差别只来自模型本身。"""
    dpo = dpo_model(args, out, model, tok)
    groups = sample(dpo, tok, prompts, args.num_samples, args.max_new_tokens, SETTINGS[args.compare_setting],
                    args.seed)
    m = measure(groups, embedder, args)
    out.log.info(f"DPO @ {args.compare_setting}: {m}；例：{groups[0][0][:40]!r}")
    return m


def main(args: Args) -> dict:
    from common import retrieval

    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 先读数据、再加载模型：--data 给的文件坏了，一行报错，不必等模型加载完
    convs = data.load_sft(args.data or data.DATA_DIR / "sft" / "chat.jsonl")
    # 要训 DPO 才按训练加载（CPU 上 fp32 主权重）；只采样时有原生 bf16 的 CPU 可用 bf16 推理，更快
    model, tok = models.load_args(args, for_training=args.dpo_steps > 0)
    prompts = load_prompts(convs, args, tok)
    embedder = retrieval.load_embedder(None)

    # 1. 同一个模型，六种解码设置：先分清"解码参数造成的雷同"，才能判断是不是模型本身坍缩了
    results = sweep_settings(model, tok, prompts, embedder, args, out.log)

    # 2. SFT vs DPO：同一解码设置下比较。DPO 把概率压向 chosen，学习率过大时常见坍缩
    models_cmp = {}
    if args.dpo_steps:
        models_cmp["sft"] = results[args.compare_setting]
        models_cmp["dpo"] = results["dpo@" + args.compare_setting] = compare_dpo(args, out, model, tok, prompts,
                                                                                 embedder)

    # 3. 结论：顶层 mode_collapse 说的是 DPO 模型（解码设置的坍缩列在 collapsed_settings 里）
    plot(out, results)
    collapsed = [n for n, r in results.items() if r["mode_collapse"]]
    g, t = results["greedy"]["distinct_2"], results["temp_1.0"]["distinct_2"]
    return out.finish({**results, "models": models_cmp, "mode_collapse": bool(models_cmp.get("dpo", {}).get(
        "mode_collapse", False)), "collapsed_settings": collapsed},
        summary=f"distinct-2：greedy {g:.2f} / temp_1.0 {t:.2f}；坍缩：{collapsed or '无'}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
