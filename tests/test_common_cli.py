"""common.cli / common.run：YAML 配置优先级、未知键被拒、用户错误 => 一行 + 退出码 2。"""
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from common import cli, run
from common.errors import UserError
from tests.conftest import load_script


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
        DemoArgs(**cli._yaml_defaults(str(cfg), DemoArgs))


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



def test_smoke_threads_at_most_two_never_more_than_the_process_has(tmp_path):
    """冒烟至多 2 个线程，不多于进程本来的（并排跑的进程由 OMP_NUM_THREADS=1 起：仍是 1 个），结束时还原。"""
    import torch

    before = torch.get_num_threads()
    for have, want in ((4, 2), (2, 2), (1, 1)):
        torch.set_num_threads(have)
        out = run.start(str(tmp_path / "demo.py"), DemoArgs(smoke=True, output_dir=str(tmp_path)))
        assert torch.get_num_threads() == want, (have, want)
        out.finish({"x": 1})
        assert torch.get_num_threads() == have
    torch.set_num_threads(before)


def test_smoke_keeps_freed_heap_and_peak_memory_still_measures(tmp_path):
    """冒烟（run.start）让 glibc 留着释放的堆：反复分配同样大小的张量不再每次缺页；PeakMemory 照样量得到增量。
    在新进程里量：pytest worker 里先跑的测试留下的碎堆会让"用完即还"也复用驻留的页（CI 上缺页数只剩 1/30）。"""
    code = textwrap.dedent(f"""
        import resource
        import torch
        from common import run, train
        from tests.test_common_cli import DemoArgs

        def page_faults() -> int:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(30):
                torch.ones(2_000_000).sum()   # 8 MB：默认阈值下单独 mmap、用完 munmap，下次重新缺页
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

        train.release_memory()              # 量内存的模式：64 KB 以上的分配用完即还
        returned = page_faults()
        run.start("{tmp_path}/demo.py", DemoArgs(smoke=True, output_dir="{tmp_path}")).finish({{"x": 1}})
        kept = page_faults()
        assert kept * 5 < returned, (kept, returned)
        held = [torch.ones(5_000_000) for _ in range(12)]   # 240 MB 的 20 MB 块：留着堆时释放后仍驻留
        del held                            # （CI 上 PeakMemory 曾只量到 200 MB 里的 144 MB）
        with train.PeakMemory() as m:
            x = torch.ones(50_000_000)      # 200 MB：不先把空闲堆还给系统，会复用上面的页，增量量成 0.1 MB
            del x
        assert m.peak_mb > 150, m.peak_mb
        assert page_faults() * 5 < returned, returned   # 量完回到留着堆的快模式
        """)
    p = subprocess.run([sys.executable, "-c", code], cwd=run.REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


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
        Bounded(**cli._yaml_defaults(str(cfg), Bounded))
    assert f"{cfg}: " in str(e.value) and needle in str(e.value)


def test_yaml_values_are_converted_like_the_cli(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    # PyYAML 把 1e-1 读成字符串（YAML 1.1 要求有小数点），命令行的 --frac 1e-1 却是数：两边结果应一样
    cfg.write_text("frac: 1e-1\nsteps: '7'\nks: 3\nname: 123\nflag: yes\n", encoding="utf-8")
    a = Bounded(**cli._yaml_defaults(str(cfg), Bounded))
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


# ---------------------------------------------------------------- issue 22 第 1 项：尺寸上限、种子、学习率
@dataclass
class Capped(cli.CommonArgs):
    seq_len: int = cli.arg(256, "序列长度", min=8, max=4096, why="激活内存 ∝ 批 × 长度")
    sizes: list[int] = cli.arg([100], "规模", min=1, max=1000, why="每块一份向量")
    learning_rate: float = cli.arg(1e-3, "学习率")
    rerank_lr: float = cli.arg(1e-4, "重排器学习率")
    recipe_learning_rate: float = cli.arg(0.0, "0 = 用配方的", min=0)


@pytest.mark.parametrize("argv, needles", [
    (["--seq-len", "1000000000000"], ["--seq-len 1000000000000", "[8, 4096]", "激活内存"]),   # 值、范围、为什么
    (["--seq-len", "1e12"], ["--seq-len", "'1e12'", "[8, 4096]", "激活内存"]),     # 整数参数写成小数：也带范围
    (["--sizes", "10", "5000"], ["--sizes 5000", "[1, 1000]", "每块一份向量"]),     # 列表参数逐个元素
    (["--seed", "-1"], ["--seed -1", "[0, 4294967295]"]),                           # 不用声明：每个脚本都有
    (["--learning-rate", "0"], ["--learning-rate 0.0", "(0, +∞)"]),                 # 学习率不用声明：必须 > 0
    (["--learning-rate", "-0.5"], ["--learning-rate -0.5", "(0, +∞)"]),
    (["--rerank-lr", "0"], ["--rerank-lr 0.0", "(0, +∞)"]),                          # *_lr 也算学习率
    (["--learning-rate", "inf"], ["--learning-rate inf", "有限"]),
    (["--seq-len", "abc"], ["--seq-len", "'abc'", "[8, 4096]"]),                     # argparse 自己的错误也只一行
    (["--report-to", "comet"], ["--report-to", "comet"]),
])
def test_parse_rejects_out_of_range_in_one_line(argv, needles, capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(Capped, argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "usage" not in err
    assert len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_edges_and_declared_zero_are_accepted(tmp_path):
    a = cli.parse(Capped, ["--seq-len", "4096", "--sizes", "1", "1000", "--seed", "0", "--learning-rate", "1e-9",
                           "--recipe-learning-rate", "0"])
    assert (a.seq_len, a.sizes, a.seed, a.learning_rate, a.recipe_learning_rate) == (4096, [1, 1000], 0, 1e-9, 0.0)
    assert cli.parse(Capped, ["--seed", str(2**32 - 1)]).seed == 2**32 - 1
    with pytest.raises(UserError, match="--learning-rate 0: "):     # main(Args(...)) 直接调用：同一套检查
        cli.validate(Capped(learning_rate=0))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"键 learning_rate 0.0: 超出允许范围 \(0, \+∞\)"):
        Capped(**cli._yaml_defaults(str(cfg), Capped))


# 每个曾经因为没有上限而分配内存崩溃（或写出 NaN 结果）的参数：给 1e12 → 一行错误、退出码 2、什么都不写
HUGE = [("lesson2_qlora_ptuning/03_ptuning/ptuning_v2_demo.py", "--num-virtual-tokens"),
        ("lesson2_qlora_ptuning/01_qlora_intro/qlora_theory.py", "--seq-len"),
        ("lesson3_distributed/03_training_acceleration/acceleration_tricks.py", "--matmul-size"),
        ("lesson5_deployment_monitoring/06_diversity_debug/diversity_evaluation.py", "--num-samples"),
        ("lesson7_hybrid_rag/06_performance_testing/performance_benchmark.py", "--sizes"),
        ("lesson1_sft/01_sft_basics/sft_theory_notebook.py", "--learning-rate")]


@pytest.mark.parametrize("rel, flag", HUGE)
def test_huge_value_is_one_line_exit_2(rel, flag, run_script, tmp_path):
    mod = load_script(rel)
    name = flag[2:].replace("-", "_")
    meta = mod.Args.__dataclass_fields__[name].metadata
    assert meta.get("why") and meta["max"] < 1e12       # 上限写在 Args 里，并说明为什么（内存 / 发散）
    over = meta["max"] * 2
    with pytest.raises(UserError, match=re.escape(f"{flag} {over}: 超出允许范围")):   # 范围内的写法：点名值与范围
        cli.validate(mod.Args(**{name: [over] if isinstance(getattr(mod.Args(), name), list) else over}))
    p = run_script(rel, "--smoke", flag, "1e12", "--output-dir", str(tmp_path), timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and flag in p.stderr and str(meta["max"]) in p.stderr, p.stderr
    assert not (tmp_path / "metrics.json").exists()


def test_brief_is_one_line_even_when_the_library_says_nothing():
    """库异常的消息可能为空（不带文字的 assert）或以空行开头：原来的 str(e).splitlines()[0] 在前者抛 IndexError，
    在后者给出空原因。brief 给第一个非空行，为空时给类型名，并截断。"""
    from common.errors import brief

    assert brief(AssertionError()) == "AssertionError"
    assert brief(ValueError("\n   \n  vocab_size must be finite \nTraceback detail")) == "vocab_size must be finite"
    assert brief(OSError("x" * 500), 20) == "x" * 20
    assert brief("problem text") == "problem text"
