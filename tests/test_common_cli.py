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
        cli.load_config(DemoArgs, str(cfg))


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


def _run(tmp_path, *argv):
    s = tmp_path / "demo.py"
    s.write_text(SCRIPT, encoding="utf-8")
    return subprocess.run([sys.executable, str(s), "--output-dir", str(tmp_path / "o"), *argv],
                          capture_output=True, text=True, timeout=120)


def test_user_error_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n', encoding="utf-8")
    p = _run(tmp_path, "--data", str(bad))
    assert p.returncode == 2
    assert f"{bad}:2:" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = _run(tmp_path, "--data", str(bad), "--report-to", "comet")
    assert p.returncode == 2 and "--report-to comet" in p.stderr
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
