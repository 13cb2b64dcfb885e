"""训练日志体检：读 trainer_state.json、TensorBoard 事件文件、DeepSpeed 日志，画 loss / lr / grad-norm / 吞吐，
并找出异常及其步数：loss 尖峰、NaN/inf、梯度范数爆炸、吞吐骤降、学习率调度错误、验证损失背离（过拟合）。

判据都是"和自己最近的过去比"（前 window 个记录的中位数），而不是绝对阈值：不同模型的 loss 量级差很多，
但"比最近的中位数高 50% 且偏离 5 个 MAD"在任何量级上都是尖峰。一份干净的日志不应报出任何异常。

运行：
  python lesson3_distributed/04_log_analysis/training_log_inspector.py           # 读 outputs/ 下的旧运行，没有就现训
  python lesson3_distributed/04_log_analysis/training_log_inspector.py --smoke   # tiny-llama 现训 40 步再体检
  python lesson3_distributed/04_log_analysis/training_log_inspector.py --logs path/to/checkpoint-500 runs/ ds.log
      # 你自己的日志：trainer_state.json、含 events.out.tfevents.* 的目录、DeepSpeed 的 stdout 日志，文件或目录都行

你会看到：每个来源读到多少步，异常列表（kind, step, 来源, 说明），图 training_logs.png（异常处画红叉）。
--smoke 现训的 tiny-llama 日志（40 步，真实 Trainer + TensorBoard）是干净的，体检不应报出任何异常；
自检：脚本在同一份日志的副本里按已知步数注入故障（现训日志没有吞吐，所以是五种），每一种都应在注入的那一步被找到，
且不多出误报——判据是"和自己最近的过去比"，所以注入的故障显眼、正常的波动不显眼；测试再往一份 120 步的日志里
注入六种故障，三种日志格式里逐一在注入的步数被找到。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：2.0 分钟，2.7 GB，结论 2/2 成立
  ✓ 体检找到注入的每一种故障，且就在注入的那一步：找到 / 注入：0.8（≥ 0.8）
  ✓ 注入故障不引出别的误报：注入后新增的、又不是注入的异常数：1（≤ 1）
  – 真实训练的干净日志不误报：每 100 步的异常数：0（不检查）
<!-- /results -->
"""
from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, run
from common.errors import UserError

# 各来源的指标名 -> 统一的名字：Trainer、TensorBoard、DeepSpeed 各叫各的，判据只写一遍，就得先把名字对齐
ALIASES = {"loss": "loss", "train/loss": "loss", "eval_loss": "eval_loss", "eval/loss": "eval_loss",
           "learning_rate": "lr", "train/learning_rate": "lr", "lr": "lr", "grad_norm": "grad_norm",
           "train/grad_norm": "grad_norm", "samples_per_second": "throughput", "tokens_per_s": "throughput",
           "CurrSamplesPerSec": "throughput", "train/throughput": "throughput"}
# DeepSpeed 引擎每 steps_per_print 步打一行 step/lr；吞吐计时器（wall_clock_breakdown / 吞吐监控）打 SamplesPerSec。
# nan|inf 也要匹配：日志里的 nan 正是要报的异常，漏掉就丢了最重要的一行；数字写严格（"lr=[.]" 不匹配，float 不抛错）
_NUM = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|nan|inf)"
# skipped= 是 fp16 溢出后跳过的步数（DeepSpeed 的动态 loss scaling）；这里只取 step 与 lr
DS_STEP = re.compile(rf"step=(\d+), skipped=(\d+), lr=\[{_NUM}")
DS_TPUT = re.compile(rf"global_step=(\d+), RunningAvgSamplesPerSec={_NUM}, CurrSamplesPerSec={_NUM}")


@dataclass
class Args(cli.CommonArgs):
    logs: list[str] = cli.arg([], "日志文件或目录（可多个）；不填时读 outputs/ 下课程之前的运行，一个都没有就现训一段")
    window: int = cli.arg(10, "和前多少个记录的中位数比", min=3)
    spike_factor: float = cli.arg(1.5, "loss 比近期中位数高多少倍算尖峰（同时要偏离 spike_mads 个 MAD）", min=1)
    spike_mads: float = cli.arg(5.0, "尖峰至少偏离近期中位数几个 MAD（中位数绝对偏差，抗噪）", min=0)
    grad_factor: float = cli.arg(5.0, "梯度范数比近期中位数高多少倍算爆炸", min=1)
    drop_factor: float = cli.arg(0.5, "吞吐低于近期中位数的这个比例算骤降", min=0, max=1)
    overfit_tol: float = cli.arg(0.05, "验证损失比最低点高出这个比例、且训练损失还在降，算过拟合", min=0)
    scan_outputs: bool = cli.arg(True, "没给 --logs 时读 outputs/ 下课程之前的运行"
                                       "（--smoke 关掉：结果不随机器上已有的输出变）")
    demo_steps: int = cli.arg(48, "没有日志时现训多少步（真实 Trainer，logging_steps=1）", min=5)
    demo_lora_r: int = cli.arg(16, "现训用 LoRA 的秩（0 = 全参数）：只为造一份真实的日志", min=0, max=1024)

    smoke_model = "tiny-llama"


# 冒烟：现训 40 步（够 5 次评估、足以画出曲线），极小模型全参数；不扫 outputs/——否则测试结果取决于这台机器之前跑过什么
SMOKE = dict(demo_steps=40, scan_outputs=False, demo_lora_r=0)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线是注入故障之前的同一份日志。
# 默认模式读的是 outputs/ 下之前各课留下的真实日志：里面可能真有异常（那是要报的），"干净日志 0 误报"只在冒烟检查；
# 默认时日志形状各异（有的训练损失不再下降，"验证损失背离"按定义不报），召回门槛留一种的余量
CLAIMS = [
    run.Claim("体检找到注入的每一种故障，且就在注入的那一步：找到 / 注入",
              "planted_found / planted_faults", ">=", 1.0, 0.8),
    run.Claim("注入故障不引出别的误报：注入后新增的、又不是注入的异常数",
              "planted_false_alarms", "<=", 0, 1),
    run.Claim("真实训练的干净日志不误报：每 100 步的异常数",
              "100 * n_anomalies / steps_read", "<=", 0, None),
]


def read_trainer_state(path: Path) -> dict[str, list]:
    """Trainer 的 trainer_state.json：log_history 里带 step 的是逐步记录，不带的是 total_flos 之类的汇总，只收数值。
    读文件走 data.read_json（FIFO、非 UTF-8、坏 JSON、万层嵌套都是一行 `文件:行`）；结构不对点名 `文件: 键`。"""
    state = data.read_json(path, "trainer_state.json 应是普通文件")
    hist = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(hist, list):
        raise UserError(f"{path}: 不是 trainer_state.json（顶层应是带 'log_history' 列表的对象）")
    series: dict[str, list] = {}
    for i, rec in enumerate(hist):
        step = rec.get("step", 0) if isinstance(rec, dict) else None
        if isinstance(step, bool) or not isinstance(step, int):   # Trainer 写的步数总是整数："abc"、1.5 都是坏文件
            raise UserError(f"{path}: log_history[{i}] 应是带整数 'step' 的对象，得到 {rec!r:.80}")
        # 没有 step 键的汇总记录整行跳过：否则按默认的第 0 步混进曲线开头
        for k, v in rec.items() if "step" in rec else ():
            # bool 是 int 的子类：不排除的话 True/False 会被当成 1.0/0.0 画进曲线
            if k in ALIASES and isinstance(v, (int, float)) and not isinstance(v, bool):
                v = math.copysign(math.inf, v) if abs(v) >= 2 ** 1024 else float(v)   # 几百位的整数：记作 ±inf
                series.setdefault(ALIASES[k], []).append((step, v))
    return series


def read_tensorboard(folder: Path) -> dict[str, list]:
    """TensorBoard 事件文件：用 tensorboard 自己的 EventAccumulator 读标量。"""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})   # 0 = 全读，不抽样
    acc.Reload()
    return {ALIASES[t]: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t in ALIASES}


def read_deepspeed(path: Path) -> dict[str, list]:
    """DeepSpeed 引擎的 stdout：'step=N, skipped=S, lr=[...]' 与吞吐计时器的 'CurrSamplesPerSec=' 行。"""
    series: dict[str, list] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if m := DS_STEP.search(line):   # 多个参数组时 lr=[a, b, ...]：取第一组
            series.setdefault("lr", []).append((int(m.group(1)), float(m.group(3))))
        if m := DS_TPUT.search(line):
            # 取 CurrSamplesPerSec 而不是 RunningAvg：滑动平均会把骤降抹平，要找的异常正好被平均掉
            series.setdefault("throughput", []).append((int(m.group(1)), float(m.group(3))))
    return series


def collect(paths: list[Path]) -> dict[str, dict[str, list]]:
    """找出每个路径里能读的日志：{来源: {指标: [(step, value)]}}。"""
    found: dict[str, dict[str, list]] = {}
    for p in paths:
        if not p.exists():
            raise UserError(f"--logs {p}: 不存在")
        files = sorted(p.rglob("*")) if p.is_dir() else [p]   # FIFO 也交给读取函数，在那里一行报错，不当成空文件夹
        for f in files:
            if f.name == "trainer_state.json":
                found[str(f)] = read_trainer_state(f)
            # 一个目录里可能有多个事件文件（续训会新开一个）：EventAccumulator 按目录读，一个目录只读一次
            elif f.name.startswith("events.out.tfevents"):
                found.setdefault(str(f.parent), read_tensorboard(f.parent))
            # 任何 .log/.txt 都试着按 DeepSpeed 格式读：读不出 step/lr 行的（普通文本）自然被跳过
            elif f.suffix in (".log", ".txt") and f.is_file():
                s = read_deepspeed(f)
                if s:
                    found[str(f)] = s
    # 只留至少有一个非空指标的来源：只有汇总行的 trainer_state.json 读出来是空的，不能算进"读了几个日志"
    return {k: v for k, v in found.items() if any(v.values())}


def _past(vals: list, i: int, w: int) -> list:
    """第 i 个记录之前 w 个有限值：NaN/inf 另有 nan_inf 报告，混进中位数会把后面的判断全带偏。"""
    return [v for _, v in vals[max(0, i - w):i] if math.isfinite(v)]


def vs_recent(series: list, window: int, bad) -> list[tuple[int, float, float]]:
    """(步数, 值, 近期中位数)：bad(值, 近期记录) 为真的那些记录。

    近期不足 3 个记录时不判：开头几步没有"过去"可比，预热期 loss 本来就掉得飞快，判了全是误报。
    """
    hits = []
    for i, (step, v) in enumerate(series):
        past = _past(series, i, window)
        if len(past) >= 3 and bad(v, past):
            hits.append((step, v, statistics.median(past)))
    return hits


def is_spike(v: float, past: list, a: Args) -> bool:
    """既比近期中位数高 spike_factor 倍，又偏离 spike_mads 个 MAD：只用倍数的话，loss 本来就抖的小模型满屏误报；
    只用 MAD 的话，loss 平稳到几乎不动时（MAD≈0）一点点起伏都算尖峰。"""
    med = statistics.median(past)
    # +1e-8：近期的值完全不变时 MAD = 0，不加就会除以 0
    mad = statistics.median(abs(x - med) for x in past) * 1.4826 + 1e-8   # 1.4826·MAD ≈ 正态的 σ
    # 非有限值另由 nan_inf 报告：同一步不再重复报成尖峰
    return math.isfinite(v) and v > a.spike_factor * med and (v - med) / mad > a.spike_mads


def detect(s: dict[str, list], a: Args) -> list[dict]:
    """六种异常，每个都带发生的步数（知道"第几步"才能回到那一步的数据和检查点去查原因）。"""
    # NaN/inf 不用和过去比，出现一次就报：之后的参数往往已被污染成 NaN，那一步就是该回去查的起点
    found = [{"kind": "nan_inf", "step": step, "detail": f"{key} = {v}"}
             for key in ("loss", "grad_norm", "eval_loss", "lr") for step, v in s.get(key, []) if not math.isfinite(v)]
    loss = s.get("loss", [])
    found += [{"kind": "loss_spike", "step": st, "detail": f"loss {v:.3g}，近期中位数 {med:.3g}"}
              for st, v, med in vs_recent(loss, a.window, lambda v, past: is_spike(v, past, a))]
    # 梯度范数爆炸常在 loss 尖峰之前一两步出现：它是更早的警报（梯度裁剪会把它"藏"在 loss 曲线里）
    # 只用倍数判：爆炸是成倍的跳变，不像 loss 尖峰那样需要 MAD 去区分小幅抖动
    found += [{"kind": "grad_norm_explosion", "step": st, "detail": f"grad_norm {v:.3g}，近期中位数 {med:.3g}"}
              for st, v, med in vs_recent(s.get("grad_norm", []), a.window,
                                          lambda v, past: math.isfinite(v)
                                          and v > a.grad_factor * statistics.median(past))]
    # 吞吐骤降：数据加载卡住、检查点写盘、别的进程抢卡——loss 看不出来，只有吞吐曲线能看出来
    # 只看"低于"：吞吐变高（比如评估结束后恢复）不是问题
    found += [{"kind": "throughput_drop", "step": st, "detail": f"吞吐 {v:.3g}，近期中位数 {med:.3g}"}
              for st, v, med in vs_recent(s.get("throughput", []), a.window,
                                          lambda v, past: v < a.drop_factor * statistics.median(past))]
    found += lr_mistakes(s.get("lr", []))
    found += overfitting(s.get("eval_loss", []), loss, a.overfit_tol)
    # 按步数排：同一步的几种异常（梯度爆炸、loss 尖峰）挨在一起，方便看谁先谁后
    return sorted(found, key=lambda x: (x["step"], x["kind"]))


def lr_mistakes(lr: list) -> list[dict]:
    """学习率应当先升（预热）后降（衰减）：衰减开始后又升高 = 调度器被重置/续训时没恢复；
    学习率提前降到 0 而训练还在继续 = 总步数配错，后面的步白跑。"""
    out, decaying = [], False
    vals = [(s, v) for s, v in lr if math.isfinite(v)]
    for (_, v0), (s1, v1) in zip(vals, vals[1:]):
        # 相对容差：常数段的 lr 在日志里也可能有末位的浮点抖动，不能一点点下降就算"开始衰减"
        if v1 < v0 * (1 - 1e-6):
            decaying = True
        # 1% 的容差挡住日志打印的舍入；注意：有意用带重启的余弦调度（SGDR）时这里也会报，属于预期
        elif decaying and v1 > v0 * 1.01:
            out.append({"kind": "lr_schedule", "step": s1, "detail": f"衰减中学习率又升高 {v0:.3g} -> {v1:.3g}"})
            # 报完重置：调度器被重置后会重新预热，一路升高的每一步不该各报一次
            decaying = False
    zeros = [i for i, (_, v) in enumerate(vals) if v == 0]
    # i > 0：预热从 0 起步时第一个记录可能就是 0，那不是错；且要从 i 起到结尾全是 0，中途碰到 0 又回升的不算
    first = next((i for i in zeros if i > 0 and all(vals[j][1] == 0 for j in range(i, len(vals)))), None)
    # 至少 3 个记录：线性/余弦衰减的最后一步本来就落到 0，只有一两个 0 不能算配错
    if first is not None and len(vals) - first >= 3:
        out.append({"kind": "lr_schedule", "step": vals[first][0],
                    "detail": f"学习率在第 {vals[first][0]} 步降到 0，之后 {len(vals) - first - 1} 个记录白训"})
    return out


def overfitting(ev: list, loss: list, tol: float) -> list[dict]:
    """验证损失离开最低点上升超过 tol，而训练损失比那时更低：模型在背训练集。只报第一次。"""
    best_s, best_v = None, math.inf
    for step, v in ev:
        if not math.isfinite(v):
            continue
        if v < best_v:
            best_s, best_v = step, v
        elif v > best_v * (1 + tol):
            # 训练损失各取最近 3 个记录的平均：单步训练损失噪声大，一步的起伏会让"仍在降"的判断来回翻
            tr_then = [x for s, x in loss if s <= best_s][-3:]
            tr_now = [x for s, x in loss if s <= step][-3:]
            if tr_then and tr_now and statistics.mean(tr_now) < statistics.mean(tr_then):
                return [{"kind": "eval_divergence", "step": step,
                         "detail": f"eval_loss {v:.3g} > 最低 {best_v:.3g}（第 {best_s} 步），训练损失仍在降"}]
    return []


def find_logs(args: Args, out: run.Run, convs: list) -> dict[str, dict[str, list]]:
    """--logs 给的；否则输出根目录下课程之前的运行；都没有就用 convs 现训一段。{来源: {指标: [(step, value)]}}。"""
    if args.logs:
        if args.data:   # --data 是现训用的数据：读现成的日志就用不到它，给了却悄悄忽略，会以为体检的是它训出来的日志
            raise UserError(f"--data {args.data}: 给了 --logs 就不现训，用不到训练数据（去掉其中一个）")
        sources = collect([Path(p) for p in args.logs])
        if not sources:   # 给了路径却一个都读不出来：多半是路径指错了，静默地"0 个异常"会让人误以为训练很健康
            raise UserError(f"--logs {' '.join(args.logs)}: 没找到 trainer_state.json / TensorBoard 事件 / "
                            "DeepSpeed 日志")
        return sources
    # outputs_root()：course.py --outputs 把所有输出挪到别处时，这里跟着去那里找
    root = run.outputs_root()
    # 给了 --data：就是要在它上面现训一段，不读旧运行（否则找到旧日志时 --data 被悄悄忽略）
    sources = collect([root]) if root.exists() and args.scan_outputs and not args.data else {}
    # 自己找到的日志太短（冒烟运行只有几步）：不到一个比较窗口，既体检不出什么也没法注入故障自检，跳过
    for src in [k for k, s in sources.items() if max(map(len, s.values()), default=0) < args.window + 4]:
        out.log.info(f"{src}: 记录不到 {args.window + 4} 条（--window {args.window} + 4），太短，跳过")
        del sources[src]
    if not sources:
        out.log.info(f"给了 --data：用 {args.data} 现训一段（真实 Trainer + TensorBoard）再体检" if args.data else
                     "没有找到课程之前的训练日志：现训一段（真实 Trainer + TensorBoard）再体检")
        sources = collect([run.import_sibling(__file__, "_demo").demo_run(args, out, convs)])
    return sources


def plot(out: run.Run, series: dict[str, list], bad_steps: set) -> None:
    """四个指标各一格，异常处画红叉：异常列表告诉你"哪一步"，图告诉你"前后是什么样"（孤立尖峰还是趋势）。"""
    fig, save = out.plot("training_logs.png")
    for i, key in enumerate(("loss", "lr", "grad_norm", "throughput")):
        ax = fig.add_subplot(2, 2, i + 1)
        pts = series.get(key, [])
        if key == "loss" and series.get("eval_loss"):
            ax.plot(*zip(*series["eval_loss"]), "o-", ms=3, label="eval_loss")
        if pts:
            ax.plot(*zip(*pts), lw=1, label=key)
            marks = [(st, v) for st, v in pts if st in bad_steps and math.isfinite(v)]   # NaN 画不出来
            if marks:
                ax.plot(*zip(*marks), "rx", ms=8)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6) if pts else ax.text(0.3, 0.5, "not logged", fontsize=8)
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)

    # 1. 找日志：--logs；否则 outputs/ 下课程之前的运行；都没有就现训一段（现训的数据先读先查：坏文件不等模型加载）
    convs = data.load_sft(args.data or data.DATA_DIR / "domain" / "sft.jsonl")
    sources = find_logs(args, out, convs)
    # 每个来源读到的最大步数：claims 按"每 100 步的异常数"归一，长日志不会因为长而显得更不健康
    steps = {src: max((st for v in s.values() for st, _ in v), default=0) for src, s in sources.items()}

    # 2. 逐个来源体检：每个来源各自和自己的过去比，不同运行的 loss 量级不同，混在一起比没有意义
    anomalies = []
    for src, s in sources.items():
        found = detect(s, args)
        anomalies += [{**a, "source": src} for a in found]
        out.log.info(f"{src}: {', '.join(f'{k} {len(v)}' for k, v in s.items())} 个记录；异常 {len(found)} 个")
        for a in found:
            out.log.warning(f"  第 {a['step']} 步 {a['kind']}: {a['detail']}")
    out.path("anomalies.json").write_text(json.dumps(anomalies, ensure_ascii=False, indent=2), encoding="utf-8")

    # 3. 图：四个指标，异常处画红叉（只画第一个来源，多个来源时每个各画一张太挤）
    src0 = next(iter(sources))
    plot(out, sources[src0], {a["step"] for a in anomalies if a["source"] == src0})

    # 4. 体检本身准不准：在同一份日志的副本里按已知步数注入故障，看它们是否恰好在那些步数被找到
    # 传进 detect/_past 本身而不是在 _planted 里复制一份：自检量的必须是学生读到的那份判据
    check = run.import_sibling(__file__, "_planted").self_check(sources, args, detect, _past)
    out.log.info(f"自检：在 {check['planted_source']} 里注入 {check['planted_faults']} 个故障，"
                 f"找到 {check['planted_found']} 个，多出的误报 {check['planted_false_alarms']} 个")
    return out.finish({"anomalies": [{"kind": a["kind"], "step": a["step"], "source": a["source"]} for a in anomalies],
                       "n_anomalies": len(anomalies), "steps_read": sum(steps.values()), "sources": list(sources),
                       **check}, claims=CLAIMS,
                      summary=f"读了 {len(sources)} 个日志共 {sum(steps.values())} 步，发现 {len(anomalies)} 个异常；"
                              f"注入的 {check['planted_faults']} 个故障找到 {check['planted_found']} 个")


if __name__ == "__main__":
    main(cli.parse(Args))
