"""第 1 课 03：全参数 SFT 脚手架。验证损失下降、best 检查点可选、被杀后 --resume 与不中断的运行结果一致。"""
import json

import pytest

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson1_sft/03_hf_finetune/hf_finetune_scaffold.py"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_models, shared_smoke):
    """不中断的参照运行（--smoke：12 步，每 4 步评估 + 存检查点）。"""
    out = tmp_path_factory.mktemp("full")
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(out)))
    shared_smoke.share(SCRIPT, out)   # 可复现测试拿它当两次运行里的一次
    return m, out


def test_eval_loss_falls_and_best_checkpoint_kept(uninterrupted):
    m, out = uninterrupted
    saved = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_loss_before", "eval_loss_after", "train_tokens_per_s"):
        assert key in saved
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.02, m
    # 纯训练吞吐只计前向+反向+优化器的时间：比"已训练的 token / 整个运行的用时"（含加载、评估、存盘）高
    state = json.loads((out / m["best_checkpoint"] / "trainer_state.json").read_text(encoding="utf-8"))
    assert m["train_tokens_per_s"] > state["num_input_tokens_seen"] / m["seconds"], (m, state["num_input_tokens_seen"])
    assert m["best_checkpoint"] and m["best_eval_loss"] <= m["eval_loss_before"]
    assert (out / "best_model" / "config.json").is_file() and (out / "loss_curve.png").stat().st_size > 0
    assert_claims(saved)


@pytest.mark.slow   # 一次子进程训练 + 一次续训
def test_killed_then_resumed_matches_uninterrupted(uninterrupted, tmp_path, run_script):
    ref, _ = uninterrupted
    # 1. 第 4 步的检查点写完后进程硬退出（os._exit，像被 kill）：没有 metrics.json，只有检查点
    p = run_script(SCRIPT, "--smoke", "--stop-after-steps", "4", "--output-dir", str(tmp_path), timeout=300)
    assert p.returncode == 3, p.stderr[-3000:]
    assert (tmp_path / "checkpoint-4").is_dir() and not (tmp_path / "metrics.json").exists()
    # 2. --resume 从最后一个检查点接着跑：步数相同，最终损失与不中断的运行相差不到 1%
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path), resume=True))
    assert m["resumed_from"] == "checkpoint-4"
    assert m["global_step"] == ref["global_step"]
    assert m["train_loss_last"] == pytest.approx(ref["train_loss_last"], rel=0.01)
    assert m["eval_loss_after"] == pytest.approx(ref["eval_loss_after"], rel=0.01)


def test_resume_without_checkpoint_and_bad_data_are_one_line_errors(tmp_path, run_script):
    p = run_script(SCRIPT, "--smoke", "--resume", "--output-dir", str(tmp_path / "empty"), timeout=600)
    assert_user_error(p, "--resume")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
                   '{"messages": [}\n', encoding="utf-8")
    p = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=600)
    assert_user_error(p, f"{bad}:2")
