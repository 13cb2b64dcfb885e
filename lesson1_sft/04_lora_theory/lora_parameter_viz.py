"""LoRA 为什么可行：全参数微调的权重增量 ΔW 本身就是"低秩"的。

做法：先全参数微调几步，对每个注意力/MLP 矩阵取 ΔW = W_after - W_before，做奇异值分解
（torch.linalg.svdvals），看前 r 个奇异值占了多少能量（sum σ_i² 的占比）。再拿同形状的随机高斯矩阵
和预训练权重 W 本身作对照：ΔW 的能量集中在极少几个方向上，随机噪声和 W 都不是。
所以用 B·A（秩 r）去近似 ΔW 损失很小，而参数量只有 r·(d_in + d_out)：本脚本用 PEFT 的 LoraConfig +
get_peft_model 真实构建 r = 1..64 的模型清点可训练参数，并与公式逐一核对。

运行：
  python lesson1_sft/04_lora_theory/lora_parameter_viz.py            # CPU，smollm2-135m，全参数 8 步
  python lesson1_sft/04_lora_theory/lora_parameter_viz.py --smoke    # 极小模型
  python lesson1_sft/04_lora_theory/lora_parameter_viz.py --model Qwen/Qwen2.5-0.5B-Instruct --source hf \\
      --config configs/lesson1/lora_parameter_viz.yaml                      # GPU，更多步数

你会看到：ΔW 前 8 个奇异值的能量占比 delta_energy_top8 远高于同形状随机矩阵（random_energy_top8：能量均匀摊在
所有方向上）和预训练权重本身（weight_energy_top8）——集中的是"这次微调改了什么"，而不是权重本来就低秩；注意力的
k/v/o_proj 比 MLP 更集中。LoRA 参数量随 r 线性增长（PEFT 数出的值与公式 r·(d_in + d_out) 逐一相等），
all-linear 注入全部 Linear、r=8 时可训练参数（lora_params）也只占全量（full_params）的一小部分。
图：delta_w_spectrum.png（奇异值谱，对数坐标）、energy_vs_rank.png（前 r 个方向捕获的能量）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：2.3 分钟，4.9 GB，结论 5/5 成立
  ✓ ΔW 的能量集中在前 8 个方向，远超同形状随机矩阵：ΔW / 随机 的前 8 能量占比：7.576（≥ 4）
  ✓ 集中的是更新而不是预训练权重本身：ΔW / W 的前 8 能量占比：3.962（≥ 2.5）
  ✓ 注意力矩阵的 ΔW 比 MLP 更集中：注意力 / MLP 的前 8 能量占比（各自平均）：1.789（≥ 1.3）
  ✓ LoRA r=8 只训练一小部分参数：PEFT 实数的可训练参数 / 全量参数：0.01816（≤ 0.025）
  ✓ PEFT 实数的参数量与公式 r·(d_in + d_out) 逐秩相等：最大差几个参数：0（≤ 0）
<!-- /results -->
"""
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, models, run, train
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    steps: int = cli.arg(8, "全参数微调多少步（只为得到一个真实的 ΔW，不追求训练好）", min=1)
    learning_rate: float = cli.arg(5e-5, "全参数微调的学习率")
    per_device_train_batch_size: int = cli.arg(4, "每步几条样本", min=1)
    max_length: int = cli.arg(192, "每条样本最多多少 token", min=8)
    max_rank: int = cli.arg(64, "LoRA 参数量清点到多大的秩（1, 2, 4, ... 直到它）", min=1)
    target_modules: str = cli.arg("all-linear", "LoRA 注入哪些层：all-linear（除 lm_head 外所有 Linear）"
                                                "或逗号分隔的名字")


SMOKE = dict(steps=10, learning_rate=1e-3, max_length=128)   # 极小模型：小网络承受得住大学习率

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；对照组（随机矩阵、W 本身、全量参数）都在同一次运行里量
CLAIMS = [
    run.Claim("ΔW 的能量集中在前 8 个方向，远超同形状随机矩阵：ΔW / 随机 的前 8 能量占比",
              "delta_energy_top8 / random_energy_top8", ">=", 2.5, 4.0),
    run.Claim("集中的是更新而不是预训练权重本身：ΔW / W 的前 8 能量占比",
              "delta_energy_top8 / weight_energy_top8", ">=", 1.4, 2.5),
    run.Claim("注意力矩阵的 ΔW 比 MLP 更集中：注意力 / MLP 的前 8 能量占比（各自平均）",
              "delta_energy_top8_attention / delta_energy_top8_mlp", ">=", 1.08, 1.3),
    run.Claim("LoRA r=8 只训练一小部分参数：PEFT 实数的可训练参数 / 全量参数",
              'lora_params["8"] / full_params', "<=", 0.1, 0.025),
    run.Claim("PEFT 实数的参数量与公式 r·(d_in + d_out) 逐秩相等：最大差几个参数",
              'max(abs(m["lora_params"][r] - m["lora_params_formula"][r]) for r in lora_params)', "<=", 0, 0),
]


TOP_R = 8   # 报告前 8 个奇异值的能量：r=8 是 LoRA 最常用的秩


def energy_top(sv, r: int) -> float:
    """前 r 个奇异值的能量占比 sum(σ_i², i<r) / sum(σ_i²)：秩 r 近似能保留的 Frobenius 范数平方比例。"""
    # 先转 float64 再平方：奇异值跨好几个数量级，fp32 里小奇异值的平方在求和时会被大项吞掉
    e = sv.double() ** 2
    return float(e[:r].sum() / e.sum())


def load_conversations(args: Args) -> list[list[dict]]:
    """默认：data/sft/*.jsonl + data/identity/train.jsonl；--data：用户自己的文件。"""
    # 文件按名字排好序再读：glob 的顺序随文件系统而变，固定顺序、固定 seed，两次运行的 ΔW 才可比
    files = [Path(args.data)] if args.data else [*sorted((data.DATA_DIR / "sft").glob("*.jsonl")),
                                                 data.DATA_DIR / "identity" / "train.jsonl"]
    return [c for f in files for c in data.load_sft(f)]


def check_targets(model, targets, flag: str) -> None:
    """--target-modules 的每个名字都要对上至少一个能注入 LoRA 的层（PEFT 的规则：全名相同或以 ".名字" 结尾）。

    PEFT 只要有一个名字对上就不报错：q_proj,v_prj 会悄悄只注入 q_proj；一个都对不上则是一长串 traceback。"""
    import torch

    # all-linear 由 PEFT 按层的类型自己去找，不存在名字对不上的问题
    if targets == "all-linear":
        return
    # Embedding 也算：PEFT 的 LoRA 同样能注入 Embedding 层，点名 embed_tokens 不该被当成写错
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        # 报错里只列名字的最后一段、去重：几百个全名列不下，学生要的是能直接填进 --target-modules 的短名
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise UserError(f"--target-modules {flag}: 模型里没有名为 {','.join(missing)} 的 Linear/Embedding 层；"
                        f"Linear 层的名字有 {','.join(linear)}（或 all-linear）")


def count_lora_params(model, target_modules: str, ranks: list[int]) -> tuple[dict, dict, dict]:
    """用 PEFT 真实构建每个秩的 LoRA 模型 -> (实际可训练参数, 公式 r·(d_in + d_out) 之和, 注入的 Linear 形状)。

    不只信公式：all-linear 到底注入了哪些层（PEFT 跳过输出层 lm_head）要真建一次才知道；数出来与公式逐一相等，
    公式才算验证过。
    """
    import copy

    from peft import LoraConfig, get_peft_model

    targets = "all-linear" if target_modules == "all-linear" else target_modules.split(",")
    check_targets(model, targets, target_modules)
    lora_params, analytic, injected = {}, {}, {}
    for r in ranks:
        # deepcopy：get_peft_model 会就地改模型，原模型后面还要做全参数微调
        # alpha、dropout 不改变参数量：这里只数参数、不训练，取常用的 alpha = 2r 即可
        pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
        lora_params[str(r)] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
        # 去掉 PEFT 包装加的前缀：名字才与原模型的 named_parameters 对得上（main 按它记下训练前的权重）
        injected = {n.removeprefix("base_model.model."): (m.in_features, m.out_features)
                    for n, m in pm.named_modules() if hasattr(m, "lora_A") and hasattr(m, "in_features")}
        # B: d_out×r，A: r×d_in -> 每个矩阵 r·(d_in + d_out)，与原矩阵的 d_in·d_out 相比是线性而非平方
        analytic[str(r)] = sum(r * (i + o) for i, o in injected.values())
        # 每个秩都是一份完整的模型副本：用完就放掉，内存里同时只留一份
        del pm
    return lora_params, analytic, injected


def full_finetune(args: Args, out: run.Run, model, tok, convs: list[list[dict]]) -> list[float]:
    """全参数微调几步（所有参数都在动，ΔW 没有任何低秩约束），返回每步训练损失。"""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [data.tokenize_chat(tok, c, args.max_length) for c in convs]
    # 回复被截光的样本没有损失可算，留着只会产生 0 梯度的批次
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows
                            if any(x != -100 for x in r["labels"])])
    cfg = SFTConfig(output_dir=str(out.path("trainer")), max_steps=args.steps, learning_rate=args.learning_rate,
                    per_device_train_batch_size=args.per_device_train_batch_size, max_length=args.max_length,
                    lr_scheduler_type="constant", weight_decay=0.0,   # 不要衰减：ΔW 只来自梯度
                    logging_steps=1, save_strategy="no", report_to=out.trainer_report_to(), seed=args.seed,
                    **train.trainer_flags(model))
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def spectra_of(before: dict, params: dict, seed: int) -> tuple[dict, dict, dict]:
    """-> (ΔW 的奇异值, 同形状随机高斯矩阵的奇异值, 预训练 W 的奇异值)，按矩阵名索引。"""
    import torch

    # 两个对照组：随机矩阵说明"能量集中"不是 SVD 本身的性质；W 本身说明集中的不是预训练权重，而是更新
    gen = torch.Generator().manual_seed(seed)
    spectra, rand_by_shape, weight_spectra = {}, {}, {}
    for n, w0 in before.items():
        # params 是训练前从同一个模型取的 Parameter 对象：优化器就地更新它们，这里读到的已是训练后的值
        w1 = params[n + ".weight"].detach()
        # 先转 fp32：torch.linalg 不支持 bf16，而 GPU 上训练时权重是 bf16
        spectra[n] = torch.linalg.svdvals((w1 - w0).float().cpu())   # svdvals 只算奇异值，比完整 SVD 快得多
        weight_spectra[n] = torch.linalg.svdvals(w0.float().cpu())
        if w0.shape not in rand_by_shape:   # 随机矩阵的谱只取决于形状，每种形状算一次
            rand_by_shape[w0.shape] = torch.linalg.svdvals(torch.randn(*w0.shape, generator=gen))
    return spectra, {n: rand_by_shape[before[n].shape] for n in before}, weight_spectra


def mean_energy(specs: dict, r: int) -> float:
    """各矩阵前 r 个方向能量占比的平均：每个矩阵权重相同，大矩阵不至于淹没小矩阵。"""
    return sum(energy_top(s, r) for s in specs.values()) / len(specs)


def plot_spectrum(out: run.Run, spectra: dict, rand_by_matrix: dict, layer_names: list[str], title: str) -> None:
    """一层里各矩阵的奇异值谱（归一化到 σ_1，对数坐标）：ΔW 掉得陡，随机矩阵几乎是平的。"""
    fig, save = out.plot("delta_w_spectrum.png")
    ax = fig.add_subplot(111)
    for n in layer_names:
        s = spectra[n]
        # 各除以自己的 σ_1：不同矩阵的尺度差得很远，归一化后比的才是谱的形状
        ax.semilogy(range(1, len(s) + 1), (s / s[0]).numpy(), label=f"ΔW {n.rsplit('.', 2)[-2]}.{n.rsplit('.', 1)[-1]}")
    s = rand_by_matrix[layer_names[0]]
    ax.semilogy(range(1, len(s) + 1), (s / s[0]).numpy(), "k--", label="random Gaussian")
    ax.axvline(TOP_R, color="gray", lw=0.8, ls=":")   # 竖线标出 r=8：LoRA 最常用的秩落在谱的哪里
    ax.set_xscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("σ_i / σ_1")
    ax.set_title(title)
    ax.legend(fontsize=7)
    save()


def plot_energy(out: run.Run, ranks: list[int], curve: dict) -> None:
    """前 r 个方向捕获的能量随 r 的变化：ΔW 的曲线最先升起来，就是"低秩够用"的直观证据。"""
    fig, save = out.plot("energy_vs_rank.png")
    ax = fig.add_subplot(111)
    for name, ys in curve.items():
        ax.plot(ranks, ys, "o-", label=name)
    # 秩按 1, 2, 4, … 取：以 2 为底的对数坐标上这些点等距
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("energy in top-r singular values (mean over matrices)")
    ax.set_title("ΔW energy sits in a few directions: why low-rank B·A works")
    ax.legend()
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)   # 冒烟：小规模超参数（只换你没改过的），单线程（见 common.run）
    out = run.start(__file__, args)
    convs = load_conversations(args)     # 先读数据：--data 有坏行时在加载模型之前就报错
    model, tok = models.load_args(args, for_training=True)
    full_params = sum(p.numel() for p in model.parameters())   # parameters() 对共享（tied）权重只算一次

    # 1. 用 PEFT 真实构建 r = 1, 2, 4, ... 的 LoRA 模型，清点可训练参数，并与公式 r·(d_in + d_out) 核对
    # 秩取 2 的幂：参数量随 r 线性增长，跨几个数量级看，每翻一倍一个点就够了
    ranks = [2 ** i for i in range(args.max_rank.bit_length()) if 2 ** i <= args.max_rank]
    lora_params, analytic, injected = count_lora_params(model, args.target_modules, ranks)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in injected})
    out.log.info(f"target_modules={args.target_modules}: adapter 注入 {len(injected)} 个 Linear，"
                 f"类型 {kinds}；例如 {list(injected)[:len(kinds)]}")
    for r in ranks:
        out.log.info(f"  r={r:<3d} LoRA 可训练参数 {lora_params[str(r)]:>10,d}（公式 {analytic[str(r)]:,d}），"
                     f"占全量 {full_params:,d} 的 {lora_params[str(r)] / full_params:.3%}")

    # 2. 记下微调前的权重：只看 LoRA 会注入的那些矩阵（clone：训练会就地改参数）
    params = dict(model.named_parameters())
    before = {n: params[n + ".weight"].detach().clone() for n in injected}

    # 3. 全参数微调几步：如果连不受约束的更新都是低秩的，用 B·A 去拟合它就不吃亏
    losses = full_finetune(args, out, model, tok, convs)

    # 4. 对每个矩阵的 ΔW 做 SVD；对照组：同形状的随机高斯矩阵、预训练权重 W 本身
    spectra, rand_by_matrix, weight_spectra = spectra_of(before, params, args.seed)
    curve = {name: [mean_energy(s, r) for r in ranks] for name, s in
             (("ΔW", spectra), ("W", weight_spectra), ("random", rand_by_matrix))}
    # 按矩阵类型分开平均：注意力和 MLP 的集中程度不同，决定 target_modules 时有用
    by_kind = {k: round(sum(energy_top(s, TOP_R) for n, s in spectra.items() if n.endswith("." + k))
                        / sum(n.endswith("." + k) for n in spectra), 4) for k in kinds}
    by_block = {b: round(mean_energy(sel, TOP_R), 4) if (sel := {n: s for n, s in spectra.items() if f".{b}." in n})
                else None for b in ("self_attn", "mlp")}   # 注意力块与 MLP 块各自平均（名字里带 self_attn / mlp）

    # 5. 画图：中间一层的奇异值谱（首尾层紧挨嵌入与输出，不一定有代表性）+ 前 r 个方向捕获的能量
    mid = getattr(model.config, "num_hidden_layers", 2) // 2
    # 层名里没有 ".layers.N." 的架构（命名方式不同）：退而取前几个矩阵画，图照样出
    layer_names = [n for n in spectra if f".layers.{mid}." in n] or list(spectra)[: len(kinds)]
    plot_spectrum(out, spectra, rand_by_matrix, layer_names,
                  f"ΔW singular values, layer {mid} ({out.model_name}, {args.steps} full-FT steps)")
    plot_energy(out, ranks, curve)

    ref = str(TOP_R) if str(TOP_R) in lora_params else str(ranks[-1])   # --max-rank < 8 时退而报告最大的秩
    return out.finish({
        "delta_energy_top8": round(mean_energy(spectra, TOP_R), 4),
        "random_energy_top8": round(mean_energy(rand_by_matrix, TOP_R), 4),
        "weight_energy_top8": round(mean_energy(weight_spectra, TOP_R), 4),
        "delta_energy_top8_by_module": by_kind,
        "delta_energy_top8_attention": by_block["self_attn"], "delta_energy_top8_mlp": by_block["mlp"],
        "delta_energy_by_rank": dict(zip(map(str, ranks), [round(x, 4) for x in curve["ΔW"]])),
        "lora_params": lora_params, "lora_params_formula": analytic,
        "lora_params_match_formula": lora_params == analytic,
        "full_params": full_params, f"trainable_ratio_r{ref}": round(lora_params[ref] / full_params, 5),
        "lora_target_modules": kinds, "lora_injected_count": len(injected), "matrices_analyzed": len(spectra),
        "train_loss_first": round(losses[0], 4), "train_loss_last": round(losses[-1], 4),
    }, summary=f"ΔW top-{TOP_R} 能量 {mean_energy(spectra, TOP_R):.1%} vs 随机 "
               f"{mean_energy(rand_by_matrix, TOP_R):.1%}；LoRA r={ref} 参数 {lora_params[ref]:,d} = 全量的 "
               f"{lora_params[ref] / full_params:.2%}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
