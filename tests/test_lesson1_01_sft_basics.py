"""第 1 课 01：SFT 在优化什么。掩码落在助手回复上、两种训练用同一把尺子量、full-sequence 把力气花在 prompt 上。"""
import json

from common import data, models
from tests.conftest import assert_user_error, load_script

SCRIPT = "lesson1_sft/01_sft_basics/sft_theory_notebook.py"


def test_assistant_mask_covers_exactly_the_reply(tiny_models):
    """带损失的 token 解码回来就是助手回复（加上模板的结束标记），一个 prompt token 都不多。"""
    tok = models.load_tokenizer("tiny-qwen2")
    conv = [{"role": "system", "content": "你是客服助手。"}, {"role": "user", "content": "怎么退货？"},
            {"role": "assistant", "content": "七天内在订单页点击申请退货即可。"}]
    enc = data.tokenize_chat(tok, conv, 512)
    reply = tok.decode([t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m])
    assert reply.strip().startswith("七天内在订单页点击申请退货即可。"), reply
    assert "怎么退货" not in reply and "客服助手" not in reply
    assert enc["labels"] == [t if m else -100 for t, m in zip(enc["input_ids"], enc["assistant_masks"])]


def test_smoke_compares_both_objectives_on_same_ruler(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("assistant_only_eval_loss", "full_sequence_eval_loss", "label_token_fraction"):
        assert key in saved
    # 只有一部分 token（助手回复）带损失
    assert 0.2 < m["label_token_fraction"] < 0.8, m
    # full-sequence 也在学 prompt：它在 prompt token 上的损失比只学回复的模型低得多
    assert m["full_sequence_prompt_loss"] < m["assistant_only_prompt_loss"] - 0.05, m
    # 只学回复的模型，留出集回复损失比训练前低（固定种子下的余量约 0.03）
    assert m["assistant_only_eval_loss"] < m["eval_loss_before"] - 0.01, m
    assert all(0 < m[k] < 20 for k in ("assistant_only_eval_loss", "full_sequence_eval_loss", "eval_loss_before"))
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_bad_data_line_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "你好", "output": "你好！"}\n{"instruction": "坏行", \n', encoding="utf-8")
    p = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=600)
    assert_user_error(p, f"{bad}:2")
