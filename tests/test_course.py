"""course.py：能发现并运行脚本、失败时退出码非 0、生成自包含的 HTML 报告；运行过程中不联网；不写仓库的 outputs/。"""
import os
import subprocess
import sys

import pytest

import course
from tests.conftest import REPO


@pytest.mark.slow   # 子进程里真的跑一个脚本
def test_course_runs_selected_scripts_offline(tmp_path, tiny_models):
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "netguard"), "NETGUARD_LOG": str(tmp_path / "net.log")}
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


def test_course_with_no_matching_scripts_still_runs(tmp_path):
    assert course.main(["--only", "does-not-exist-anywhere", "--report-only", "--outputs", str(tmp_path)]) == 0
    assert "还没有课程脚本" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_out_dir_is_the_scripts_own_default():
    from common import run

    for s in course.discover()[:3]:
        assert course.out_dir_of(s) == run.default_output_dir(s)
