"""可靠性 · 模糊测试（issue 8 第 8 项）：随机但可复现的坏输入，喂给每个脚本的每个数值参数和每个读文件的入口。

约定只有一条：坏输入 → 退出码 2、一行错误点名参数（`--max-steps`、`文件: 键`）或 `文件:行`、没有 traceback、不写结果。
生成器是 hypothesis（derandomize=True：同一份代码每次生成同一批用例，CI 失败能在本地原样重现）。
在进程内调用 cli.parse / main / common.data（不起子进程），几百个用例几十秒跑完。

用例数：默认几百个（CI 每次都跑）；标了 slow 的同一批测试各自放大到 ≥1000 个。
环境变量 RELIABILITY_FUZZ_SCALE=N 把所有数量再乘 N（本地想多找一会儿 bug 时用）。
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
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
