"""第 3 课 01：ZeRO 配置器。2 个真实 rank 各持有一半参数、估算与 DeepSpeed 一致、batch 公式与未知键被拒绝。"""
import json

import pytest

from common import train
from common.errors import UserError
from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson3_distributed/01_distributed_training/zero3_configurator.py"


@pytest.mark.slow
def test_zero3_two_ranks_hold_half_the_params(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("estimate_vs_deepspeed_pct", "world_size", "params_per_rank", "total_params", "loss_first",
                "loss_last"):
        assert key in saved, key
    # 两个 gloo 进程真的跑了 ZeRO-3：每个 rank 只持有约一半参数（DeepSpeed 按 world_size 对齐，可能多几个填充元素）
    assert m["world_size"] == 2 and len(m["params_per_rank"]) == 2
    assert m["run_total_params"] == m["total_params"]
    for local in m["params_per_rank"]:
        assert abs(local - m["total_params"] / 2) <= 0.01 * m["total_params"], m["params_per_rank"]
    # 同一批数据训练几步，loss 必须明显下降（梯度确实经过了 reduce-scatter 与分片更新；固定种子下约 5.43 -> 4.55）
    assert m["loss_last"] < m["loss_first"] - 0.3, m["run_losses"]
    assert abs(m["estimate_vs_deepspeed_pct"]) < 10
    # 生成的每份配置都能被 DeepSpeed 的解析器按目标卡数（8）接受，batch 三个数自洽
    for name in ("ds_zero1.json", "ds_zero2.json", "ds_zero3.json", "ds_config.json"):
        cfg = json.loads((tmp_path / name).read_text(encoding="utf-8"))
        train.validate_ds_config(cfg, 8, name)
        assert cfg["train_batch_size"] == cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 8
    run_cfg = json.loads((tmp_path / "ds_config_run.json").read_text(encoding="utf-8"))
    assert run_cfg["zero_optimization"]["stage"] == 3 and "offload_param" in run_cfg["zero_optimization"]
    assert (tmp_path / "zero_memory.png").stat().st_size > 0
    # run.log 是一份真实的 DeepSpeed 日志（每步的 step/lr 行）：第 3 课 04 的日志体检能读它
    log_mod = load_script("lesson3_distributed/04_log_analysis/training_log_inspector.py")
    series = log_mod.read_deepspeed(tmp_path / "run.log")
    assert {s for s, _ in series["lr"]} >= set(range(1, 7)), series
    assert_claims(saved)


@pytest.mark.parametrize("psi,largest", [(7_000_000_000, 131_000_000), (70_000_000_000, 1_050_000_000),
                                         (135_000_000, 28_000_000)])
@pytest.mark.parametrize("n_gpu,n_node", [(8, 1), (8, 4), (2, 1)])
def test_estimate_within_10pct_of_deepspeed(psi, largest, n_gpu, n_node):
    mod = load_script(SCRIPT)
    for stage, oo, op in [(2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True)]:
        ours = mod.estimate_gb(psi, largest, stage, n_gpu * n_node, oo, op)
        ds = mod.deepspeed_gb(psi, largest, stage, n_gpu, n_node, oo, op)
        assert abs(ours - ds) / ds < 0.10, (stage, oo, op, ours, ds)
    # 论文公式（不含实现项）在 ZeRO-3 上系统性地少算：说明实现项是必须的
    paper = mod.estimate_gb(psi, largest, 3, n_gpu * n_node, False, False, paper=True)
    assert paper < mod.deepspeed_gb(psi, largest, 3, n_gpu, n_node, False, False)


def test_batch_rule_and_deepspeed_parser_reject_bad_configs():
    mod = load_script(SCRIPT)
    args = mod.Args(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=4, train_batch_size=16)
    with pytest.raises(UserError, match="--train-batch-size"):   # 公开仓库常见错误：忘了乘卡数
        mod.build_config(args, world_size=8)
    good = mod.build_config(mod.Args(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=4), 8)
    assert good["train_batch_size"] == 128
    train.validate_ds_config(good, 8)
    with pytest.raises(UserError, match="拒绝"):   # 同一份配置换到 4 张卡：DeepSpeed 自己的 batch 断言
        train.validate_ds_config(good, 4)
    bad_zero = json.loads(json.dumps(good))
    bad_zero["zero_optimization"]["stage3_prefetch_bucket"] = 1   # 少了 _size：DeepSpeed 的 pydantic 模型拒绝
    with pytest.raises(UserError, match="stage3_prefetch_bucket"):
        train.validate_ds_config(bad_zero, 8)
    with pytest.raises(UserError, match="zero_optimisation"):   # 顶层拼错：DeepSpeed 会默默忽略，我们拒绝
        train.validate_ds_config({**good, "zero_optimisation": {"stage": 3}}, 8)


def test_wrong_train_batch_size_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--no-run", "--train-batch-size", "100", "--output-dir", str(tmp_path),
                      timeout=300)
    assert_user_error(proc, "--train-batch-size 100")


def test_shipped_deepspeed_configs_pass_deepspeed_parser():
    """configs/deepspeed/*.json 都能被 DeepSpeed 按目标卡数接受（文件名 _16gpu = 16 卡，否则 8 卡），batch 公式成立。"""
    import re

    from tests.conftest import REPO

    files = sorted((REPO / "configs" / "deepspeed").glob("*.json"))
    assert len(files) >= 3
    for f in files:
        cfg = json.loads(f.read_text(encoding="utf-8"))
        world = int(m.group(1)) if (m := re.search(r"_(\d+)gpu", f.stem)) else 8
        train.validate_ds_config(cfg, world, f.name)
        per_step = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
        assert cfg["train_batch_size"] == per_step * world
        with pytest.raises(UserError):   # 同一份配置换一个卡数就不成立：这正是公开仓库常犯的错
            train.validate_ds_config(cfg, world * 2, f.name)


def test_device_cuda_without_cuda_is_one_line_error(tmp_path, monkeypatch):
    """--device cuda 在没有 CUDA 的机器上：一行点名 --device cuda，不悄悄改用 CPU 的 gloo 跑（issue 22 第 6 组）。"""
    import torch

    from common import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mod = load_script(SCRIPT)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UserError) as e:
            mod.main(cli.parse(mod.Args, ["--smoke", "--device", "cuda", "--output-dir", str(tmp_path)]))
    finally:
        torch.set_num_threads(threads)   # 冒烟的 run.start 改了线程数，出错时没走到 finish 还原
    assert str(e.value).startswith("--device cuda: ") and "CUDA" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "ds_config.json").exists()


def test_too_few_records_for_the_ranks_refused_before_torchrun(tmp_path, monkeypatch):
    """--data 在父进程里先读：条数凑不出每个 rank 一个微批时一行报错，不拉起 torchrun
    （worker 取批的循环一个批也产不出，会永远等下去）。"""
    import subprocess

    import torch

    from common import cli

    data = tmp_path / "tiny.jsonl"
    data.write_text('{"instruction": "你好", "output": "你好！"}\n' * 3, encoding="utf-8")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"不该启动子进程：{a[:1]}"))
    mod = load_script(SCRIPT)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UserError) as e:
            mod.main(cli.parse(mod.Args, ["--smoke", "--data", str(data), "--output-dir", str(tmp_path / "o")]))
    finally:
        torch.set_num_threads(threads)
    assert str(e.value).startswith(f"--data {data}: 只有 3 条对话") and "\n" not in str(e.value)
    assert not (tmp_path / "o" / "metrics.json").exists()
