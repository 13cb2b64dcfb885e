"""common.models / common.tiny：三档模型能加载、能生成；分词器中英往返；错误信息清楚。"""
import json
import shutil

import pytest
import torch

from common import models, tiny
from common.errors import UserError
from tests.conftest import assert_user_error


@pytest.mark.parametrize("name", tiny.TINY_NAMES)
def test_tiny_model_loads_and_generates(tiny_models, name):
    model, tok = models.load(name)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 5e6, f"{name} 参数量 {n} 不在约 1-5M 的范围"
    msgs = [{"role": "user", "content": "你好，请介绍一下电池。"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert torch.isfinite(logits).all()
    assert out.shape[1] > enc["input_ids"].shape[1]
    info = json.loads((tiny_models[name] / "course_build.json").read_text(encoding="utf-8"))
    assert info["final_pretrain_loss"] < 6.0, "预训练后 loss 应明显低于随机初始化（ln 3072 ≈ 8.0）"


def test_tiny_build_is_deterministic(tiny_models, tmp_path, monkeypatch):
    """同一种子、同一语料 => 逐位相同的权重：分词器与缓存逐字节相同，同一构建跑两次权重完全相等。

    预训练截到 40 步（完整构建在 2 核上要 2 分钟，而不确定性——未设种子的初始化、数据顺序、并行归约的次序——
    在头几步就会显出来）。
    """
    from transformers import AutoModelForCausalLM

    tok_dir = tiny.build_tokenizer(tmp_path / "tok")
    assert (tok_dir / "tokenizer.json").read_bytes() == (tiny_models["tiny-llama"] / "tokenizer.json").read_bytes()
    monkeypatch.setattr(tiny, "_PRETRAIN_STEPS", 40)
    runs = [tiny.build("tiny-llama", tmp_path / f"tiny-llama-{i}", seed=0, log=lambda *_: None, tok_dir=tok_dir)
            for i in range(2)]
    a, b = (AutoModelForCausalLM.from_pretrained(r).state_dict() for r in runs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = AutoModelForCausalLM.from_pretrained(tiny_models["tiny-llama"]).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a), "40 步的权重应与完整预训练不同：否则截断没有生效"


@pytest.mark.parametrize("text", ["监督微调只在助手回复上计算损失。", "LoRA trains low-rank updates; 秩 r=8!",
                                  "云帆扫地机器人 R3 的电池容量是 5200mAh。"])
def test_tiny_tokenizer_round_trips(tiny_models, text):
    tok = models.load_tokenizer("tiny-qwen2")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")), "BPE 应把常见字节序列合并，token 数少于字节数"


def test_tiny_chat_template_marks_assistant(tiny_models):
    tok = models.load_tokenizer("tiny-glm")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(marked) == "hello<|im_end|>"


def test_smollm2_answers_paris_offline():
    model, tok = models.load("smollm2-135m")
    assert not hasattr(model.config, "quantization_config")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    assert "Paris" in tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError, match="不是内置模型"):
        models.resolve("no-such-model")
    with pytest.raises(UserError, match="--source hf"):
        models.resolve("Qwen/Qwen2.5-0.5B-Instruct")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        models.resolve(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="--source"):
        models.resolve("tiny-qwen2", source="ftp")
    with pytest.raises(UserError, match="--dtype"):
        models.pick_dtype("int3")


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert models.pick_dtype("auto", cpu, for_training=True) == torch.float32
    expected = torch.bfloat16 if models.cpu_has_bf16() else torch.float32
    assert models.pick_dtype("auto", cpu) == expected
    assert models.pick_dtype("bf16", cpu) == torch.bfloat16


@pytest.fixture
def config_only(tmp_path, tiny_models):
    """有 config.json、没有权重的模型目录（训练没跑完、只拷了配置）。"""
    d = tmp_path / "config-only"
    d.mkdir()
    shutil.copy(tiny_models["tiny-qwen2"] / "config.json", d)
    return d


def test_check_dir_names_the_flag_and_what_is_missing(tmp_path, tiny_models, config_only):
    """issue 22 第 4 项：不存在的目录、没有权重的目录、不是 adapter 的目录，都在加载前一行说清，点名参数。"""
    assert models.check_dir(tiny_models["tiny-qwen2"]) == tiny_models["tiny-qwen2"]   # 好目录原样通过
    with pytest.raises(UserError, match=r"^--reward-model .*missing: 不是一个存在的目录"):
        models.check_dir(tmp_path / "missing", "--reward-model")
    with pytest.raises(UserError, match=r"^--model .*config-only: 有 config.json 却没有权重"):
        models.load(str(config_only))
    with pytest.raises(UserError, match=r"^--adapter .*: 目录里没有 adapter_config.json"):
        models.check_dir(tiny_models["tiny-qwen2"], "--adapter", adapter=True)   # 完整模型也不是 adapter
    (config_only / "adapter_config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(UserError, match="没有权重 adapter_model.safetensors"):
        models.check_dir(config_only, "--adapter", adapter=True)


def _one_error_line(proc, prefix: str) -> None:
    """退出码 2、没有 traceback，且恰好一行错误，以 prefix（参数 + 路径）开头。"""
    assert_user_error(proc, prefix)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("错误: ")]
    assert len(errors) == 1 and errors[0].startswith("错误: " + prefix), proc.stderr[-2000:]


@pytest.mark.parametrize("kind", ["missing", "config_only"])
def test_rlhf_reward_model_dir_is_checked_before_training(run_script, tmp_path, config_only, kind):
    """--reward-model 指向不存在 / 没有权重的目录：曾是 transformers 的 OSError traceback（"Repo id must be…"）。"""
    rm = tmp_path / "missing" if kind == "missing" else config_only
    out = tmp_path / "out"
    p = run_script("lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py", "--smoke", "--reward-model", str(rm),
                   "--output-dir", str(out), timeout=300)
    _one_error_line(p, f"--reward-model {rm}: ")
    assert not (out / "metrics.json").exists()


def test_chat_server_blames_the_adapter_before_starting_the_server(run_script, tmp_path):
    """--adapter 不存在：曾经启动服务、等它崩掉，再报"--model tiny-qwen2: 服务没能启动"（原因只在 server.log）。"""
    missing = tmp_path / "no-adapter"
    out = tmp_path / "out"
    p = run_script("lesson5_deployment_monitoring/07_serving/chat_server.py", "--smoke", "--adapter", str(missing),
                   "--output-dir", str(out), timeout=300)
    _one_error_line(p, f"--adapter {missing}: ")
    assert "服务没能启动" not in p.stderr and not (out / "server.log").exists()


def test_weight_only_int8_keeps_outputs_and_shrinks_weights(tiny_models):
    """只量化权重：每个 Linear 都换掉、权重变成 int8，输出与原模型（同样是 bf16 激活）几乎一样。"""
    import copy

    import torch

    from common import lm

    model, tok = models.load("tiny-llama", dtype="float32")
    ref = copy.deepcopy(model).to(torch.bfloat16)
    q = copy.deepcopy(model)
    n = models.weight_only(q)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules()) and n > 0
    assert not any(isinstance(m, torch.nn.Linear) for m in q.modules())
    assert lm.size_mb(q) < 0.7 * lm.size_mb(model)
    ids = torch.tensor([tok("Review: great phone, works well", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits.float(), q(input_ids=ids).logits.float()
    # 逐输出通道的 int8：相对误差在 1% 量级（bf16 本身的舍入就有 0.4%）；贪心的下一个 token 多数相同
    assert (a - b).norm() / a.norm() < 0.05, (a - b).norm() / a.norm()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8


def test_weight_only_int4_reads_half_the_bytes_of_int8_and_keeps_the_output_layer_at_int8(tiny_models):
    """bits=4（聊天服务的 --weights int4）：能用 int4 核心的层是 int4（权重字节约 int8 的一半），lm_head 留 int8；
    输出离 bf16 参照比 int8 远，但贪心的下一个 token 多数仍相同。"""
    import copy

    import torch

    model, tok = models.load("tiny-llama", dtype="float32")
    ref, q8, q4 = copy.deepcopy(model).to(torch.bfloat16), copy.deepcopy(model), copy.deepcopy(model)
    models.weight_only(q8)
    assert models.weight_only(q4, bits=4) == models.weight_only(copy.deepcopy(model), bits=4) > 0
    head = q4.get_output_embeddings()
    bits = [m.bits for m in q4.modules() if hasattr(m, "weight_q") and m is not head]
    assert head.bits == 8 and bits.count(4) >= len(bits) // 2, bits
    layers8 = {n: m for n, m in q8.named_modules() if hasattr(m, "weight_q")}
    four = [(m, layers8[n]) for n, m in q4.named_modules() if getattr(m, "bits", 8) == 4]
    assert sum(m.weight_q.nbytes for m, _ in four) * 2 == sum(m8.weight_q.nbytes for _, m8 in four)
    ids = torch.tensor([tok("Review: great phone, works well", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b8, b4 = (m(input_ids=ids).logits.float() for m in (ref, q8, q4))
    e8, e4 = (a - b8).norm() / a.norm(), (a - b4).norm() / a.norm()
    assert e8 < e4 < 0.1, (e8, e4)
    assert (a.argmax(-1) == b4.argmax(-1)).float().mean() > 0.6


def test_weight_only_int4_recovers_weights_already_on_a_q4_1_grid():
    """SmolLM2 的 GGUF 层是 Q4_1（每 32 个一组，w = d·q + m）：这样的权重按组 min/max 量回 int4 时落回原来的格子，
    int4 核心算出的就是原权重的矩阵乘（scale、zero 都能用 bf16 精确表示时逐位相同，只剩 bf16 激活的舍入）。"""
    import torch

    g = torch.Generator().manual_seed(0)
    n, k = 64, 128
    d = torch.tensor([2.0 ** e for e in torch.randint(-9, -6, (n * k // 32,), generator=g).tolist()])
    q = torch.randint(0, 16, (n * k // 32, 32), generator=g)
    q[:, 0], q[:, 1] = 0, 15    # 每组都用到最小和最大的格点（min/max 才能认出格子）
    m = -8 * d                   # 组的中点 0：zero = m + 8d 正好是 bf16 能表示的
    w = (q * d[:, None] + m[:, None]).reshape(n, k)
    lin = torch.nn.Linear(k, n, bias=False)
    lin.weight.data = w.clone()
    net = torch.nn.Sequential(lin, torch.nn.Identity())
    models.weight_only(net, bits=4)
    assert net[0].bits == 4
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        y = net(x).float()
    exact = x.float() @ w.t()
    assert (y - exact).abs().max() < 0.02 * exact.abs().max(), (y - exact).abs().max()
    # 对照：int8 在同一批权重上做不到（它的格子是逐行对称的 255 级，不是原来的 16 级）
    lin8 = torch.nn.Linear(k, n, bias=False)
    lin8.weight.data = w.clone()
    net8 = torch.nn.Sequential(lin8)
    models.weight_only(net8)
    with torch.no_grad():
        y8 = net8(x).float()
    assert (y - exact).abs().mean() < (y8 - exact).abs().mean()


def test_int8_float_prefill_uses_float_weights_only_for_the_prompt(tiny_models):
    """float_prefill（聊天服务的 --weights int8）：一次多个位置的前向（提示的预填充）走 fp32 权重，与 fp32 模型一致；
    一次一个位置的解码走 int8 核心，和不留 fp32 副本时逐位相同。"""
    import copy

    import torch

    model, tok = models.load("tiny-llama", dtype="float32")
    q, hybrid = copy.deepcopy(model), copy.deepcopy(model)
    models.weight_only(q)
    models.weight_only(hybrid, float_prefill=True)
    ids = torch.tensor([tok("Review: great phone, works well", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref, pure, mixed = (m(input_ids=ids).logits.float() for m in (model, q, hybrid))
        # 预填充：没有了 int8 的量化误差，只剩 bf16 激活的舍入（极小模型上舍入占大头），所以离 fp32 更近
        assert not torch.equal(mixed, pure) and (mixed - ref).norm() < (pure - ref).norm()
        # 解码（序列长 1）：与纯 int8 的输出逐位相同——用的是同一个 int8 核心
        last = ids[:, -1:]
        assert torch.equal(q(input_ids=last).logits, hybrid(input_ids=last).logits)
