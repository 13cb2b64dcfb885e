"""第 5 课 02 的配方检查：加载模型之前把 TRL 配方与 accelerate 配置读一遍，坏的一行拒绝（点名 文件:行 或 文件: 键）。

TrlParser 与 accelerate 对 YAML 里的值几乎照单全收：`beta: .nan` 让每一步的梯度都是 NaN，却照样写出 adapter 与
模型卡；`beta: [1, 2]` 这样类型不对的值（argparse 只转换字符串默认值）要到训练中途才崩。只有这一课读配方，所以
放在脚本旁边（run.import_sibling 加载），不在 common/。
"""
from __future__ import annotations

import enum
import math
import types
import typing
from pathlib import Path

from common import data, run
from common.errors import UserError, brief

# 配方里的数值：闭区间 + 理由；NaN / inf 不论哪个键都拒绝
_BATCH = (1, 1024, "激活内存 ∝ 批大小 × 长度")
RANGES = {"beta": (1e-4, 100, "β ≤ 0 时隐式奖励没有意义，太大时 sigmoid 饱和、学不动"),
          "learning_rate": (1e-9, 1, "AdamW 的学习率超过 1 必然发散"),
          "max_steps": (1, 100_000, "评估间隔按步数算：-1（按 epoch 训练）在这里不行"),
          "per_device_train_batch_size": _BATCH, "per_device_eval_batch_size": _BATCH,
          "gradient_accumulation_steps": _BATCH, "max_length": (16, 32768, "激活内存 ∝ 长度"),
          "lora_r": (1, 1024, "秩不能超过矩阵的维度"), "lora_dropout": (0, 0.9, "丢弃概率"),
          "seed": (0, 2**32 - 1, "numpy 的种子是 32 位无符号整数")}


def read_yaml(flag: str, path: str) -> dict:
    """只用 safe_load 读（!!python/object 之类的标签不会构造执行，报 文件:行）；不存在、不是 UTF-8、语法错误、
    嵌套过深、顶层不是映射：一行说清，点名参数或 文件:行。"""
    import yaml

    p = Path(path)
    if not p.is_file():   # 不存在、文件夹、FIFO（读它会一直等）、成环的链接：都不是普通文件
        raise UserError(f"{flag} {path}: 文件不存在（或不是普通文件）")
    try:
        cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {path}: 不是 UTF-8 文本（第 {e.start} 字节）") from None
    except RecursionError:
        raise UserError(f"{flag} {path}: YAML 嵌套太深（正常的配置不会嵌套上千层）") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        # ConstructorError = 写了 !!python/... 之类的标签：这是 safe_load 有意拒绝，不是 YAML 语法写错，要说明白
        hint = "；配方只按数据读，不构造 Python 对象" if isinstance(e, yaml.constructor.ConstructorError) else ""
        # PyYAML 的行号从 0 数，编辑器从 1 数：+1 后学生按报错的行号就能直接跳到那一行
        raise UserError(f"{path}:{mark.line + 1 if mark else 1}: YAML 无法解析"
                        f"（{brief(getattr(e, 'problem', None) or e, 300)}{hint}）") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{flag} {path}: 顶层必须是 键: 值 映射")
    return cfg


def _kinds(tp) -> set | None:  # noqa: ANN001
    """字段注解 -> YAML 里允许的值类型（枚举写成字符串；list[str]、dict 字段也可写成字符串）；认不出的返回 None。"""
    alts = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    out = set()
    for a in alts:
        origin = typing.get_origin(a) or a
        if a in (type(None), bool, int, float, str):
            out.add(a)
        # 枚举字段在 YAML 里只能写成字符串，由 HfArgumentParser 按取值转成枚举
        elif isinstance(a, type) and issubclass(a, enum.Enum):
            out.add(str)
        elif origin is dict or (origin is list and typing.get_args(a) in ((), (str,))):
            out |= {origin, str}
        # 认不出的注解（Literal、嵌套容器……）不猜：放行交给 TrlParser，宁可漏查也不误拒合法的配方
        else:
            return None
    return out


def check_values(path: str, cfg: dict, classes: tuple) -> None:
    """每个键的值：类型与字段注解相符（整数字段不收 2.5，数值字段不收 true / 列表）、数是有限的、在 RANGES 之内。"""
    # 几个 dataclass 的字段合在一起查：同一份配方同时填 ScriptArguments / DPOConfig / ModelConfig 的键
    hints = {k: v for c in classes for k, v in typing.get_type_hints(c).items()}
    for k, v in cfg.items():
        kinds = _kinds(hints[k]) if k in hints else None
        # bool 是 int 的子类：不排除的话 beta: true 会被当成数 1 通过类型与范围检查
        num = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = kinds is None or type(v) in kinds or (isinstance(v, int) and num and float in kinds) or \
            (isinstance(v, str) and bool(kinds & {int, float, bool}))   # 字符串由 argparse 按类型转换、报错
        if ok and kinds and isinstance(v, list):   # 列表字段（list[str]）：元素也要是字符串
            ok = all(isinstance(e, str) for e in v)
        if not ok:
            want = " / ".join(sorted("null" if t is type(None) else t.__name__ for t in kinds))
            raise UserError(f"{path}: 键 {k} {str(v)[:60]}: 应是 {want}，不是 {type(v).__name__}")
        try:
            x = float(v) if num or isinstance(v, str) else None   # 与 argparse 一样：引号里的 "nan" 也是数
        except ValueError:   # 不是数的字符串（如调度器名 cosine）：没有数值范围可查
            continue
        except OverflowError:   # 几百位的整数
            x = math.inf
        lo, hi, why = RANGES.get(k, (-math.inf, math.inf, ""))
        if x is not None and not math.isfinite(x):
            raise UserError(f"{path}: 键 {k} {v}: 必须是有限的数")
        if x is not None and not lo <= x <= hi:
            raise UserError(f"{path}: 键 {k} {v}: 超出允许范围 [{lo}, {hi}]（{why}）")


def check(args) -> Path | None:  # noqa: ANN001
    """配方与 accelerate 配置逐键检查；返回校验过的本地偏好对文件（--data 或配方的 dataset_name；hub 数据集：None）。"""
    from accelerate.commands.config.config_args import ClusterConfig
    from trl import DPOConfig, ModelConfig, ScriptArguments

    recipe = read_yaml("--recipe", args.recipe)
    check_values(args.recipe, recipe, (ScriptArguments, DPOConfig, ModelConfig))   # 不认识的键由 TrlParser 报
    # 直接用 python 运行时 accelerate 根本不读这份配置（只抄进模型卡）：这里不查，坏键要等到换成
    # accelerate launch 时才暴露，而那时模型卡里早已写着一份坏配置
    launch = read_yaml("--accelerate-config", args.accelerate_config)
    unknown = sorted(str(k) for k in launch if k not in typing.get_type_hints(ClusterConfig))
    if unknown:
        raise UserError(f"{args.accelerate_config}: accelerate 不认识的键 {unknown}")
    check_values(args.accelerate_config, launch, (ClusterConfig,))
    if args.data:   # --data 与其它脚本一样按当前目录算；配方里的相对路径按仓库根目录算
        local, where = Path(args.data), f"--data {args.data}"
    else:
        name = str(recipe.get("dataset_name") or "")
        local, where = run.REPO_ROOT / name, f"{args.recipe}: 键 dataset_name {name}"
        if not name or (local.suffix not in (".json", ".jsonl") and not local.exists()):
            return None   # hub 数据集名（如 trl-lib/ultrafeedback_binarized）
    if not local.is_file():
        raise UserError(f"{where}: 文件不存在（要的是 prompt/chosen/rejected 的 JSON/JSONL）")
    data.load_preference(local)   # 按课程格式逐行校验：坏行报 文件:行，也在加载模型之前
    return local
