"""增量学习（持续学习）与 LoRA：先学任务 A，再学任务 B，A 会不会被忘掉？怎么缓解？

任务 A：情感分类（data/classification/sentiment.jsonl，回答 positive / negative）；
任务 B：电动车领域问答（data/domain/sft.jsonl，或 --data 自己的 SFT 文件）。
分数 = 留出样本上助手回复 token 的 teacher-forcing 预测准确率（0-1，越高越好；不需要生成，快且稳定）。
策略并排比较：
  naive      同一个 adapter 先训 A 再接着训 B：灾难性遗忘，A 的分数掉下来（forgetting = A 训完时 − B 训完后）；
  replay     训 B 时按比例混入 A 的旧样本（经验回放缓冲区）：用一点旧数据换记忆；
  separate   每个任务一个 adapter，推理时按任务切换（PEFT 多 adapter，set_adapter）：不遗忘，但要知道是哪个任务；
  merge_*    把 A、B 两个 adapter 用 PEFT add_weighted_adapter 合成一个：linear / TIES / DARE（+TIES）。
             一个 adapter 服务两个任务、不需要任务路由；合并方法不同，互相干扰的程度不同。

运行：
  python lesson4_alignment/05_incremental_learning/incremental_lora.py            # CPU，smollm2-135m
  python lesson4_alignment/05_incremental_learning/incremental_lora.py --smoke    # tiny-qwen2（满载时墙钟约 2.5 分钟）
  python lesson4_alignment/05_incremental_learning/incremental_lora.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson4/incremental_lora_gpu.yaml              # GPU，bf16
  --data 任务 B 的 SFT 文件（alpaca/chat）；--task-a-data 任务 A 的分类文件（text/label）。

你会看到（--smoke，tiny-qwen2，实测）：学完 A 时 A 0.88；naive 学完 B 后 A 掉到 0.27（forgetting 0.60）；
replay 0.61（遗忘 0.26）；separate 0.88（不遗忘）；合并 linear / TIES / DARE 的 A 0.66 / 0.62 / 0.59，但 B 回落到 0.11-0.13。
默认（smollm2，36 步/任务，2 核 CPU 7.8 分钟）：学完 A 0.94；naive 后 A 0.53（遗忘 0.41）；replay −0.01、separate 0、
合并 0.02–0.03。输出：incremental.png、adapters/。详见同目录 README.md。
"""

import random
from dataclasses import dataclass

from common import cli, data, models, run
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    task_a_data: str = cli.arg(None, "任务 A 的分类数据（text/label）；默认 data/classification/sentiment.jsonl")
    steps_a: int = cli.arg(36, "任务 A 训练步数", min=1)
    steps_b: int = cli.arg(36, "任务 B 训练步数", min=1)
    batch_size: int = cli.arg(8, "每步几条样本", min=1)
    learning_rate: float = cli.arg(5e-4, "LoRA 学习率", min=0)
    lora_r: int = cli.arg(8, "LoRA 秩", min=1)
    lora_alpha: int = cli.arg(16, "LoRA 缩放系数", min=1)
    replay_fraction: float = cli.arg(0.25, "replay：训 B 时每批里 A 旧样本的比例", min=0, max=0.9)
    merge_density: float = cli.arg(0.5, "TIES/DARE 合并时保留的参数比例", min=0.01, max=1)
    max_length: int = cli.arg(128, "每条样本最多多少 token", min=8)
    val_fraction: float = cli.arg(0.15, "每个任务留出多少比例做评估", min=0.01, max=0.9)

    smoke_model = "tiny-qwen2"


SMOKE = dict(steps_a=40, steps_b=40, batch_size=16, learning_rate=2e-3, lora_r=16, lora_alpha=32)


def task_a_convs(path) -> list[list[dict]]:
    """分类 -> 对话：问情感，答标签。"""
    recs, labels = data.load_classification(path)
    return [[{"role": "user", "content": f"Sentiment ({'/'.join(labels)})? {r['text']}"},
             {"role": "assistant", "content": r["label"]}] for r in recs]


def batchify(tok, rows, device):
    import torch

    n = max(len(r["input_ids"]) for r in rows)
    return {key: torch.tensor([r[key] + [v] * (n - len(r[key])) for r in rows], device=device)
            for key, v in (("input_ids", tok.pad_token_id), ("attention_mask", 0), ("labels", -100))}


def train_adapter(model, tok, rows, steps: int, args: Args, rng, replay=None, log=None, name=""):
    """训练当前激活的 adapter（只有它的参数可训练）；replay 给了就在每批里混入旧任务样本。"""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.learning_rate)
    n_old = int(round(args.batch_size * args.replay_fraction)) if replay else 0
    model.train()
    for step in range(steps):
        batch = rng.sample(rows, min(args.batch_size - n_old, len(rows))) + (rng.sample(replay, n_old) if n_old else [])
        loss = model(**batchify(tok, batch, model.device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if log and (step + 1) % 20 == 0:
            log.info(f"[{name}] step {step + 1}/{steps} loss {loss.item():.3f}")


def score(model, tok, rows) -> float:
    """留出样本上助手 token 的 teacher-forcing 准确率。"""
    import torch

    model.eval()
    hit = tot = 0
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            b = batchify(tok, rows[i:i + 16], model.device)
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].argmax(-1)
            lab = b["labels"][:, 1:]
            m = lab != -100
            hit += (pred[m] == lab[m]).sum().item()
            tot += m.sum().item()
    return hit / max(tot, 1)


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)
    rng = random.Random(args.seed)

    # 1. 两个任务的数据，各自留出一部分
    a_path = args.task_a_data or data.DATA_DIR / "classification" / "sentiment.jsonl"
    b_path = args.data or data.DATA_DIR / "domain" / "sft.jsonl"
    a_train, a_eval = data.split(task_a_convs(a_path), args.val_fraction, args.seed)
    b_train, b_eval = data.split(data.load_sft(b_path), args.val_fraction, args.seed)
    from peft import LoraConfig, get_peft_model

    model, tok = models.load_args(args, for_training=True)
    enc = lambda convs: [data.tokenize_chat(tok, c, args.max_length) for c in convs]  # noqa: E731
    A, A_ev, B, B_ev = enc(a_train), enc(a_eval), enc(b_train), enc(b_eval)
    out.log.info(f"任务 A {len(A)}/{len(A_ev)} 条（训练/留出），任务 B {len(B)}/{len(B_ev)} 条")
    base_a, base_b = score(model, tok, A_ev), score(model, tok, B_ev)
    out.log.info(f"原模型：A {base_a:.3f}，B {base_b:.3f}")

    # 2. 先学任务 A（adapter "A"），存盘：后面的策略都从这个 adapter 出发
    cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg, adapter_name="A")
    train_adapter(model, tok, A, args.steps_a, args, rng, log=out.log, name="A")
    a_after_a, b_after_a = score(model, tok, A_ev), score(model, tok, B_ev)
    out.log.info(f"学完 A：A {a_after_a:.3f}，B {b_after_a:.3f}")
    ad_dir = out.path("adapters")
    model.save_pretrained(ad_dir, selected_adapters=["A"])   # 多 adapter 时存到 adapters/A/

    # 3. naive：同一个 adapter 接着学 B；replay：同样但每批混入 A 的旧样本
    results = {}
    for name, replay in (("naive", None), ("replay", A)):
        model.load_adapter(str(ad_dir / "A"), adapter_name=name, is_trainable=True)
        model.set_adapter(name)
        train_adapter(model, tok, B, args.steps_b, args, rng, replay=replay, log=out.log, name=name)
        results[name] = {"task_a_score": score(model, tok, A_ev), "task_b_score": score(model, tok, B_ev)}

    # 4. separate：一个只学 B 的新 adapter；推理时按任务切换 adapter
    model.add_adapter("B", cfg)
    model.set_adapter("B")
    train_adapter(model, tok, B, args.steps_b, args, rng, log=out.log, name="B")
    b_only = score(model, tok, B_ev)
    model.set_adapter("A")
    results["separate"] = {"task_a_score": score(model, tok, A_ev), "task_b_score": b_only}

    # 5. 合并：add_weighted_adapter 把 A、B 合成一个 adapter（不需要任务路由）
    for combo in ("linear", "ties", "dare_ties"):
        name = f"merge_{combo}"
        kw = {} if combo == "linear" else {"density": args.merge_density}
        try:
            model.add_weighted_adapter(["A", "B"], [1.0, 1.0], name, combination_type=combo, **kw)
        except ValueError as e:   # 例如 A、B 的 r 不同，linear 不能合并
            raise UserError(f"--lora-r {args.lora_r}: {combo} 合并失败（{e}）") from None
        model.set_adapter(name)
        results[name] = {"task_a_score": score(model, tok, A_ev), "task_b_score": score(model, tok, B_ev)}
    for r in results.values():
        r["task_a_score"], r["task_b_score"] = round(r["task_a_score"], 4), round(r["task_b_score"], 4)
        r["forgetting"] = round(a_after_a - r["task_a_score"], 4)
    for k, r in results.items():
        out.log.info(f"{k:16s} A {r['task_a_score']:.3f}  B {r['task_b_score']:.3f}  遗忘 {r['forgetting']:+.3f}")
    model.save_pretrained(ad_dir)

    # 6. 图：每种策略的 A / B 分数
    fig, save = out.plot("incremental.png")
    ax = fig.add_subplot(111)
    names = list(results)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["task_a_score"] for n in names], 0.4, label="task A (old)")
    ax.bar([x + 0.2 for x in xs], [results[n]["task_b_score"] for n in names], 0.4, label="task B (new)")
    ax.axhline(a_after_a, color="tab:blue", ls="--", lw=1, label="task A right after learning A")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_ylabel("held-out token accuracy")
    ax.set_title(f"Learning A then B with LoRA ({out.model_name})")
    ax.legend(fontsize=8)
    save()
    forgetting = results["naive"]["forgetting"]
    best = min((k for k in results if k != "naive"), key=lambda k: results[k]["forgetting"])
    return out.finish({
        **results, "forgetting": forgetting, "task_a_after_a": round(a_after_a, 4), "task_b_after_a": round(b_after_a, 4),
        "base_task_a": round(base_a, 4), "base_task_b": round(base_b, 4),
    }, summary=f"学完 A：A {a_after_a:.2f}；naive 学完 B 后 A {results['naive']['task_a_score']:.2f}（遗忘 {forgetting:.2f}）；"
               f"遗忘最少：{best}（{results[best]['forgetting']:+.2f}）")


if __name__ == "__main__":
    main(cli.parse(Args))
