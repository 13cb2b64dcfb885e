"""可靠性 · 训练被 kill（issue 8 第 6 项）：任何时刻 SIGKILL，--resume 都能接着跑完，结果与没中断时一致。

第 1 课 03 的冒烟训练（12 步，每 4 步存一次检查点）在按种子抽出的时刻被 SIGKILL——启动中、训练中、
以及**保存检查点的半途**（轮询到 tmp-checkpoint-N 出现后再等几毫秒）——每次杀掉后用 --resume 接着跑，
最后一次不杀。断言：最后的步数与不中断的运行相同，最终 eval_loss 相差 < 1%；至少有一次确实杀在保存途中。
另测：最后一个检查点的 model.safetensors 被截断时，--resume 跳过它、改用更早的完好检查点，并在日志里说明。
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from common import run
from tests._prefork import Forked
from tests.conftest import REPO, load_script

SCRIPT = "lesson1_sft/03_hf_finetune/hf_finetune_scaffold.py"
# 原子检查点只属于第 1 课 03：与脚本自己用的是同一个模块（import_sibling 按文件夹登记，只加载一次）
checkpoints = run.import_sibling(REPO / SCRIPT, "_checkpoint")
SEED = 20261202
KILLS = 7


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_models):
    """不中断的参照运行（--smoke：12 步，每 4 步评估 + 存检查点；留下全部 3 个检查点，截断测试要用到更早的那个）。"""
    out = tmp_path_factory.mktemp("ref")
    mod = load_script(SCRIPT)
    return mod.main(mod.Args(smoke=True, output_dir=str(out), save_total_limit=3)), out


def _spawn(out, resume: bool, log, launcher=None):
    """起一次训练（log：几次运行共用的日志文件，接在末尾写）。被杀的进程从 conftest 的预热启动器 fork 出来：每次省下
    5 秒导入，同样是一个能被 SIGKILL 的独立进程；没有启动器时起全新解释器。"""
    argv = [str(REPO / SCRIPT), "--smoke", "--output-dir", str(out)] + (["--resume"] if resume else [])
    forked = launcher and launcher.spawn(argv, cwd=str(out.parent), stdout=str(log), stderr=str(log), append=True)
    if forked:
        return forked
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, *argv], stdout=fh, stderr=subprocess.STDOUT, cwd=str(out.parent))


# 各种时刻从哪个时间窗里抽（秒）。"启动中"：新解释器先花约 5 秒导入 torch / transformers / peft，1–8 秒落在导入与
# 建模型之间；fork 出来的进程大库已导入，约 2.5 秒就存第一个检查点，0.2–2 秒才是它的启动阶段
WINDOWS = {"save": (0, 0.03), "train": (0, 3), "startup": (1, 8)}
FORKED_STARTUP = (0.2, 2)


def _staging(out) -> set[str]:
    return {p.name for p in out.glob("tmp-checkpoint-*")} if out.is_dir() else set()


def _published(out) -> set[str]:
    return {p.name for p in out.glob("checkpoint-*") if p.is_dir() and not p.is_symlink()} if out.is_dir() else set()


def _kill_at(proc, out, moment, deadline: float = 600) -> str:
    """按 moment（种类, 窗口里的位置 0–1）等到那一刻再 SIGKILL；返回实际杀在哪儿（'save' = 保存途中）或 'finished'。"""
    kind, u = moment
    lo, hi = FORKED_STARTUP if kind == "startup" and isinstance(proc, Forked) else WINDOWS[kind]
    delay = lo + (hi - lo) * u
    t0 = time.monotonic()
    seen_tmp, seen_pub = _staging(out), _published(out)
    while proc.poll() is None and time.monotonic() - t0 < deadline:
        if kind == "startup" and time.monotonic() - t0 >= delay:
            break
        if kind == "save" and _staging(out) - seen_tmp:
            time.sleep(delay)
            break
        if kind == "train" and _published(out) - seen_pub:
            time.sleep(delay)
            break
        time.sleep(0.001)
    if proc.poll() is not None:
        return "finished"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    inside = any(out.glob("tmp-checkpoint-*")) or any(p.is_symlink() for p in out.glob("checkpoint-*"))
    return "save" if inside else kind


@pytest.mark.slow
def test_sigkill_at_seeded_moments_then_resume_matches_uninterrupted(reference, tmp_path, launcher):
    ref, _ = reference
    rng = random.Random(SEED)
    # 按种子抽时刻：保存途中（等 0–30 ms）、刚存完后的训练/评估中（等 0–3 s）、启动阶段（见 WINDOWS）。
    # 机器快慢不同，有的时刻会落在运行结束之后（'finished'）：那就换一个新目录从头再来，直到真正杀中 KILLS 次
    kinds = ["save", "train", "save", "startup", "save", "train", "save"]
    out, where, log = tmp_path / "run0", [], tmp_path / "runs.log"
    for attempt in range(4 * KILLS):
        if sum(w != "finished" for w in where) >= KILLS - 2:   # 至少 5 次真正杀中
            break
        k = kinds[attempt % len(kinds)]
        moment = (k, rng.uniform(0, 1))
        # 有检查点（或保存到一半的临时目录）就 --resume，交给脚本自己收拾；一个完好的都没有时脚本报错退出 2，改为从头跑
        resume = bool(_published(out) or _staging(out))
        w = _kill_at(_spawn(out, resume, log, launcher), out, moment)
        if w == "finished" and resume and checkpoints.last_intact(out) is None:
            w = _kill_at(_spawn(out, False, log, launcher), out, moment)
        where.append(w)
        if w == "finished":   # 这一轮已经跑完：换新目录，后面的 kill 才有意义
            out = tmp_path / f"run{attempt + 1}"
    # 最后一次不杀：从最新的完好检查点续训到底
    resume = bool(_published(out) or _staging(out))
    p = _spawn(out, resume, log, launcher)
    rc = p.wait(timeout=600)
    if rc == 2 and resume and checkpoints.last_intact(out) is None:
        # 只剩保存到一半的临时目录：脚本清理后按约定报错退出 2（不是崩溃），学生照提示去掉 --resume 从头跑
        rc = _spawn(out, False, log, launcher).wait(timeout=600)
    assert rc == 0, log.read_text(errors="replace")[-3000:]
    m = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    print(f"\n{len(where)} 次尝试 SIGKILL：{where}；最终 step {m['global_step']}，eval_loss {m['eval_loss_after']} "
          f"vs 不中断 {ref['eval_loss_after']}（差 {abs(m['eval_loss_after'] / ref['eval_loss_after'] - 1):.3%}）")
    assert sum(w != "finished" for w in where) >= KILLS - 2, where
    assert "save" in where, f"没有一次杀在保存途中：{where}"
    assert m["global_step"] == ref["global_step"]
    assert m["eval_loss_after"] == pytest.approx(ref["eval_loss_after"], rel=0.01)


def test_truncated_last_checkpoint_is_skipped_for_the_previous_intact_one(reference, tmp_path, caplog):
    import shutil

    ref, ref_out = reference
    out = tmp_path / "run"
    shutil.copytree(ref_out, out, symlinks=True)
    (out / "metrics.json").unlink()
    steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert len(steps) >= 2, steps
    last = out / f"checkpoint-{steps[-1]}" / "model.safetensors"
    with open(last, "r+b") as f:             # 被 kill 在写权重半途时留下的样子
        f.truncate(last.stat().st_size // 2)
    assert "截断" in checkpoints.problem(last.parent)
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(out), resume=True))
    assert m["resumed_from"] == f"checkpoint-{steps[-2]}"
    assert m["global_step"] == ref["global_step"]
    assert m["eval_loss_after"] == pytest.approx(ref["eval_loss_after"], rel=0.01)
    assert (out / f"damaged-checkpoint-{steps[-1]}").is_dir()


def test_checkpoint_problems_are_named(tmp_path):
    d = tmp_path / "checkpoint-4"
    d.mkdir()
    assert "trainer_state.json" in checkpoints.problem(d)
    (d / "trainer_state.json").write_text('{"global_step": 4', encoding="utf-8")
    assert "不是合法 JSON" in checkpoints.problem(d)
    (d / "trainer_state.json").write_text('{"global_step": 8}', encoding="utf-8")
    assert "与目录名不符" in checkpoints.problem(d)
    (d / "trainer_state.json").write_text('{"global_step": 4}', encoding="utf-8")
    assert "safetensors" in checkpoints.problem(d)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.ones(64)}, d / "model.safetensors")
    assert checkpoints.problem(d) is None
    torch.save({"x": torch.ones(64)}, d / "optimizer.pt")
    assert checkpoints.problem(d) is None
    raw = (d / "optimizer.pt").read_bytes()
    (d / "optimizer.pt").write_bytes(raw[: len(raw) // 2])
    assert "optimizer.pt" in checkpoints.problem(d)
    os.remove(d / "optimizer.pt")
    # 半途被杀的保存：链接 + 不完整的临时目录 → 续训时删掉，回到完好的 checkpoint-4
    (tmp_path / "tmp-checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8").symlink_to("tmp-checkpoint-8")
    assert checkpoints.last_intact(tmp_path) == str(d)
    assert not (tmp_path / "checkpoint-8").exists() and not (tmp_path / "tmp-checkpoint-8").exists()
