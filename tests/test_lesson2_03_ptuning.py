"""第 2 课 03：P-Tuning v2（每层前缀）在留出的情感数据上训练后准确率上升；与 v1 / LoRA 同表；坏输入一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson2_qlora_ptuning/03_ptuning/ptuning_v2_demo.py"


def test_ptuning_v2_accuracy_rises(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert set(m["labels"]) == {"negative", "neutral", "positive"} and m["eval_examples"] == 60
    for method in ("ptuning_v2", "ptuning_v1", "lora"):
        for key in ("accuracy_before", "accuracy_after", "trainable_params", "seconds"):
            assert key in saved[method], (method, key)
    v2, v1, lora = m["ptuning_v2"], m["ptuning_v1"], m["lora"]
    # 冻结模型，只训练每层的前缀：留出准确率上升（tiny-llama 固定种子 0.42 -> 0.55）
    assert v2["accuracy_after"] >= v2["accuracy_before"] + 0.08, v2
    # 可训练参数：前缀 = 层数 × 2(K,V) × 虚拟 token × kv 维 = 4 × 2 × 16 × 64；远少于 LoRA
    assert v2["trainable_params"] == 4 * 2 * 16 * 64
    assert v2["trainable_params"] < v1["trainable_params"] < lora["trainable_params"]
    assert (tmp_path / "methods.png").stat().st_size > 0
    assert_claims(saved)


def test_bad_label_file_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "很好", "label": "positive"}\n{"text": "很差"}\n', encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=180)
    assert_user_error(proc, f"{bad}:2")


def test_unknown_method_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--methods", "p_tuning_v3", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--methods")


def test_single_token_labels_scored_in_one_forward_match_the_full_sequence(tiny_models):
    """标签都是单 token 时一次前向读最后位置的分布（K 倍省算）：必须和"标签接在提示后整串算"的 log p 一样。"""
    import torch

    from common import lm, models

    mod = load_script(SCRIPT)
    model, tok = models.load("tiny-llama", dtype="float32")   # bf16 默认会让两条路径差 1e-2：比的是算法不是精度
    batch = [{"prompt": tok(t, add_special_tokens=False)["input_ids"], "y": 0}
             for t in ("Review: great phone\nSentiment:", "Review: it broke after one day, awful\nSentiment:")]
    labels = [[553], [1681], [2417]]
    with torch.no_grad():
        fast = mod.label_scores(model, batch, labels, tok.pad_token_id, 0)
        full = torch.stack([lm.sequence_logprobs(model, torch.tensor([ex["prompt"] + lab]),
                                                 mask=torch.tensor([[0] * len(ex["prompt"]) + [1]]))[0]
                            for ex in batch for lab in labels]).view(2, 3)
    assert torch.allclose(fast, full, atol=1e-4), (fast, full)
