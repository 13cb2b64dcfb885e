"""第 1 课 05：LoRA 微调 GLM 架构对话模型。损失下降、身份准确率上升、adapter 与合并模型一致、坏数据一行报错。"""
import json

from tests.conftest import assert_user_error, load_script

SCRIPT = "lesson1_sft/05_lora_finetune/lora_chatglm_demo.py"


def test_lora_identity_finetune_and_merge(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_loss_before", "eval_loss_after", "identity_accuracy_before", "identity_accuracy_after",
                "trainable_ratio", "merged_matches_adapter", "samples"):
        assert key in saved, key
    assert m["model"] == "tiny-glm"
    # 训练的效果：验证损失下降（固定种子下约 5.6 -> 4.4），留出身份问题的准确率明显上升（0 -> 0.6）
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.3, m
    assert m["identity_accuracy_after"] >= m["identity_accuracy_before"] + 0.3, m
    # 只训练低秩增量：可训练参数是一小部分（极小模型上约 11%，因为它的隐藏维只有 128）
    assert 0 < m["trainable_ratio"] < 0.2
    assert set(m["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"}
    # fp32 下合并只差浮点舍入；重新加载的 adapter 与训练中的模型完全一致
    assert m["merged_matches_adapter"] < 1e-3 and m["adapter_reload_max_diff"] < 1e-5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert list((tmp_path / "merged").glob("*.safetensors")) and (tmp_path / "merged" / "config.json").is_file()
    assert not list((tmp_path / "merged").glob("adapter_*")), "合并后的模型不应再带 adapter"
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert all(s["before"] != s["after"] for s in m["samples"])


def test_malformed_jsonl_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "你是谁？", "output": "我是小助手。"}\n{"instruction": "坏行", "output": \n',
                   encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=180)
    assert_user_error(proc, f"{bad}:2")
