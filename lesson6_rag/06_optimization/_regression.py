"""第 6 课 06 的回归告警：把本次最优配置的 test 成绩与同目录的 baseline_<mode>.json 比，掉得太多就报警。

调参实验最怕"改了切块 / 换了模型，某个指标悄悄掉了没人发现"：把基线存进仓库，每次运行自动比一遍，
就像单元测试守住代码一样守住检索质量。
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from common import data
from common.errors import UserError

# 回归告警比较的指标：都是确定性的（同数据同种子结果不变），告警才不会被随机波动误触发；生成类指标不进来
COMPARED = ("recall_at_5", "mrr", "ndcg_at_10", "answer_f1")


def read_baseline(path: Path) -> dict:
    """读基线并检查结构（本脚本写出的四个键；指标是有限的数）：坏基线在扫描之前一行报错，不是跑完整个实验才报。"""
    base = data.read_json(path, "--baseline 基线 JSON")
    if not isinstance(base, dict):
        raise UserError(f"--baseline {path}: 顶层应是 JSON 对象 {{mode, fingerprint, best_config, metrics}}")
    for key, tp in (("mode", str), ("fingerprint", dict), ("best_config", str), ("metrics", dict)):
        if not isinstance(base.get(key), tp):
            raise UserError(f"--baseline {path}: {key} 应是{'文本' if tp is str else ' JSON 对象'}，"
                            f"实际是 {json.dumps(base.get(key), ensure_ascii=False)[:60]}")
    for k in COMPARED:   # NaN 与任何数比较都是 False：NaN 基线永远不会告警，等于没有基线
        v = base["metrics"].get(k)
        # bool 是 int 的子类：true / false 会被当成 1 / 0 混过类型检查，要先单独排除
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise UserError(f"--baseline {path}: metrics.{k} 应是有限的数，实际是 {v!r}")
    return base


def baseline_path(args, mode: str, folder: Path) -> Path:
    """要比较（或 --update-baseline 时要写）的基线文件；在扫描之前就查好：读的要读得通，写的要写得进去。"""
    # 按模式分基线：冒烟与默认运行的数据量、扫描范围都不同，拿一个比另一个只会永远报警（或永远不报）
    path = Path(args.baseline) if args.baseline else folder / f"baseline_{mode}.json"
    if args.update_baseline:   # 写进文件夹、FIFO（会一直等）或断链：扫描跑完才失败，白跑一场
        # 断链单独用 is_symlink 判：exists() 会跟随链接，断链时返回 False，只看它会当成"还不存在、可以写"
        if not path.parent.is_dir() or ((path.exists() or path.is_symlink()) and not path.is_file()):
            raise UserError(f"--baseline {path}: 写不进去（不是普通文件，或所在文件夹不存在）")
    elif args.baseline or path.is_file():   # 用户点名的基线必须存在；自带的那个没有就跳过比较
        read_baseline(path)
    return path


def compare_baseline(path: Path, fingerprint: dict, current: dict, tolerance: float) -> list[str] | None:
    """与基线比：返回掉得超过 tolerance 的指标（有则打印红色 ALERT）；基线的数据/扫描范围不同则返回 None。"""
    base = read_baseline(path)
    # 指纹先过一遍 JSON：元组变列表，与从文件读回来的基线才比得上
    if base.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    # 只报"下降超过容差"：指标上升是改进，不该让 CI 变红
    # k in base["metrics"]：旧基线里没有的指标跳过，而不是 KeyError
    drops = [f"{k}: {base['metrics'][k]} → {current[k]}" for k in COMPARED
             if k in base["metrics"] and current[k] < base["metrics"][k] - tolerance]
    if drops:
        from rich.console import Console
        # 告警打到 stderr：stdout 被重定向到文件或管道时，红字仍直接出现在终端上
        Console(stderr=True).print(f"ALERT 回归：比基线 {path.name} 下降超过 {tolerance}：" + "；".join(drops),
                                   style="bold red")
    return drops


def check_baseline(args, out, fingerprint: dict, best: str, current: dict, path: Path) -> tuple[Path, bool, list]:
    """与同一模式的基线比较（数据或扫描范围不同的基线不可比，跳过）；--update-baseline 时写新基线。

    args：脚本的 Args；out：common.run.Run；path：baseline_path 在扫描之前查好的基线文件。
    """
    # 写基线要显式加 --update-baseline：默认就覆盖的话，一次变差的运行会把自己写成新基线，告警永远不响
    if args.update_baseline:
        # 缩进 + 末尾换行：基线存在仓库里，更新时 git diff 一目了然
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
