"""第 7 课 04：客服路由（FAQ → RAG → 转人工）在留出的多轮对话上，转人工又准又全，追问改写让检索来源更准。"""
from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson7_hybrid_rag/04_enterprise_case/customer_service_case.py"


def test_routing_handoff_and_condensing(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    routes = m["routes"]
    assert set(routes) == {"faq", "rag", "handoff"}
    assert abs(sum(r["share"] for r in routes.values()) - 1) < 1e-6
    assert min(r["share"] for r in routes.values()) > 0.1            # 三条路都真的被走到
    assert routes["faq"]["accuracy"] >= 0.9                          # FAQ 直答给的是标准答案
    assert m["handoff_precision"] >= 0.8 and m["handoff_recall"] >= 0.8, m
    assert m["routing_accuracy"] >= 0.8
    # 多轮改写：追问的检索来源准确率明显高于不改写
    assert m["followup_source_accuracy"] >= m["followup_source_accuracy_no_condense"] + 0.2, m
    assert (tmp_path / "transcript.jsonl").stat().st_size > 0
    assert_claims(m)


def test_bad_dialogue_file_names_line(run_script, tmp_path):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"id": "x", "turns": [{"user": "hi", "route": "faq"}]}\n{"id": "y", "turns": [{"user": "hi"}]}\n',
                   encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--dialogues", str(bad), "--output-dir", str(tmp_path / "o"))
    assert_user_error(proc, f"{bad}:2")
