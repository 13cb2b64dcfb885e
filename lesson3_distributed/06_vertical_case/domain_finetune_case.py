"""垂直领域案例：先在领域文档上继续预训练（CPT），再用领域指令做 SFT，用 DeepSpeed（ZeRO-2）在 2 个 CPU 进程上训练；
量训练前后的领域困惑度（学到了多少）与通用困惑度（忘了多少），并比较在继续预训练数据里混入不同比例的通用文本
对遗忘的抑制。

领域 = 电动车电池与充电（data/domain/docs，可用 --docs 换成你的文档目录）；领域指令 = data/domain/sft.jsonl（--data）；
通用文本 = data/sft/alpaca.jsonl 的常识问答（与领域无关）。困惑度都在没参与训练的留出文本上算：
每篇领域文档每 5 段留 1 段，通用文本留 20%。领域指令留出 --val-fraction 算 SFT 的验证损失：训练前一行说清几条超过
--max-length（截掉的是回答结尾），SFT 阶段每隔几步评估一次、留验证损失最低的那一步；第 1 步后的预计用时写在 train.log。

运行：
  python lesson3_distributed/06_vertical_case/domain_finetune_case.py           # smollm2-135m，2 个 gloo 进程
  python lesson3_distributed/06_vertical_case/domain_finetune_case.py --smoke   # tiny-llama，2 个进程
  python lesson3_distributed/06_vertical_case/domain_finetune_case.py --model Qwen/Qwen2.5-1.5B --source hf \\
      --ranks 8 --config configs/lesson3/domain_finetune_case_gpu.yaml   # GPU：同一个 worker，NCCL，bf16

你会看到：每个混合比例一行（留出领域 ppl、通用 ppl 训练前 -> 后，SFT 留下的是哪一步），图 domain_vs_general.png。
继续预训练 + SFT 之后留出领域段落的困惑度下降：模型学到了领域。混入通用文本（默认 --mix 0 0.3）后，通用困惑度比只训领域
时更低，而领域困惑度几乎不受影响：混合比例就是"学新"与"不忘旧"之间的旋钮。遗忘的大小要看模型：本来就欠训练的极小模型
（tiny-llama）只在领域上训，通用困惑度也未必变差；把学习率与步数调大，领域块会被背下来，留出领域困惑度反而上升、
通用困惑度升得更多——领域数据少时，过拟合比遗忘来得更早。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：3.8 分钟，5.4 GB，结论 3/3 成立
  ✓ 继续预训练 + SFT 学到了领域：训练后 / 训练前 的留出领域困惑度：0.4816（≤ 0.98）
  ✓ 混入通用文本抑制遗忘：混入通用 / 只训领域 的留出通用困惑度：0.8658（≤ 0.99）
  ✓ 混入通用文本不大牺牲领域：混入通用 / 只训领域 的留出领域困惑度：1.026（≤ 1.05）
  – 多个 rank 数据并行训练，训练损失下降：每个混合比例 CPT 最后一步 / 第一步（取最差的）：1.334（不检查）
<!-- /results -->
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, lm, models, run, services, train
from common.errors import UserError

HERE = Path(__file__).resolve().parent


@dataclass
class Args(cli.CommonArgs):
    docs: str = cli.arg(None, "领域文档目录（.txt/.md/.html）；默认 data/domain/docs")
    general: str = cli.arg(None, "通用文本（SFT 格式文件，取问答文本）；默认 data/sft/alpaca.jsonl")
    # 上限 0.9：mix → 1 时 worker 里要补的通用块数 mix / (1 − mix) × 领域块数会发散
    mix: list[float] = cli.arg([0.0, 0.3], "继续预训练数据里通用文本的占比，每个比例训一个模型", min=0, max=0.9)
    ranks: int = cli.arg(2, "进程数（CPU 上每个进程一个 rank，gloo；GPU 上每卡一个，NCCL）", min=1, max=16)
    cpt_steps: int = cli.arg(10, "继续预训练步数（CPU 默认规模：smollm2 在 2 核上每步几秒）", min=1)
    sft_steps: int = cli.arg(5, "SFT 步数", min=0)
    micro_batch: int = cli.arg(2, "每个 rank 每步几个块/样本", min=1)
    block_size: int = cli.arg(128, "继续预训练的块长（token）", min=16)
    learning_rate: float = cli.arg(5e-5, "学习率（继续预训练一般比预训练末期略大，比 LoRA 小）")
    max_length: int = cli.arg(0, "领域指令每条最多多少 token；0 = 2 × --block-size", min=0)
    val_fraction: float = cli.arg(0.1, "领域指令留出多少比例算 SFT 的验证损失（按它留最好的一步）", min=0.01, max=0.5)
    eval_steps: int = cli.arg(0, "SFT 每多少步评估一次；0 = 自动（评估开销 ≤ 训练的 1/10，至少 2 次）", min=0)

    smoke_model = "tiny-llama"


# 冒烟：极小模型承受得住更大的学习率。领域文档只有约 30 个 128-token 块：步数再多（或学习率 2e-3）就把训练块背下来，
# 留出段落的困惑度反而升高（实测 577 -> 723）——领域数据少时，过拟合比遗忘来得更早
SMOKE = dict(cpt_steps=15, sft_steps=5, micro_batch=4, learning_rate=5e-4)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里量：训练前的原模型、
# 只训领域的模型（--mix 的第一个比例）。smollm2 的默认值还没有实测，lr 5e-5、10 步的变化比冒烟小，门槛放宽
CLAIMS = [
    run.Claim("继续预训练 + SFT 学到了领域：训练后 / 训练前 的留出领域困惑度",
              "domain_ppl_after / domain_ppl_before", "<=", 0.95, 0.98),
    run.Claim("混入通用文本抑制遗忘：混入通用 / 只训领域 的留出通用困惑度",
              "general_ppl_after_mixed / general_ppl_after", "<=", 0.95, 0.99),
    run.Claim("混入通用文本不大牺牲领域：混入通用 / 只训领域 的留出领域困惑度",
              "domain_ppl_after_mixed / domain_ppl_after", "<=", 1.05, 1.05),
    # 每步只看几个块，单步损失噪声大：smollm2 用 lr 5e-5 训 10 步，首尾两步之差在噪声量级，默认模式不查这条
    run.Claim("多个 rank 数据并行训练，训练损失下降：每个混合比例 CPT 最后一步 / 第一步（取最差的）",
              'max(v["cpt_loss_last"] / v["cpt_loss_first"] for v in mix.values())', "<=", 0.97, None),
]


def load_texts(args: Args) -> dict:
    """领域文档按段落切，每 5 段留 1 段做评估；通用文本留 20%；领域指令留出 --val-fraction。"""
    docs = data.load_documents(args.docs or data.DATA_DIR / "domain" / "docs")
    # 按段落切再隔 5 留 1：留出的段落与训练段落来自同一批文档（同分布），但模型一个字也没见过
    # 20 个字符以下的段落（标题、残行）去掉：几乎不含领域知识，混进留出集只会让困惑度更抖
    paras = [p.strip() for d in docs for p in d.text.split("\n\n") if len(p.strip()) > 20]
    if len(paras) < 5:
        raise UserError(f"--docs {args.docs}: 只有 {len(paras)} 个段落，至少需要 5 个（段落以空行分隔）")
    # 各轮问答拼成一段纯文本：继续预训练与困惑度只要文本，不要对话模板
    general = [" ".join(m["content"] for m in c) for c in data.load_sft(args.general or data.DATA_DIR / "sft" /
                                                                          "alpaca.jsonl")]
    cut = int(len(general) * 0.8)   # 通用留出 20%：量"忘了多少"，要用训练时也没混进去的通用文本
    # 领域指令也要留出：SFT 阶段按它的验证损失挑最好的一步，用训练过的样本挑，挑出来的只是背得最熟的一步
    sft, sft_eval = data.split(data.load_sft(args.data or data.DATA_DIR / "domain" / "sft.jsonl"), args.val_fraction,
                               args.seed)
    # 下标不是 5 的倍数的进训练、是 5 的倍数的留出：两边互补，一段也不重叠
    return {"domain": [p for i, p in enumerate(paras) if i % 5], "domain_eval": paras[::5],
            "general": general[:cut], "general_eval": general[cut:], "sft": sft, "sft_eval": sft_eval}


def encode_sft(args: Args, tok, texts: dict) -> dict:
    """领域指令 -> 只在回答上算损失的 token 行（rank 们直接用，不再各自分词）。先不截断：一行说清几条超过 --max-length
    （截掉的是回答结尾，模型学不会收尾），再截断。"""
    max_length = args.max_length or 2 * args.block_size
    # 在主进程分词一次：每个 rank 各自分词既重复又可能因分词器版本不同而不一致
    # 10**9 = 先不截断：length_report 要看到原长，才数得出几条会被截、截掉多少回答 token
    encoded = [data.tokenize_chat(tok, c, 10**9) for c in texts["sft"]]
    # drop_flag=None：本脚本没有"丢弃超长样本"的开关，提示里就不建议它
    stats = train.length_report(encoded, max_length, drop_flag=None)
    texts["sft_rows"] = train.truncate(encoded, max_length)
    texts["sft_eval_rows"] = train.truncate([data.tokenize_chat(tok, c, 10**9) for c in texts["sft_eval"]], max_length)
    return stats


def perplexity(path_or_name: str, texts: list[str], block: int, args: Args) -> float:
    """留出文本首尾相连（文档间插 EOS）切成块，按 token 平均负对数似然，exp 后即困惑度。"""
    # 训练后的模型是 rank 0 存下的本地目录：按 local 加载，不会去 hub 上找同名模型
    # 固定 fp32：训练前后用同一精度量，困惑度的差别只来自训练，不混进精度差
    model, tok = models.load(path_or_name, source="local" if Path(path_or_name).is_dir() else args.source,
                             device=args.device, dtype="float32")
    ids: list[int] = []
    for t in texts:
        # 与 worker 的 blocks() 同一切法（不加 BOS、文档间插 EOS）：评估文本的格式与训练时一致
        ids += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    # 一块一批：块与块之间不填充，和训练时看到的上下文长度一致
    # 不足一块的尾巴也算（训练时丢掉）：留出文本本来就少，一个 token 也不浪费
    return lm.perplexity(model, [{"input_ids": ids[i:i + block]} for i in range(0, len(ids) - 1, block)], 1,
                         tok.pad_token_id)


def launch(args: Args, out: run.Run, texts: dict) -> dict:
    """torchrun 拉起 ranks 个进程跑 _domain_worker.py（DeepSpeed ZeRO-2）。"""
    tpath, cfg_path, result = out.path("texts.json"), out.path("ds_config.json"), out.path("train_result.json")
    # 只写 rank 们要用的四项：留出文本只在主进程评估，不交给训练进程，从根上杜绝拿它训练
    tpath.write_text(json.dumps({k: texts[k] for k in ("domain", "general", "sft_rows", "sft_eval_rows")},
                                ensure_ascii=False), encoding="utf-8")
    # ZeRO-2：切优化器状态与梯度，每个 rank 保留完整权重（方便 rank 0 直接 save_pretrained）
    # train_batch_size = 微批 × rank 数（累积 1）：DeepSpeed 初始化时断言三者自洽
    cfg = {"train_batch_size": args.micro_batch * args.ranks, "train_micro_batch_size_per_gpu": args.micro_batch,
           # bf16 节给 GPU 用；CPU 上 worker 会删掉它改跑 fp32（见 _domain_worker.main）
           "gradient_accumulation_steps": 1, "gradient_clipping": 1.0, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
           "steps_per_print": 10}
    cfg_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    # 删掉上次的结果：这次 rank 0 若没写出，train.launch 不会把旧文件当成这次的读回来
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_addr",
           # 随机空闲端口：torchrun 默认的固定端口在测试并行或上一次进程没退干净时会撞
           "127.0.0.1", "--master_port", str(services.free_port()), str(HERE / "_domain_worker.py"),
           "--texts", str(tpath), "--model-path", str(models.resolve(args.resolved_model(), args.source)),
           "--ds-config", str(cfg_path), "--mix", *map(str, args.mix), "--cpt-steps", str(args.cpt_steps),
           "--sft-steps", str(args.sft_steps), "--block-size", str(args.block_size), "--eval-steps",
           str(args.eval_steps), "--learning-rate", str(args.learning_rate), "--seed", str(args.seed),
           "--out", str(result)]
    out.log.info(f"启动 {args.ranks} 个进程（DeepSpeed ZeRO-2）：混合比例 {args.mix}，CPT {args.cpt_steps} 步 + "
                 f"SFT {args.sft_steps} 步；第 1 步后的预计用时、每步损失见 {out.path('train.log')}")
    return train.launch(cmd, out.path("train.log"), result)


def plot_mix(out, res: dict, dom0: float, gen0: float, table: dict) -> None:
    """每个混合比例在（领域 ppl, 通用 ppl）平面上的位置：越靠左下越好，"before" 是起点。"""
    fig, save = out.plot("domain_vs_general.png")
    ax = fig.add_subplot(111)
    ax.plot([dom0], [gen0], "ks", label="before")
    for mix, t in table.items():
        ax.plot([t["domain_ppl"]], [t["general_ppl"]], "o", label=f"general share {mix}")
    ax.set_xlabel("domain perplexity (held-out)")
    ax.set_ylabel("general perplexity (held-out)")
    ax.set_title(f"{out.model_name}: continued pretraining + SFT on {res['world_size']} ranks")
    ax.legend(fontsize=7)
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 数据：领域文档 / 通用文本 / 领域指令 各自留出评估部分；领域指令超长的先数清再截断
    texts = load_texts(args)
    # 这里只加载分词器：先把数据分词、数清超长样本，坏数据不必等模型加载完才报
    stats = encode_sft(args, models.load_tokenizer(args.resolved_model(), args.source), texts)
    out.log.info(f"领域段落 训练 {len(texts['domain'])} / 留出 {len(texts['domain_eval'])}；通用 训练 "
                 f"{len(texts['general'])} / 留出 {len(texts['general_eval'])}；领域指令 训练 {len(texts['sft_rows'])}"
                 f" / 留出 {len(texts['sft_eval_rows'])} 条")

    # 2. 训练前：原模型在两种留出文本上的困惑度
    name = args.resolved_model()
    dom0 = perplexity(name, texts["domain_eval"], args.block_size, args)
    gen0 = perplexity(name, texts["general_eval"], args.block_size, args)
    out.log.info(f"训练前：领域 ppl {dom0:.2f}，通用 ppl {gen0:.2f}")

    # 3. 多进程训练：每个混合比例一个模型（CPT -> SFT，SFT 留验证损失最低的一步）
    # 第 1 步后的预计用时写在 train.log：rank 们的输出都重定向到那里，两个进程的进度条混在终端里读不出来
    res = launch(args, out, texts)

    # 4. 训练后：同一把尺子再量一次
    table = {}   # 每个混合比例：困惑度 + CPT/SFT 的损失首尾 + SFT 保留的那一步（看遗忘与学新的权衡）
    for mix, r in res["runs"].items():
        d, g = perplexity(r["path"], texts["domain_eval"], args.block_size, args), \
            perplexity(r["path"], texts["general_eval"], args.block_size, args)
        table[mix] = {"domain_ppl": round(d, 3), "general_ppl": round(g, 3), "general_blocks": r["general_blocks"],
                      "cpt_loss_first": r["cpt"][0], "cpt_loss_last": r["cpt"][-1],
                      "sft_loss_last": r["sft"][-1] if r["sft"] else None,
                      **{k: r[k] for k in ("kept_step", "eval_history")}}
        out.log.info(f"通用占比 {mix}：领域 ppl {dom0:.2f} -> {d:.2f}，通用 ppl {gen0:.2f} -> {g:.2f}；SFT 保留第 "
                     f"{r['kept_step']} 步（验证损失 {dict(r['eval_history']).get(r['kept_step'], float('nan')):.3f}）")

    # 5. 图：每个混合比例在（领域 ppl, 通用 ppl）平面上的位置
    plot_mix(out, res, dom0, gen0, table)
    # 第一个比例（默认 0 = 只训领域）是基线，最后一个（通用占比最大）与它比：混入通用文本换来了什么
    first, last = table[f"{args.mix[0]:g}"], table[f"{args.mix[-1]:g}"]
    return out.finish({"domain_ppl_before": round(dom0, 3), "domain_ppl_after": first["domain_ppl"],
                       "general_ppl_before": round(gen0, 3), "general_ppl_after": first["general_ppl"],
                       "domain_ppl_after_mixed": last["domain_ppl"], "general_ppl_after_mixed": last["general_ppl"],
                       "mix": table, "world_size": res["world_size"], **stats}, claims=CLAIMS,
                      summary=f"领域 ppl {dom0:.2f} -> {first['domain_ppl']:.2f}，通用 ppl {gen0:.2f} -> "
                              f"{first['general_ppl']:.2f}（通用占比 {args.mix[0]:g}）；" + "，".join(
                                  f"占比 {k}: 通用 {v['general_ppl']:.2f}" for k, v in table.items()))


if __name__ == "__main__":
    main(cli.parse(Args))
