"""对齐方法横向比较：DPO、KTO、ORPO、SimPO，同一个 SFT 起点、同一份数据、同样步数，一张表看清差别。

四种方法的损失（π = 策略，π_ref = 冻结的参考模型，σ = sigmoid，log π(y) = 回答各 token 的 log 概率之和）：
  DPO   −log σ(β·[log π/π_ref(y_c) − log π/π_ref(y_r)])                         需要参考模型，成对数据
  KTO   好回答：1 − σ(β·(log π/π_ref(y) − z))；坏回答：1 − σ(β·(z − log π/π_ref(y)))  需要参考模型，只要"好/坏"标签
        （z = 策略与参考在不匹配回答上的 KL 估计；本脚本把偏好对拆成 (prompt, chosen, 好)、(prompt, rejected, 坏)）
  ORPO  SFT 损失 + λ·(−log σ(log odds(y_c) − log odds(y_r)))，odds = p/(1−p)，p 为按长度平均的概率  不需要参考模型
  SimPO −log σ(β/|y_c|·log π(y_c) − β/|y_r|·log π(y_r) − γ)（TRL 中 CPOTrainer, loss_type="simpo"）  不需要参考模型
评估（同一把尺子）：留出偏好对上"策略给 chosen 的平均每 token log 概率高于 rejected"的比例（pref_accuracy）
与平均差值（margin）；每一对的差值比 SFT 起点大的比例（toward_chosen：训练有没有把没见过的对往 chosen 那边推，
相当于以起点为参考的隐式奖励准确率）；训练秒数；训练期间的峰值内存（CPU 为进程 RSS 增量，GPU 为显存峰值）。

运行：
  python lesson4_alignment/01_alignment_overview/compare_methods.py            # CPU，smollm2-135m
  python lesson4_alignment/01_alignment_overview/compare_methods.py --smoke    # tiny-qwen2，全参数
  python lesson4_alignment/01_alignment_overview/compare_methods.py --model Qwen/Qwen2.5-1.5B-Instruct \\
      --source hf --config configs/lesson4/compare_methods_gpu.yaml             # GPU，bf16
  --data 自己的偏好文件（prompt/chosen/rejected）；--methods dpo,orpo 只比其中几种。

你会看到（默认，smollm2-135m + LoRA，每种方法 12 步）：results.md 一张表，每种方法的 pref_accuracy、margin、
秒数、峰值内存，第一行是 SFT 起点。四种损失都把 margin 从起点推开、把多数留出对往 chosen 推；直接优化偏好的 DPO、
SimPO 推得最多，ORPO 的偏好项只是 SFT 损失上的小加项，推得最少。准确率只数"排对"的对数，比 margin 粗：12 步里起点
排错的对大多只是往对的方向挪了一点、还没翻过来；只有 SimPO 优化的正好是这把尺子（长度归一化的差值）。
DPO 每步多一次参考模型前向，比不需要参考模型的 ORPO、SimPO 慢。内存：默认走 LoRA，参考模型 = 关掉 adapter，
不另占权重，所以 DPO 的内存并不更高（全参数 --lora-r 0 时才多一份冻结副本）；RSS 增量里还混着先跑的方法付的
一次性开销，表里照实列出、不作结论。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：10.0 分钟，7.0 GB（超过 10 分钟），结论 5/5 成立
  ✓ 四种损失都把留出的平均 log π 差（chosen − rejected）推离 SFT 起点：各方法 margin − 起点的最小值：0.0097（> 0）
  ✓ 每种方法都把多数没见过的偏好对往 chosen 推：各方法逐对差值比起点大的比例的最小值：0.7015（≥ 0.55）
  ✓ 直接优化偏好的 DPO、SimPO 推得比 ORPO（SFT 损失上的小加项）多：两者较小的 margin − ORPO 的：0.0767（≥ 0.03）
  ✓ SimPO 优化的就是长度归一化的差值，留出准确率高过起点（至少多排对一对）：SimPO 准确率 − 起点：0.0298（≥ 0.01）
  ✓ DPO 每步多一次参考模型前向，训练比不需要参考模型的方法慢：DPO 秒数 / ORPO、SimPO 中较慢者：1.707（≥ 1.2）
<!-- /results -->
输出：compare_methods.png、results.md。详见同目录 README.md。
"""

import copy
import time
from dataclasses import dataclass

from common import cli, data, lm, models, run, train
from common.errors import UserError

METHODS = ("dpo", "kto", "orpo", "simpo")
# 参考模型要多一次前向（全参数时还多一份权重）：这是 ORPO / SimPO 想省掉的成本
NEEDS_REF = {"dpo": True, "kto": True, "orpo": False, "simpo": False}


@dataclass
class Args(cli.CommonArgs):
    methods: str = cli.arg("dpo,kto,orpo,simpo", "要比较的方法（逗号分隔）：dpo / kto / orpo / simpo")
    sft_steps: int = cli.arg(20, "共同起点：先在 prompt+chosen 上 SFT 多少步（0 = 直接用原模型）", min=0)
    max_steps: int = cli.arg(12, "每种方法训练多少步（都一样才公平；CPU 上 4 种方法共约 5 分钟）", min=1)
    learning_rate: float = cli.arg(1e-4, "每种方法的学习率（都一样；LoRA 的量级，全参数 --lora-r 0 时用 ~5e-6）")
    sft_learning_rate: float = cli.arg(2e-4, "SFT 起点的学习率（LoRA；全参数用 ~2e-5）")
    beta: float = cli.arg(0.1, "DPO/KTO/ORPO 的 β（ORPO 里是 λ）", min=1e-6)
    simpo_beta: float = cli.arg(2.0, "SimPO 的 β：长度归一化后的奖励尺度要大得多（论文用 2-2.5）", min=1e-6)
    simpo_gamma: float = cli.arg(0.5, "SimPO 的目标间隔 γ", min=0)
    per_device_train_batch_size: int = cli.arg(4, "每步几对（KTO 每步同样条数的单条样本）", min=2)
    max_length: int = cli.arg(256, "prompt+回答最多多少 token", min=8)
    lora_r: int = cli.arg(16, "LoRA 秩：SFT 起点与每种方法都只训练 adapter（DPO/KTO 的参考模型 = 关掉 adapter，"
                              "不另占一份权重）；0 = 全参数", min=0)
    lora_alpha: int = cli.arg(32, "LoRA 缩放系数", min=1)
    val_fraction: float = cli.arg(0.2, "留出比例", min=0.01, max=0.9)

    smoke_model = "tiny-qwen2"


# 冒烟：极小模型全参数训练，承受得住大学习率；12 步就能让四种方法彼此拉开
SMOKE = dict(lora_r=0, sft_steps=20, max_steps=12, learning_rate=5e-4, sft_learning_rate=1e-3, max_length=128)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线 = 同一次运行里的 SFT 起点或不需要参考模型的方法。
# 前两条对 --methods 选出的任意几种都成立；后三条比较具体的方法，只在四种都跑时检查
# 表达式里写死四个名字、再用 `if k in m` 跳过没跑的：--methods 只选几种时前两条照样能求值，不会 KeyError
_ALL = '("dpo", "kto", "orpo", "simpo")'
CLAIMS = [
    run.Claim("四种损失都把留出的平均 log π 差（chosen − rejected）推离 SFT 起点：各方法 margin − 起点的最小值",
              f'min(m[k]["margin"] for k in {_ALL} if k in m) - sft_start["margin"]', ">", 0.01, 0.0),
    # 原来的"每种方法都提高留出准确率"在默认运行（12 步 × 4 对）上只有 SimPO 成立（手量 0.627 -> 0.657）：准确率只数
    # 翻过来的对，12 步里多数对只是挪了一点。改成逐对看方向（toward_chosen），准确率的那一条只对 SimPO 说
    run.Claim("每种方法都把多数没见过的偏好对往 chosen 推：各方法逐对差值比起点大的比例的最小值",
              f'min(m[k]["toward_chosen"] for k in {_ALL} if k in m)', ">=", 0.55, 0.55),
    run.Claim("直接优化偏好的 DPO、SimPO 推得比 ORPO（SFT 损失上的小加项）多：两者较小的 margin − ORPO 的",
              'min(dpo["margin"], simpo["margin"]) - orpo["margin"]', ">=", 0.08, 0.03),
    run.Claim("SimPO 优化的就是长度归一化的差值，留出准确率高过起点（至少多排对一对）：SimPO 准确率 − 起点",
              'simpo["pref_accuracy"] - sft_start["pref_accuracy"]', ">=", 0.05, 0.01),
    # 秒数：冒烟时极小模型每步只要几十毫秒，满载的共享 CPU 上计时会翻转（实测 ORPO 比 DPO 还慢），只在默认运行检查。
    # 原来还有一条"DPO 峰值内存最高"：默认走 LoRA，参考模型 = 关掉 adapter，不另占权重，这一条本来就不该成立
    # （手量的 5168 vs 3092 MB 是先跑的 DPO 付了进程的一次性开销）；已删，见文档字符串
    run.Claim("DPO 每步多一次参考模型前向，训练比不需要参考模型的方法慢：DPO 秒数 / ORPO、SimPO 中较慢者",
              'dpo["seconds"] / max(orpo["seconds"], simpo["seconds"])', ">=", None, 1.2),
]


def parse_methods(text: str) -> list[str]:
    """--methods 解析成列表；拼错的方法名在加载模型之前一行报错，而不是训练到一半才失败。"""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    # 空列表也要拒绝（如 --methods ,）：否则要等 SFT 起点训完，max() 在空的 results 上才报错
    if not methods or [m for m in methods if m not in METHODS]:
        raise UserError(f"--methods {text}: 只能从 {', '.join(METHODS)} 里选")
    return methods


def sft_start(model, tok, pairs, args, out):
    """共同起点：TRL SFTTrainer 在 prompt + chosen 上训练（prompt-completion 格式，只在回答上算损失）。

    偏好方法都假设策略已经会按格式回答（InstructGPT、Zephyr 都先 SFT）；从裸模型开始，比的就是谁先学会格式。
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # prompt-completion 格式：SFTTrainer 的 completion_only_loss 默认（None）对这种格式只在 completion 上算损失
    ds = Dataset.from_list([{"prompt": p["prompt"], "completion": p["chosen"]}
                            for p in data.preference_conversational(pairs)])
    # 批大小写死 8、不跟 --per-device-train-batch-size：那个旋钮是被比较的方法每步几对，改它不该连起点一起变；
    # report_to=[]：起点不是比较对象，不往实验跟踪里多记一条运行
    cfg = SFTConfig(output_dir=str(out.path("sft")), seed=args.seed, max_steps=args.sft_steps,
                    learning_rate=args.sft_learning_rate, per_device_train_batch_size=8, max_length=args.max_length,
                    logging_steps=10, save_strategy="no", report_to=[], **train.trainer_flags(model, log=False))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=train.lora_config(args.lora_r, args.lora_alpha))
    trainer.train()
    # LoRA：把 SFT 的 adapter 合并进权重，得到一个普通模型作为所有方法的共同起点（各方法再各挂一个新 adapter）
    return train.merge_lora(trainer.model)


def make_trainer(method: str, model, tok, pairs, args, out):
    """每种方法用 TRL 里对应的训练器；共同的超参数一样（差别只来自损失，比较才公平）。"""
    from datasets import Dataset

    # disable_dropout：策略与参考模型的 log π 要在同一个确定的网络上算，否则比值里混进了 dropout 噪声
    common = dict(output_dir=str(out.path(f"trainer_{method}")), seed=args.seed, max_steps=args.max_steps,
                  learning_rate=args.learning_rate, per_device_train_batch_size=args.per_device_train_batch_size,
                  max_length=args.max_length, logging_steps=5, save_strategy="no", report_to=out.trainer_report_to(),
                  disable_dropout=True, **train.trainer_flags(model, log=False))
    # 对话格式（消息列表）交给 TRL 自己套 chat template：四个训练器按同一个模板渲染，输入格式一致
    ds = Dataset.from_list(data.preference_conversational(pairs))
    # 起点已把 SFT 的 adapter 合并进权重：每种方法在它上面各挂一个全新的 adapter，互不继承
    peft = train.lora_config(args.lora_r, args.lora_alpha)
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer(model=model, ref_model=ref_copy(model, args), args=DPOConfig(beta=args.beta, **common),
                          train_dataset=ds, processing_class=tok, peft_config=peft)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        # KTO 只要"好/坏"标签（前景理论的损失，不需要成对）：把每个偏好对拆成两条单独的样本
        unpaired = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
                    for p in data.preference_conversational(pairs) for k in ("chosen", "rejected")]
        return KTOTrainer(model=model, ref_model=ref_copy(model, args), args=KTOConfig(beta=args.beta, **common),
                          train_dataset=Dataset.from_list(unpaired), processing_class=tok, peft_config=peft)
    if method == "orpo":
        # TRL 1.x 把 ORPO / CPO 挪进了 trl.experimental：旧教程里的 from trl import ORPOTrainer 会 ImportError
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        # ORPO 没有参考模型：这里的 beta 是论文里的 λ（偏好项相对 SFT 损失的权重），不是 KL 约束的强度
        return ORPOTrainer(model=model, args=ORPOConfig(beta=args.beta, **common), train_dataset=ds,
                           processing_class=tok, peft_config=peft)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # SimPO = CPO 的损失换成长度归一化 + 目标间隔；cpo_alpha=0 去掉 CPO 附带的 SFT 项，才是论文里的 SimPO
    cfg = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=args.simpo_beta, simpo_gamma=args.simpo_gamma, **common)
    return CPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft)


def ref_copy(model, args):
    """全参数训练时参考模型是起点的一份冻结副本；LoRA 时不需要（TRL 关掉 adapter 就是参考模型），返回 None。"""
    # eval() + requires_grad_(False)：参考模型不带 dropout 噪声、不存梯度，只多占一份权重
    return None if args.lora_r else copy.deepcopy(model).eval().requires_grad_(False)


def avg_response_logp(model, tok, prompt: list[dict], response: list[dict], max_length: int) -> float:
    """回答（含 eos）平均每个 token 的 log π：按长度平均，免得"回答越短 log 概率之和越高"替某个方法加分。"""
    import torch

    ids_p = tok(data.prompt_text(tok, prompt), add_special_tokens=False).input_ids
    # 提示已由对话模板渲染（特殊 token 都在文本里），add_special_tokens=False 免得再加一遍；
    # 回答补上 eos：在哪里停下也是回答的一部分；截到训练用的同一个 max_length
    ids = (ids_p + tok(response[-1]["content"] + tok.eos_token, add_special_tokens=False).input_ids)[:max_length]
    x = torch.tensor([ids], device=model.device)
    answer = torch.zeros_like(x)
    answer[0, len(ids_p):] = 1   # 只数回答部分：提示的概率每种方法都一样，算进来只会冲淡差别
    with torch.no_grad():
        total = lm.sequence_logprobs(model, x, mask=answer)
    # 分母从第 1 位数起：sequence_logprobs 不计第 0 个 token（它没有上文），分子分母要数同一批 token
    return (total / answer[0, 1:].sum()).item()


def preference_eval(model, tok, pairs, max_length: int) -> list[float]:
    """留出对逐对的差值：平均每 token log π(chosen) − log π(rejected)。> 0 的比例 = 准确率，均值 = margin。

    与任何一种方法的训练目标都无关（DPO 的隐式奖励、SimPO 的间隔各有各的尺度），所以能横着比。
    """
    model.eval()   # 关掉 dropout：同一个模型量两次结果相同，与起点的逐对差值才可比
    return [avg_response_logp(model, tok, p["prompt"], p["chosen"], max_length)
            - avg_response_logp(model, tok, p["prompt"], p["rejected"], max_length)
            for p in data.preference_conversational(pairs)]


def summarize(diffs: list[float], start: list[float] | None = None) -> dict:
    """准确率（排对的比例）、margin（平均差值）；给了起点的逐对差值时，再加"比起点更偏向 chosen 的对"的比例。"""
    r = {"pref_accuracy": round(sum(d > 0 for d in diffs) / len(diffs), 4), "margin": round(sum(diffs) / len(diffs), 4)}
    if start is not None:
        # 逐对和起点比，而不是只比均值：margin 可能被少数几对的大幅变化撑起来，toward_chosen 数的是有多少对在变好
        r["toward_chosen"] = round(sum(d > s for d, s in zip(diffs, start)) / len(diffs), 4)
    return r


def run_method(method: str, init_state: dict, tok, pairs: tuple, start: list[float], args, out) -> dict:
    """从同一起点的一份新副本训练一种方法，计时、量内存，再用同一把尺子评估。"""
    policy, _ = models.load_args(args, for_training=True)   # 新加载再装入起点权重：各方法互不影响
    policy.load_state_dict(init_state)   # load_state_dict 是拷贝：init_state 不被训练改动
    train_pairs, eval_pairs = pairs
    trainer = make_trainer(method, policy, tok, train_pairs, args, out)
    # 只把 trainer.train() 包进去：建训练器、分词这些一次性开销不算进"方法的成本"
    with train.PeakMemory(train.device_of(policy)) as mem:
        t0 = time.perf_counter()
        trainer.train()
        secs = time.perf_counter() - t0
    r = summarize(preference_eval(trainer.model, tok, eval_pairs, args.max_length), start)
    out.log.info(f"{method.upper()}: 准确率 {r['pref_accuracy']:.3f}，差值 {r['margin']:.3f}，比起点偏向 chosen 的对 "
                 f"{r['toward_chosen']:.0%}，{secs:.1f} 秒，峰值内存 +{mem.peak_mb:.0f} MB")
    return {**r, "seconds": round(secs, 2), "peak_mem_mb": round(mem.peak_mb, 1), "needs_ref_model": NEEDS_REF[method]}


def write_table(out, results: dict, start_acc: float, start_margin: float) -> None:
    """results.md：SFT 起点一行在最上面——每种方法的数字只有和起点比才有意义。"""
    rows = ["| method | pref_accuracy | margin | toward_chosen | seconds | peak_mem_mb | needs ref model |",
            "|---|---|---|---|---|---|---|", f"| SFT start | {start_acc:.3f} | {start_margin:.3f} | - | - | - | - |"]
    rows += [f"| {m.upper()} | {r['pref_accuracy']:.3f} | {r['margin']:.3f} | {r['toward_chosen']:.2f} | "
             f"{r['seconds']:.1f} | {r['peak_mem_mb']:.0f} | {'yes' if r['needs_ref_model'] else 'no'} |"
             for m, r in results.items()]
    out.path("results.md").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print("\n".join(rows))


def plot_results(out, results: dict, start_acc: float, max_steps: int) -> None:
    """准确率与训练秒数并排：颜色区分要不要参考模型，看"多一个模型"换来了什么。"""
    fig, save = out.plot("compare_methods.png")
    names = ["SFT"] + [m.upper() for m in results]
    # SFT 那根柱子的秒数记 0：起点的训练开销由所有方法共摊，不算进任何一种方法的成本
    panels = (("held-out pref accuracy", [start_acc] + [r["pref_accuracy"] for r in results.values()]),
              ("train seconds", [0] + [r["seconds"] for r in results.values()]))
    for i, (key, vals) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.bar(names, vals, color=["gray"] + ["tab:blue" if NEEDS_REF[m] else "tab:orange" for m in results])
        ax.set_title(key)
    fig.suptitle(f"Same SFT start, {max_steps} steps each ({out.model_name}); blue = needs reference model")
    save()


def main(args: Args) -> dict:
    # 先套冒烟参数再 run.start：config.json 记下的才是真正跑的参数
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    methods = parse_methods(args.methods)

    # 1. 数据：同一份偏好对，同一个留出集（留出对谁都没训练过，准确率才不是背答案）
    train_pairs, eval_pairs = data.preference_split(args.data, args.val_fraction, args.seed)

    # 2. 共同的 SFT 起点：各方法的差别只能来自损失本身，所以起点、数据、步数、学习率全都一样
    model, tok = models.load_args(args, for_training=True)
    if args.sft_steps:
        model = sft_start(model, tok, train_pairs, args, out)
    # 留着逐对差值（不只是均值）：每种方法的 toward_chosen 要逐对和起点比
    start_diffs = preference_eval(model, tok, eval_pairs, args.max_length)
    start = summarize(start_diffs)
    start_acc, start_margin = start["pref_accuracy"], start["margin"]
    out.log.info(f"SFT 起点：留出偏好准确率 {start_acc:.3f}，平均 log π 差 {start_margin:.3f}")
    # 存一份权重再删模型：四种方法依次训练时内存里只有一份起点，峰值内存才反映方法本身
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    del model

    # 3. 每种方法：从同一起点复制、训练、计时、测内存、同一把尺子评估
    # 一种接一种地跑：共享 CPU 上并行会互相抢核，秒数就不再只属于一个方法；
    # 先跑的方法会替后面的付掉进程的一次性内存开销（见文档字符串），所以内存一栏只列出、不作结论
    results = {m: run_method(m, init_state, tok, (train_pairs, eval_pairs), start_diffs, args, out) for m in methods}

    # 4. 表格与图
    write_table(out, results, start_acc, start_margin)
    plot_results(out, results, start_acc, args.max_steps)
    # 按准确率挑“最好”只是摘要里的一句；结论看 CLAIMS 里的 margin 与 toward_chosen（准确率比 margin 粗，见文档字符串）
    best = max(results, key=lambda m: results[m]["pref_accuracy"])
    per_method = "，".join(f"{m.upper()} {r['pref_accuracy']:.2f}/{r['seconds']:.0f}s" for m, r in results.items())
    return out.finish({**results, "sft_start": start},
                      summary=f"SFT 起点准确率 {start_acc:.2f}；{per_method}；最好 {best.upper()}",
                      claims=CLAIMS if set(methods) == set(METHODS) else CLAIMS[:2])  # 后几条点名具体方法


if __name__ == "__main__":
    main(cli.parse(Args))
