"""第 5 课 05：客服对齐。检查器判得准；SFT 让留出工单的合规率明显高于只靠提示词；
反馈闭环用检查器抓到的失败构造偏好对。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/05_customer_support_case/customer_alignment.py"


def test_compliance_checker():
    mod = load_script(SCRIPT)
    oos = {"type": "out_of_scope", "lang": "zh", "kb": ""}
    assert mod.check(oos, "您好，抱歉，我只能回答云帆产品与售后相关的问题。") == []
    assert mod.check(oos, "好的，这是一首诗。") == ["tone", "must_refuse_out_of_scope"]
    esc = {"type": "escalation", "lang": "en", "kb": ""}
    assert mod.check(esc, "Sorry! I'm transferring you to a human agent right away.") == []
    assert "promise_outside_policy" in mod.check(esc, "Sorry, we guarantee a free replacement, human agent soon.")
    ins = {"type": "in_scope", "lang": "zh", "kb": "7 天无理由退货。"}
    assert mod.check(ins, "您好，抱歉，我只能回答云帆相关问题。") == ["over_refusal"]


def test_sft_and_feedback_loop_raise_compliance(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("compliance_prompt_only", "compliance_sft", "compliance_dpo"):
        assert key in saved, key
    assert_claims(saved)
    # 极小模型不会照提示词守规矩；用合规参考回复 SFT 后，留出工单的合规率明显上升
    assert m["compliance_sft"] >= m["compliance_prompt_only"] + 0.2, m
    assert m["feedback_pairs"] > 0, "反馈闭环应从 SFT 模型的失败里构造出偏好对"
    rows = [json.loads(x) for x in (tmp_path / "held_out_answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == m["held_out"] and {r["type"] for r in rows} == {"in_scope", "out_of_scope", "escalation"}
    assert abs(sum(not r["violations"] for r in rows) / len(rows) - m["compliance_dpo"]) < 1e-3


def test_bad_ticket_file_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"ticket": "写首诗", "type": "out_of_scope", "lang": "zh"}\n{"ticket": "x", "type": "chitchat"}\n',
                   encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--tickets", str(bad), "--output-dir", str(tmp_path / "o"), timeout=300)
    assert_user_error(proc, f"{bad}:2")
