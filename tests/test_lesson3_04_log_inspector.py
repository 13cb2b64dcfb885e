"""第 3 课 04：训练日志体检。真实训练的干净日志 0 个异常；注入的六种故障在三种日志格式里都在注入的步数被找到。"""
import json
import math

import pytest

from tests.conftest import REPO, assert_claims, assert_user_error, load_script

SCRIPT = "lesson3_distributed/04_log_analysis/training_log_inspector.py"
N = 120


def clean_history() -> list[dict]:
    """一次正常训练的样子：loss 指数下降带小噪声、预热 + 余弦学习率、grad_norm ~1、吞吐 ~100、eval 每 10 步且下降。"""
    import random

    rnd, hist = random.Random(0), []
    for s in range(1, N + 1):
        lr = 1e-3 * min(1.0, s / 10) * (0.5 * (1 + math.cos(math.pi * max(0, s - 10) / (N - 10))) if s > 10 else 1)
        hist.append({"step": s, "loss": 1.0 + 2.0 * math.exp(-s / 30) + rnd.gauss(0, 0.02), "learning_rate": lr,
                     "grad_norm": 1.0 + rnd.gauss(0, 0.05), "samples_per_second": 100 + rnd.gauss(0, 2)})
        if s % 10 == 0:
            hist.append({"step": s, "eval_loss": 1.2 + 2.0 * math.exp(-s / 30)})
    return hist


def inject(hist: list[dict]) -> list[dict]:
    """六种故障，各在一个已知步数。"""
    hist = json.loads(json.dumps(hist))
    by = {(h["step"], "eval_loss" in h): h for h in hist}
    by[(25, False)]["loss"] *= 3                      # loss 尖峰
    by[(40, False)]["loss"] = float("nan")             # NaN
    by[(55, False)]["grad_norm"] = 40.0                # 梯度爆炸
    by[(65, False)]["samples_per_second"] = 20.0       # 吞吐骤降（比如换数据时卡在 I/O）
    for s in range(75, N + 1):                         # 续训时调度器被重置：学习率跳回峰值
        by[(s, False)]["learning_rate"] = 1e-3 * (0.5 * (1 + math.cos(math.pi * (s - 75) / (N - 75))))
    for k, s in enumerate(range(90, N + 1, 10)):       # 验证损失离开最低点上升，训练损失还在降
        by[(s, True)]["eval_loss"] = by[(80, True)]["eval_loss"] * (1.1 + 0.1 * k)
    return hist


EXPECTED = {("loss_spike", 25), ("nan_inf", 40), ("grad_norm_explosion", 55), ("throughput_drop", 65),
            ("lr_schedule", 75), ("eval_divergence", 90)}


def write_state(path, hist):
    path.mkdir(parents=True, exist_ok=True)
    (path / "trainer_state.json").write_text(json.dumps({"log_history": hist}), encoding="utf-8")
    return path


def test_injected_faults_found_at_their_steps_and_clean_log_yields_none(tmp_path):
    mod = load_script(SCRIPT)
    clean = mod.main(mod.Args(logs=[str(write_state(tmp_path / "clean", clean_history()))],
                              output_dir=str(tmp_path / "o1")))
    assert clean["n_anomalies"] == 0, clean["anomalies"]
    assert clean["steps_read"] == N
    bad = mod.main(mod.Args(logs=[str(write_state(tmp_path / "bad", inject(clean_history())))],
                            output_dir=str(tmp_path / "o2")))
    found = {(a["kind"], a["step"]) for a in bad["anomalies"]}
    assert found == EXPECTED, found
    assert (tmp_path / "o2" / "training_logs.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "o2" / "anomalies.json").read_text(encoding="utf-8"))) == len(EXPECTED)


def test_tensorboard_and_deepspeed_logs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    mod = load_script(SCRIPT)
    hist = inject(clean_history())
    w = SummaryWriter(str(tmp_path / "tb"))
    for h in hist:
        for k, tag in (("loss", "train/loss"), ("learning_rate", "train/learning_rate"),
                       ("grad_norm", "train/grad_norm"), ("eval_loss", "eval/loss")):
            if k in h:
                w.add_scalar(tag, h[k], h["step"])
    w.close()
    # DeepSpeed 引擎与吞吐计时器打印的原样格式
    ds = tmp_path / "ds" / "train.log"
    ds.parent.mkdir()
    ds.write_text("".join(
        f"[2026-12-02 01:00:00,000] [INFO] [logging.py:107:log_dist] [Rank 0] step={h['step']}, skipped=0, "
        f"lr=[{h['learning_rate']}], mom=[(0.9, 0.999)]\n"
        f"[2026-12-02 01:00:00,000] [INFO] [timer.py:264:stop] epoch=0/micro_step={h['step']}/global_step={h['step']}, "
        f"RunningAvgSamplesPerSec=99.0, CurrSamplesPerSec={h['samples_per_second']}, MemAllocated=0.0GB, "
        f"MaxMemAllocated=0.0GB\n" for h in hist if "loss" in h), encoding="utf-8")
    m = mod.main(mod.Args(logs=[str(tmp_path / "tb"), str(ds)], output_dir=str(tmp_path / "o")))
    by_src = {}
    for a in m["anomalies"]:
        by_src.setdefault("ds" if a["source"].endswith("train.log") else "tb", set()).add((a["kind"], a["step"]))
    # TensorBoard 里没有吞吐；DeepSpeed 日志里只有学习率与吞吐
    assert by_src["tb"] == EXPECTED - {("throughput_drop", 65)}, by_src
    assert by_src["ds"] == {("throughput_drop", 65), ("lr_schedule", 75)}, by_src


@pytest.mark.slow
def test_smoke_real_training_log_is_clean(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    # 现训的 tiny-llama（真实 Trainer，40 步）：trainer_state.json 与 TensorBoard 都读到了，没有误报
    assert m["steps_read"] == 80 and len(m["sources"]) == 2
    assert m["n_anomalies"] == 0, m["anomalies"]
    # 自检：同一份现训日志的副本里注入的故障（现训日志没有吞吐，所以是五种），每一个都在注入的步数被找到
    assert m["planted_faults"] == 5 and m["planted_found"] == 5 and m["planted_false_alarms"] == 0, m["planted"]
    assert_claims(m)


def test_missing_logs_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--logs", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"), timeout=120)
    assert_user_error(proc, "--logs")


def test_data_with_logs_is_refused_not_ignored(tmp_path, run_script):
    """--data 是没有日志时现训用的数据：同时给了 --logs 就用不到它，一行报错，不悄悄忽略。"""
    logs = tmp_path / "trainer_state.json"
    logs.write_text(json.dumps({"log_history": [{"step": i, "loss": 2.0} for i in range(1, 30)]}), encoding="utf-8")
    good = str(REPO / "data" / "sft" / "alpaca.jsonl")   # 好文件：拒绝它只因为用不到，不是因为它坏
    proc = run_script(SCRIPT, "--logs", str(logs), "--data", good, "--output-dir", str(tmp_path / "o"), timeout=120)
    assert_user_error(proc, f"--data {good}: ", "--logs")
    assert not (tmp_path / "o" / "metrics.json").exists()
