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
  python lesson4_alignment/05_incremental_learning/incremental_lora.py --smoke    # tiny-qwen2
  python lesson4_alignment/05_incremental_learning/incremental_lora.py --model Qwen/Qwen2.5-7B-Instruct \\
      --source hf --config configs/lesson4/incremental_lora_gpu.yaml              # GPU，bf16
  --data 任务 B 的 SFT 文件（alpaca/chat）；--task-a-data 任务 A 的分类文件（text/label）。

你会看到（默认 smollm2，36 步/任务）：每种策略一行，任务 A、B 的分数与遗忘量。
LoRA 学完 A，A 的分数比原模型高出一截；naive 接着学 B，A 的分数大幅回落——同一组低秩增量被 B 的梯度改写了。
replay 混入一点 A 的旧样本，遗忘几乎消失，B 也没少学；separate 每个任务一个 adapter，A 的那份原封不动，不遗忘。
三种合并都保住了 A，代价是 B 比单独的 B adapter 差：两份增量加在同一组权重上互相干扰，TIES / DARE 靠修剪与
按符号选举减少干扰，但不能消除。输出：incremental.png、adapters/。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：8.6 分钟，4.0 GB，结论 7/7 成立
  ✓ LoRA 学会任务 A：A 的分数 学完 A − 原模型：0.5926（≥ 0.4）
  ✓ naive 接着学 B 会忘掉 A（灾难性遗忘）：A 的分数 学完 A 时 − 学完 B 后：0.4074（≥ 0.2）
  ✓ 回放旧样本减少遗忘：naive 的遗忘 − replay 的遗忘：0.4223（≥ 0.2）
  ✓ 回放几乎不耽误学 B：replay 的 B 分数 − naive 的 B 分数：0.0176（≥ -0.05）
  ✓ 每个任务一个 adapter 不遗忘：naive 的遗忘 − separate 的遗忘：0.4074（≥ 0.2）
  ✓ 合并的 adapter 保住 A：三种合并里最低的 A 分数 − naive 的 A 分数：0.3778（≥ 0.2）
  ✓ 合并的代价是两个增量互相干扰：separate 的 B 分数 − 三种合并的平均 B 分数：0.0213（≥ 0.01）
<!-- /results -->
详见同目录 README.md。
"""

import random
from dataclasses import dataclass

from common import cli, data, lm, models, run, train
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    task_a_data: str = cli.arg(None, "任务 A 的分类数据（text/label）；默认 data/classification/sentiment.jsonl")
    steps_a: int = cli.arg(36, "任务 A 训练步数", min=1)
    steps_b: int = cli.arg(36, "任务 B 训练步数", min=1)
    batch_size: int = cli.arg(8, "每步几条样本", min=1)
    learning_rate: float = cli.arg(5e-4, "LoRA 学习率")
    lora_r: int = cli.arg(8, "LoRA 秩", min=1)
    lora_alpha: int = cli.arg(16, "LoRA 缩放系数", min=1)
    replay_fraction: float = cli.arg(0.25, "replay：训 B 时每批里 A 旧样本的比例", min=0, max=0.9)
    merge_density: float = cli.arg(0.5, "TIES/DARE 合并时保留的参数比例", min=0.01, max=1)
    max_length: int = cli.arg(128, "每条样本最多多少 token", min=8)
    val_fraction: float = cli.arg(0.15, "每个任务留出多少比例做评估", min=0.01, max=0.9)

    smoke_model = "tiny-qwen2"


# 冒烟：极小模型要大学习率 + 大秩才能在 40 步里学会 A——学不会 A，也就谈不上"忘掉 A"
SMOKE = dict(steps_a=40, steps_b=40, batch_size=16, learning_rate=2e-3, lora_r=16, lora_alpha=32)
# PEFT add_weighted_adapter 的 combination_type 名：dare_ties = DARE 的随机丢弃 + TIES 的符号选举
MERGES = ("linear", "ties", "dare_ties")

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测（原模型、刚学完 A 时、naive）
CLAIMS = [
    run.Claim("LoRA 学会任务 A：A 的分数 学完 A − 原模型", "task_a_after_a - base_task_a", ">=", 0.4, 0.4),
    run.Claim("naive 接着学 B 会忘掉 A（灾难性遗忘）：A 的分数 学完 A 时 − 学完 B 后", "forgetting", ">=", 0.3, 0.2),
    run.Claim("回放旧样本减少遗忘：naive 的遗忘 − replay 的遗忘", 'forgetting - replay["forgetting"]', ">=", 0.25, 0.2),
    run.Claim("回放几乎不耽误学 B：replay 的 B 分数 − naive 的 B 分数",
              'replay["task_b_score"] - naive["task_b_score"]', ">=", -0.05, -0.05),
    run.Claim("每个任务一个 adapter 不遗忘：naive 的遗忘 − separate 的遗忘",
              'forgetting - separate["forgetting"]', ">=", 0.3, 0.2),
    run.Claim("合并的 adapter 保住 A：三种合并里最低的 A 分数 − naive 的 A 分数",
              'min(m[k]["task_a_score"] for k in ("merge_linear", "merge_ties", "merge_dare_ties"))'
              ' - naive["task_a_score"]', ">=", 0.2, 0.2),
    run.Claim("合并的代价是两个增量互相干扰：separate 的 B 分数 − 三种合并的平均 B 分数",
              'separate["task_b_score"] - sum(m[k]["task_b_score"] for k in ("merge_linear", "merge_ties",'
              ' "merge_dare_ties")) / 3', ">=", 0.03, 0.01),
]


def task_a_convs(path) -> list[list[dict]]:
    """分类 -> 对话：问情感，答标签。两个任务同一种对话格式，分数才能用同一把尺子量。"""
    recs, labels = data.load_classification(path)
    # 把候选标签写进提问：答案只有这几个词，模型不用猜输出格式，分数量的是分类本身而不是措辞
    return [[{"role": "user", "content": f"Sentiment ({'/'.join(labels)})? {r['text']}"},
             {"role": "assistant", "content": r["label"]}] for r in recs]


def batchify(tok, rows, device):
    """右填充成批并搬到模型所在设备；labels 的填充位是 -100，不进损失也不进准确率。"""
    return {k: v.to(device) for k, v in lm.pad_right(rows, tok.pad_token_id).items()}


def load_tasks(args: Args) -> tuple[list, list, list, list]:
    """两个任务的对话，各自留出一部分：(A 训练, A 留出, B 训练, B 留出)。在加载模型之前读，坏数据一秒内报错。"""
    a_path = args.task_a_data or data.DATA_DIR / "classification" / "sentiment.jsonl"
    b_path = args.data or data.DATA_DIR / "domain" / "sft.jsonl"
    # 按 --seed 确定性地切分：重跑时留出集不变，两次运行的分数才可比（同一次运行里各策略本就共用这份留出集）
    a_train, a_eval = data.split(task_a_convs(a_path), args.val_fraction, args.seed)
    b_train, b_eval = data.split(data.load_sft(b_path), args.val_fraction, args.seed)
    return a_train, a_eval, b_train, b_eval


def train_adapter(model, tok, rows, steps: int, args: Args, rng, replay=None, log=None, name=""):
    """训练当前激活的 adapter（只有它的参数可训练）；replay 给了就在每批里混入旧任务样本。"""
    import torch

    # 每次新建优化器：可训练的只有当前激活的 adapter，换了 adapter 参数就换了；旧的 AdamW 动量也属于旧任务
    opt = torch.optim.AdamW(train.trainable_params(model), lr=args.learning_rate)
    # 先 round 再 int：直接 int 会向下截断，比例乘出来不是整数时每批系统性地少放旧样本
    n_old = int(round(args.batch_size * args.replay_fraction)) if replay else 0
    model.train()
    for step in range(steps):
        # 每批固定混入 n_old 条旧样本（而不是整体按比例抽）：每一步的梯度里都有 A 的份，拉住 A 不被冲走
        # min(…, len(rows))：random.sample 要的条数多于总数时直接抛 ValueError，小数据集也要跑得通
        batch = rng.sample(rows, min(args.batch_size - n_old, len(rows))) + (rng.sample(replay, n_old) if n_old else [])
        loss = train.optimizer_step(opt, model(**batchify(tok, batch, model.device)).loss)
        if log and (step + 1) % 20 == 0:
            log.info(f"[{name}] step {step + 1}/{steps} loss {loss:.3f}")


def score(model, tok, rows) -> float:
    """留出样本上助手 token 的 teacher-forcing 准确率：不生成，快且确定，同一个模型两次量结果一样。"""
    import torch

    model.eval()   # 关掉 dropout：文档字符串说的“两次量结果一样”靠的就是它
    hit = tot = 0
    with torch.no_grad():
        for i in range(0, len(rows), 16):
            b = batchify(tok, rows[i:i + 16], model.device)
            # 错开一位：位置 t 的 logits 预测第 t+1 个 token，所以 logits 去掉最后一位、labels 去掉第一位才对齐
            pred = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].argmax(-1)
            lab = b["labels"][:, 1:]
            m = lab != -100   # 只数助手回复的 token：提示词谁都能"预测"（它就在输入里）
            hit += (pred[m] == lab[m]).sum().item()
            tot += m.sum().item()
    # max(…, 1)：回复全被 max_length 截掉时没有可数的 token，不能除零
    return hit / max(tot, 1)


def both(model, tok, A_ev, B_ev) -> dict:
    """当前激活的 adapter 在两个任务上的分数：只看新任务会漏掉遗忘，只看旧任务会漏掉没学会。"""
    return {"task_a_score": score(model, tok, A_ev), "task_b_score": score(model, tok, B_ev)}


def continue_on_b(model, tok, ad_dir, A, B, A_ev, B_ev, args, rng, log) -> dict:
    """naive 与 replay：都从存盘的 adapter A 出发接着学 B，差别只有每批里混不混 A 的旧样本。"""
    results = {}
    for name, replay in (("naive", None), ("replay", A)):
        # 从磁盘重新装 A（而不是接着上一个策略训）：两种策略的起点完全相同，差别才只来自回放
        # is_trainable=True：load_adapter 默认按推理加载（冻结），这里是要接着训练的
        model.load_adapter(str(ad_dir / "A"), adapter_name=name, is_trainable=True)
        # set_adapter 把它设为激活且可训练、其余 adapter 冻结（PEFT 默认 inference_mode=False）：优化器只拿到它的参数
        model.set_adapter(name)
        train_adapter(model, tok, B, args.steps_b, args, rng, replay=replay, log=log, name=name)
        results[name] = both(model, tok, A_ev, B_ev)
    return results


def separate_adapter(model, tok, cfg, B, A_ev, B_ev, args, rng, log) -> dict:
    """separate：一个只学 B 的新 adapter；推理时按任务切换。A 的权重一个数都没动，所以不会遗忘。"""
    # 新 adapter 按 LoRA 默认初始化（B 矩阵为 0）：刚加上时不改变模型输出，学 B 从原模型出发而不是从 A 出发
    model.add_adapter("B", cfg)
    model.set_adapter("B")
    train_adapter(model, tok, B, args.steps_b, args, rng, log=log, name="B")
    b_only = score(model, tok, B_ev)
    # 量 A 时切回 adapter A：这就是“按任务路由”，separate 的前提是推理时知道当前是哪个任务
    model.set_adapter("A")
    return {"task_a_score": score(model, tok, A_ev), "task_b_score": b_only}


def merged_adapters(model, tok, A_ev, B_ev, args) -> dict:
    """把 A、B 两个 adapter 合成一个（不需要任务路由）：linear 直接相加；TIES 先剪掉小的、再按多数符号合并，
    减少两组增量互相抵消；DARE 随机丢掉一部分再放大，也是为了减少干扰（Yadav 2023；Yu 2023）。"""
    results = {}
    for combo in MERGES:
        name = f"merge_{combo}"
        # linear 不收 density：只有修剪类的 TIES / DARE 按 density 决定保留多少参数
        kw = {} if combo == "linear" else {"density": args.merge_density}
        try:
            # 权重都是 1：两个增量原样相加，不偏向任何一个任务；合并出的是新 adapter，A、B 本身不动
            model.add_weighted_adapter(["A", "B"], [1.0, 1.0], name, combination_type=combo, **kw)
        except ValueError as e:   # 例如 A、B 的 r 不同，linear 不能合并
            raise UserError(f"--lora-r {args.lora_r}: {combo} 合并失败（{e}）") from None
        model.set_adapter(name)
        results[name] = both(model, tok, A_ev, B_ev)
    return results


def plot_scores(out, results: dict, a_after_a: float) -> None:
    """每种策略 A / B 并排，虚线是刚学完 A 时的 A 分数：柱子离虚线多远就是忘了多少。"""
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


def main(args: Args) -> dict:
    # 先套冒烟参数再 run.start：config.json 记下的才是真正跑的参数
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 一个按 --seed 建的 Random 贯穿各策略的抽样：同一个 --seed 重跑，每一批抽到的样本都一样
    rng = random.Random(args.seed)

    # 1. 两个任务的数据，各自留出一部分；先量原模型：学完 A 的分数要和它比，才知道 A 真的学会了
    convs = load_tasks(args)
    model, tok = models.load_args(args, for_training=True)
    # tokenize_chat 只在助手回复上留 labels（其余 -100）：训练损失和 score 都只算回答，不算提问
    A, A_ev, B, B_ev = ([data.tokenize_chat(tok, c, args.max_length) for c in part] for part in convs)
    out.log.info(f"任务 A {len(A)}/{len(A_ev)} 条（训练/留出），任务 B {len(B)}/{len(B_ev)} 条")
    base_a, base_b = score(model, tok, A_ev), score(model, tok, B_ev)
    out.log.info(f"原模型：A {base_a:.3f}，B {base_b:.3f}")

    # 2. 先学任务 A（adapter "A"），存盘：后面的策略都从这个 adapter 出发
    from peft import get_peft_model

    # 同一个 cfg 后面还用来建 adapter B：A、B 的秩相同，linear 合并才做得了（秩不同会报错，见 merged_adapters）
    cfg = train.lora_config(args.lora_r, args.lora_alpha)
    model = get_peft_model(model, cfg, adapter_name="A")   # 起名 "A"：后面要按名字切换、合并
    train_adapter(model, tok, A, args.steps_a, args, rng, log=out.log, name="A")
    a_after_a, b_after_a = score(model, tok, A_ev), score(model, tok, B_ev)
    out.log.info(f"学完 A：A {a_after_a:.3f}，B {b_after_a:.3f}")
    ad_dir = out.path("adapters")
    model.save_pretrained(ad_dir, selected_adapters=["A"])   # 多 adapter 时存到 adapters/A/

    # 3. naive：同一个 adapter 接着学 B；replay：同样但每批混入 A 的旧样本
    results = continue_on_b(model, tok, ad_dir, A, B, A_ev, B_ev, args, rng, out.log)
    # 4. separate：一个只学 B 的新 adapter；推理时按任务切换 adapter
    results["separate"] = separate_adapter(model, tok, cfg, B, A_ev, B_ev, args, rng, out.log)
    # 5. 合并：add_weighted_adapter 把 A、B 合成一个 adapter（不需要任务路由）
    results.update(merged_adapters(model, tok, A_ev, B_ev, args))
    for k, r in results.items():
        r["task_a_score"], r["task_b_score"] = round(r["task_a_score"], 4), round(r["task_b_score"], 4)
        r["forgetting"] = round(a_after_a - r["task_a_score"], 4)   # 正数 = 忘了多少；负数 = 学 B 反而帮了 A
        out.log.info(f"{k:16s} A {r['task_a_score']:.3f}  B {r['task_b_score']:.3f}  遗忘 {r['forgetting']:+.3f}")
    # 最后存下全部 adapter（A、naive、replay、B 与三个合并，各占一个子目录）：表里任何一行都能单独加载复现
    model.save_pretrained(ad_dir)

    # 6. 图：每种策略的 A / B 分数
    plot_scores(out, results, a_after_a)
    forgetting = results["naive"]["forgetting"]
    # 排除 naive：它是被比较的基线，要找的是哪种缓解办法遗忘最少
    best = min((k for k in results if k != "naive"), key=lambda k: results[k]["forgetting"])
    return out.finish({
        **results, "forgetting": forgetting, "task_a_after_a": round(a_after_a, 4),
        "task_b_after_a": round(b_after_a, 4), "base_task_a": round(base_a, 4), "base_task_b": round(base_b, 4),
    }, summary=f"学完 A：A {a_after_a:.2f}；naive 学完 B 后 A {results['naive']['task_a_score']:.2f}"
               f"（遗忘 {forgetting:.2f}）；遗忘最少：{best}（{results[best]['forgetting']:+.2f}）", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
