"""体检准不准的自检（只属于第 3 课 04）：在日志副本里按已知步数注入故障，看体检是否恰好在那些步数找到它们。"""
from __future__ import annotations

import math
import statistics


def plant_faults(s: dict[str, list], a, past) -> tuple[dict[str, list], set]:
    """在一份日志的副本里按已知步数注入故障（序列够长才注入），返回 (注入后的序列, {(kind, 步数)})。

    体检准不准，要在同一份日志上量：注入前的原日志就是基线，新增的异常应当恰好是注入的那些。
    训练损失类的故障放在后半段：验证损失背离的判据要比较前半段的训练损失，尖峰和 NaN 混进去会干扰它。
    """
    # 逐个指标复制列表：注入只改副本，原日志还要当基线（self_check 里的 clean）再体检一次
    s, planted = {k: list(v) for k, v in s.items()}, set()
    n_min = a.window + 4   # 之前至少要有一个完整的窗口可比

    def past_median(vals: list, i: int) -> float:
        return statistics.median(past(vals, i, a.window) or [1.0])

    if len(loss := s.get("loss", [])) >= n_min:
        # 各故障的注入位置彼此错开（见下面几处的比例）：同一步只注一种，"找到没有"才能逐一归因
        for frac, kind in ((0.75, "loss_spike"), (0.9, "nan_inf")):
            i = int(frac * len(loss))
            st = loss[i][0]
            # 注入值取尖峰门槛的 2 倍：明确越线，量的是"找不找得到"，而不是门槛附近碰运气
            loss[i] = (st, 2 * a.spike_factor * past_median(loss, i) if kind == "loss_spike" else math.nan)
            planted.add((kind, st))
    # 同理：梯度取爆炸门槛的 2 倍，吞吐取骤降门槛的一半
    for key, frac, kind, factor in (("grad_norm", 0.5, "grad_norm_explosion", 2 * a.grad_factor),
                                    ("throughput", 0.6, "throughput_drop", a.drop_factor / 2)):
        if len(vals := s.get(key, [])) >= n_min:
            i = int(frac * len(vals))
            vals[i] = (vals[i][0], factor * past_median(vals, i))
            planted.add((kind, vals[i][0]))
    # 调度器被重置：从 70% 处起学习率从峰值重新走一遍（要在已经开始衰减之后，恒定学习率的日志没法注入）
    if len(lr := s.get("lr", [])) >= n_min:
        k, peak = int(0.7 * len(lr)), max(range(len(lr)), key=lambda j: lr[j][1])
        if peak < k and lr[k - 1][1] < 0.99 * lr[peak][1]:
            s["lr"] = lr[:k] + [(st, lr[peak + j][1]) for j, (st, _) in enumerate(lr[k:])]
            planted.add(("lr_schedule", lr[k][0]))
    # 过拟合：前四分之一的某次评估之后验证损失一路上升（训练损失那时还在快速下降）
    if len(ev := s.get("eval_loss", [])) >= 4 and loss:
        b = max(0, len(ev) // 4 - 1)
        best = min(v for _, v in ev[:b + 1])
        # 第一次评估就比最低点高 10%，已超过 overfit_tol 的默认 5%：注入点必定越线，之后继续上升
        s["eval_loss"] = ev[:b + 1] + [(st, best * (1.1 + 0.1 * j)) for j, (st, _) in enumerate(ev[b + 1:])]
        planted.add(("eval_divergence", ev[b + 1][0]))
    return s, planted


def self_check(sources: dict[str, dict[str, list]], a, detect, past) -> dict:
    """在记录最多的那个来源上注入故障再体检：找到几个、在不在注入的步数、有没有多出误报。

    detect / past 是脚本里的体检函数本身（传进来而不是复制：量的必须是学生读到的那份判据）。
    """
    # 选记录最多的来源：每种注入都要求序列至少 window + 4 条，越长越容得下全部注入点
    src = max(sources, key=lambda k: sum(len(v) for v in sources[k].values()))
    # 注入前先体检一次原日志：它本来就有的异常不算注入引出的误报（见返回值里的 planted_false_alarms）
    clean = {(x["kind"], x["step"]) for x in detect(sources[src], a)}
    series, planted = plant_faults(sources[src], a, past)
    found = {(x["kind"], x["step"]) for x in detect(series, a)}
    return {"planted_source": src, "planted": sorted(planted), "planted_faults": len(planted),
            "planted_found": len(planted & found), "planted_false_alarms": len(found - planted - clean)}
