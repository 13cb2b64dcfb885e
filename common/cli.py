"""命令行：dataclass 参数 + HfArgumentParser，优先级 默认值 < --config YAML < 命令行。

取值范围写在字段里（cli.arg(min=, max=, why=)），命令行、YAML 与直接构造的 Args 都由 validate() 检查。
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import UserError

_T = TypeVar("_T")
_OURS = ("min", "max", "why")   # argparse 不认识的 metadata 键：parse 时去掉，交给 validate() 检查
# 名字像学习率、又没声明下限的参数必须 > 0：0 等于不训练，负数朝 loss 变大的方向走（0 另有含义的自己写 min=0）
_LEARNING_RATE = re.compile(r"learning_rate|(^|_)lr$")


def arg(default: Any, help: str, *, min: float | None = None, max: float | None = None, why: str | None = None,
        **kw: Any) -> Any:
    """一行声明一个参数：默认值 + 帮助文本 + 可选的取值范围（闭区间，列表参数逐个元素检查）。
    例：cli.arg(60, "训练步数", min=1)；cli.arg(256, "序列长度", min=8, max=65536, why="激活内存 ∝ 长度")。
    why 说上限从哪来（多半是内存），越界时写进报错；choices=[...] 原样交给 argparse。
    """
    meta = {k: v for k, v in dict(help=help, min=min, max=max, why=why, **kw).items() if v is not None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def _flag_name(name: str) -> str:
    """字段名 -> 命令行参数名（max_steps -> --max-steps）。"""
    return "--" + name.replace("_", "-")


def _allowed(name: str, meta: typing.Mapping) -> str:
    """报错里的允许范围（区间写法，带上限的理由）：[8, 65536]（…内存…）、[1, +∞)、(0, 1.0]；没有范围时为空。"""
    lo = f"[{meta['min']}" if "min" in meta else "(0" if _LEARNING_RATE.search(name) else "(-∞"
    hi = f"{meta['max']}]" if "max" in meta else "+∞)"
    if (lo, hi) == ("(-∞", "+∞)"):
        return ""
    return f"允许范围 {lo}, {hi}" + (f"（{meta['why']}）" if meta.get("why") else "")


def validate(args: Any, where: str | None = None) -> Any:
    """按字段声明的范围检查（NaN/inf 一律拒绝；学习率见 _LEARNING_RATE）；出错时 UserError 点名参数或 文件: 键。"""
    for f in dataclasses.fields(args):
        v, meta = getattr(args, f.name), f.metadata
        name = f"{where}: 键 {f.name}" if where else _flag_name(f.name)
        positive = "min" not in meta and _LEARNING_RATE.search(f.name)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                continue
            if isinstance(x, float) and not math.isfinite(x):
                raise UserError(f"{name} {x}: 必须是有限的数")
            if x < meta.get("min", -math.inf) or x > meta.get("max", math.inf) or (positive and x <= 0):
                raise UserError(f"{name} {x}: 超出{_allowed(f.name, meta)}")
        choices = meta.get("choices")
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
    seed: int = arg(42, "随机种子：同一种子同样结果", min=0, max=2**32 - 1, why="numpy 的种子是 32 位无符号整数")
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
        return self.model or (self.smoke_model if self.smoke else self.default_model)


def _default(f: dataclasses.Field) -> Any:
    """字段的默认值（列表参数的在 default_factory 里）。"""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _convert(value: Any, tp: Any, default: Any, where: str) -> Any:
    """把 YAML 里的一个值转成字段的类型，规则与命令行相同（'1e-4' 也算数）；转不了就 UserError 点名 文件: 键。"""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):   # Optional[X] / X | None
        tp = next((a for a in typing.get_args(tp) if a is not type(None)), str)
    if value is None:
        if default is None:
            return None
        raise UserError(f"{where}: 不能为空（默认值 {default!r}）")
    if typing.get_origin(tp) in (list, tuple) or tp in (list, tuple):
        elem = (typing.get_args(tp) or (str,))[0]
        return [_convert(v, elem, 0, where) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, (dict, list)):
        raise UserError(f"{where}: 应是一个{getattr(tp, '__name__', tp)}值，不是 {type(value).__name__}")
    if tp is bool:
        if str(value).lower() not in ("true", "yes", "1", "false", "no", "0"):
            raise UserError(f"{where} {value!r}: 应是 true / false")
        return str(value).lower() in ("true", "yes", "1")
    if tp in (int, float):   # 先转成文本再转数，与命令行一字不差：true 不是数，2.0 / 1e3 不是整数
        try:
            return tp(str(value))
        except ValueError:
            raise UserError(f"{where} {value!r}: 应是{'整数' if tp is int else '数'}") from None
    return str(value) if tp is str else value


def _yaml_defaults(path: str, cls: type) -> dict:
    """读 YAML 配置：只认 Args 的字段名，每个值按字段类型转换、按声明的范围检查（与命令行同一套规则）。"""
    p = Path(path)
    if not p.is_file():   # 文件夹、FIFO、断链、成环的链接都在这里拦下（FIFO 读了会一直等）
        raise UserError(f"--config {path}: 不存在或不是普通文件（要的是 YAML 配置文件）")
    try:
        # libyaml 的 C 解析器（有就用）：纯 Python 的扫描器读上万层嵌套、超长一行的坏配置是平方级的（模糊测试里共 8 秒）
        t = p.read_text(encoding="utf-8")
        cfg = (yaml.load(t, Loader=yaml.CSafeLoader) if yaml.__with_libyaml__ else yaml.safe_load(t)) or {}
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path}: 不是 UTF-8 文本（第 {e.start} 字节）") from None
    except RecursionError:
        raise UserError(f"--config {path}: YAML 嵌套太深（正常的配置不会嵌套上千层）") from None
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
    hints = typing.get_type_hints(cls)   # 脚本用了 from __future__ import annotations 时注解是字符串
    out = {k: _convert(v, hints[k], _default(fields[k]), f"{path}: 键 {k}") for k, v in cfg.items()}
    validate(cls(**out), where=path)   # 范围与可选值：报错点名 文件: 键
    return out


def with_smoke(args: _T, overrides: dict) -> _T:
    """--smoke 时换成脚本给的小规模参数；只替换用户没改过的（--smoke --learning-rate 1e-2 仍然生效）。"""
    if not getattr(args, "smoke", False):
        return args
    defaults = {f.name: _default(f) for f in dataclasses.fields(args)}   # SMOKE 写错字段名：下面 getattr 就报错点名
    return dataclasses.replace(args, **{k: v for k, v in overrides.items() if getattr(args, k) == defaults[k]})


def _number(tp: type, name: str, meta: typing.Mapping):
    """argparse 的 type：转不成数时（包括整数参数写成 1e12）报错带上允许范围，学生一次就知道该填多少。"""
    def convert(text: str):
        try:
            return tp(text)
        except ValueError:
            span = _allowed(name, meta)
            raise argparse.ArgumentTypeError(f"{text!r} 不是{'整数' if tp is int else '数'}"
                                             + (f"；{span}" if span else "")) from None

    return convert


def _parser_class():
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        """HfArgumentParser 把 metadata 全部交给 add_argument：先去掉它不认识的键；数值参数换上 _number。"""

        @staticmethod
        def _parse_dataclass_field(parser, fld):  # noqa: ANN001
            meta, fld = fld.metadata, copy.copy(fld)
            fld.metadata = types.MappingProxyType({k: v for k, v in meta.items() if k not in _OURS})
            HfArgumentParser._parse_dataclass_field(parser, fld)
            action = next(a for a in parser._actions if a.dest == fld.name)
            if action.type in (int, float):
                action.type = _number(action.type, fld.name, meta)

        def error(self, message: str):   # argparse 默认先打印整段 usage；这里只要一行（parse 打印、退出码 2）
            raise UserError(re.sub(r"^argument (?:\S+/)?(\S+): ", r"\1 ", message))   # --a_b/--a-b: → --a-b

    return Parser


def _excepthook(exc_type, exc, tb):  # noqa: ANN001
    if issubclass(exc_type, UserError):
        print(f"错误: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.__excepthook__(exc_type, exc, tb)


def parse(cls: type[_T], argv: list[str] | None = None) -> _T:
    """解析命令行；之后任何 UserError 都变成一行错误 + 退出码 2（不是 traceback）。"""
    sys.excepthook = _excepthook
    argv = list(sys.argv[1:] if argv is None else argv)
    # --help 的说明 = 定义 Args 的那个脚本的模块文档（进程内调用 parse 时也对；退而用 __main__ 的）
    doc = getattr(sys.modules.get(cls.__module__), "__doc__", None) or getattr(sys.modules["__main__"], "__doc__", None)
    parser = _parser_class()(cls, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    try:
        # 先只取 --config，把 YAML 当作默认值，命令行再覆盖它
        pre, _ = parser.parse_known_args(argv)
        if getattr(pre, "config", None):
            parser.set_defaults(**_yaml_defaults(pre.config, cls))
        args, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True,
                                                        look_for_args_file=False)
        if rest:
            raise UserError(f"未知参数 {' '.join(rest)}（用 --help 查看可用参数）")
        return validate(args)
    except UserError as e:
        print(f"错误: {e}", file=sys.stderr)
        raise SystemExit(2) from None
