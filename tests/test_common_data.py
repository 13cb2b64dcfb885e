"""common.data：项目自带的每个数据文件都通过校验；坏输入给出 文件:行: 原因；只在助手回复上算损失。"""
import json

import pytest

from common import data, models
from common.errors import UserError

D = data.DATA_DIR


@pytest.mark.parametrize("rel,minimum", [("sft/alpaca.jsonl", 300), ("sft/chat.jsonl", 150),
                                         ("identity/train.jsonl", 40), ("identity/eval.jsonl", 15),
                                         ("domain/sft.jsonl", 100)])
def test_sft_files_validate(rel, minimum):
    convs = data.load_sft(D / rel)
    assert len(convs) >= minimum
    assert all(c[-1]["role"] == "assistant" for c in convs)


def test_identity_answers_name_the_assistant():
    for rel in ("identity/train.jsonl", "identity/eval.jsonl"):
        for c in data.load_sft(D / rel):
            assert "灵犀" in c[-1]["content"] or "Lingxi" in c[-1]["content"]


def test_other_formats_validate():
    assert len(data.load_preference(D / "preference/pairs.jsonl")) >= 300
    kto = [r for _, r in data.read_records(D / "kto/kto.jsonl")]   # 没有脚本读 KTO 格式：格式在这里查
    assert len(kto) >= 300 and {r["label"] for r in kto} == {True, False}
    assert all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) and type(r["label"]) is bool
               for r in kto)
    recs, labels = data.load_classification(D / "classification/sentiment.jsonl")
    assert len(recs) >= 300 and labels == ["negative", "neutral", "positive"]


def test_knowledge_base_and_qa_are_consistent():
    docs = data.load_documents(D / "kb" / "docs")
    assert len(docs) >= 40
    assert {d.path.suffix for d in docs} >= {".md", ".txt", ".html"}
    by_id = {d.id: d for d in docs}
    qa = data.load_qa(D / "kb" / "qa.jsonl", by_id)   # 检查 doc_id 存在且 gold_passage 是原文片段
    assert len(qa) >= 100
    assert all(q["answer"] in q["gold_passage"] for q in qa)
    assert {q["lang"] for q in qa} == {"zh", "en"}
    html_doc = next(d for d in docs if d.path.suffix == ".html")
    assert "<" not in html_doc.text, "HTML 文档应只留下可见文本"


def test_raw_and_domain_docs_load():
    assert len(data.load_documents(D / "raw")) >= 5
    assert len(data.load_documents(D / "domain" / "docs")) >= 8


@pytest.mark.parametrize("content,needle", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n', ":2: 不是合法的 JSON 行"),
    ('{"instruction": "a"}\n', ":1: 缺少字段 'output'"),
    ('{"instruction": "a", "output": 3}\n', ":1: 字段 'output' 应为字符串"),
    ('{"prompt": "a", "response": "b"}\n', ":1: 既不是 alpaca"),
    ('{"messages": [{"role": "robot", "content": "x"}]}\n', "messages[0].role"),
    ('{"messages": [{"role": "user", "content": "x"}]}\n', "最后一条应是 assistant"),
    ('[1, 2]', ":1: 每条记录应为 JSON 对象"),
    ('\n\n', "没有任何记录"),
])
def test_bad_sft_input_names_file_and_line(tmp_path, content, needle):
    p = tmp_path / ("bad.json" if content.startswith("[") else "bad.jsonl")
    p.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as e:
        data.load_sft(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_bad_other_formats(tmp_path):
    p = tmp_path / "k.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match="doc_id.*gold_passage"):
        data.load_qa(p)
    with pytest.raises(UserError, match="文件不存在"):
        data.load_sft(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="文件夹不存在"):
        data.load_documents(tmp_path / "nope")


@pytest.mark.parametrize("name", ["tiny-qwen2", "smollm2-135m"])
def test_assistant_only_labels(tiny_models, name):
    tok = models.load_tokenizer(name)
    msgs = [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "1+1=?"},
            {"role": "assistant", "content": "等于 2。"}, {"role": "user", "content": "再加 1？"},
            {"role": "assistant", "content": "That is 3."}]
    enc = data.tokenize_chat(tok, msgs)
    labelled = [t for t in enc["labels"] if t != -100]
    text = tok.decode(labelled)
    assert "等于 2。" in text and "That is 3." in text
    assert "1+1" not in text and "你是助手" not in text and "再加" not in text
    assert 0 < len(labelled) < len(enc["input_ids"])
