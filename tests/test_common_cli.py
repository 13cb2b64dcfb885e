"""common.cli / common.run：YAML 配置优先级、未知键被拒、用户错误 => 一行 + 退出码 2。"""
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from common import cli, run
from common.errors import UserError


@dataclass
class DemoArgs(cli.CommonArgs):
    steps: int = cli.arg(10, "步数")
    lr: float = cli.arg(1e-3, "学习率")


def test_yaml_then_cli_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 50\nlr: 0.01\n", encoding="utf-8")
    a = cli.parse(DemoArgs, ["--config", str(cfg), "--steps", "7"])
    assert (a.steps, a.lr) == (7, 0.01)
    assert a.resolved_model() == "smollm2-135m"
    assert cli.parse(DemoArgs, ["--smoke"]).resolved_model() == "tiny-qwen2"


def test_unknown_yaml_key_rejected(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 5\nlearning_rat: 1\n", encoding="utf-8")
    with pytest.raises(UserError, match="learning_rat"):
        cli._load_config(DemoArgs, str(cfg))


SCRIPT = textwrap.dedent('''
    from dataclasses import dataclass
    from common import cli, data, run

    @dataclass
    class Args(cli.CommonArgs):
        pass

    def main(args):
        out = run.start(__file__, args)
        recs = data.load_sft(args.data)
        return out.finish({"n": len(recs)})

    if __name__ == "__main__":
        main(cli.parse(Args))
''')


def _script(tmp_path):
    s = tmp_path / "demo.py"
    s.write_text(SCRIPT, encoding="utf-8")
    return s


def _run(tmp_path, *argv):
    return subprocess.run([sys.executable, str(_script(tmp_path)), "--output-dir", str(tmp_path / "o"), *argv],
                          capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    p = _run(tmp_path, "--data", str(bad))
    assert p.returncode == 2
    assert f"{bad}:2:" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _run(tmp_path, "--data", str(bad), "--report-to", "comet")
    assert p.returncode == 2 and "--report-to" in p.stderr and "comet" in p.stderr
    p = _run(tmp_path, "--data", str(bad), "--config", str(tmp_path / "none.yaml"))
    assert p.returncode == 2 and "none.yaml" in p.stderr
    p = _run(tmp_path, "--no-such-flag")
    assert p.returncode == 2


def test_good_run_writes_metrics(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    p = _run(tmp_path, "--data", str(good))
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["n"] == 1 and m["mode"] == "default" and "seconds" in m
    assert (tmp_path / "o" / "argv.txt").exists() and (tmp_path / "o" / "config.json").exists()
    assert p.stdout.strip().splitlines()[-1].startswith("[demo]")


def test_default_output_dir_follows_script_location():
    d = run.default_output_dir(run.REPO_ROOT / "lesson1_sft" / "05_lora_finetune" / "x.py")
    assert d == run.REPO_ROOT / "outputs" / "lesson1_sft" / "05_lora_finetune"


def test_with_smoke_keeps_user_choices_and_threads_restore(tmp_path):
    import torch

    from common import run

    @dataclass
    class A(cli.CommonArgs):
        steps: int = cli.arg(100, "步数")
        lr: float = cli.arg(1e-4, "学习率")

    a = cli.with_smoke(A(smoke=True, lr=5e-3), {"steps": 5, "lr": 1e-2})
    assert (a.steps, a.lr) == (5, 5e-3)                      # 用户写了 --lr 就保留
    assert cli.with_smoke(A(), {"steps": 5}).steps == 100     # 不是冒烟就不动
    before = torch.get_num_threads()
    out = run.start(str(tmp_path / "demo.py"), A(smoke=True, output_dir=str(tmp_path)), smoke_threads=1)
    assert torch.get_num_threads() == 1
    out.finish({"x": 1})
    assert torch.get_num_threads() == before


def test_with_smoke_replaces_list_defaults():
    @dataclass
    class B(cli.CommonArgs):
        sizes: list[int] = cli.arg([1, 2, 4], "批大小")

    assert cli.with_smoke(B(smoke=True), {"sizes": [1]}).sizes == [1]
    assert cli.with_smoke(B(smoke=True, sizes=[8]), {"sizes": [1]}).sizes == [8]


@dataclass
class Bounded(cli.CommonArgs):
    steps: int = cli.arg(10, "步数", min=1)
    frac: float = cli.arg(0.1, "比例", min=0, max=1)
    ks: list[int] = cli.arg([1, 5], "k 列表", min=1)
    name: str = cli.arg(None, "可空的名字")
    flag: bool = cli.arg(False, "开关")


@pytest.mark.parametrize("kw, needle", [({"steps": 0}, "--steps 0"), ({"frac": 1.5}, "--frac 1.5"),
                                        ({"frac": float("nan")}, "--frac nan"), ({"ks": [5, -5]}, "--ks -5"),
                                        ({"report_to": "comet"}, "--report-to comet"), ({"device": "tpu"}, "--device")])
def test_validate_names_the_flag(kw, needle):
    with pytest.raises(UserError) as e:
        cli.validate(Bounded(**kw))
    assert needle in str(e.value)
    assert cli.validate(Bounded(steps=1, frac=0.0, ks=[1])).steps == 1      # 边界本身合法（闭区间）


def test_parse_rejects_out_of_range_flags(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(Bounded, ["--steps", "-3"])
    assert e.value.code == 2 and "--steps -3" in capsys.readouterr().err


@pytest.mark.parametrize("text, needle", [
    ("steps: [1, 2]\n", "键 steps"),                 # 列表给了整数参数
    ("steps: {a: 1}\n", "键 steps"),                 # 映射
    ("frac: null\n", "键 frac"),                     # 不可为空
    ("frac: abc\n", "键 frac"),
    ("steps: 2.5\n", "键 steps"),
    ("steps: 0\n", "键 steps 0"),                    # 范围：与命令行同一套检查
    ("frac: .nan\n", "键 frac"),
    ("flag: maybe\n", "键 flag"),
    ("ks: [1, x]\n", "键 ks"),
])
def test_yaml_values_get_cli_types_and_ranges(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as e:
        cli._load_config(Bounded, str(cfg))
    assert f"{cfg}: " in str(e.value) and needle in str(e.value)


def test_yaml_values_are_converted_like_the_cli(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    # PyYAML 把 1e-1 读成字符串（YAML 1.1 要求有小数点），命令行的 --frac 1e-1 却是数：两边结果应一样
    cfg.write_text("frac: 1e-1\nsteps: '7'\nks: 3\nname: 123\nflag: yes\n", encoding="utf-8")
    a = cli._load_config(Bounded, str(cfg))
    assert (a.frac, a.steps, a.ks, a.name, a.flag) == (0.1, 7, [3], "123", True)
    b = cli.parse(Bounded, ["--config", str(cfg), "--steps", "9"])
    assert (b.frac, b.steps, b.ks) == (0.1, 9, [3])
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2]\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        cli.parse(Bounded, ["--config", str(bad)])
    assert e.value.code == 2 and f"{bad}: 键 steps" in capsys.readouterr().err


def test_non_utf8_config_is_one_line_error(tmp_path):
    cfg = tmp_path / "gbk.yaml"
    cfg.write_bytes("steps: 5  # 步数\n".encode("gbk"))
    p = _run(tmp_path, "--config", str(cfg))
    assert p.returncode == 2 and "Traceback" not in p.stderr and "UTF-8" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_output_dir_that_is_a_file_or_uncreatable(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    for bad in (f, f / "sub"):
        with pytest.raises(UserError, match="--output-dir"):
            run.start(str(tmp_path / "demo.py"), Bounded(output_dir=str(bad)))
    good = tmp_path / "data.jsonl"
    good.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    p = subprocess.run([sys.executable, str(_script(tmp_path)), "--output-dir", str(f), "--data", str(good)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--output-dir" in p.stderr and "Traceback" not in p.stderr


def test_metrics_json_never_holds_nan(tmp_path):
    """NaN / inf 换成 null（标准 JSON 没有 NaN），并在日志里点名；其余指标照常写出。"""
    out = run.start(str(tmp_path / "demo.py"), Bounded(output_dir=str(tmp_path)))
    m = out.finish({"loss": float("nan"), "nested": {"ppl": float("inf"), "ok": 1.5}, "curve": [1.0, float("-inf")]})
    assert m["loss"] is None and m["nested"] == {"ppl": None, "ok": 1.5} and m["curve"] == [1.0, None]
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["nested"]["ok"] == 1.5


def test_description_comes_from_the_args_module(capsys):
    import types

    mod = types.ModuleType("fake_lesson_script")
    mod.__doc__ = "假的课程脚本：运行说明在这里。"
    sys.modules[mod.__name__] = mod
    try:
        A = type("A", (Bounded,), {"__module__": mod.__name__})
        with pytest.raises(SystemExit):
            cli.parse(dataclass(A), ["--help"])
        assert "运行说明在这里" in capsys.readouterr().out
    finally:
        del sys.modules[mod.__name__]
