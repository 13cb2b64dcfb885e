"""可靠性 · 读数据（issue 8 第 4 项）：恶意或意外的输入文件只得到一行 `文件:行: 原因`，绝不是 traceback。

每个用例都是一个真实用户会碰到的坑：万层嵌套的 JSON、JSON 字符串里合法的 U+2028、截断的 emoji 转义（孤立代理字符）、
坏 PDF、指到文件夹外面的符号链接、清洗后为空的文档、答案不在 gold_passage 里的问答、把文件夹/FIFO/成环链接当文件、
Windows 记事本写出的 BOM。
"""
import contextlib
import io
import json
import os
import sys
import threading

import pytest

from common import cli, data
from common.errors import UserError
from tests.conftest import load_script

ALPACA = {"instruction": "你是谁？", "output": "我是灵犀。"}


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def user_error(fn, *a) -> str:
    with pytest.raises(UserError) as e:
        fn(*a)
    msg = str(e.value)
    assert "\n" not in msg, msg           # 一行
    return msg


@pytest.mark.parametrize("name,body,line", [
    ("deep.jsonl", lambda deep: json.dumps(ALPACA) + "\n" + '{"x": ' + deep + "}\n", 2),
    ("deep.json", lambda deep: "[\n" + json.dumps(ALPACA) + ",\n" + deep + "\n]", 3),
])
def test_ten_thousand_levels_of_nesting_is_one_line_not_recursion_error(tmp_path, name, body, line):
    p = write(tmp_path / name, body("[" * 10_000 + "]" * 10_000))
    msg = user_error(data.load_sft, p)
    assert f"{p}:{line}:" in msg and "嵌套太深" in msg


def test_line_separator_inside_a_json_string_does_not_split_the_line(tmp_path):
    # U+2028/U+2029、\x0b、\x1c、\x85 都能原样出现在 JSON 字符串里；str.splitlines 会在它们那里断行
    odd = "第一句\u2028第二句\u2029\x0b\x0c\x1c\x1d\x1e\x85end"
    recs = [{"instruction": odd, "output": "好"}, ALPACA]
    p = write(tmp_path / "ok.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\r\n")
    convs = data.load_sft(p)
    assert len(convs) == 2 and convs[0][0]["content"] == odd


def test_lone_surrogate_is_rejected_with_file_and_line(tmp_path):
    p = write(tmp_path / "s.jsonl", json.dumps(ALPACA) + "\n" + '{"instruction": "hi", "output": "\\ud83d"}\n')
    msg = user_error(data.load_sft, p)
    assert f"{p}:2:" in msg and "代理字符" in msg and "'output'" in msg
    p = write(tmp_path / "k.json", '[\n{"prompt": "a", "completion": "b", "label": true, "\\udc00": 1}\n]')
    assert f"{p}:2:" in user_error(data.read_records, p)      # 键名里的也算；JSON 数组报真实行号


def test_utf8_bom_is_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_text(json.dumps(ALPACA, ensure_ascii=False) + "\n", encoding="utf-8-sig")
    assert data.load_sft(p)[0][-1]["content"] == "我是灵犀。"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# 标题\n正文", encoding="utf-8-sig")
    assert data.load_documents(docs)[0].text.startswith("# 标题")


def test_json_array_errors_point_at_the_real_line(tmp_path):
    p = write(tmp_path / "a.json", "[\n" + json.dumps(ALPACA) + ",\n\n" + '{"instruction": "x"}\n]')
    assert f"{p}:4: 缺少字段 'output'" in user_error(data.load_sft, p)
    p = write(tmp_path / "b.json", "[\n" + json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n]")
    assert f"{p}:3:" in user_error(data.load_sft, p)        # 少了逗号
    p = write(tmp_path / "c.json", '{"instruction": "a", "output": "b"}')
    assert "顶层应为记录列表" in user_error(data.load_sft, p)


def test_non_utf8_names_the_line(tmp_path):
    p = tmp_path / "gbk.jsonl"
    p.write_bytes((json.dumps(ALPACA) + "\n").encode() + json.dumps({"instruction": "你好", "output": "好"},
                                                                      ensure_ascii=False).encode("gbk"))
    assert f"{p}:2: 不是 UTF-8" in user_error(data.load_sft, p)


@pytest.mark.parametrize("kind,needle", [("dir", "是一个文件夹，不是文件"), ("fifo", "命名管道（FIFO）"),
                                         ("loop", "符号链接成环"), ("broken", "断开的符号链接"),
                                         ("missing", "文件不存在"), ("under_file", "中间有一段是文件")])
def test_directory_fifo_or_link_loop_given_as_a_file_gets_an_accurate_message(tmp_path, kind, needle):
    p = tmp_path / "x.jsonl"
    if kind == "dir":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)                       # 读它会永远阻塞：必须在读之前认出来
    elif kind == "loop":
        os.symlink(tmp_path / "y.jsonl", p)
        os.symlink(p, tmp_path / "y.jsonl")
    elif kind == "broken":
        os.symlink(tmp_path / "gone.jsonl", p)
    elif kind == "under_file":
        write(tmp_path / "f", "")
        p = tmp_path / "f" / "x.jsonl"
    msg = user_error(data.load_sft, p)
    assert msg.startswith(f"{p}: ") and needle in msg
    if kind in ("dir", "missing"):
        assert needle in user_error(data.load_qa, p)


def test_docs_folder_that_is_a_file_or_a_loop(tmp_path):
    f = write(tmp_path / "f.md", "x")
    assert "不是文件夹" in user_error(data.load_documents, f)
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    assert "符号链接成环" in user_error(data.load_documents, tmp_path / "a")
    assert "文件夹不存在" in user_error(data.load_documents, tmp_path / "nope")


def test_corrupt_pdf_is_one_line(tmp_path):
    pytest.importorskip("pypdf")
    docs = tmp_path / "docs"
    docs.mkdir()
    write(docs / "ok.md", "fine")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\nendobj\n" + b"\x00" * 64)
    msg = user_error(data.load_documents, docs)
    assert msg.startswith(f"{docs / 'broken.pdf'}: PDF 无法解析")


def test_symlinks_never_leave_the_docs_folder_and_aliases_are_read_once(tmp_path):
    docs, outside = tmp_path / "docs", tmp_path / "outside"
    (docs / "sub").mkdir(parents=True)
    outside.mkdir()
    write(docs / "a.md", "alpha")
    write(docs / "sub" / "b.txt", "beta")
    write(outside / "secret.md", "TOP SECRET")
    os.symlink(outside / "secret.md", docs / "leak.md")       # 文件链接指向外面
    os.symlink(outside, docs / "leakdir")                      # 文件夹链接指向外面
    os.symlink(docs / "sub", docs / "alias_dir")               # 文件夹内的别名
    os.symlink(docs / "a.md", docs / "alias.md")
    os.symlink(docs, docs / "sub" / "loop")                    # 成环
    skipped = []
    docs_read = data.load_documents(docs, skipped)
    assert [d.id for d in docs_read] == ["a.md", "sub/b.txt"]
    assert all("SECRET" not in d.text for d in docs_read)
    why = dict(skipped)
    assert "文件夹之外" in why[str(docs / "leak.md")] and "文件夹之外" in why[str(docs / "leakdir")]
    assert "不重复入库" in why[str(docs / "alias_dir")] and "不重复入库" in why[str(docs / "alias.md")]
    assert str(docs / "sub" / "loop") in why


def test_documents_empty_after_cleaning_are_reported_not_indexed(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    write(docs / "real.md", "真正的内容")
    write(docs / "blank.txt", " \n\t\u200b\ufeff\n")
    write(docs / "boiler.html", "<html><head><title>t</title></head><nav>菜单</nav><script>x()</script>"
                                "<footer>版权</footer></html>")
    skipped = []
    assert [d.id for d in data.load_documents(docs, skipped)] == ["real.md"]
    assert {os.path.basename(p) for p, why in skipped if "清洗后是空文档" in why} == {"blank.txt", "boiler.html"}
    (docs / "real.md").unlink()
    assert "没有找到可用的" in user_error(data.load_documents, docs)


def test_fifo_inside_docs_is_skipped_not_waited_on(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    write(docs / "a.md", "alpha")
    os.mkfifo(docs / "pipe.md")
    skipped = []
    assert [d.id for d in data.load_documents(docs, skipped)] == ["a.md"]
    assert "FIFO" in dict(skipped)[str(docs / "pipe.md")]


def test_symlink_loops_inside_docs_are_skipped_with_a_line_not_a_traceback(tmp_path):
    """issue 22 第 7 项：--docs 里有成环的链接（a -> .、x.md -> y.md -> x.md、self.md -> self.md）曾以
    RuntimeError: Symlink loop 结束（先 resolve 后判断成环）；应与其它读不了的条目一样：跳过并在日志里点名。"""
    docs = tmp_path / "docs"
    docs.mkdir()
    write(docs / "real.md", "真正的内容")
    os.symlink(".", docs / "a")                                 # 文件夹链接指回自己
    os.symlink("y.md", docs / "x.md")
    os.symlink("x.md", docs / "y.md")
    os.symlink("self.md", docs / "self.md")
    os.symlink("y", docs / "x")                                 # 不是文档后缀的环：和其它非文档文件一样不看
    os.symlink("x", docs / "y")
    skipped = []
    assert [d.id for d in data.load_documents(docs, skipped)] == ["real.md"]
    why = dict(skipped)
    assert all("成环" in why[str(docs / n)] for n in ("x.md", "y.md", "self.md"))
    assert "不重复入库" in why[str(docs / "a")]                  # a -> . 是文件夹内的别名，不是环
    (docs / "real.md").unlink()                                 # 只剩环：一行"没有可用文档"，退出码 2
    msg = user_error(data.load_documents, docs)
    assert msg.startswith(f"{docs}: 没有找到可用的") and "跳过了 4 个" in msg


def test_qa_fields_are_checked(tmp_path):
    ok = {"question": "热线是多少？", "answer": "400-820-3366", "gold_passage": "客服热线 400-820-3366，全年无休。"}
    p = write(tmp_path / "qa.jsonl", json.dumps(ok, ensure_ascii=False) + "\n"
              + json.dumps({**ok, "answer": "400-000-0000"}, ensure_ascii=False) + "\n")
    msg = user_error(data.load_qa, p)
    assert f"{p}:2:" in msg and "gold_passage" in msg
    p = write(tmp_path / "lang.jsonl",
              json.dumps({**ok, "lang": "zh"}) + "\n" + json.dumps({**ok, "lang": "cn"}) + "\n")
    msg = user_error(data.load_qa, p)
    assert f"{p}:2: 字段 'lang'" in msg and "zh / en" in msg
    p = write(tmp_path / "lang2.jsonl", json.dumps({**ok, "lang": ["zh"]}) + "\n")
    assert f"{p}:1: 字段 'lang'" in user_error(data.load_qa, p)
    assert data.load_qa(write(tmp_path / "auto.jsonl", json.dumps(ok) + "\n"))[0]["lang"] == "zh"


def test_shipped_data_still_loads_unchanged():
    """新检查不误伤项目自带的数据（44 篇文档、135 条问答）。"""
    docs = data.load_documents(data.DATA_DIR / "kb" / "docs")
    qa = data.load_qa(data.DATA_DIR / "kb" / "qa.jsonl", {d.id: d for d in docs})
    assert len(docs) == 44 and len(qa) == 135


# ------------------------------------------- issue 22 第 2 项：各课自己读的文件，也走 common.data 的读取与字段检查
LOGS = "lesson3_distributed/04_log_analysis/training_log_inspector.py"
DIALOGUES = "lesson7_hybrid_rag/04_enterprise_case/customer_service_case.py"
TICKETS = "lesson5_deployment_monitoring/05_customer_support_case/customer_alignment.py"
GRADED = "lesson4_alignment/06_dataset_curation/dataset_curation.py"


def refused_by_script(rel: str, argv: list[str], out) -> str:
    """像命令行那样跑 cli.parse + main（--smoke），没接住的异常交给 cli 装上的 excepthook（进程里正是这样）；
    断言退出码 2、没有 traceback、错误是最后一行且只有一行、没写 metrics.json；返回那一行。"""
    mod, err, code, hook = load_script(rel), io.StringIO(), None, sys.excepthook
    try:
        with contextlib.redirect_stderr(err):
            try:
                mod.main(cli.parse(mod.Args, [*argv, "--smoke", "--output-dir", str(out)]))
            except Exception as e:  # noqa: BLE001 - 与进程里一样：交给 excepthook（非 UserError 会打出 traceback）
                sys.excepthook(type(e), e, e.__traceback__)
    except SystemExit as e:
        code = e.code
    finally:
        sys.excepthook = hook
    text = err.getvalue()
    assert code == 2 and "Traceback" not in text, f"退出码 {code}：{text[-1500:]}"
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith("错误: ") and text.count("错误: ") == 1, text[-1500:]
    assert not (out / "metrics.json").exists()
    return last


def trainer_state(tmp_path, raw: bytes):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_bytes(raw)
    return tmp_path / "run" / "trainer_state.json"


@pytest.mark.parametrize("raw,needle", [
    (b'{"log_history": [\n{"step": 1, "loss": "\xff"}]}', ":2: 不是 UTF-8"),
    (b'{"log_history": [1, 2, 3]}', ": log_history[0] 应是带整数 'step' 的对象"),   # 曾是 AttributeError
    (b'[1, 2, 3]', ": 不是 trainer_state.json"),
    (b'{"log_history": [{"step": 1, "loss": 2.0}, {"step": "abc", "loss": 1.0}]}',
     ": log_history[1] 应是带整数 'step' 的对象，得到 {'step': 'abc'"),               # 曾是 ValueError
    (b'{"log_history": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", ":1: JSON 嵌套太深"),    # 曾是 RecursionError
    (b'{"log_history": [{"step": 1, "loss": 2.0}\n{"step": 2}]}', ":2: JSON 无法解析"),
])
def test_log_inspector_bad_trainer_state_is_one_line(tmp_path, raw, needle):
    f = trainer_state(tmp_path, raw)
    line = refused_by_script(LOGS, ["--logs", str(tmp_path / "run")], tmp_path / "o")
    assert f"{f}{needle}" in line, line


def test_log_inspector_garbled_numbers_in_deepspeed_log_are_not_a_traceback(tmp_path):
    """宽松的数字正则曾框住 "lr=[.]"、"=1e+"，float() 抛 ValueError；现在它们不算 DeepSpeed 的行。"""
    log = write(tmp_path / "ds.log", "step=1, skipped=0, lr=[0.001, 0.002]\nstep=2, skipped=0, lr=[.]\n"
                "step=3, skipped=0, lr=[-]\nglobal_step=3, RunningAvgSamplesPerSec=1e+, CurrSamplesPerSec=.e\n"
                "step=4, skipped=0, lr=[nan]\nglobal_step=4, RunningAvgSamplesPerSec=9, CurrSamplesPerSec=8.5e1\n")
    s = load_script(LOGS).read_deepspeed(log)
    assert s["lr"][0] == (1, 0.001) and s["lr"][1][0] == 4 and s["throughput"] == [(4, 85.0)], s
    only_garbage = write(tmp_path / "g.log", "step=2, skipped=0, lr=[.]\n")
    assert "--logs" in refused_by_script(LOGS, ["--logs", str(only_garbage)], tmp_path / "o")


@pytest.mark.parametrize("given", ["folder", "file"])
def test_log_inspector_fifo_named_trainer_state_is_refused_not_waited_on(tmp_path, given):
    """读 FIFO 会一直等写入方（曾经卡死）。保险：万一又去读了，20 秒后打开写端再关上，读到空内容：测试失败，不卡住。"""
    (tmp_path / "run").mkdir()
    fifo = tmp_path / "run" / "trainer_state.json"
    os.mkfifo(fifo)

    def unblock():
        with contextlib.suppress(OSError):   # 没人在读（修好了）时 O_NONBLOCK 打开写端报 ENXIO：什么都不做
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    timer = threading.Timer(20, unblock)
    timer.daemon = True
    timer.start()
    try:
        line = refused_by_script(LOGS, ["--logs", str(tmp_path / "run" if given == "folder" else fifo)], tmp_path / "o")
    finally:
        timer.cancel()
    assert f"{fifo}: 是命名管道（FIFO）" in line, line


@pytest.mark.parametrize("second,needle", [
    ({"turns": [{"user": "运费怎么算？", "route": "faq"}]}, ":2: 缺少字段 'id'"),                     # 曾是 KeyError
    ({"id": "d2", "turns": [{"user": "运费怎么算？", "route": "faq", "answer": 99}]},
     ":2: 字段 'turns[0].answer' 应为字符串，得到 int"),                                              # 曾是 TypeError
    ({"id": "d2", "turns": [{"user": "hi", "route": "faq"}, {"route": "rag"}]}, ":2: 缺少字段 'turns[1].user'"),
])
def test_customer_service_bad_dialogue_fields_are_named(tmp_path, second, needle):
    bad = write(tmp_path / "d.jsonl", json.dumps({"id": "d1", "turns": [{"user": "hi", "route": "faq"}]}) + "\n"
                + json.dumps(second, ensure_ascii=False) + "\n")
    line = refused_by_script(DIALOGUES, ["--dialogues", str(bad)], tmp_path / "o")
    assert f"{bad}{needle}" in line, line


def test_customer_alignment_integer_ticket_is_refused_at_read_time(tmp_path):
    """整数工单曾一路走到建 Arrow 数据集才以 pyarrow.ArrowInvalid 崩。"""
    bad = write(tmp_path / "t.jsonl", '{"ticket": "写首诗", "type": "out_of_scope", "lang": "zh"}\n'
                                      '{"ticket": 12345, "type": "escalation", "lang": "zh"}\n')
    line = refused_by_script(TICKETS, ["--tickets", str(bad)], tmp_path / "o")
    assert f"{bad}:2: 字段 'ticket' 应为字符串，得到 int" in line, line


@pytest.mark.parametrize("score", ["NaN", "Infinity", "true"])
def test_dataset_curation_nan_score_is_refused_not_silently_dropped(tmp_path, score):
    """NaN 分数和谁比都是 False：那条回答曾被悄悄排除在所有偏好对之外，退出码 0。"""
    bad = write(tmp_path / "graded.jsonl",
                '{"prompt": "q", "responses": [{"text": "a", "score": 5}, {"text": "b", "score": 1}]}\n'
                f'{{"prompt": "q2", "responses": [{{"text": "a", "score": 5}}, {{"text": "b", "score": {score}}}]}}\n')
    line = refused_by_script(GRADED, ["--graded", str(bad)], tmp_path / "o")
    assert f"{bad}:2: responses[1].score = " in line and "应为有限的数" in line, line


def test_read_json_reports_deep_or_broken_model_config_in_one_line(tmp_path):
    """common.safety 检查模型目录的 config.json 也走 data.read_json：万层嵌套曾是 RecursionError。"""
    from common import safety

    (tmp_path / "config.json").write_text('{"a": ' + "[" * 10_000 + "]" * 10_000 + "}", encoding="utf-8")
    assert f"{tmp_path / 'config.json'}:1: JSON 嵌套太深" in user_error(safety.check_model_dir, tmp_path)
    (tmp_path / "config.json").write_text('{\n"auto_map": {"AutoModel": "m.M"},\n}', encoding="utf-8")
    assert f"{tmp_path / 'config.json'}:3: JSON 无法解析" in user_error(safety.check_model_dir, tmp_path)
