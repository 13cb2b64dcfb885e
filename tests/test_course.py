"""course.py：能发现并运行脚本、失败时退出码非 0、生成自包含的 HTML 报告；运行过程中不联网；不写仓库的 outputs/。"""
import json
import os
import subprocess
import sys
import time

import pytest

import course
from tests.conftest import REPO


@pytest.mark.slow   # 子进程里真的跑一个脚本
def test_course_runs_selected_scripts_offline(tmp_path, tiny_models):
    # netguard 拦截联网；REPO 放进 PYTHONPATH：子进程里的 common 必须是这份代码（而不是别处 pip install -e 的那份）
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "netguard"), str(REPO)]),
           "NETGUARD_LOG": str(tmp_path / "net.log")}
    outputs = tmp_path / "outputs"
    # 只挑一个最快的脚本跑一遍 course.py --smoke（全部脚本各自的冒烟测试在 test_lessonN_* 里）
    p = subprocess.run([sys.executable, "course.py", "--smoke", "--only", "01_sft_basics", "--outputs", str(outputs)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # 脚本自己的输出目录（common.run.default_output_dir）也跟着 --outputs 走
    metrics = outputs / "lesson1_sft" / "01_sft_basics" / "metrics.json"
    assert metrics.is_file() and (outputs / "logs").is_dir()
    html = (outputs / "report.html").read_text(encoding="utf-8")
    assert "LLM 课程运行报告" in html and "1 通过" in html
    assert "assistant_only_eval_loss" in html and "data:image/png;base64" in html
    assert not (tmp_path / "net.log").exists(), (tmp_path / "net.log").read_text()


def test_course_reports_failure(tmp_path, monkeypatch):
    bad = tmp_path / "lesson9_demo" / "01_fail"
    bad.mkdir(parents=True)
    (bad / "fail.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n", encoding="utf-8")
    monkeypatch.setattr(course, "REPO", tmp_path)
    assert course.main(["--smoke", "--outputs", str(tmp_path / "outputs")]) == 1
    html = (tmp_path / "outputs" / "report.html").read_text(encoding="utf-8")
    assert "失败 (3)" in html and "boom" in html


def test_smoke_runs_scripts_side_by_side_and_reports_in_course_order(tmp_path, monkeypatch):
    """冒烟模式两个脚本并排跑（每个 1 线程）：两个各睡 1.5 秒的脚本共用时 < 2.5 秒；报告仍按课程顺序。"""
    for name in ("01_a", "02_b"):
        d = tmp_path / "lesson9_demo" / name
        d.mkdir(parents=True)
        (d / "s.py").write_text(f"import time\ntime.sleep(1.5)\nprint('{name} done')\n", encoding="utf-8")
    monkeypatch.setattr(course, "REPO", tmp_path)
    t0 = time.perf_counter()
    assert course.main(["--smoke", "--jobs", "2", "--outputs", str(tmp_path / "outputs")]) == 0
    assert time.perf_counter() - t0 < 2.5
    html = (tmp_path / "outputs" / "report.html").read_text(encoding="utf-8")
    assert html.index("01_a") < html.index("02_b")
    with pytest.raises(SystemExit):   # 记录 / 比较墙钟的运行不能并排
        course.main(["--smoke", "--jobs", "2", "--record", str(tmp_path / "ref")])


def test_course_with_no_matching_scripts_still_runs(tmp_path):
    assert course.main(["--only", "does-not-exist-anywhere", "--report-only", "--outputs", str(tmp_path)]) == 0
    assert "还没有课程脚本" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_out_dir_is_the_scripts_own_default():
    from common import run

    for s in course.discover()[:3]:
        assert course.out_dir_of(s) == run.default_output_dir(s)


_FAKE = '''import json, os, pathlib, time
time.sleep(0.3)   # 墙钟要比 course.py 记录的精度（0.1 秒）长，"慢了 2.5 倍"才量得出来
out = pathlib.Path(os.environ["LLM_COURSE_OUTPUTS"]) / "lesson9_demo" / "01_claim"
out.mkdir(parents=True, exist_ok=True)
row = {"statement": "训练后损失更低", "expr": "after / before", "op": "<=", "threshold": 0.9, "value": 0.95,
       "held": False}
(out / "metrics.json").write_text(json.dumps({"mode": "smoke", "model": "fake", "claims": [row]}))
print("done")
'''


def _fake_course(tmp_path, monkeypatch):
    d = tmp_path / "lesson9_demo" / "01_claim"
    d.mkdir(parents=True)
    (d / "claim.py").write_text(_FAKE, encoding="utf-8")
    monkeypatch.setattr(course, "REPO", tmp_path)
    return tmp_path / "outputs", tmp_path / "ref"


def test_strict_fails_on_a_claim_that_does_not_hold(tmp_path, monkeypatch):
    outputs, _ = _fake_course(tmp_path, monkeypatch)
    assert course.main(["--smoke", "--outputs", str(outputs)]) == 0          # 结论不成立不是崩溃
    assert course.main(["--smoke", "--strict", "--outputs", str(outputs)]) == 1
    html = (outputs / "report.html").read_text(encoding="utf-8")
    assert "训练后损失更低" in html and "✗" in html


def test_compare_flags_a_planted_regression(tmp_path, monkeypatch, capsys):
    outputs, ref = _fake_course(tmp_path, monkeypatch)
    assert course.main(["--smoke", "--outputs", str(outputs), "--record", str(ref)]) == 0
    rec_file = ref / "lesson9_demo" / "01_claim" / "claim.json"
    rec = json.loads(rec_file.read_text(encoding="utf-8"))
    assert rec["claims"][0]["held"] is False and rec["peak_rss_mb"] > 0 and rec["script_sha"]
    # 同一份结果与自己的记录比：什么都不报
    same = [{**rec, "metrics": {}, "claims_failed": 1}]
    assert course.compare(same, ref) == []
    # 种下退步：参考里这条结论成立、墙钟只有这次的 1/2.5
    rec["claims"][0]["held"] = True
    rec["seconds"] = rec["seconds"] / 2.5
    rec_file.write_text(json.dumps(rec), encoding="utf-8")
    capsys.readouterr()
    assert course.main(["--smoke", "--outputs", str(outputs), "--compare", str(ref)]) == 1
    out = capsys.readouterr().out
    assert "结论翻转 ✓→✗" in out and "墙钟" in out


def test_record_is_skipped_when_the_script_did_not_change(tmp_path, monkeypatch, capsys):
    outputs, ref = _fake_course(tmp_path, monkeypatch)
    course.main(["--smoke", "--outputs", str(outputs), "--record", str(ref)])
    rec = json.loads((ref / "lesson9_demo" / "01_claim" / "claim.json").read_text(encoding="utf-8"))
    rec["ok"] = True
    (ref / "lesson9_demo" / "01_claim" / "claim.json").write_text(json.dumps(rec), encoding="utf-8")
    capsys.readouterr()
    course.main(["--smoke", "--outputs", str(outputs), "--record", str(ref)])
    assert "已记录" in capsys.readouterr().out
    rel = "lesson9_demo/01_claim/claim.py"
    assert "待重录" not in course.render_block("script", ref, rel)
    script = tmp_path / "lesson9_demo" / "01_claim" / "claim.py"
    # 只改注释、文档字符串与排版：行为没变，记录照样算数
    script.write_text('"""新的说明。"""\n' + _FAKE.replace("\n", "  # 一条注释\n", 1) + "\n\n# 解释为什么\n",
                      encoding="utf-8")
    assert "待重录" not in course.render_block("script", ref, rel)
    script.write_text(_FAKE + "X = 1\n", encoding="utf-8")
    # 记录之后代码改过：生成块照实标出"待重录"，直到重录
    assert "待重录" in course.render_block("script", ref, rel)
    course.main(["--smoke", "--outputs", str(outputs), "--record", str(ref)])
    assert "已记录" not in capsys.readouterr().out


def test_readme_blocks_are_generated_from_results():
    """README 与各课 README 里的测量块必须就是 results/ 生成的样子（改了结果没跑 --readme 就失败）。"""
    assert course.rewrite_readmes(check=True) == [], "运行 python course.py --readme"
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "<!-- results:course -->" in text


def test_device_cuda_without_cuda_is_one_line_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(course, "_cuda_available", lambda: False)
    assert course.main(["--smoke", "--device", "cuda", "--only", "does-not-exist-anywhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err and "CUDA" in err


def test_device_is_passed_on_and_a_missing_library_is_a_skip_not_a_failure(tmp_path, monkeypatch, capsys):
    topic = tmp_path / "lesson9_demo" / "01_gpu"
    topic.mkdir(parents=True)
    # 一个脚本确认自己收到了 --device cuda；另一个在 GPU 机器上缺库（如那里没装 trl）
    (topic / "a_ok.py").write_text(
        "import sys\nassert '--device' not in sys.argv or sys.argv[-2:] == ['--device', 'cuda']\n", encoding="utf-8")
    (topic / "b_missing.py").write_text("import no_such_lib_xyz  # noqa\n", encoding="utf-8")
    monkeypatch.setattr(course, "REPO", tmp_path)
    monkeypatch.setattr(course, "_cuda_available", lambda: True)
    assert course.main(["--smoke", "--device", "cuda", "--outputs", str(tmp_path / "outputs")]) == 0
    out = capsys.readouterr().out
    assert "b_missing.py: 跳过，这台机器没装 no_such_lib_xyz" in out and "1/1 通过" in out
    # 不带 --device 时缺库照常是失败：CPU 上的行为不变
    assert course.main(["--smoke", "--outputs", str(tmp_path / "outputs")]) == 1


def test_device_run_is_never_recorded_as_the_cpu_reference():
    with pytest.raises(SystemExit) as e:
        course.main(["--full", "--device", "cuda", "--record", str(course.REFERENCE)])
    assert e.value.code == 2


def test_scripts_over_the_laptop_limits_are_listed_with_the_reason(tmp_path):
    assert "都在 10 分钟、8 GB 以内" in course.render_block("over", tmp_path)
    rel = "lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py"
    course.record_path(tmp_path, rel).parent.mkdir(parents=True)
    course.record_path(tmp_path, rel).write_text(json.dumps({"seconds": 300, "peak_rss_mb": 11 * 1024}),
                                                 encoding="utf-8")
    block = course.render_block("over", tmp_path)
    assert rel in block and "超过 8 GB" in block and "超过 10 分钟" not in block and "四份权重" in block


def test_efficiency_table_divides_the_same_runs_numbers_and_checks_the_goal(tmp_path):
    rel = "lesson1_sft/05_lora_finetune/lora_chatglm_demo.py"
    assert "| 未记录 | ≥ 2 | — |" in course.render_block("efficiency", tmp_path)
    course.record_path(tmp_path, rel).parent.mkdir(parents=True)
    metrics = {"eval_tokens_per_s": 150.0, "train_tokens_per_s": 50.0, "eval_seconds": 30.0, "train_seconds": 100.0}
    course.record_path(tmp_path, rel).write_text(json.dumps({"metrics": metrics}), encoding="utf-8")
    block = course.render_block("efficiency", tmp_path)
    # 评估 3 倍于训练（≥ 2 ✓），评估时间 0.3 倍（≤ 0.1 ✗）
    assert "| 3 | ≥ 2 | ✓ |" in block and "| 0.3 | ≤ 0.1 | ✗ |" in block
