"""第 1 课 02：数据预处理流水线。每条规则都真删了东西、计数对得上、输出里不留个人信息、训练脚本读得进。"""
import json
import re
from collections import Counter

import pytest

from common import data
from common.errors import UserError
from tests.conftest import assert_claims, load_script

SCRIPT = "lesson1_sft/02_data_preprocess/data_pipeline.py"
RULES = ("exact_duplicate", "too_short", "too_long", "boilerplate", "language", "near_duplicate")


def test_pipeline_on_shipped_dirty_data(tmp_path):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    for key in ("records_in", "records_out", "removed_by_rule", "pii_masked"):
        assert key in json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    # 每条规则在附带的脏数据上都删掉了段落，且计数守恒
    assert set(m["removed_by_rule"]) == set(RULES)
    assert all(m["removed_by_rule"][r] > 0 for r in RULES), m["removed_by_rule"]
    assert m["records_out"] == m["records_in"] - sum(m["removed_by_rule"].values())
    assert all(m["pii_masked"][k] > 0 for k in ("phone", "email", "id_card")), m["pii_masked"]
    assert set(m["languages"]) <= {"zh", "en"} and {"ja", "fr"} <= set(m["removed_languages"])
    assert m["tasks"].get("qa", 0) > 0 and m["tasks"].get("summary", 0) > 0

    # 输出是 common.data.load_sft 认可的 chat 格式（训练脚本就用它读）
    train, val = data.load_sft(tmp_path / "train.jsonl"), data.load_sft(tmp_path / "val.jsonl")
    assert len(train) + len(val) == m["records_out"] and len(val) >= 1
    assert all(c[-1]["role"] == "assistant" and c[-1]["content"].strip() for c in train + val)

    # 输出里不残留个人信息：用比脚本更宽松的独立正则检查
    text = (tmp_path / "train.jsonl").read_text(encoding="utf-8") + (tmp_path / "val.jsonl").read_text(encoding="utf-8")
    assert not re.search(r"(?<!\d)1[3-9]\d[-\s]?\d{4}[-\s]?\d{4}(?!\d)", text)
    assert not re.search(r"[\w.+-]+@[\w-]+\.[A-Za-z]{2,}", text)
    assert not re.search(r"(?<!\d)\d{17}[\dXx](?!\d)", text)
    for leaked in ("13812345678", "13700002222", "11010519900307123X", "zhang.wei@example.com"):
        assert leaked not in text
    # 审计文件与数据卡
    removed = [json.loads(line) for line in (tmp_path / "removed.jsonl").read_text(encoding="utf-8").splitlines()]
    assert Counter(r["rule"] for r in removed) == Counter({k: v for k, v in m["removed_by_rule"].items() if v})
    card = (tmp_path / "data_card.md").read_text(encoding="utf-8")
    assert "near_duplicate" in card and str(m["records_out"]) in card
    assert (tmp_path / "funnel.png").stat().st_size > 0
    assert m["pii_left_in_output"] == 0 and m["pii_masked_total"] > 0
    assert_claims(tmp_path / "metrics.json")


def test_cleaning_rules_unit():
    mod = load_script(SCRIPT)
    counts = Counter()
    masked = mod.mask_pii("电话 +86 139-1234-5678、(+86)13700002222、186 0000 2222、8613912345678，"
                          "邮箱 a.b@example.cn，身份证 11010519491231002X，订单号 YF202403018848", counts)
    assert counts["phone"] == 4 and counts["email"] == 1 and counts["id_card"] == 1, (counts, masked)
    assert "YF202403018848" in masked                      # 订单号不是手机号，不能误伤
    assert mod.id_checksum_ok("11010519491231002X") and not mod.id_checksum_ok("110105194912310021")
    assert mod.normalize("Ｒ３\u200b 扫地机\u00a0器人，\n很好用") == "R3 扫地机器人，很好用"
    assert mod.lang_of("L5 使用 8 节 AA 碱性电池，正常使用可续航约 12 个月。") == "zh"
    qa = mod.to_record({"text": "Q: How do I reset the lock? A: Hold the reset button for 5 seconds.",
                        "lang": "en", "source": "x"})
    assert qa["meta"]["task"] == "qa" and qa["messages"][1]["content"] == "Hold the reset button for 5 seconds."


def test_bad_document_is_one_line_error(tmp_path, run_script):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "good.txt").write_text("这是一段足够长的正常中文段落，用来确认流水线可以读取它。", encoding="utf-8")
    (docs / "broken.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    proc = run_script(SCRIPT, "--smoke", "--data", str(docs), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "broken.txt" in proc.stderr and "Traceback" not in proc.stderr


def test_smoke_still_checks_an_explicit_model(tmp_path, tiny_models):
    """冒烟不数 token，但点名了 --model 仍加载它的分词器检查：好模型照常跑完，坏目录一行报错（不被悄悄接受）。"""
    from common import cli

    mod = load_script(SCRIPT)
    m = mod.main(cli.parse(mod.Args, ["--smoke", "--model", "tiny-qwen2", "--output-dir", str(tmp_path)]))
    assert "chat_tokens" not in m["lengths"]
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "qwen2", "vocab_size": Infinity}', encoding="utf-8")
    (bad / "model.safetensors").write_bytes(b"garbage!")
    with pytest.raises(UserError) as e:
        mod.main(cli.parse(mod.Args, ["--smoke", "--model", str(bad), "--output-dir", str(tmp_path / "o")]))
    assert str(e.value).startswith(f"--model {bad}: ") and "\n" not in str(e.value)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_tokenizer_failure_without_message_is_one_line(tmp_path, tiny_models, monkeypatch):
    """分词器加载抛出不带文字的异常（transformers 里的裸 assert）：仍是一行 UserError 点名 --model，不是 IndexError。"""
    from common import cli, models

    mod = load_script(SCRIPT)

    def broken(*a, **kw):
        raise AssertionError()

    monkeypatch.setattr(models, "load_tokenizer", broken)
    with pytest.raises(UserError) as e:
        mod.main(cli.parse(mod.Args, ["--smoke", "--model", "tiny-qwen2", "--output-dir", str(tmp_path)]))
    assert str(e.value) == "--model tiny-qwen2: 加载不了分词器（AssertionError）"
