"""可靠性 · 模糊测试（issue 8 第 8 项）：随机但可复现的坏输入，喂给每个脚本的每个数值参数和每个读文件的入口。

约定只有一条：坏输入 → 退出码 2、一行错误点名参数（`--max-steps`、`文件: 键`）或 `文件:行`、没有 traceback、不写结果。
生成器是 hypothesis（derandomize=True：同一份代码每次生成同一批用例，CI 失败能在本地原样重现）。
在进程内调用 cli.parse / main / common.data（不起子进程），几百个用例几十秒跑完。

第 8 节：路径参数登记表（由每个脚本的 Args 推出来，不手写）把 issue 22 列的坏文件（非 UTF-8、类型不对、缺字段、NaN、
一万层嵌套、FIFO、成环的符号链接、空文件、该是文件的地方是文件夹、大得溢出的数）喂给每个脚本的每个路径参数，
走脚本真正的入口（cli.parse + main，--smoke）；坏输入必须在加载任何模型、起任何子进程之前被拒绝。

用例数：默认几百个（CI 每次都跑）；标了 slow 的同一批测试各自放大到 ≥1000 个（第 8 节的 slow 组 ≥2000 个）。
环境变量 RELIABILITY_FUZZ_SCALE=N 把所有数量再乘 N（本地想多找一会儿 bug 时用）。
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import re
import shutil
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from common import cli, data
from common.errors import UserError
from tests.conftest import REPO, load_script

SCALE = int(os.environ.get("RELIABILITY_FUZZ_SCALE", "1") or 1)
SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("lesson[0-9]_*/[0-9][0-9]_*/*.py")
                 if not p.name.startswith(("_", "test")))
CASES: Counter = Counter()      # 每类实际跑了多少个用例（报告里的数字从这里来）


@pytest.fixture(scope="module", autouse=True)
def report_case_counts():
    """模块结束时打印每类用例数（pytest -s 可见；README 的数字来自这里）。"""
    yield
    print("\n模糊测试用例数：", dict(CASES), "合计", sum(CASES.values()))


def fuzz_settings(n: int):
    return settings(max_examples=n * SCALE, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def modules():
    return {rel: load_script(rel) for rel in SCRIPTS}


def numeric_fields(cls) -> list[tuple[str, type, bool, dict]]:
    """(字段名, 元素类型 int/float, 是否列表, metadata)：Args 里所有数值参数（含 list[int] 之类）。"""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        is_list = typing.get_origin(t) is list
        elem = typing.get_args(t)[0] if is_list else t
        if elem in (int, float):
            out.append((f.name, elem, is_list, dict(f.metadata)))
    return out


def choice_fields(cls) -> list[tuple[str, list]]:
    return [(f.name, list(f.metadata["choices"])) for f in dataclasses.fields(cls) if f.metadata.get("choices")]


def call_parse(mod, argv: list[str]) -> tuple[int | None, str, object]:
    """在进程内跑 cli.parse：返回 (退出码或 None, stderr, 解析结果)。"""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = cli.parse(mod.Args, argv)
        except SystemExit as e:
            return (e.code if isinstance(e.code, int) else 1), err.getvalue(), None
    return None, err.getvalue(), args


def assert_refused(code, err: str, *needles: str) -> None:
    assert code == 2, f"退出码 {code}，stderr：{err[-1500:]}"
    assert "Traceback" not in err, err[-1500:]
    for n in needles:
        assert n in err, f"stderr 没有点名 {n!r}：{err[-1500:]}"


def is_number(s: str) -> bool:
    for conv in (int, float):
        try:
            conv(s)
            return True
        except ValueError:
            pass
    return False


# ---------------------------------------------------------------- 1. 数值参数：命令行
NONFINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "-1e999"]


@st.composite
def bad_flag(draw, mods):
    """(脚本, 字段, argv 里的值列表)：一定是坏值。"""
    rel = draw(st.sampled_from(SCRIPTS))
    fields = numeric_fields(mods[rel].Args)
    choices = choice_fields(mods[rel].Args)
    kinds = ["nonfinite", "garbage"] + (["choice"] if choices else [])
    name, elem, is_list, meta = draw(st.sampled_from(fields))
    if meta.get("min") is not None:
        kinds.append("below")
    if meta.get("max") is not None:
        kinds.append("above")
    kind = draw(st.sampled_from(kinds))
    if kind == "choice":
        name, options = draw(st.sampled_from(choices))
        bad = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(
            lambda s: s not in map(str, options) and not s.startswith("-")))
        return rel, name, [bad], kind
    if kind == "nonfinite":
        bad = draw(st.sampled_from(NONFINITE))
    elif kind == "garbage":      # 不是数的文本（不以 - 开头：那会被 argparse 当成另一个参数名）
        bad = draw(st.one_of(st.sampled_from(["", "abc", "1.2.3", "0x10", "五", "1e", "--", "1,000"]),
                             st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=10))
                   .filter(lambda s: not is_number(s) and not s.startswith("-")))
        if elem is int and draw(st.booleans()):
            bad = draw(st.sampled_from(["1.5", "2e3", "0.1", "-0.5"]))      # 整数参数给小数
    else:
        lo, hi = meta.get("min"), meta.get("max")
        delta = draw(st.one_of(st.just(1), st.integers(1, 10**9), st.floats(0.001, 1e6) if elem is float
                               else st.integers(1, 1000)))
        v = (lo - delta) if kind == "below" else (hi + delta)   # 负数 argparse 认得（没有像负数的参数名）
        v = int(math.floor(v) if kind == "below" else math.ceil(v)) if elem is int else float(v)
        bad = repr(v) if elem is float else str(v)
    values = [bad]
    if is_list:   # 列表参数：坏值混在好值中间
        good = str(meta.get("min", 1) if meta.get("min") is not None else 1)
        values = draw(st.permutations([good, bad]))
    return rel, name, list(values), kind


def test_every_numeric_flag_refuses_bad_values(modules):
    _fuzz_flags(modules, 150)


@pytest.mark.slow
def test_every_numeric_flag_refuses_bad_values_slow(modules):
    _fuzz_flags(modules, 600)


def _fuzz_flags(modules, n):
    @fuzz_settings(n)
    @given(case=bad_flag(modules))
    def run(case):
        rel, name, values, kind = case
        code, err, _ = call_parse(modules[rel], ["--smoke", cli._flag_name(name), *values])
        # 列表参数里排在后面的 "-inf"：argparse 不认它是负数，当成了一个新参数名，报"未知参数 -inf"——也点名了坏值
        late = [v for v in values[1:] if v.startswith("-") and not re.match(r"^-\d+$|^-\d*\.\d+$", v)]
        assert_refused(code, err, *(late or [cli._flag_name(name)]))
        CASES["flag_cli"] += 1

    run()


def test_declared_ranges_are_closed_and_consistent(modules):
    """边界值本身必须被接受：min/max 是闭区间，而且 min ≤ 默认值 ≤ max（默认值 None 除外）。"""
    for rel, mod in modules.items():
        defaults = mod.Args()
        for name, elem, is_list, meta in numeric_fields(mod.Args):
            lo, hi = meta.get("min"), meta.get("max")
            d = getattr(defaults, name)
            for x in (d if is_list else [d]):
                if x is None:
                    continue
                assert (lo is None or x >= lo) and (hi is None or x <= hi), f"{rel} {name} 默认值 {x} 不在 [{lo}, {hi}]"
            for edge in (lo, hi):
                if edge is None:
                    continue
                code, err, args = call_parse(mod, [cli._flag_name(name), str(elem(edge))])
                assert code is None, f"{rel} {cli._flag_name(name)} {edge}（边界）被拒绝：{err}"


# ---------------------------------------------------------------- 2. 数值参数：YAML（同样的检查，点名 文件 与 键）
@st.composite
def bad_yaml(draw, mods):
    rel = draw(st.sampled_from(SCRIPTS))
    name, elem, is_list, meta = draw(st.sampled_from(numeric_fields(mods[rel].Args)))
    options = [float("nan"), float("inf"), float("-inf"), "abc", "", {"a": 1}, "1.2.3"]
    if not is_list:
        options += [[1, 2], [[1]]]
    if meta.get("min") is not None:
        options.append(meta["min"] - draw(st.integers(1, 10**6)))
    if meta.get("max") is not None:
        options.append(meta["max"] + draw(st.integers(1, 10**6)))
    bad = draw(st.sampled_from(options))
    if is_list and draw(st.booleans()):
        bad = [meta.get("min") if meta.get("min") is not None else 1, bad]
    return rel, name, bad


def test_yaml_values_get_the_same_checks_as_flags(modules, tmp_path):
    _fuzz_yaml(modules, tmp_path, 60)


@pytest.mark.slow
def test_yaml_values_get_the_same_checks_as_flags_slow(modules, tmp_path):
    _fuzz_yaml(modules, tmp_path, 250)


def _fuzz_yaml(modules, tmp_path, n):
    @fuzz_settings(n)
    @given(case=bad_yaml(modules))
    def run(case):
        rel, name, bad = case
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({name: bad}, allow_unicode=True), encoding="utf-8")
        code, err, _ = call_parse(modules[rel], ["--smoke", "--config", str(p)])
        assert_refused(code, err, str(p), name)
        CASES["flag_yaml"] += 1

    run()


# ---------------------------------------------------------------- 3. main(Args(...)) 直接调用：同样拒绝，且什么都不写
@st.composite
def bad_direct(draw, mods):
    rel = draw(st.sampled_from(SCRIPTS))
    fields = [f for f in numeric_fields(mods[rel].Args)]
    name, elem, is_list, meta = draw(st.sampled_from(fields))
    options = [float("nan"), float("inf"), float("-inf")]
    if meta.get("min") is not None:
        options.append(elem(meta["min"]) - draw(st.integers(1, 1000)))
    if meta.get("max") is not None:
        options.append(elem(meta["max"]) + draw(st.integers(1, 1000)))
    bad = draw(st.sampled_from(options))
    return rel, name, ([bad] if is_list else bad)


def test_main_called_directly_refuses_and_writes_nothing(modules, tmp_path):
    _fuzz_direct(modules, tmp_path, 40)


@pytest.mark.slow
def test_main_called_directly_refuses_and_writes_nothing_slow(modules, tmp_path):
    _fuzz_direct(modules, tmp_path, 160)


def _fuzz_direct(modules, tmp_path, n):
    @fuzz_settings(n)
    @given(case=bad_direct(modules))
    def run(case):
        rel, name, bad = case
        out = tmp_path / f"out{CASES['flag_direct']}"
        mod = modules[rel]
        with pytest.raises(UserError) as e:
            mod.main(mod.Args(smoke=True, output_dir=str(out), **{name: bad}))
        assert cli._flag_name(name) in str(e.value) and "\n" not in str(e.value)
        assert not (out / "metrics.json").exists() and not (out / "config.json").exists()
        CASES["flag_direct"] += 1

    run()


# ------------------------------------------- 4. 读数据的函数：任意内容 → 正常返回，或一行点名文件的 UserError
READERS = {"read_records": data.read_records, "load_sft": data.load_sft, "load_preference": data.load_preference,
           "load_classification": data.load_classification, "load_qa": data.load_qa}
KEYS = ["instruction", "input", "output", "system", "messages", "role", "content", "prompt", "chosen", "rejected",
        "completion", "label", "text", "question", "answer", "doc_id", "gold_passage", "lang"]
ODD_TEXT = st.text(st.characters(codec="utf-8") | st.sampled_from(["\u2028", "\u2029", "\x85", "\ufeff", "\x00",
                                                                      "\u200b", "\r", "\x1c"]), max_size=20)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | ODD_TEXT,
                       lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.sampled_from(KEYS) | ODD_TEXT,
                                                                                 kids, max_size=5), max_leaves=12)


@st.composite
def file_content(draw) -> bytes:
    kind = draw(st.sampled_from(["records", "records", "array", "bytes", "text", "surrogate", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "text":
        return draw(ODD_TEXT).encode("utf-8")
    recs = draw(st.lists(st.dictionaries(st.sampled_from(KEYS), JSONISH, max_size=6) | JSONISH, max_size=5))
    if kind == "surrogate":
        recs.append({"output": "x\ud800"})
    if kind == "deep":       # 占位，序列化后换成两万层的数组
        recs.insert(draw(st.integers(0, len(recs))), {"__deep__": True})
    lines = [json.dumps(r, ensure_ascii=draw(st.booleans())) for r in recs]
    if kind == "deep":
        lines = [ln if '"__deep__"' not in ln else '{"text": ' + "[" * 20_000 + "]" * 20_000 + "}" for ln in lines]
    if kind == "array":
        body = "[\n" + ",\n".join(lines) + "\n]"
    else:
        body = draw(st.sampled_from(["\n", "\r\n"])).join(lines)
    raw = body.encode("utf-8", "surrogatepass")
    if draw(st.booleans()) and raw:       # 随机截断或插入一个坏字节
        i = draw(st.integers(0, len(raw)))
        raw = raw[:i] if draw(st.booleans()) else raw[:i] + b"\xff" + raw[i:]
    if draw(st.integers(0, 9)) == 0:
        raw = b"\xef\xbb\xbf" + raw
    return raw


def test_readers_never_raise_anything_but_a_one_line_user_error(tmp_path):
    _fuzz_readers(tmp_path, 100)


@pytest.mark.slow
def test_readers_never_raise_anything_but_a_one_line_user_error_slow(tmp_path):
    _fuzz_readers(tmp_path, 400)


def _fuzz_readers(tmp_path, n):
    @fuzz_settings(n)
    @given(raw=file_content(), reader=st.sampled_from(sorted(READERS)), suffix=st.sampled_from([".jsonl", ".json"]))
    def run(raw, reader, suffix):
        p = tmp_path / f"f{suffix}"
        p.write_bytes(raw)
        try:
            READERS[reader](p)
            CASES["reader_content_ok"] += 1
        except UserError as e:
            msg = str(e)
            assert msg.startswith(f"{p}:") and "\n" not in msg, msg
            msg.encode("utf-8")            # 错误信息本身能打印（不含孤立代理字符）
            CASES["reader_content_refused"] += 1

    run()


# ---------------------------------------------------------------- 5. 有效文件里恰好坏一行：错误必须指到那一行
SFT_LINES = (data.DATA_DIR / "sft" / "alpaca.jsonl").read_text(encoding="utf-8").splitlines()[:5]
QA_LINES = (data.DATA_DIR / "kb" / "qa.jsonl").read_text(encoding="utf-8").splitlines()[:5]
CORRUPTIONS = ["truncate", "bad_byte", "drop_field", "wrong_type", "surrogate", "deep", "not_object", "bad_lang",
               "answer_not_in_gold", "bad_role"]


def corrupt(line: str, how: str, kind: str, draw) -> bytes:
    rec = json.loads(line)
    need = "output" if kind == "sft" else draw(st.sampled_from(["question", "answer"]))
    if how == "truncate":
        return line[: draw(st.integers(1, len(line) - 1))].encode()
    if how == "bad_byte":
        i = draw(st.integers(0, len(line)))
        return line[:i].encode() + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + line[i:].encode()
    if how == "drop_field":
        rec.pop(need)
    elif how == "wrong_type":
        rec[need] = draw(st.sampled_from([1, 2.5, True, [], {}, ["x"]]))
    elif how == "surrogate":
        return json.dumps({**rec, need: "x"}).replace('"x"', '"\\udfff"').encode()
    elif how == "deep":
        return (json.dumps(rec)[:-1] + ', "z": ' + "[" * 12_000 + "]" * 12_000 + "}").encode()
    elif how == "not_object":
        return draw(st.sampled_from([b"[1, 2]", b"42", b'"text"', b"null"]))
    elif how == "bad_lang" and kind == "qa":
        rec["lang"] = draw(st.sampled_from(["cn", "EN", "", 1]))
        if rec["lang"] == "":
            rec["lang"] = "zh-CN"
    elif how == "answer_not_in_gold" and kind == "qa":
        rec["answer"] = rec["answer"] + "（不在原文里）"
    elif how == "bad_role" and kind == "sft":
        rec = {"messages": [{"role": draw(st.sampled_from(["robot", "User", "", "tool"])), "content": "hi"},
                            {"role": "assistant", "content": "ok"}]}
    else:
        rec.pop(need)
    return json.dumps(rec, ensure_ascii=False).encode()


@st.composite
def one_bad_line(draw, kind: str):
    lines = SFT_LINES if kind == "sft" else QA_LINES
    at = draw(st.integers(0, len(lines) - 1))
    how = draw(st.sampled_from(CORRUPTIONS))
    bad = corrupt(lines[at], how, kind, draw)
    raw = b"\n".join(bad if i == at else ln.encode() for i, ln in enumerate(lines)) + b"\n"
    return raw, at + 1, how


def test_one_bad_line_is_named_exactly(tmp_path):
    _fuzz_one_bad_line(tmp_path, 60)


@pytest.mark.slow
def test_one_bad_line_is_named_exactly_slow(tmp_path):
    _fuzz_one_bad_line(tmp_path, 250)


def _fuzz_one_bad_line(tmp_path, n):
    @fuzz_settings(n)
    @given(kind=st.sampled_from(["sft", "qa"]), data_=st.data())
    def run(kind, data_):
        raw, line, how = data_.draw(one_bad_line(kind))
        p = tmp_path / f"{kind}.jsonl"
        p.write_bytes(raw)
        with pytest.raises(UserError) as e:
            (data.load_sft if kind == "sft" else data.load_qa)(p)
        assert str(e.value).startswith(f"{p}:{line}:") and "\n" not in str(e.value), (how, str(e.value))
        CASES["reader_bad_line"] += 1

    run()


# ---------------------------------------------------------------- 6. 文档文件夹：随机文件名、内容、链接
@st.composite
def docs_folder(draw, root: Path) -> Path:
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    (root / "sub").mkdir(parents=True)
    (root / "ok.md").write_text("正常的文档 normal document", encoding="utf-8")
    for i in range(draw(st.integers(0, 5))):
        sub = draw(st.sampled_from(["", "sub/"]))
        name = f"{sub}f{i}{draw(st.sampled_from(['.md', '.txt', '.html', '.htm', '.pdf', '.MD', '.bin']))}"
        kind = draw(st.sampled_from(["bytes", "text", "html", "pdf", "fifo", "link_out", "link_in", "loop", "dir"]))
        p = root / name
        if kind == "bytes":
            p.write_bytes(draw(st.binary(max_size=200)))
        elif kind == "text":
            p.write_bytes(draw(ODD_TEXT).encode("utf-8"))
        elif kind == "html":
            p.write_text("<div>" * draw(st.integers(0, 3000)) + draw(ODD_TEXT) + "<script>x</script>", encoding="utf-8")
        elif kind == "pdf":
            p.write_bytes(b"%PDF-1.4\n" + draw(st.binary(max_size=200)))
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind == "link_out":
            os.symlink("/etc/hostname" if draw(st.booleans()) else "/etc", p)
        elif kind == "link_in":
            os.symlink(root / draw(st.sampled_from(["ok.md", "sub", ".", "missing"])), p)
        elif kind == "loop":   # 自己指向自己（符号链接成环：曾经让 f.resolve() 抛 RuntimeError）
            os.symlink(p, p)
        else:
            p.mkdir()
    return root


def test_docs_folder_never_crashes_and_never_leaves_the_folder(tmp_path):
    _fuzz_docs(tmp_path, 50)


@pytest.mark.slow
def test_docs_folder_never_crashes_and_never_leaves_the_folder_slow(tmp_path):
    _fuzz_docs(tmp_path, 200)


def _fuzz_docs(tmp_path, n):
    pytest.importorskip("pypdf")
    import logging

    logging.getLogger("pypdf").setLevel(logging.CRITICAL)   # 坏 PDF 的警告刷屏

    @fuzz_settings(n)
    @given(data_=st.data())
    def run(data_):
        root = data_.draw(docs_folder(tmp_path / "docs"))
        try:
            docs = data.load_documents(root)
        except UserError as e:
            assert str(e).startswith(str(root)) and "\n" not in str(e), str(e)
        else:
            assert all(d.path.resolve().is_relative_to(root.resolve()) for d in docs)
            assert all(d.text.strip() for d in docs)
        CASES["reader_docs"] += 1

    run()


# ------------------------------------------- 7. 每个脚本读文件的参数：端到端，退出码 2、点名文件:行、不写 metrics.json
# 各脚本的 --data 是什么：SFT 文件、文档文件夹，还是问答文件（其余参数按名字：--docs 文件夹，--qa / --eval-data 文件）
DATA_KIND = {"lesson1_sft/02_data_preprocess/data_pipeline.py": "docs",
             "lesson6_rag/01_vector_store_selection/knowledge_base_selection.py": "docs",
             "lesson6_rag/03_vector_db_build/build_vector_store.py": "docs",
             "lesson6_rag/02_data_preprocessing/data_preprocess.py": "qa",
             "lesson6_rag/04_rag_architecture/rag_architecture_demo.py": "qa"}
KNOWN = [s for s in SCRIPTS if s.startswith(("lesson1_", "lesson6_"))]   # 其它课的 --data 格式各不相同


def file_flags(rel: str, mod) -> list[tuple[str, str]]:
    """脚本真正读的路径参数（源码里出现 args.<名字>；CommonArgs 的 --data 并非每个脚本都用）。"""
    src = (REPO / rel).read_text(encoding="utf-8")
    names = {f.name for f in dataclasses.fields(mod.Args) if re.search(rf"args\.{f.name}\b", src)}
    out = []
    if "data" in names:
        out.append(("data", DATA_KIND.get(rel, "sft")))
    out += [(n, k) for n, k in (("eval_data", "sft"), ("docs", "docs"), ("qa", "qa")) if n in names]
    return out


@st.composite
def bad_input_for(draw, kind: str, where: Path) -> tuple[list[str], str]:
    """生成一个坏输入，返回 (路径参数值, stderr 里必须出现的字符串)。"""
    import shutil

    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    odd = draw(st.sampled_from(["missing", "dir_or_file", "fifo", "content"]))
    target = where / ("in.jsonl" if kind != "docs" else "docs")
    if odd == "missing":
        return str(target), str(target)
    if odd == "fifo":
        os.mkfifo(target)
        return str(target), str(target)
    if odd == "dir_or_file":
        if kind == "docs":
            target.write_text("x", encoding="utf-8")
        else:
            target.mkdir()
        return str(target), str(target)
    if kind == "docs":
        target.mkdir()
        for d in sorted((data.DATA_DIR / "kb" / "docs" / "faq").glob("*"))[:3]:
            shutil.copy(d, target / d.name)
        bad = target / draw(st.sampled_from(["bad.md", "bad.txt", "bad.pdf"]))
        bad.write_bytes(b"%PDF-1.4 broken" if bad.suffix == ".pdf" else "中文".encode("gbk") * 3)
        return str(target), str(bad)
    raw, line, _ = draw(one_bad_line(kind))
    target.write_bytes(raw)
    return str(target), f"{target}:{line}:"


@pytest.mark.parametrize("rel", KNOWN)
def test_every_file_flag_of_every_script_end_to_end(rel, modules, tmp_path, tiny_models):
    _fuzz_script_files(rel, modules[rel], tmp_path, 3)


@pytest.mark.slow
@pytest.mark.parametrize("rel", KNOWN)
def test_every_file_flag_of_every_script_end_to_end_slow(rel, modules, tmp_path, tiny_models):
    _fuzz_script_files(rel, modules[rel], tmp_path, 8)


def _fuzz_script_files(rel, mod, tmp_path, n):
    flags = file_flags(rel, mod)
    for flag, kind in flags:
        _fuzz_one_file_flag(mod, flag, kind, tmp_path, n, [cli._flag_name(f) for f, _ in flags])


def _fuzz_one_file_flag(mod, flag, kind, tmp_path, n, flag_names):
    import torch

    threads = torch.get_num_threads()

    @fuzz_settings(n)
    @given(data_=st.data())
    def run(data_):
        value, needle = data_.draw(bad_input_for(kind, tmp_path / "in"))
        out = tmp_path / "out"
        code, err, args = call_parse(mod, ["--smoke", "--output-dir", str(out), cli._flag_name(flag), value])
        if code is None:
            try:
                mod.main(args)
                code = 0
            except UserError as e:
                code, err = 2, f"错误: {e}"
            finally:
                torch.set_num_threads(threads)   # 冒烟时 run.start 改了线程数，出错时没走到 finish 还原
        # 点名坏文件（最好到行），或在读之前就点名了路径参数（如 "--docs 需要配套的 --qa"；--data 是 --docs 的别名）
        assert_refused(code, err)
        assert needle in err or any(f in err for f in flag_names), err[-1500:]
        assert not (out / "metrics.json").exists()
        CASES[f"script_file_{kind}"] += 1

    run()


# ---------------------------------------------------------------- 8. 路径参数登记表：从 Args 推出来，不手写
# 哪些字段是路径：类型是 str / list[str] / Path、没有 choices、默认值不是一个普通的词（source 的 "auto" 不是路径），
# 并且帮助文本说它是文件/文件夹/目录/YAML/配置，或字段名是 *_data，
# 或源码把 args.<名字> 直接交给了读文件、加载模型的函数。
# 是什么格式：先看帮助文本；帮助文本只有通用说法时（CommonArgs 的 --data），看源码里读它的函数和它的默认数据。
PATH_HELP = re.compile(r"文件|文件夹|目录|JSONL|YAML|配置")
PATH_NAME = re.compile(r"(^|_)(data|docs|dir|path|file)$")
READERS_RX = (r"load_sft|load_preference|preference_split|load_qa|load_classification|load_documents|read_records|"
              r"read_json|load_kb|load_args|load|resolve|check_dir|load_embedder|load_cross_encoder|read_text|open|Path")
# (格式, 帮助文本里的说法, 源码里的说法)：按顺序取第一个命中的。
# 加一种新格式：在这里加一行，再在 FORMATS 里说它是哪种形状、拿哪个文件当"好文件"来改坏。
FORMAT_RULES = [
    ("model_dir", r"模型名|模型目录|向量模型|评委模型|备用模型|adapter 目录|本地目录|交叉编码器|cross-encoder",
     r"load_args\(args, name=|check_dir\(|load_embedder\(|load_cross_encoder\(|models\.load\("),
    ("yaml", r"YAML|配置", r"yaml\."),
    ("logs", r"日志", r"tfevents|trainer_state"),
    ("baseline_json", r"基线 JSON", r"baseline_"),
    ("dialogues", r"多轮对话", r"dialogues\.jsonl"),
    ("graded", r"打分", r"graded\.jsonl"),
    ("tickets", r"工单", r"tickets\.jsonl"),
    ("preference", r"偏好", r"load_preference|preference_split|\"preference\""),
    ("sft", r"SFT|alpaca", r"load_sft|\"sft\"|sft\.jsonl|sft_long"),
    ("qa", r"问答", r"load_qa|qa\.jsonl"),
    ("classification", r"分类数据|分类文件|text/label", r"load_classification|\"classification\""),
    ("docs", r"文件夹|文档目录", r"load_documents|\"raw\"|\"docs\""),
]


@dataclasses.dataclass(frozen=True)
class PathFlag:
    script: str
    name: str           # 字段名（命令行是 --name-with-dashes）
    fmt: str | None     # FORMATS 的键；None = 推不出来（登记表测试会失败并说明怎么补）
    is_list: bool
    read: bool          # 脚本（或它旁边的 _*.py）真的读它
    evidence: str       # 推断依据（失败信息里给开发者看）

    @property
    def flag(self) -> str:
        return cli._flag_name(self.name)

    @property
    def key(self) -> str:
        return f"{self.script} {self.flag}"


def _source(rel: str) -> str:
    """脚本和它旁边的 _*.py 的源码，去掉行尾注释（注释里的词不算推断依据）。"""
    here = REPO / rel
    text = "\n".join(p.read_text(encoding="utf-8") for p in [here, *sorted(here.parent.glob("_*.py"))])
    return re.sub(r"\s+#.*$", "", text, flags=re.M)


def classify(name: str, help_: str, lines: list[str]) -> tuple[str | None, str]:
    """(格式, 依据)；推不出来时格式为 None。"""
    if name == "output_dir":
        return "output_dir", "字段名 output_dir"
    if name == "config":
        return "yaml", "CommonArgs 的 --config"
    for fmt, help_rx, _ in FORMAT_RULES:
        if m := re.search(help_rx, help_):
            return fmt, f"帮助文本里的 {m.group()!r}"
    code = "\n".join(lines)
    for fmt, _, src_rx in FORMAT_RULES:
        if m := re.search(src_rx, code):
            return fmt, f"源码里的 {m.group()!r}"
    return None, f"帮助文本 {help_!r}；读它的源码 {lines[:3]}"


def path_flags(rel: str, args_cls) -> list[PathFlag]:
    """一个脚本的所有路径参数（由 Args 的字段类型、默认值、帮助文本、字段名与源码推出）。"""
    hints, src = typing.get_type_hints(args_cls), _source(rel)
    out = []
    for f in dataclasses.fields(args_cls):
        t = hints[f.name]
        is_list = typing.get_origin(t) is list
        elem = typing.get_args(t)[0] if is_list else t
        default = f.default if f.default is not dataclasses.MISSING else None
        if elem not in (str, Path) or f.metadata.get("choices"):
            continue
        if isinstance(default, str) and default and not re.search(r"[/\\]|\.\w+$", default):
            continue       # 默认值是个普通的词（auto、not-needed、course-assistant）：不是路径
        help_ = f.metadata.get("help", "")
        lines = [ln.strip() for ln in src.splitlines() if re.search(rf"args\.{f.name}\b", ln)]
        calls = [ln for ln in lines if re.search(rf"\b({READERS_RX})\((?:[^()]*\()?[^()]*args\.{f.name}\b", ln)]
        if not (PATH_HELP.search(help_) or PATH_NAME.search(f.name) or calls):
            continue
        # --model 由 models.load_args(args) / args.resolved_model() / out.model_name 读，源码里不一定写出 args.model
        # --output-dir 与 --config 由 common 读（run.start、cli.parse），每个脚本都读
        read = bool(lines) or f.name in ("output_dir", "config") or (
            f.name == "model" and bool(re.search(r"load_args\(args\b|resolved_model\(\)|out\.model_name", src)))
        fmt, why = classify(f.name, help_, calls or lines)
        out.append(PathFlag(rel, f.name, fmt, is_list, read, why))
    return out


@dataclasses.dataclass(frozen=True)
class Format:
    """一种输入格式：形状（决定能造哪些坏文件）+ 一个好文件（在它上面只改坏一处，其余都合法）。"""

    shape: str                 # jsonl / logs / json / yaml / docs / model_dir / output_dir
    example: str | None = None  # 相对仓库的好文件；yaml 的例子按参数取（默认值或 configs/ 里的配置）
    name: str = "in.jsonl"     # 坏文件的文件名（日志体检按文件名找 trainer_state.json）


FORMATS = {
    "sft": Format("jsonl", "data/sft/alpaca.jsonl"),
    "preference": Format("jsonl", "data/preference/pairs.jsonl"),
    "qa": Format("jsonl", "data/kb/qa.jsonl"),
    "classification": Format("jsonl", "data/classification/sentiment.jsonl"),
    "dialogues": Format("jsonl", "data/kb/dialogues.jsonl"),
    "tickets": Format("jsonl", "data/support/tickets.jsonl"),
    "graded": Format("jsonl", "data/preference_raw/graded.jsonl"),
    "logs": Format("logs", name="trainer_state.json"),
    "baseline_json": Format("json", "lesson6_rag/06_optimization/baseline_smoke.json", name="baseline.json"),
    "yaml": Format("yaml", name="in.yaml"),
    "docs": Format("docs", "data/kb/docs", name="docs"),
    "model_dir": Format("model_dir", name="model"),
    "output_dir": Format("output_dir", name="out"),
}
# 每种形状能造的坏输入（issue 22 列的那些）。每一种都保证是坏的：合法却奇怪的输入不在这里（它们要能跑完）。
PLACE = ("missing", "dir_not_file", "fifo", "symlink_loop")
KINDS = {
    "jsonl": PLACE + ("empty", "invalid_utf8", "wrong_types", "missing_keys", "nan", "huge", "deep", "not_object"),
    "logs": PLACE + ("empty", "invalid_utf8", "wrong_types", "missing_keys", "nan", "huge", "deep", "not_object"),
    "json": PLACE + ("empty", "invalid_utf8", "wrong_types", "missing_keys", "nan", "huge", "deep", "not_object"),
    "yaml": PLACE + ("invalid_utf8", "wrong_types", "nan", "huge", "deep", "not_object", "syntax", "python_tag"),
    "docs": ("missing", "file_not_dir", "fifo", "symlink_loop", "empty_dir", "invalid_utf8", "broken_pdf",
             "nothing_readable"),
    "model_dir": ("missing", "file_not_dir", "fifo", "symlink_loop", "empty_dir", "config_invalid_utf8",
                  "config_nan", "config_deep", "config_wrong_types", "config_empty", "config_fifo"),
    "output_dir": ("file_not_dir", "fifo", "symlink_loop", "under_a_file"),
}
# 数值也必须有限的格式：打分的 score 是 NaN/inf 就是坏文件（训练日志里的 NaN loss 却是要报出来的异常，不算坏文件）
FINITE_NUMBERS = {"graded"}
DEEP = 10_000


@functools.cache
def registry() -> tuple[PathFlag, ...]:
    """每个脚本的每个路径参数。"""
    return tuple(pf for rel in SCRIPTS for pf in path_flags(rel, load_script(rel).Args))


def _other_type(v, draw):
    """一个与 v 类型不同的 JSON 值（None 不算：那是"缺字段"，另有一类）。"""
    options = [7, 2.5, True, [1, 2], {"k": 1}, "abc"]
    return draw(st.sampled_from([o for o in options if type(o) is not type(v)]))


def _mutate(rec, kind: str, draw, fmt: str):
    """把一条记录（dict）改坏，返回改坏后的 JSON 值（huge/deep 先放占位符，由 _dumps 换成真正的文本）。"""
    if kind == "wrong_types":
        return {k: _other_type(v, draw) for k, v in rec.items()}
    if kind == "missing_keys":     # 只留一个字段（或一个都不留）：没有哪种格式一个字段就够
        keep = draw(st.sampled_from([None, *sorted(rec)])) if len(rec) > 1 else None
        return {keep: rec[keep]} if keep else {}
    if kind == "nan":
        if fmt in FINITE_NUMBERS and draw(st.booleans()):
            return _map_numbers(rec, draw(st.sampled_from([math.nan, math.inf, -math.inf])))
        return {k: draw(st.sampled_from([math.nan, math.inf, -math.inf])) for k in rec}
    if kind in ("huge", "deep"):   # 先放占位符，序列化后换成 json.dumps 写不出来的文本
        return {k: f"__{kind}__" for k in rec}
    if kind == "not_object":
        return draw(st.sampled_from([[1, 2, 3], 42, "text", None, [[{"a": 1}]]]))
    raise AssertionError(kind)


def _map_numbers(x, value):
    if isinstance(x, bool):
        return x
    if isinstance(x, (int, float)):
        return value
    if isinstance(x, dict):
        return {k: _map_numbers(v, value) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_numbers(v, value) for v in x]
    return x


def _dumps(rec) -> str:
    s = json.dumps(rec, ensure_ascii=False)
    # 1.0e+400 解析出来是 inf；一万层的数组超过 Python 的递归上限
    return s.replace('"__huge__"', "1.0e+400").replace('"__deep__"', "[" * DEEP + "]" * DEEP)


def _bad_utf8(raw: bytes, draw) -> bytes:
    i = draw(st.integers(0, len(raw)))
    return raw[:i] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"])) + raw[i:]


def _place(target: Path, kind: str, draw) -> bool:
    """路径本身就不对的几类；造好了返回 True。"""
    if kind == "missing":
        return True
    if kind in ("dir_not_file", "empty_dir"):
        target.mkdir()
    elif kind == "file_not_dir":
        target.write_text("这是一个文件\n", encoding="utf-8")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink_loop":
        os.symlink(target.name, target)          # 自己指向自己
    elif kind == "under_a_file":
        target.parent.joinpath("plain").write_text("x", encoding="utf-8")
    else:
        return False
    return True


def _yaml_example(pf: PathFlag) -> dict | list:
    """yaml 参数的好文件：参数默认值指向的文件，否则 configs/<课>/<脚本>.yaml，再否则一个只有 seed 的配置。"""
    default = next(f for f in dataclasses.fields(load_script(pf.script).Args) if f.name == pf.name).default
    cfg = REPO / "configs" / pf.script.split("_")[0] / f"{Path(pf.script).stem}.yaml"
    for p in (default, cfg if pf.name == "config" else None):
        if isinstance(p, (str, Path)) and Path(p).is_file():
            return yaml.safe_load(Path(p).read_text(encoding="utf-8")) or {"seed": 7}
    return {"seed": 7}


@st.composite
def hostile_input(draw, pf: PathFlag, where: Path) -> str:
    """在 where 里造一个坏输入，返回交给参数的路径。每一类都保证是坏的（不是"合法但奇怪"）。"""
    fmt = FORMATS[pf.fmt]
    kind = draw(st.sampled_from(KINDS[fmt.shape]))
    CASES[f"path_kind_{kind}"] += 1
    # 路径本身也随机一点（空格、中文、多一层目录）：错误信息要原样点名它
    where = where / f"{draw(st.sampled_from(['', '数据 ', 'with space ', 'ünï.']))}{draw(st.integers(0, 999))}"
    where.mkdir()
    target = where / fmt.name
    if fmt.shape == "output_dir" and kind == "under_a_file":
        _place(target, kind, draw)
        return str(where / "plain" / "out")
    if _place(target, kind, draw):
        return str(target)
    if fmt.shape == "docs":
        target.mkdir()
        if kind == "nothing_readable":        # 只有读不了或空的：FIFO、成环的链接、空文档
            os.mkfifo(target / "a.md")
            os.symlink("b.md", target / "b.md")
            (target / "c.txt").write_text(" \n\u200b", encoding="utf-8")
            return str(target)
        for d in sorted((REPO / fmt.example).rglob("*.md"))[:2]:
            shutil.copy(d, target / d.name)
        if kind == "broken_pdf":
            pytest.importorskip("pypdf")
            (target / "bad.pdf").write_bytes(b"%PDF-1.4\n" + draw(st.binary(max_size=64)))
        else:
            name = draw(st.sampled_from(["bad.md", "bad.txt", "bad.html"]))
            (target / name).write_bytes(_bad_utf8("正常的一段文字。\n".encode() * 3, draw))
        return str(target)
    if fmt.shape == "model_dir":
        target.mkdir()
        content = {"config_invalid_utf8": _bad_utf8(b'{"model_type": "qwen2", "hidden_size": 8}', draw),
                   "config_nan": b'{"model_type": "qwen2", "hidden_size": NaN, "vocab_size": Infinity}',
                   "config_deep": b'{"model_type": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                   "config_wrong_types": draw(st.sampled_from([b"[1, 2, 3]", b'"qwen2"', b'{"model_type": 7}'])),
                   "config_empty": b""}.get(kind)
        for name in ("config.json", "adapter_config.json"):
            if content is None:                # config_fifo
                os.mkfifo(target / name)
            else:
                (target / name).write_bytes(content)
        for name in ("model.safetensors", "adapter_model.safetensors"):
            (target / name).write_bytes(draw(st.binary(min_size=8, max_size=64)))
        return str(target)
    if fmt.shape == "yaml":
        cfg = _yaml_example(pf)
        if kind == "syntax":
            text = yaml.safe_dump(cfg, allow_unicode=True) + draw(st.sampled_from(["key: [1, 2\n", "a: b: c\n",
                                                                                  "\t- x\n", "x: 'open\n"]))
        elif kind == "python_tag":
            text = "!!python/object/apply:os.system ['echo pwned']\n" if draw(st.booleans()) else \
                yaml.safe_dump(cfg) + "extra: !!python/object/apply:os.getcwd []\n"
        elif kind == "deep":
            text = "key: " + "[" * DEEP + "]" * DEEP + "\n"
        elif kind == "invalid_utf8":
            target.write_bytes(_bad_utf8(yaml.safe_dump(cfg, allow_unicode=True).encode(), draw))
            return str(target)
        elif kind == "not_object":
            text = draw(st.sampled_from(["- 1\n- 2\n", "42\n", "just a string\n"]))
        else:
            scalar = {"nan": ".nan", "huge": "1.0e+400"}.get(kind)
            text = "".join(f"{k}: {scalar or json.dumps(_other_type(v, draw))}\n" for k, v in
                           (cfg.items() if isinstance(cfg, dict) else []))
        target.write_text(text, encoding="utf-8")
        return str(target)
    # 记录类文件：jsonl（一行一条）、logs（trainer_state.json 的 log_history）、json（基线）
    if kind == "empty":
        target.write_bytes(draw(st.sampled_from([b"", b"\n", b"\n\n  \n"])))
        return str(target)
    if fmt.shape == "logs":
        doc = {"global_step": 20, "log_history": [{"step": i, "loss": round(2.5 - 0.05 * i, 3),
                                                    "learning_rate": 1e-3, "grad_norm": 1.0, "epoch": i / 20}
                                                   for i in range(1, 21)]}
    elif fmt.shape == "json":
        doc = json.loads((REPO / fmt.example).read_text(encoding="utf-8"))
    if fmt.shape in ("logs", "json"):
        if kind == "invalid_utf8":
            target.write_bytes(_bad_utf8(json.dumps(doc, indent=1).encode(), draw))
        elif kind == "missing_keys":
            key = "log_history" if fmt.shape == "logs" else draw(st.sampled_from(sorted(doc)))
            target.write_text(json.dumps({k: v for k, v in doc.items() if k != key}), encoding="utf-8")
        elif fmt.shape == "logs" and kind != "not_object":   # 改坏 log_history 里的一条
            hist = doc["log_history"]
            k = draw(st.integers(0, len(hist) - 1))
            hist[k] = _mutate(hist[k], kind, draw, pf.fmt)
            target.write_text(_dumps(doc), encoding="utf-8")
        else:
            target.write_text(_dumps(_mutate(doc, kind, draw, pf.fmt)), encoding="utf-8")
        return str(target)
    lines = (REPO / fmt.example).read_text(encoding="utf-8").splitlines()
    k = draw(st.integers(0, len(lines) - 1))
    if kind == "invalid_utf8":
        bad = _bad_utf8(lines[k].encode(), draw)
    else:
        bad = _dumps(_mutate(json.loads(lines[k]), kind, draw, pf.fmt)).encode()
    target.write_bytes(b"\n".join(bad if i == k else ln.encode() for i, ln in enumerate(lines)) + b"\n")
    return str(target)


# 两个临时名单：正在修的（KNOWN_BEING_FIXED）与新发现、还没人修的（KNOWN_FINDINGS），名单里的参数失败时
# 本测试 xfail 而不是 fail。issue 22 这一轮两份名单都已清空：它找到的 40 多处（先加载模型后读数据、--data 声明了
# 却不读、坏模型目录要等另一个模型加载完才报、子进程里才报……）都已在脚本和 common 里修好
KNOWN_BEING_FIXED: set[str] = set()
KNOWN_FINDINGS: set[str] = set()


def _listed(pf: PathFlag, names: set[str]) -> bool:
    """名单里的 "<脚本> --参数"；"* --参数" 指每个脚本的这个参数（common 里的同一处毛病）。"""
    return pf.key in names or f"* {pf.flag}" in names


class ModelLoadedFirst(BaseException):
    """坏输入还没被拒绝，脚本就先加载了模型或起了子进程（BaseException：脚本里的 except Exception 拦不住它）。"""


class Hang(BaseException):
    """一个用例超过 CASE_TIMEOUT 秒：多半是在读 FIFO。"""


CASE_TIMEOUT = 60


@contextlib.contextmanager
def _guards(hostile: list[str]):
    """拒绝坏输入之前加载模型、起子进程就失败；超时就失败。

    加载的正是坏模型目录时放行：拒绝它的地方就在加载函数里（坏模型参数也要在别的模型加载之前查出来：
    models.check_dir 只看文件，不花时间）。"""
    import signal
    import subprocess

    from transformers import PreTrainedModel

    from common import models, retrieval

    def spy(what, real, pass_hostile=True):
        def wrapper(*a, **kw):
            if pass_hostile and any(h in str(x) for h in hostile for x in (*a, *kw.values())):
                return real(*a, **kw)
            raise ModelLoadedFirst(f"坏输入还没被拒绝就先调用了 {what}({str(a[:1])[:160]}…)："
                                   "应先读、先查用户给的文件，再加载模型或起子进程")
        return wrapper

    real_popen = subprocess.Popen

    class Popen(real_popen):
        # 子进程（torchrun、服务）里读坏文件：要等它启动、失败，错误还在子进程的日志里。先在本进程查完再起。
        # 库自己查平台的小命令（platform 模块的 uname -p）不算
        def __init__(self, args, *a, **kw):
            if re.search(r"python|torch|accelerate|deepspeed|mlflow", str(args)):
                spy("subprocess.Popen", None, pass_hostile=False)(args)
            super().__init__(args, *a, **kw)

    def on_alarm(*_):
        raise Hang(f"用例超过 {CASE_TIMEOUT} 秒没有结束（在读 FIFO？）")

    real_fp = PreTrainedModel.from_pretrained.__func__
    old = signal.signal(signal.SIGALRM, on_alarm)
    with pytest.MonkeyPatch.context() as mp:     # 每个用例结束就还原：下一个用例的间谍不会套在这一个外面
        for mod, name in ((models, "load"), (retrieval, "load_embedder"), (retrieval, "load_cross_encoder")):
            mp.setattr(mod, name, spy(f"{mod.__name__}.{name}", getattr(mod, name)))
        mp.setattr(subprocess, "Popen", Popen)
        mp.setattr(PreTrainedModel, "from_pretrained", classmethod(
            lambda cls, *a, **kw: spy("from_pretrained", lambda *b, **k: real_fp(cls, *b, **k))(*a, **kw)))
        try:
            yield lambda: signal.alarm(CASE_TIMEOUT)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def _run_case(mod, pf: PathFlag, value: str, out: Path, arm) -> tuple[int, str]:
    """像学生那样跑：cli.parse（命令行）+ main，--smoke，输出到 out。返回 (退出码, stderr)。"""
    import torch

    argv = ["--smoke", "--output-dir", value] if pf.name == "output_dir" else \
        ["--smoke", "--output-dir", str(out), pf.flag, value]
    threads = torch.get_num_threads()
    arm()
    try:
        code, err, args = call_parse(mod, argv)
        if code is None:
            with contextlib.redirect_stdout(io.StringIO()):
                mod.main(args)
            code = 0
    except UserError as e:
        code, err = 2, f"错误: {e}"
    finally:
        import signal

        signal.alarm(0)
        torch.set_num_threads(threads)   # 冒烟时 run.start 改了线程数，出错时没走到 finish 还原
    return code, err


def _fuzz_one_path_flag(mod, pf: PathFlag, tmp_path: Path, n: int) -> None:
    case = Counter()

    # 不缩小失败的例子：一个用例可能要跑几秒（脚本真的跑起来了），缩小要重跑几十次；失败信息里已有坏输入的全貌
    @settings(fuzz_settings(n), phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(data_=st.data())
    def run(data_):
        case["n"] += 1
        where = tmp_path / f"{pf.name}-{case['n']}"
        where.mkdir()
        value = data_.draw(hostile_input(pf, where), label="坏输入")
        out = where / "out"
        with _guards([value]) as arm:
            code, err = _run_case(mod, pf, value, out, arm)
        assert code == 2, f"{pf.key} {value}: 退出码 {code}，stderr 末尾：{err[-800:]}"
        assert "Traceback" not in err, err[-1500:]
        msg = err.strip()
        assert "\n" not in msg, f"错误不止一行：{msg[:800]}"
        assert pf.flag in msg or value in msg, f"错误没有点名 {pf.flag} 或 {value}：{msg[:400]}"
        metrics = Path(value) / "metrics.json" if pf.name == "output_dir" else out / "metrics.json"
        assert not metrics.exists(), f"坏输入却写了 {metrics}"
        CASES[f"path_{pf.fmt}"] += 1

    run()


def _fuzz_path_flags(rel: str, tmp_path, n: int) -> None:
    """一个脚本的每个路径参数各跑 n 个坏输入；先收齐每个参数的结果，再按名单判定。"""
    mod = load_script(rel)
    flags = [pf for pf in path_flags(rel, mod.Args) if pf.read and pf.fmt in FORMATS]
    failures: dict[str, str] = {}
    for pf in flags:
        try:
            _fuzz_one_path_flag(mod, pf, tmp_path, n)
        except (AssertionError, ModelLoadedFirst, Hang, Exception) as e:  # noqa: BLE001 - 收齐每个参数的结果再报
            failures[pf.key] = f"{type(e).__name__}: {str(e)[:1200]}"
    expected = {f.key for f in flags if _listed(f, KNOWN_BEING_FIXED | KNOWN_FINDINGS)}
    unexpected = {k: v for k, v in failures.items() if k not in expected}
    assert not unexpected, "坏输入没有被干净地拒绝：\n" + "\n".join(f"{k}: {v}" for k, v in unexpected.items())
    # 名单里的参数这次全过了：几个随机用例证明不了修好，只提示（slow 那组用例多，全过多半就是修好了）
    for k in sorted(expected - set(failures)):
        print(f"\n名单里的 {k} 这次 {n} 个坏输入都被干净地拒绝了：修好了就从名单里删掉")
    if failures:
        pytest.xfail("名单（KNOWN_BEING_FIXED / KNOWN_FINDINGS）里的参数仍然失败："
                     + "；".join(f"{k}: {v[:200]}" for k, v in failures.items()))


def test_registry_derives_a_format_for_every_path_flag():
    """登记表覆盖每个脚本的每个路径参数：推不出格式的参数让这个测试失败，并说清该补什么。"""
    unknown = [pf for pf in registry() if pf.read and pf.fmt is None and pf.key not in KNOWN_FINDINGS]
    assert not unknown, "\n".join(
        f"{pf.key}: 推不出它要什么格式（{pf.evidence}）。在帮助文本里说明格式（例如 '偏好对 JSONL {{prompt, chosen, "
        f"rejected}}'），或在 tests/test_reliability_fuzz.py 的 FORMAT_RULES 加一条规则、FORMATS 加这种格式"
        for pf in unknown)
    stale = [pf.key for pf in registry() if pf.key in KNOWN_FINDINGS and pf.read and pf.fmt is not None
             and pf.name == "data" and pf.script.endswith("dpo_hf_run.py")]
    assert not stale, f"{stale} 已经推得出格式：从 KNOWN_FINDINGS 里删掉"
    fmts = Counter(pf.fmt for pf in registry() if pf.read)
    # 推断确实在起作用：每种格式都有参数落进来，且 --config / --output-dir 每个脚本一个
    assert set(FORMATS) <= set(fmts), f"这些格式一个参数都没有：{set(FORMATS) - set(fmts)}"
    assert fmts["output_dir"] == len(SCRIPTS)


def test_registry_flags_a_new_path_flag_it_cannot_classify():
    """新脚本加了一个格式不明的路径参数：登记表认出它是路径、却推不出格式（上面的测试就会失败）；写清格式就能推出。"""
    @dataclasses.dataclass
    class Args(cli.CommonArgs):
        rubric_file: str = cli.arg(None, "评分细则文件；默认 data/rubric.bin")
        pairs_path: str = cli.arg(None, "偏好对 JSONL {prompt, chosen, rejected}")
        note: str = cli.arg("hello", "随便一句话")

    flags = {pf.name: pf for pf in path_flags(SCRIPTS[0], Args)}
    assert flags["rubric_file"].fmt is None and "评分细则文件" in flags["rubric_file"].evidence
    assert flags["pairs_path"].fmt == "preference"
    assert "note" not in flags and "source" not in flags and "report_to" not in flags


def test_unread_data_flags_are_refused():
    """声明了却不读的数据参数（CommonArgs 的 --data 之类）：给了就必须拒绝（像检索脚本的 --data），
    不能悄悄忽略用户的数据、照旧用内置数据跑出结果。（不读的 --model 只是多余，不在此列。）"""
    silent, fixed = [], []
    for pf in registry():
        if pf.read or pf.fmt == "model_dir":
            continue
        try:
            load_script(pf.script).Args(smoke=True, **{pf.name: str(REPO / "data" / "sft" / "alpaca.jsonl")})
        except UserError as e:
            assert pf.flag in str(e), str(e)
            fixed += [pf.key] if pf.key in KNOWN_FINDINGS else []
        else:
            silent += [] if pf.key in KNOWN_FINDINGS else [pf.key]
    assert not silent, f"这些参数给了也被悄悄忽略：{silent}"
    assert not fixed, f"{fixed} 已经修好：从 KNOWN_FINDINGS 里删掉"


@pytest.mark.parametrize("rel", SCRIPTS)
def test_hostile_files_through_every_path_flag(rel, tmp_path, tiny_models):
    _fuzz_path_flags(rel, tmp_path, 2)


@pytest.mark.slow
@pytest.mark.parametrize("rel", SCRIPTS)
def test_hostile_files_through_every_path_flag_slow(rel, tmp_path, tiny_models):
    _fuzz_path_flags(rel, tmp_path, 15)
