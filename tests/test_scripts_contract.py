"""每个课程脚本都守同一份约定（CONTRIBUTING.md）：--help 显示文档、坏参数退出码 2 不带 traceback、
声明的取值范围真的被检查、--smoke 只经过 SMOKE + cli.with_smoke、config.json 记下的就是实际运行的参数、
脚本不超过 300 行、只 import common 不 import 别的课、YAML 配置都能解析。

为了 CI 的时间，--help 与坏参数在进程内用 cli.parse 检查（每个脚本启动子进程要几秒）；
只留一个真实子进程的样本，证明进程内的结论和学生在命令行上看到的一样。
"""
import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest

import course
from common import cli, retrieval, run, safety
from tests.conftest import REPO, assert_user_error, load_script

SCRIPTS = [s.relative_to(REPO).as_posix() for s in course.discover()]
CONFIGS = sorted((REPO / "configs").glob("lesson*/*.yaml"))
MAX_LINES = 300


def _tree(rel: str) -> ast.Module:
    return ast.parse((REPO / rel).read_text(encoding="utf-8"), rel)


def _parse_exit(mod, argv: list[str], capsys) -> tuple[int, str, str]:
    """进程内跑 cli.parse（就是 `python 脚本 argv` 做的事），返回 (退出码, stdout, stderr)。"""
    with pytest.raises(SystemExit) as e:
        cli.parse(mod.Args, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_every_script_listed_in_readme():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = [s for s in SCRIPTS if s not in readme]
    assert not missing, f"README.md 没有列出：{missing}"
    listed = [w.strip("`|() ") for w in readme.split() if w.strip("`|() ").startswith("lesson") and
              w.strip("`|() ").endswith(".py")]
    assert all((REPO / w).exists() for w in listed), "README 列出的脚本必须存在"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_help_and_bad_flags(rel, capsys):
    mod = load_script(rel)
    code, out, _ = _parse_exit(mod, ["--help"], capsys)
    assert code == 0 and "--smoke" in out and "运行" in out        # 说明 = 脚本的模块文档
    code, _, err = _parse_exit(mod, ["--smoke", "--report-to", "comet"], capsys)
    assert code == 2 and "--report-to" in err
    # 每个声明了范围的数值参数：越界一格就退出码 2，错误点名这个参数
    for f in dataclasses.fields(mod.Args):
        for bound, step in (("min", -1), ("max", 1)):
            if bound not in f.metadata:
                continue
            flag, bad = cli._flag_name(f.name), f.metadata[bound] + step
            code, _, err = _parse_exit(mod, [flag, str(bad)], capsys)
            assert code == 2 and flag in err, (flag, bad, err)


def test_help_and_bad_flag_in_a_real_process(run_script):
    """样本：真实子进程里的 --help 与坏参数，和进程内检查的结论一致。"""
    rel = SCRIPTS[0]
    p = run_script(rel, "--help", timeout=600)
    assert p.returncode == 0 and "--smoke" in p.stdout and "运行" in p.stdout
    assert_user_error(run_script(rel, "--smoke", "--report-to", "comet", timeout=600), "--report-to")


@pytest.mark.parametrize("rel", SCRIPTS)
def test_smoke_only_through_with_smoke(rel):
    """--smoke 只有一种做法：模块级 SMOKE + main 开头的 cli.with_smoke；之后没人再读 args.smoke、改 args。"""
    tree = _tree(rel)
    reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "smoke"]
    assert not reads, f"{rel}:{reads[0]}: 读了 .smoke；冒烟规模写进 SMOKE，由 cli.with_smoke 统一替换"
    writes = [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
              for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
              if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "args"]
    assert not writes, f"{rel}:{writes[0]}: 改了 args 的字段；config.json 就不再等于实际运行的参数"
    assert any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "SMOKE" for t in n.targets)
               for n in tree.body), f"{rel}: 缺少模块级 SMOKE = dict(...)"
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    body = [s for s in main.body if not isinstance(s, (ast.Import, ast.ImportFrom)) and
            not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    assert "cli.with_smoke(args, SMOKE)" in ast.unparse(body[0]), f"{rel}: main 的第一步应是 cli.with_smoke"
    assert "run.start(" in ast.unparse(body[1]), f"{rel}: with_smoke 之后紧接着 run.start"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_smoke_config_json_is_what_runs(rel, tmp_path, monkeypatch):
    """冒烟运行的 config.json = 实际交给 main 后续步骤的参数 = Args(smoke=True) 经 SMOKE 替换的结果。
    只跑到 run.start 为止（之后抛出哨兵异常），所以每个脚本不到一秒。"""
    mod = load_script(rel)
    seen, real_init = {}, run.Run.__init__

    class Stop(Exception):
        pass

    def spy(self, script, args, smoke_threads=None):
        real_init(self, script, args, smoke_threads)
        seen["args"] = args
        if self._threads:   # 不让冒烟的单线程设置漏到同一进程里的其它测试
            import torch

            torch.set_num_threads(self._threads)
        raise Stop

    monkeypatch.setattr(run.Run, "__init__", spy)
    with pytest.raises(Stop):
        mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    expected = cli.with_smoke(mod.Args(smoke=True, output_dir=str(tmp_path)), mod.SMOKE)
    assert seen["args"] == expected
    saved = json.loads((tmp_path / "config.json").read_text(encoding="utf-8"))
    # 秘密字段（api_key 等）在 config.json 里是 ***（common.safety），其余与实际参数逐项相同
    assert saved == json.loads(json.dumps(safety.redacted_config(expected), default=str))
    assert all(saved[k] == v for k, v in mod.SMOKE.items()), "SMOKE 里的值没有进 config.json"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_script_shape(rel):
    """模块文档与整行注释之外 ≤ 300 行；只 import 标准库、第三方库与 common（课与课之间不互相 import）。

    模块文档不计：它是学生读的第一页（推导、运行方式）和 course.py --readme 生成的参考运行结论，每条结论一行。
    整行注释不计：说"为什么"的注释是学生读代码时最需要的，行数上限不该逼人删它们（issue 20：注释 ≥ 15%）。
    """
    tree = _tree(rel)
    doc = tree.body[0] if tree.body and isinstance(tree.body[0], ast.Expr) else None
    body = (REPO / rel).read_text(encoding="utf-8").splitlines()[doc.end_lineno if doc else 0:]
    lines = sum(not ln.lstrip().startswith("#") for ln in body)
    assert lines <= MAX_LINES, f"{rel}: {lines} 行 > {MAX_LINES}；按步骤拆成具名函数，共用机械放进 common/"
    for n in ast.walk(tree):
        names = [a.name for a in n.names] if isinstance(n, ast.Import) else \
            [n.module or ""] if isinstance(n, ast.ImportFrom) else []
        bad = [m for m in names if m.startswith(("lesson", "tests"))]
        assert not bad, f"{rel}:{n.lineno}: 不要 import 别的课或测试"


@pytest.mark.parametrize("rel", [s for s in SCRIPTS if issubclass(load_script(s).Args, retrieval.KBArgs)])
def test_rag_scripts_refuse_data(rel, capsys):
    """检索脚本的数据分两份（--docs / --qa）：--data 一行报错并提示该用什么。"""
    code, _, err = _parse_exit(load_script(rel), ["--data", "qa.jsonl"], capsys)
    assert code == 2 and "--data" in err and "--docs" in err and "--qa" in err


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_yaml_config_parses(cfg: Path):
    """configs/<lesson>/<script>.yaml 的键必须都是该脚本 Args 的字段，值的类型与范围也要对。"""
    stem = cfg.stem
    matches = [s for s in SCRIPTS if Path(s).stem == stem or stem.startswith(Path(s).stem)]
    assert matches, f"{cfg} 找不到对应的脚本（文件名应以脚本名开头）"
    mod = load_script(matches[0])
    mod.Args(**cli._yaml_defaults(str(cfg), mod.Args))


# 训练或检索脚本至少声明 3 条结论（issue 21）：看源码里有没有训练循环 / Trainer / 检索
_TRAINS_OR_RETRIEVES = ("Trainer(", ".backward(", "retrieval.", "BM25", "faiss")


@pytest.mark.parametrize("rel", SCRIPTS)
def test_claims_declared(rel):
    """每个脚本把它教的效果写成 CLAIMS（run.Claim），交给 out.finish，且它的冒烟测试检查它们。"""
    mod = load_script(rel)
    text = (REPO / rel).read_text(encoding="utf-8")
    claims = getattr(mod, "CLAIMS", None)
    assert claims and all(isinstance(c, run.Claim) for c in claims), f"{rel}: 没有模块级 CLAIMS = [run.Claim(...)]"
    need = 3 if any(k in text for k in _TRAINS_OR_RETRIEVES) else 1
    assert len(claims) >= need, f"{rel}: 训练/检索脚本至少 {need} 条结论，现在 {len(claims)}"
    for c in claims:
        assert c.op in run._OPS and c.statement.strip() and c.expr.strip(), c
        assert c.smoke is not None or c.default is not None, f"{rel}: {c.statement} 两个模式都不检查"
    assert "claims=CLAIMS" in text, f"{rel}: out.finish(..., claims=CLAIMS) 没有把结论交给 run"
    lesson, topic = Path(rel).parts[0], Path(rel).parts[1]
    tests = [t.read_text(encoding="utf-8") for t in (REPO / "tests").glob(f"test_lesson{lesson[6]}_{topic[:2]}_*.py")]
    assert any("assert_claims(" in t and Path(rel).stem in t for t in tests), \
        f"{rel}: 冒烟测试里没有 assert_claims(...)"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_docstring_numbers_come_from_the_reference_run(rel):
    """"你会看到"的实测数字由 course.py --readme 从 results/ 生成（<!-- results:script --> 块），不手写。

    块外不许出现"实测"及带单位的测量值（秒、分钟、GB、MB、tokens/s；"≤ 10 分钟"这样的上限可以）：
    手写的数字没人再核对，会悄悄过期。
    """
    doc = ast.get_docstring(ast.parse((REPO / rel).read_text(encoding="utf-8")), clean=False) or ""
    assert "<!-- results:script -->" in doc and "<!-- /results -->" in doc, \
        f"{rel}: 文档字符串里没有 <!-- results:script --> … <!-- /results --> 生成块（加上后运行 course.py --readme）"
    outside = re.sub(r"<!-- results:script -->.*?<!-- /results -->", "", doc, flags=re.S)
    typed = re.findall(r"实测|(?<![\d.,≤<])(?<![≤<] )\d[\d.,]*\s*(?:秒|分钟|GB|MB|tokens/s|token/s)", outside)
    assert not typed, f"{rel}: 生成块外有手写的测量值 {typed[:5]}：删掉，或写成 CLAIMS 由参考运行生成"


TOPIC_READMES = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("lesson[0-9]_*/[0-9][0-9]_*/README.md"))


@pytest.mark.parametrize("rel", TOPIC_READMES)
def test_topic_readme_numbers_come_from_the_reference_run(rel):
    """课题文件夹的 README：每个脚本一个 <!-- results:script:脚本名.py --> 生成块，块外没有手写的测量值。"""
    text = (REPO / rel).read_text(encoding="utf-8")
    for script in sorted((REPO / rel).parent.glob("*.py")):
        if not script.name.startswith(("_", "test")):
            assert f"<!-- results:script:{script.name} -->" in text, \
                f"{rel}: 缺 {script.name} 的生成块 <!-- results:script:{script.name} --> … <!-- /results -->"
    outside = re.sub(r"<!-- results:[^>]*-->.*?<!-- /results -->", "", text, flags=re.S)
    outside = re.sub(r"```.*?```", "", outside, flags=re.S)   # 代码块里是命令和参数，不是测量值
    typed = re.findall(r"实测|(?<![\d.,≤<])(?<![≤<] )\d[\d.,]*\s*(?:秒|分钟|GB|MB|tokens/s|token/s)", outside)
    assert not typed, f"{rel}: 生成块外有手写的测量值 {typed[:5]}：删掉，或写成脚本的 CLAIMS 由参考运行生成"
