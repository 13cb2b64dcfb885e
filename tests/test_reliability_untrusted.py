"""可靠性 · 不可信的模型（issue 8 第 9 项前半）：别人的模型目录不能在你不知情时执行代码。

- 带自定义代码（auto_map）的模型：不加 --trust-remote-code 就拒绝，错误点名这个参数，目录里的代码一行都没执行；
- 只有 pickle 权重（pytorch_model.bin）的目录：拒绝（只加载 safetensors）；
- 源码检查：没有不带 weights_only=True 的 torch.load，没有 pickle.load / yaml.load / 写死的 trust_remote_code=True。
"""
import json
import re
import shutil

import pytest

from common import models, safety
from common.errors import UserError
from tests.conftest import REPO


@pytest.fixture
def evil_model(tmp_path, tiny_models):
    """tiny-qwen2 的副本，改成必须执行目录里代码才能加载的样子；代码一旦执行就留下 PWNED 文件。"""
    d = tmp_path / "evil-model"
    shutil.copytree(tiny_models["tiny-qwen2"], d)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg.update(model_type="evil_qwen2", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                  "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    marker = tmp_path / "PWNED"
    payload = f"open({str(marker)!r}, 'w').write('code ran')\n"
    (d / "configuration_evil.py").write_text(payload + "from transformers import Qwen2Config\n\n\n"
                                             "class EvilConfig(Qwen2Config):\n    model_type = 'evil_qwen2'\n")
    (d / "modeling_evil.py").write_text(payload + "from transformers import Qwen2ForCausalLM\n\n\n"
                                        "from .configuration_evil import EvilConfig\n\n\n"
                                        "class EvilModel(Qwen2ForCausalLM):\n    config_class = EvilConfig\n")
    return d, marker


def test_remote_code_is_refused_unless_asked_and_the_message_names_the_flag(evil_model):
    d, marker = evil_model
    with pytest.raises(UserError) as e:
        safety.check_model_dir(d)
    assert "--trust-remote-code" in str(e.value) and "auto_map" in str(e.value)
    with pytest.raises(UserError):
        models.load(str(d))                                # transformers 自己也拒绝（但消息里没点名参数，见下）
    assert not marker.exists(), "没加 --trust-remote-code，目录里的代码却执行了"
    safety.check_model_dir(d, trust_remote_code=True)      # 明确要求时放行


def test_models_load_names_the_flag(evil_model):
    d, _ = evil_model
    with pytest.raises(UserError) as e:
        models.load(str(d))
    assert "--trust-remote-code" in str(e.value), str(e.value)


def test_remote_code_refusal_end_to_end(evil_model, run_script, tmp_path):
    """像用户那样从命令行跑：退出码 2、一行、点名 --trust-remote-code，不写 metrics.json。"""
    d, marker = evil_model
    out = tmp_path / "out"
    p = run_script("lesson1_sft/04_lora_theory/lora_parameter_viz.py", "--smoke", "--model", str(d),
                   "--output-dir", str(out), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "--trust-remote-code" in p.stderr and not (out / "metrics.json").exists()
    assert not marker.exists()


def test_pickle_only_model_dir_is_refused(tmp_path, tiny_models):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "pickle-model"
    shutil.copytree(tiny_models["tiny-qwen2"], d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        safety.check_model_dir(d)
    with pytest.raises(UserError, match="safetensors") as e:
        models.load(str(d))
    assert "\n" not in str(e.value)


def test_shipped_models_pass_the_checks(tiny_models):
    for path in tiny_models.values():
        safety.check_model_dir(path)
    safety.check_model_dir(models.resolve("smollm2-135m"))


def _python_sources():
    skip = {".venv", "outputs", ".git", "node_modules"}
    for f in sorted(REPO.rglob("*.py")):
        if not skip & set(f.relative_to(REPO).parts):
            yield f


def _calls(src: str, name: str):
    """源码里每一处 name( 调用的完整参数文本（跨行，按括号配对）。"""
    for m in re.finditer(re.escape(name) + r"\s*\(", src):
        depth, i = 1, m.end()
        while depth and i < len(src):
            depth += {"(": 1, ")": -1}.get(src[i], 0)
            i += 1
        yield src.count("\n", 0, m.start()) + 1, src[m.start():i]


def test_no_unsafe_deserialisation_in_the_repository():
    """pickle 能执行任意代码：torch.load 必须 weights_only=True；不许 pickle.load / yaml.load / 写死信任远程代码。"""
    me = "test_reliability_untrusted.py"
    bad = []
    for f in _python_sources():
        if f.name == me:
            continue
        src = f.read_text(encoding="utf-8")
        rel = f.relative_to(REPO)
        for line, call in _calls(src, "torch.load"):
            if not re.search(r"weights_only\s*=\s*True", call):
                bad.append(f"{rel}:{line}: {call[:80]}")
        for name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "yaml.load", "yaml.unsafe_load",
                     "numpy.load", "np.load"):
            for line, call in _calls(src, name):
                if name.endswith("np.load") or name == "numpy.load":
                    if re.search(r"allow_pickle\s*=\s*True", call):
                        bad.append(f"{rel}:{line}: {call[:80]}")
                    continue
                if name == "yaml.load" and re.search(r"Loader\s*=\s*yaml\.(Safe|CSafe)Loader", call):
                    continue
                bad.append(f"{rel}:{line}: {call[:80]}")
        for m in re.finditer(r"trust_remote_code\s*=\s*True", src):
            bad.append(f"{rel}:{src.count(chr(10), 0, m.start()) + 1}: 写死了 trust_remote_code=True")
    assert not bad, "不安全的反序列化：\n" + "\n".join(bad)
