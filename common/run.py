"""一次运行的公共机械：输出目录、随机种子、日志、实验跟踪、metrics.json、画图。"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from common.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
_OUTPUTS = REPO_ROOT / "outputs"
_TRACKERS = ("none", "tensorboard", "mlflow", "wandb")


def _is_main_process() -> bool:
    """分布式时只有 rank 0 打印和写文件。"""
    return int(os.environ.get("RANK", "0")) == 0


def get_logger(name: str = "course") -> logging.Logger:
    """rich 彩色日志（只在 rank 0 输出 INFO）。"""
    log = logging.getLogger(name)
    if not log.handlers:
        from rich.logging import RichHandler

        h = RichHandler(show_path=False, show_time=False, markup=False, rich_tracebacks=False)
        log.addHandler(h)
        log.setLevel(logging.INFO if _is_main_process() else logging.WARNING)
        log.propagate = False
    return log


def _seed_everything(seed: int) -> None:
    """固定 python / numpy / torch 的随机性：同一种子同样结果。"""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


OUTPUTS_ENV = "LLM_COURSE_OUTPUTS"   # course.py --outputs 用它把每个脚本的默认输出目录整体挪到别处


def outputs_root() -> Path:
    """所有输出的根目录：环境变量 LLM_COURSE_OUTPUTS，默认仓库里的 outputs/。"""
    return Path(os.environ[OUTPUTS_ENV]) if os.environ.get(OUTPUTS_ENV) else _OUTPUTS


def default_output_dir(script: str | Path, root: str | Path | None = None) -> Path:
    """<root>/<lesson>/<NN_topic>/（root 默认 outputs_root()），由脚本所在位置决定，与当前工作目录无关。"""
    p = Path(script).resolve()
    try:
        rel = p.parent.relative_to(REPO_ROOT)
    except ValueError:
        rel = Path(p.stem)
    return Path(root or outputs_root()) / rel


def _make_output_dir(path: Path, flag: str = "--output-dir") -> Path:
    """建输出目录；它是个文件、或建不了（没有权限、上级是文件）时给一行错误，而不是 traceback。"""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: 已存在同名文件，不是目录")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {path}: 无法创建或写入（{e.strerror or type(e).__name__}）") from None
    return path


def _finite_or_none(metrics: Any, path: str = "", bad: list[str] | None = None) -> Any:
    """把 NaN / ±inf 换成 None（JSON 的 null）：标准 JSON 没有 NaN，写进去别的程序就读不了；bad 收集出问题的键。"""
    if isinstance(metrics, dict):
        return {k: _finite_or_none(v, f"{path}{k}.", bad) for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [_finite_or_none(v, f"{path}{i}.", bad) for i, v in enumerate(metrics)]
    if hasattr(metrics, "item") and callable(metrics.item) and getattr(metrics, "ndim", 0) == 0:
        metrics = metrics.item()   # numpy / torch 标量
    if isinstance(metrics, float) and not math.isfinite(metrics):
        if bad is not None:
            bad.append(path.rstrip("."))
        return None
    return metrics


def _jsonable(o: Any) -> Any:
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return o.item() if hasattr(o, "item") and callable(o.item) else str(o)   # numpy/torch 标量；Path 等写成字符串


_OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t}
_SHOW_OP = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}
# 表达式里能用的函数（没有 __import__、open 之类：表达式写在脚本里，但不该能做别的事）
_EXPR_FUNCS = {"min": min, "max": max, "abs": abs, "len": len, "sum": sum, "all": all, "any": any, "round": round}


@dataclasses.dataclass(frozen=True)
class Claim:
    """脚本教的一条效果，写成数据：一句中文结论 + 对本次 metrics 的表达式 + 比较方向 + 两种模式的门槛。
    门槛为 None = 这个模式不检查（例：极小模型学不到语言，"LoRA 降低困惑度"只在默认模式检查）。
    基线必须在同一次运行里测（"≤ 0.9 × 未训练模型"），不写"在某个范围内"或"不为空"。
    """

    statement: str
    expr: str
    op: str
    smoke: float | None
    default: float | None

    def check(self, metrics: dict, mode: str) -> dict:
        """在 metrics 上求值；表达式出错（缺指标）记为不成立并写明原因，从不让一次跑完的运行崩掉。"""
        threshold = self.smoke if mode == "smoke" else self.default
        row = {"statement": self.statement, "expr": self.expr, "op": self.op, "threshold": threshold}
        try:
            value = eval(self.expr, {"__builtins__": {}, **_EXPR_FUNCS, "m": metrics}, dict(metrics))  # noqa: S307
            value = float(value)
        except (NameError, KeyError) as e:   # 这次没测这个指标（如 --methods 只选了一部分）：未检查，不算不成立
            return {**row, "value": None, "held": None, "error": f"本次没有这个指标：{e}"}
        except Exception as e:   # 除零、类型不对：这条没被证明
            return {**row, "value": None, "held": False if threshold is not None else None,
                    "error": f"{type(e).__name__}: {e}"}
        held = None if threshold is None else bool(math.isfinite(value) and _OPS[self.op](value, threshold))
        return {**row, "value": round(value, 6), "held": held}


def _print_claims(rows: list[dict], mode: str) -> None:
    """运行结束时的 ✓/✗ 块：学生一眼看到这节课的结论在这次运行里成立没有。"""
    checked = [r for r in rows if r["held"] is not None]
    print(f"\n这节课的结论（{mode} 模式的门槛）：", flush=True)
    for r in rows:
        mark = {True: "✓", False: "✗", None: "–"}[r["held"]]
        value = "—" if r["value"] is None else _short(r["value"])
        tail = f"{_SHOW_OP[r['op']]} {_short(r['threshold'])}" if r["threshold"] is not None else "（本模式不检查）"
        why = f"  [{r['error']}]" if r.get("error") else ""
        print(f"  {mark} {r['statement']}：{r['expr']} = {value} {tail}{why}", flush=True)
    print(f"  {sum(r['held'] for r in checked)}/{len(checked)} 条成立", flush=True)


class Run:
    """脚本的一次运行：run.start() 创建，out.finish(metrics) 收尾。"""

    def __init__(self, script: str, args: Any, smoke_threads: int | None = 2):
        from common import cli

        self.script = Path(script)
        self.args = cli.validate(args)   # 直接调用 main(Args(...)) 时也检查范围（命令行/YAML 已在 parse 里查过）
        self.dir = _make_output_dir(Path(args.output_dir) if getattr(args, "output_dir", None)
                                   else default_output_dir(script))
        self.log = get_logger()
        self.t0 = time.perf_counter()
        self.mode = "smoke" if getattr(args, "smoke", False) else ("default" if not getattr(args, "model", None)
                                                                     else "custom")
        self.report_to = getattr(args, "report_to", "none") or "none"
        if self.report_to not in _TRACKERS:
            raise UserError(f"--report-to {self.report_to}: 只支持 {', '.join(_TRACKERS)}")
        _seed_everything(getattr(args, "seed", 42))
        self._threads = None
        if self.mode == "smoke" and smoke_threads:
            # 冒烟至多 smoke_threads 个线程，finish() 时还原。空闲 2 核上单独跑时 2 线程快（第 5 课 05：33 -> 22 秒）；
            # 并排跑的（course.py --jobs 2、pytest -n 2）用 OMP_NUM_THREADS=1 起进程，torch 默认 1 个：这里只降不升
            import torch

            from common import train

            train.keep_freed_memory()   # 极小模型每步分配又释放同样的大张量：留着释放的堆复用
            self._threads = torch.get_num_threads()
            torch.set_num_threads(min(smoke_threads, self._threads))
        if _is_main_process():
            # 记录命令行与解析后的配置：结果可以原样复现
            from common import safety  # 秘密（--api-key、URL 里的密码、环境变量里的 token）不落盘

            (self.dir / "argv.txt").write_text(" ".join([sys.executable, *safety.redact_argv(sys.argv)]) + "\n",
                                               encoding="utf-8")
            (self.dir / "config.json").write_text(json.dumps(safety.redacted_config(args), ensure_ascii=False,
                                                             indent=2, default=_jsonable), encoding="utf-8")

    @property
    def model_name(self) -> str:
        """本次实际使用的模型名。"""
        return self.args.resolved_model() if hasattr(self.args, "resolved_model") else str(self.args.model)

    def path(self, name: str) -> Path:
        """输出目录下的一个文件路径。"""
        return self.dir / name

    def trainer_report_to(self) -> list[str]:
        """给 transformers TrainingArguments.report_to 的值（wandb 默认离线，见 common/__init__）。"""
        if self.report_to == "none":
            return []
        if self.report_to == "mlflow":
            os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(self.dir / 'mlflow.db').as_posix()}")
        if self.report_to == "wandb":
            os.environ.setdefault("WANDB_DIR", str(self.dir))
        return [self.report_to]

    def plot(self, name: str):
        """返回 (fig, save)：画完调用 save() 写 PNG 到输出目录。"""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.rcParams["font.sans-serif"] = ["Noto Sans CJK SC", "WenQuanYi Zen Hei", "DejaVu Sans"]
        plt.rcParams["axes.unicode_minus"] = False
        fig = plt.figure(figsize=(7, 4.2), dpi=110)

        def save() -> Path:
            out = self.dir / name
            fig.tight_layout()
            fig.savefig(out)
            plt.close(fig)
            return out

        return fig, save

    def finish(self, metrics: dict, summary: str | None = None, claims: list[Claim] = ()) -> dict:
        """写 metrics.json（加上 model / mode / seconds / claims），打印结果表、结论块和一行总结。
        NaN / inf 不是合法 JSON：换成 null 并在日志里点名是哪个指标（不整个拒绝：跑了很久的结果其余部分仍有用）。
        结论不成立也照常写完（它是要给学生看的结果，不是错误）；course.py --strict 和冒烟测试据此失败。
        """
        bad: list[str] = []
        metrics = {**metrics, "model": self.model_name, "mode": self.mode,
                   "seconds": round(time.perf_counter() - self.t0, 2)}
        rows = [c.check(metrics, self.mode) for c in claims]
        metrics = _finite_or_none({**metrics, **({"claims": rows} if rows else {})}, bad=bad)
        if bad:
            self.log.warning(f"指标 {bad} 不是有限的数（NaN/inf），metrics.json 里记为 null")
        if self._threads:
            import torch

            torch.set_num_threads(self._threads)
        if _is_main_process():
            (self.dir / "metrics.json").write_text(json.dumps(metrics, ensure_ascii=False, indent=2, allow_nan=False,
                                                              default=_jsonable), encoding="utf-8")
            _print_table({k: v for k, v in metrics.items() if k != "claims"}, self.script.name)
            if rows:
                _print_claims(rows, self.mode)
            line = summary or ", ".join(f"{k}={_short(v)}" for k, v in metrics.items()
                                        if not isinstance(v, (dict, list)))
            print(f"[{self.script.stem}] {line}", flush=True)
        return metrics


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_table(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{title} 结果", show_lines=False)
    t.add_column("指标")
    t.add_column("数值", overflow="fold")
    for k, v in metrics.items():
        t.add_row(k, json.dumps(v, ensure_ascii=False, default=_jsonable) if isinstance(v, (dict, list))
                  else _short(v))
    Console(width=119).print(t)


def start(script: str, args: Any, smoke_threads: int | None = 2) -> Run:
    """开始一次运行：建输出目录、固定种子、保存 argv 与配置；冒烟时用至多 smoke_threads 个线程（None = 不改）。"""
    return Run(script, args, smoke_threads)


def import_sibling(script: str | Path, name: str) -> Any:
    """按路径导入脚本旁边的 _name.py（只属于这一课的代码）：文件夹名以数字开头，不能写成包的 import。"""
    import hashlib
    import importlib.util

    path = Path(script).resolve().parent / f"{name}.py"
    key = f"_lesson_{hashlib.md5(str(path.parent).encode()).hexdigest()[:8]}_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod   # 先登记：dataclass 等按模块名回查
        spec.loader.exec_module(mod)
    return sys.modules[key]
