"""第 4 课 06：偏好数据治理。埋下的重复、近似重复、有害 chosen、标注分歧、长度偏置、泄漏都被对应规则处理；
坏数据一行报错。
"""
import json
import random

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson4_alignment/06_dataset_curation/dataset_curation.py"


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_planted_problems_are_removed(tmp_path):
    # 40 对互不相似的干净数据（随机词拼成）；32 对 chosen 更长、8 对更短：长度偏置 0.8
    rng = random.Random(0)
    words = ("battery charger lock vacuum purifier warranty refund points app hotline filter brush winter range "
             "cable socket invoice delivery install privacy member yuan hours minutes sensor motor screen door "
             "window room floor pet hair dust smoke smell noise light button reset update").split()
    say = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    clean = [{"prompt": f"{say(8)}?", "chosen": say(14 if i < 32 else 3), "rejected": say(3 if i < 32 else 14)}
             for i in range(40)]
    dirty = [dict(clean[0]), dict(clean[1]),                                           # 2 条完全重复
             {**clean[2], "prompt": clean[2]["prompt"].upper() + "  "},                   # 1 条规范化后相同
             {**clean[3], "chosen": clean[3]["chosen"] + " thanks"},                      # 1 条近似重复
             {"prompt": "How do I make a bomb at home?", "chosen": "Here is how to make a bomb: ...",
              "rejected": "I can't help with that."},                                   # 1 条有害 chosen
             {"prompt": "Split vote question here?", "chosen": "A", "rejected": "B", "votes": ["chosen", "rejected"]},
             {"prompt": "Same text both sides?", "chosen": "Same.", "rejected": "Same."}]  # 无信息对
    data, extra, ev = tmp_path / "pairs.jsonl", tmp_path / "extra.jsonl", tmp_path / "eval.jsonl"
    _write(data, clean)
    _write(extra, dirty)
    _write(ev, [clean[5], clean[6]])   # 外部评估集里的两个 prompt 泄漏进了训练数据
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, data=str(data), extra_data=str(extra), graded="", eval_data=str(ev),
                          output_dir=str(tmp_path / "out")))
    rules = m["removed_by_rule"]
    assert m["pairs_in"] == 47
    assert rules["exact_duplicate"] == 3 and rules["near_duplicate"] == 1, rules
    assert rules["unsafe_chosen"] == 1 and rules["low_agreement"] == 1 and rules["identical_responses"] == 1, rules
    assert rules["eval_leak"] == 2, rules
    # 长度偏置：0.8 -> 下采样 chosen 更长的对，回到 0.5 ± 0.1
    assert m["length_bias_before"] > 0.75 and abs(m["length_bias_after"] - 0.5) <= 0.1 + 1e-9, m
    assert abs(m["length_bias_after"] - 0.5) < abs(m["length_bias_before"] - 0.5) - 0.15, m
    assert m["leaked_prompts_after"] == 0
    out = tmp_path / "out"
    kept = [json.loads(x) for x in (out / "pairs_clean.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(kept) == m["pairs_out"] and not any("bomb" in r["chosen"] for r in kept)
    assert len({r["prompt"].lower().strip() for r in kept}) == len(kept)
    assert rules["length_rebalance"] >= 15
    removed = (out / "removed.jsonl").read_text(encoding="utf-8")
    assert removed.count('"rule"') == m["pairs_in"] - m["pairs_out"]
    assert "length_rebalance" in (out / "curation_report.md").read_text(encoding="utf-8")
    assert "<table>" in (out / "curation_report.html").read_text(encoding="utf-8")


def test_default_data_random_split_leaks(tmp_path):
    """项目自带数据 + data/preference_raw/：随机切分会泄漏，按 prompt 分组切分后为 0。"""
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    assert m["leaked_prompts"] > 0 and m["leaked_prompts_after"] == 0, m
    assert m["removed_by_rule"]["unsafe_chosen"] == 4 and m["flipped_by_votes"] == 1, m
    assert m["pairs_from_graded"] > 0 and m["pairs_out"] < m["pairs_in"]
    assert_claims(m)


def test_bad_graded_file_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "graded.jsonl"
    bad.write_text('{"prompt": "q", "responses": [{"text": "a", "score": 1}, {"text": "b"}]}\n', encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--graded", str(bad), "--output-dir", str(tmp_path / "o"), timeout=180)
    assert_user_error(proc, f"{bad}:1")
