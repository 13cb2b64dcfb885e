"""学生把 --data 指向自己的长回答数据时，六个 Trainer 脚本做同样的三件事（issue 20）：

训练前一行说清几条超过 max_length、会怎样、怎么改；第 1 步后报预计用时；按验证损失留最好的一步（装回的就是
eval_loss 最低的那个评估点）。数据在 tmp_path 里确定性地造 200 条：SFT 取 data/longform/sft_long.jsonl 的前 200 条，
偏好对把 data/preference/pairs.jsonl 里相邻几对的回答拼长（长短不一，一部分超过 max_length）。
后半是 common.train 这套 API 的单元测试（不跑模型，一秒内）。
"""
import json
import logging
import time
from types import SimpleNamespace

import pytest

from tests.conftest import REPO, load_script

LONG = REPO / "data" / "longform" / "sft_long.jsonl"
PAIRS = REPO / "data" / "preference" / "pairs.jsonl"


class _Capture(logging.Handler):
    """收集课程日志（common.run 的 logger 不向 root 传播，caplog 抓不到）。"""

    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def course_log():
    from common.run import get_logger

    h = _Capture()
    log = get_logger()   # 先让 common.run 装好它自己的 handler 和 INFO 级别，再挂上收集器
    log.addHandler(h)
    yield h.lines
    log.removeHandler(h)


def long_sft(path, n: int = 200):
    """学生式长回答 SFT：sft_long.jsonl 的前 n 条（回答 100-800 token，长短不一）。"""
    path.write_text("".join(LONG.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return path


def long_pairs(path, n: int = 200):
    """n 对长回答偏好对：第 i 对的 chosen / rejected 是从第 i 对起 1-12 对的 chosen / rejected 依次拼接
    （长度随 i 变化，有长有短），prompt 不变。确定性，不用随机数。"""
    base = [json.loads(x) for x in PAIRS.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = []
    for i in range(n):
        group = [base[(i + j) % len(base)] for j in range(1 + i % 12)]
        rows.append({"prompt": base[i % len(base)]["prompt"], "chosen": " ".join(p["chosen"] for p in group),
                     "rejected": " ".join(p["rejected"] for p in group)})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def assert_truncation_and_eta(m: dict, lines: list[str], knob: str, fate: str = "：截断") -> None:
    """训练前那一行点名了超长的条数、它们的下场（截断 / 整对丢弃）和调长度的参数；第 1 步后那一行给出了预计用时。"""
    assert m["records"] >= 150 and m["over_max_length"] > 0, m
    line = next(x for x in lines if f"超过 {knob}" in x)
    assert f"的 {m['over_max_length']} " in line and fate in line and "要保留请调大" in line, line
    assert any(x.startswith("第 1 步实测") and "预计约" in x for x in lines), lines[-20:]


def assert_kept_best(m: dict, after: float | None) -> None:
    """至少评估过 2 次；保留的是 eval_loss 最低的那一步；训练后量到的 eval_loss 就是那个最低值（装回来了）。"""
    history = m["eval_history"]
    assert len(history) >= 2, history
    best_step, best = min(history, key=lambda h: h[1])
    assert m["kept_step"] == best_step, (m["kept_step"], history)
    if after is not None:
        assert after == pytest.approx(best, abs=2e-3), (after, history)


# 脚本 -> (数据, 小规模参数, 训练前那一行里调长度的参数, 训练后量到的 eval_loss 在 metrics 里的位置, 超长的下场)
TRAINERS = {
    "lesson1_sft/05_lora_finetune/lora_chatglm_demo.py": (
        long_sft, dict(max_length=128, max_steps=4, eval_steps=2, per_device_train_batch_size=4, max_new_tokens=4),
        "--max-length 128", lambda m: m["eval_loss_after"], "：截断"),
    "lesson2_qlora_ptuning/02_qlora_pipeline/qlora_trainer.py": (
        long_sft, dict(max_length=96, max_steps=4, per_device_train_batch_size=4),
        "--max-length 96", lambda m: m["eval_loss_after"], "：截断"),
    # RewardTrainer 把超长的对整对丢掉（不截断）：max_length 取在中间，一部分对留下来训练
    "lesson4_alignment/03_reward_model_training/train_reward_model.py": (
        long_pairs, dict(max_length=160, max_steps=4, per_device_train_batch_size=4),
        "--max-length 160", lambda m: m["eval_loss"], "：整对丢弃"),
    "lesson4_alignment/04_dpo/dpo_train.py": (
        long_pairs, dict(max_length=160, max_steps=4, per_device_train_batch_size=4, betas=[0.1]),
        "--max-length 160", lambda m: m["beta_sweep"]["0.1"]["eval_loss"], "：截断"),
    # 截断由配方的 max_length（256）决定；--data 换掉配方里的数据集
    "lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py": (
        long_pairs, dict(max_steps=4), "配方 dpo_hf.yaml 的 max_length 256", lambda m: m["eval_loss"], "：截断"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(TRAINERS))
def test_trainer_script_on_own_long_data(script, tmp_path, tiny_models, course_log):
    make, kwargs, knob, after, fate = TRAINERS[script]
    mod = load_script(script)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path / "o"), data=str(make(tmp_path / "d.jsonl")), **kwargs))
    assert_truncation_and_eta(m, course_log, knob, fate)
    assert_kept_best(m, after(m))


@pytest.mark.slow
def test_lesson3_06_domain(tmp_path, tiny_models, course_log):
    """多进程的 SFT 阶段是手写的 DeepSpeed 循环：预计用时那一行在 rank 0 的日志 train.log 里。"""
    mod = load_script("lesson3_distributed/06_vertical_case/domain_finetune_case.py")
    out = tmp_path / "o"
    m = mod.main(mod.Args(smoke=True, output_dir=str(out), data=str(long_sft(tmp_path / "d.jsonl")), ranks=1,
                          mix=[0.0], cpt_steps=2, sft_steps=4, block_size=64, max_length=96))
    # rank 0 的 rich 日志在 train.log 里带级别前缀、按终端宽度折行：去掉前缀、接回一行再找
    worker = "".join(x.strip().removeprefix("INFO").strip() for x in (out / "train.log").read_text(encoding="utf-8")
                     .splitlines())
    eta = worker[worker.index("第 1 步实测"):]
    assert_truncation_and_eta(m, course_log + [eta[:eta.index("）") + 1]], "--max-length 96")
    assert_kept_best(m["mix"]["0"], None)


# ---- common.train 的单元测试 ----------------------------------------------------------------------------------

def _row(n_prompt: int, n_answer: int) -> dict:
    return {"input_ids": list(range(n_prompt + n_answer)), "labels": [-100] * n_prompt + [7] * n_answer}


def test_length_report_counts_sft_rows_and_pairs(course_log):
    from common import train

    rows = [_row(10, 20), _row(10, 60), _row(10, 100)]   # 30 / 70 / 110 token
    s = train.length_report(rows, 64)
    assert (s["records"], s["over_max_length"], s["tokens_max"]) == (3, 2, 110)
    assert s["answer_tokens_cut"] == (70 - 64) + (110 - 64) and s["answer_tokens"] == 180
    assert "超过 --max-length 64 的 2 条" in course_log[-1] and "--max-length 128" in course_log[-1]
    # 偏好对：任一条超长整对算超长；丢弃策略不提截断
    pairs = [[_row(10, 20), _row(10, 30)], [_row(10, 20), _row(10, 80)]]
    s = train.length_report(pairs, 64, "drop", drop_flag=None)
    assert (s["records"], s["over_max_length"]) == (2, 1)
    assert "的 1 对：整对丢弃" in course_log[-1] and "截断" not in course_log[-1]
    assert train.length_report(rows, 200)["over_max_length"] == 0 and "没有被截断的" in course_log[-1]


def test_truncate_keeps_only_rows_with_answer_tokens():
    from common import train

    rows = [_row(10, 20), _row(70, 10)]   # 第二条截到 64 后只剩提示
    assert [len(r["input_ids"]) for r in train.truncate(rows, 64)] == [30]
    assert train.truncate(rows, 64, "drop") == [{"input_ids": rows[0]["input_ids"], "labels": rows[0]["labels"]}]


def test_eval_schedule_caps_cost_and_evaluates_at_least_twice():
    from common import train

    # 评估 3000 token，一步 100 token：评估开销 ≤ 10% 要隔 ceil(3000 / 30) = 100 步
    assert train.eval_schedule(1000, 3000, 100) == (1000, 100)
    # 只训 30 步：仍然至少评估 2 次（每 15 步）
    assert train.eval_schedule(30, 3000, 100) == (30, 15)
    # round_steps：步数取评估间隔的整数倍，最后一次评估之后不白训
    assert train.eval_schedule(31, interval=10, round_steps=True) == (30, 10)


def test_best_step_args_are_valid_training_arguments(tmp_path):
    from transformers import TrainingArguments

    from common import train

    a = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **train.best_step_args(5))
    assert a.load_best_model_at_end and a.metric_for_best_model == "eval_loss" and not a.greater_is_better
    assert a.eval_steps == a.save_steps == 5


def _control():
    return SimpleNamespace(should_training_stop=False, should_evaluate=False, should_save=False)


def test_time_budget_stops_with_a_final_eval_and_save():
    """预算用满：停在这一步，并要求先评估 + 保存（load_best_model_at_end 才看得到它）；不限时从不停。"""
    from common import train

    added = []
    clock = train.attach(SimpleNamespace(add_callback=added.append), minutes=0.0001)   # 6 毫秒
    state, control = SimpleNamespace(global_step=3, max_steps=10), _control()
    clock.on_train_begin(None, state, control)
    clock.on_step_begin(None, state, control)
    clock.on_step_end(None, state, control)
    assert not control.should_training_stop   # 还没到预算
    time.sleep(0.02)
    clock.on_step_end(None, state, control)
    assert control.should_training_stop and control.should_evaluate and control.should_save and clock.hit
    assert added == [clock]
    off, control = train.attach(SimpleNamespace(add_callback=added.append)), _control()
    off.on_train_begin(None, state, control)
    time.sleep(0.01)
    off.on_step_end(None, state, control)
    assert not control.should_training_stop and not off.hit


def test_eta_line_after_step_one_and_evaluation_leaves_rng_untouched(course_log):
    """第 1 步后打一行预计用时（超预算时说约停在第几步）；训练中的评估用掉的随机数在评估后还原。"""
    import torch

    from common import train

    clock = train.attach(SimpleNamespace(add_callback=lambda cb: None), minutes=1.0)
    state, control = SimpleNamespace(global_step=1, max_steps=1000), _control()
    clock.on_train_begin(None, state, control)
    clock.on_step_begin(None, state, control)
    time.sleep(0.1)
    clock.on_step_end(None, state, control)
    assert course_log[-1].startswith("第 1 步实测") and "最多 1000 步" in course_log[-1]
    assert "超过 --max-train-minutes 1" in course_log[-1]   # 1000 步 × ≥0.1 秒 > 1 分钟
    expected = torch.rand(3)   # 没有评估时，下一次取随机数得到的
    torch.random.set_rng_state(clock.rng[0])
    clock.on_step_end(None, SimpleNamespace(global_step=2, max_steps=1000), control)
    torch.rand(50)   # 评估消耗随机数（数据加载器的种子、采样……）
    clock.on_evaluate(None, state, control)
    assert torch.equal(torch.rand(3), expected)


def test_kept_step_reads_best_checkpoint_and_history():
    from common import train

    log = [{"eval_loss": 3.0, "step": 0}, {"loss": 2.5, "step": 1}, {"eval_loss": 2.0, "step": 5},
           {"eval_loss": 2.2, "step": 10}, {"eval_loss": 2.0001, "step": 10}]   # 最后一条：训练后又评估了一次
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=log, best_model_checkpoint="/x/checkpoint-5",
                                                    global_step=10, max_steps=20),
                              callback_handler=SimpleNamespace(callbacks=[]))
    k = train.kept_step(trainer)
    assert k["kept_step"] == 5 and k["steps"] == 10 and k["eval_history"] == [[5, 2.0], [10, 2.2]]
    assert k["stopped_early"] and not k["time_budget_hit"]
    trainer.state.best_model_checkpoint = None   # 没有评估 / 检查点：保留的就是最后一步
    assert train.kept_step(trainer)["kept_step"] == 10


def test_kept_metrics_reads_the_logged_evaluation_instead_of_evaluating_again():
    """保留那一步训练中评估过：直接读那次记录（同样的 eval_* 键），evaluate() 一次都不调；没评估过才真的评估。"""
    from common import train

    calls = []
    log = [{"eval_loss": 3.0, "step": 0}, {"eval_loss": 2.0, "eval_rewards/accuracies": 0.75, "eval_runtime": 1.5,
                                           "epoch": 0.5, "step": 5}, {"loss": 1.9, "step": 6}]
    trainer = SimpleNamespace(state=SimpleNamespace(log_history=log, best_model_checkpoint="/x/checkpoint-5",
                                                    global_step=10, max_steps=10),
                              callback_handler=SimpleNamespace(callbacks=[]),
                              evaluate=lambda: calls.append(1) or {"eval_loss": 9.9})
    assert train.kept_metrics(trainer) == {"eval_loss": 2.0, "eval_rewards/accuracies": 0.75, "eval_runtime": 1.5,
                                           "epoch": 0.5}
    assert not calls
    trainer.state.best_model_checkpoint = None        # 保留最后一步（第 10 步），而它没评估过：只能评估
    assert train.kept_metrics(trainer) == {"eval_loss": 9.9} and calls == [1]
