"""第 1 课 01：SFT 在优化什么。掩码落在助手回复上、两种训练用同一把尺子量、full-sequence 把力气花在 prompt 上。"""
import json

import pytest

from common import data, models
from tests.conftest import assert_claims, assert_user_error, load_script

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


def test_two_datasets_differ_only_in_labels(tiny_models):
    """两份训练集 token 一模一样，只有损失掩码不同；带损失 token 的比例 = 回复 token / 全部 token，
    比 full-sequence 的 1 小（它在全部 token 上算损失）。"""
    mod = load_script(SCRIPT)
    tok = models.load_tokenizer("tiny-qwen2")
    convs = data.load_sft(data.DATA_DIR / "sft" / "chat.jsonl")[:6]
    assistant_only, full, fraction = mod.build_datasets(tok, convs, 128)
    assert list(assistant_only["input_ids"]) == list(full["input_ids"])
    replies = sum(sum(m) for m in assistant_only["assistant_masks"])
    total = sum(len(ids) for ids in full["input_ids"])
    assert fraction == replies / total and 0 < replies < total


def test_heldout_losses_match_cross_entropy(tiny_models):
    """同一把尺子：批量、右填充地量出的回复损失与 prompt 损失，等于一条一条用交叉熵算再按 token 加权平均。"""
    import torch
    import torch.nn.functional as F

    mod = load_script(SCRIPT)
    model, tok = models.load("tiny-qwen2", device="cpu", dtype="float32")
    convs = data.load_sft(data.DATA_DIR / "sft" / "chat.jsonl")[:5]
    encs = [data.tokenize_chat(tok, c, 128) for c in convs]
    resp, prompt = mod.heldout_losses(model, tok, encs, batch_size=4)   # 5 条：第二批只有 1 条，两批宽度不同
    sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for e in encs:
            ids = torch.tensor([e["input_ids"]])
            nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
            is_resp = torch.tensor(e["assistant_masks"][1:]).bool()
            for j, sel in enumerate((is_resp, ~is_resp)):
                sums[j] += nll[sel].sum().item()
                counts[j] += int(sel.sum())
    assert resp == pytest.approx(sums[0] / counts[0], rel=1e-4)
    assert prompt == pytest.approx(sums[1] / counts[1], rel=1e-4)


def test_smoke_compares_both_objectives_on_same_ruler(tmp_path, tiny_models, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("assistant_only_eval_loss", "full_sequence_eval_loss", "label_token_fraction"):
        assert key in saved
    # full-sequence 也在学 prompt：它在 prompt token 上的损失比只学回复的模型低得多
    assert m["full_sequence_prompt_loss"] < m["assistant_only_prompt_loss"] - 0.05, m
    # 只学回复的模型，留出集回复损失比训练前低（固定种子下的余量约 0.03）；full-sequence 也在学回复，同样变低
    assert m["assistant_only_eval_loss"] < m["eval_loss_before"] - 0.01, m
    assert m["full_sequence_eval_loss"] < m["eval_loss_before"], m
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert_claims(saved)


def test_bad_data_line_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "你好", "output": "你好！"}\n{"instruction": "坏行", \n', encoding="utf-8")
    p = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=600)
    assert_user_error(p, f"{bad}:2")
