"""命令行：dataclass 参数 + HfArgumentParser，优先级 默认值 < --config YAML < 命令行。"""
from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import UserError

_T = TypeVar("_T")


_BOUNDS = ("min", "max")   # 取值范围写在 metadata 里；argparse 不认识它们，交给 validate() 检查


def arg(default: Any, help: str, *, min: float | None = None, max: float | None = None, **kw: Any) -> Any:
    """一行声明一个参数：默认值 + 帮助文本 + 可选的取值范围（闭区间，列表参数逐个元素检查）。

    例：cli.arg(60, "训练步数", min=1)；cli.arg(0.1, "留出比例", min=0, max=1)。
    choices=[...] 原样交给 argparse。范围在命令行和 YAML 里都由 validate() 统一检查。
    """
    meta = {"help": help, **kw}
    if min is not None:
        meta["min"] = min
    if max is not None:
        meta["max"] = max
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _flag_name(name: str) -> str:
    """字段名 -> 命令行参数名（max_steps -> --max-steps）。"""
    return "--" + name.replace("_", "-")


def validate(args: Any, where: str | None = None) -> Any:
    """按每个字段声明的范围检查参数（NaN/inf 一律拒绝）；出错时 UserError 点名参数（或 YAML 的 文件: 键）。"""
    for f in dataclasses.fields(args):
        v = getattr(args, f.name)
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        name = f"{where}: 键 {f.name}" if where else _flag_name(f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if isinstance(x, float) and not math.isfinite(x):
                raise UserError(f"{name} {x}: 必须是有限的数")
            if lo is not None and x < lo:
                raise UserError(f"{name} {x}: 必须 ≥ {lo}")
            if hi is not None and x > hi:
                raise UserError(f"{name} {x}: 必须 ≤ {hi}")
        choices = f.metadata.get("choices")
        if choices and v is not None and not isinstance(v, (list, tuple)) and v not in choices:
            raise UserError(f"{name} {v}: 只能是 {' / '.join(map(str, choices))}")
    return args


@dataclass
class CommonArgs:
    """每个课程脚本都有的参数。"""

    model: str = arg(None, "模型：tiny-qwen2 / tiny-llama / tiny-glm / smollm2-135m / 本地目录 / hub id；"
                           "不填时默认 smollm2-135m，--smoke 时默认极小模型")
    source: str = arg("auto", "模型来源：auto（内置名或本地目录）/ hf / modelscope（需联网）")
    smoke: bool = arg(False, "冒烟模式：极小模型 + 极少步数，约 30 秒跑完（CI 用）")
    data: str = arg(None, "用自己的数据文件（JSON/JSONL，格式见 data/README.md）代替内置数据")
    output_dir: str = arg(None, "输出目录；默认 outputs/<lesson>/<NN_topic>/")
    seed: int = arg(42, "随机种子：同一种子同样结果")
    report_to: str = arg("none", "实验跟踪：none / tensorboard / mlflow / wandb（wandb 默认离线）",
                         choices=["none", "tensorboard", "mlflow", "wandb"])
    device: str = arg("auto", "auto / cpu / cuda", choices=["auto", "cpu", "cuda"])
    dtype: str = arg("auto", "auto / float32 / bfloat16 / float16；auto：GPU 用 bf16，支持 bf16 的 CPU 也可用")
    trust_remote_code: bool = arg(False, "允许执行模型仓库里的代码（只对你信任的模型打开）")
    config: str = arg(None, "YAML 配置文件；其中的键必须是本脚本的参数名")

    # 脚本可覆盖：--smoke 时默认用哪个极小模型
    smoke_model = "tiny-qwen2"
    default_model = "smollm2-135m"

    def resolved_model(self) -> str:
        """没写 --model 时，按运行模式选默认模型。"""
        if self.model:
            return self.model
        return self.smoke_model if self.smoke else self.default_model


def _field_types(cls: type) -> dict[str, Any]:
    """字段名 -> 类型（脚本用了 from __future__ import annotations 时注解是字符串，要解析回类型）。"""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - 解析不了就按默认值的类型猜
        hints = {}
    return {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(cls)}


def _convert(value: Any, tp: Any, default: Any, where: str) -> Any:
    """把 YAML 里的一个值转成字段的类型，规则与命令行相同（'1e-4' 也算数）；转不了就 UserError 点名 文件: 键。"""
    origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):   # Optional[X] / X | None
        tp = next((a for a in targs if a is not type(None)), str)
        origin, targs = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        if default is None:
            return None
        raise UserError(f"{where}: 不能为空（默认值 {default!r}）")
    if origin in (list, tuple) or tp in (list, tuple):
        items = value if isinstance(value, list) else [value]
        return [_convert(v, targs[0] if targs else str, 0, where) for v in items]
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: 应是一个{getattr(tp, '__name__', tp)}值，不是 {type(value).__name__}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "false", "no", "0"):
            return str(value).lower() in ("true", "yes", "1")
        raise UserError(f"{where} {value!r}: 应是 true / false")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise UserError(f"{where} {value!r}: 应是整数")
        try:
            return int(value) if not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError):
            raise UserError(f"{where} {value!r}: 应是整数") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where} {value!r}: 应是数")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} {value!r}: 应是数") from None
    if tp is str:
        return str(value)
    return value


def _yaml_defaults(path: str, cls: type) -> dict:
    """读 YAML 配置：只认 Args 的字段名，每个值按字段类型转换、按声明的范围检查（与命令行同一套规则）。"""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: 文件不存在")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: 不是 UTF-8 文本（第 {e.start} 字节）") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else path
        raise UserError(f"{where}: YAML 无法解析（{getattr(e, 'problem', e)}）") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: 顶层必须是 键: 值 映射")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(cfg) - set(fields))
    if unknown:
        raise UserError(f"{path}: 未知的键 {unknown}；可用的键：{sorted(set(fields) - {'config'})}")
    types_ = _field_types(cls)
    out = {}
    for k, v in cfg.items():
        f = fields[k]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out[k] = _convert(v, types_[k], default, f"{path}: 键 {k}")
    validate(cls(**out), where=path)   # 范围与可选值：报错点名 文件: 键
    return out


def _excepthook(exc_type, exc, tb):  # noqa: ANN001
    if issubclass(exc_type, UserError):
        print(f"错误: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.__excepthook__(exc_type, exc, tb)


def _load_config(cls: type[_T], path: str, **overrides: Any) -> _T:
    """把 YAML 配置解析成参数对象（测试用它检查每个 YAML 都合法）。"""
    cfg = _yaml_defaults(path, cls)   # 类型转换 + 范围检查，报错点名 文件: 键
    cfg.update(overrides)
    return validate(cls(**cfg))


def with_smoke(args: _T, overrides: dict) -> _T:
    """--smoke 时换成脚本给的小规模参数；只替换用户没改过的（--smoke --learning-rate 1e-2 仍然生效）。"""
    if not getattr(args, "smoke", False):
        return args
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(args)}   # 列表参数的默认值在 default_factory 里
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise KeyError(f"SMOKE 里有 Args 没有的字段：{unknown}")   # 脚本自己的 bug，不是用户错误
    return dataclasses.replace(args, **{k: v for k, v in overrides.items() if getattr(args, k) == defaults[k]})


def _parser_class():
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        """HfArgumentParser 把 metadata 全部交给 add_argument；先去掉它不认识的 min/max。"""

        @staticmethod
        def _parse_dataclass_field(parser, fld):  # noqa: ANN001
            fld = copy.copy(fld)
            fld.metadata = types.MappingProxyType({k: v for k, v in fld.metadata.items() if k not in _BOUNDS})
            HfArgumentParser._parse_dataclass_field(parser, fld)

    return Parser


def _description(cls: type) -> str | None:
    """--help 的说明 = 定义 Args 的那个脚本的模块文档（进程内调用 parse 时也对；退而用 __main__ 的）。"""
    mod = sys.modules.get(cls.__module__)
    return (getattr(mod, "__doc__", None) or getattr(sys.modules.get("__main__"), "__doc__", None)) or None


def parse(cls: type[_T], argv: list[str] | None = None) -> _T:
    """解析命令行；之后任何 UserError 都变成一行错误 + 退出码 2（不是 traceback）。"""
    import argparse

    _Parser = _parser_class()
    sys.excepthook = _excepthook
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(cls, description=_description(cls))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    try:
        # 先只取 --config，把 YAML 当作默认值，命令行再覆盖它
        pre, _ = parser.parse_known_args(argv)
        if getattr(pre, "config", None):
            parser.set_defaults(**_yaml_defaults(pre.config, cls))
        try:
            args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                            look_for_args_file=False)
        except SystemExit as e:  # argparse 已经打印了哪一个参数错了；统一退出码为 2
            raise SystemExit(2 if e.code else 0) from None
        if rest:
            raise UserError(f"未知参数 {' '.join(rest)}（用 --help 查看可用参数）")
        return validate(args)
    except UserError as e:
        print(f"错误: {e}", file=sys.stderr)
        raise SystemExit(2) from None
