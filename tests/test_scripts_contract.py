"""每个课程脚本都守同一份约定：--help 显示文档、坏参数退出码 2 不带 traceback、YAML 配置都能解析。"""
from pathlib import Path

import pytest

import course
from common import cli
from tests.conftest import REPO, load_script

SCRIPTS = [s.relative_to(REPO).as_posix() for s in course.discover()]
CONFIGS = sorted((REPO / "configs").glob("lesson*/*.yaml"))


def test_every_script_listed_in_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [s for s in SCRIPTS if s not in readme]
    assert not missing, f"README.md 没有列出：{missing}"
    listed = [w.strip("`|() ") for w in readme.split() if w.strip("`|() ").startswith("lesson") and
              w.strip("`|() ").endswith(".py")]
    assert all((REPO / w).exists() for w in listed), "README 列出的脚本必须存在"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_help_and_bad_flags(rel, run_script):
    p = run_script(rel, "--help", timeout=180)
    assert p.returncode == 0 and "--smoke" in p.stdout and "运行" in p.stdout
    p = run_script(rel, "--smoke", "--report-to", "comet", timeout=180)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--report-to" in p.stderr


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_yaml_config_parses(cfg: Path):
    """configs/<lesson>/<script>.yaml 的键必须都是该脚本 Args 的字段。"""
    stem = cfg.stem
    matches = [s for s in SCRIPTS if Path(s).stem == stem or stem.startswith(Path(s).stem)]
    assert matches, f"{cfg} 找不到对应的脚本（文件名应以脚本名开头）"
    mod = load_script(matches[0])
    cli.load_config(mod.Args, str(cfg))
