"""第 6 课 06 的回归告警：把本次最优配置的 test 成绩与同目录的 baseline_<mode>.json 比，掉得太多就报警。

调参实验最怕"改了切块 / 换了模型，某个指标悄悄掉了没人发现"：把基线存进仓库，每次运行自动比一遍，
就像单元测试守住代码一样守住检索质量。
"""
from __future__ import annotations

import json
from pathlib import Path

# 回归告警比较的指标：都是确定性的（同数据同种子结果不变），告警才不会被随机波动误触发；生成类指标不进来
COMPARED = ("recall_at_5", "mrr", "ndcg_at_10", "answer_f1")


def compare_baseline(path: Path, fingerprint: dict, current: dict, tolerance: float) -> list[str] | None:
    """与基线比：返回掉得超过 tolerance 的指标（有则打印红色 ALERT）；基线的数据/扫描范围不同则返回 None。"""
    base = json.loads(path.read_text(encoding="utf-8"))
    # 指纹先过一遍 JSON：元组变列表，与从文件读回来的基线才比得上
    if base.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    # 只报"下降超过容差"：指标上升是改进，不该让 CI 变红
    drops = [f"{k}: {base['metrics'][k]} → {current[k]}" for k in COMPARED
             if k in base["metrics"] and current[k] < base["metrics"][k] - tolerance]
    if drops:
        from rich.console import Console
        Console(stderr=True).print(f"ALERT 回归：比基线 {path.name} 下降超过 {tolerance}：" + "；".join(drops),
                                   style="bold red")
    return drops


def check_baseline(args, out, fingerprint: dict, best: str, current: dict, folder: Path) -> tuple[Path, bool, list]:
    """与同一模式的基线比较（数据或扫描范围不同的基线不可比，跳过）；--update-baseline 时写新基线。

    args：脚本的 Args；out：common.run.Run；folder：默认基线所在的文件夹（脚本旁边，随仓库提交）。
    """
    # 按模式分基线：冒烟与默认运行的数据量、扫描范围都不同，拿一个比另一个只会永远报警（或永远不报）
    path = Path(args.baseline) if args.baseline else folder / f"baseline_{out.mode}.json"
    # 写基线要显式加 --update-baseline：默认就覆盖的话，一次变差的运行会把自己写成新基线，告警永远不响
    if args.update_baseline:
        path.write_text(json.dumps({"mode": out.mode, "fingerprint": fingerprint, "best_config": best,
                                    "metrics": current}, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        out.log.info(f"已把本次结果写成基线：{path}")
        return path, False, []
    if not path.is_file():
        out.log.info(f"没有基线 {path.name}：跳过回归比较（加 --update-baseline 生成）")
        return path, False, []
    drops = compare_baseline(path, fingerprint, current, args.tolerance)
    if drops is None:
        out.log.warning(f"基线 {path.name} 是在另一份数据或扫描范围上记录的，不可比：跳过回归比较")
    return path, bool(drops), drops or []
