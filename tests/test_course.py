"""course.py：能发现并运行脚本、失败时退出码非 0、生成自包含的 HTML 报告；运行过程中不联网。"""
import os
import subprocess
import sys

import course
from tests.conftest import REPO


def test_course_runs_selected_scripts_offline(tmp_path, tiny_models):
    scripts = course.discover()
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "netguard"), "NETGUARD_LOG": str(tmp_path / "net.log")}
    # 只挑一个最快的脚本跑一遍 course.py --smoke（全部脚本各自的冒烟测试在 test_lessonN_* 里）
    pick = "01_sft_basics" if any("01_sft_basics" in str(s) for s in scripts) else "no-script-yet"
    p = subprocess.run([sys.executable, "course.py", "--smoke", "--only", pick], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    html = (REPO / "outputs" / "report.html").read_text(encoding="utf-8")
    assert "LLM 课程运行报告" in html
    if pick != "no-script-yet":
        assert "metrics.json" not in html or "data:image/png;base64" in html
        assert "assistant_only_eval_loss" in html
    assert not (tmp_path / "net.log").exists(), (tmp_path / "net.log").read_text()


def test_course_reports_failure(tmp_path, monkeypatch):
    bad = tmp_path / "lesson9_demo" / "01_fail"
    bad.mkdir(parents=True)
    (bad / "fail.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n", encoding="utf-8")
    monkeypatch.setattr(course, "REPO", tmp_path)
    monkeypatch.setattr(course, "OUTPUTS", tmp_path / "outputs")
    assert course.main(["--smoke"]) == 1
    html = (tmp_path / "outputs" / "report.html").read_text(encoding="utf-8")
    assert "失败 (3)" in html and "boom" in html


def test_course_with_no_matching_scripts_still_runs():
    assert course.main(["--only", "does-not-exist-anywhere", "--report-only"]) == 0
