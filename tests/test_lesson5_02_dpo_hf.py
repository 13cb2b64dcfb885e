"""第 5 课 02：HF 平台方式的 DPO。

TrlParser 读配方、留出偏好对 margin 由 0 变正、模型卡带元数据与指标、离线 --push 只写目录。
"""
import json

import yaml

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py"


def test_dpo_recipe_model_card_and_offline_push(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, push=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("eval_reward_margin", "eval_reward_accuracy", "train_loss", "model_card_path"):
        assert key in saved, key
    assert_claims(saved)
    # 训练前策略 = 参考模型，margin 恰为 0；DPO 之后留出偏好对上 chosen 的隐式奖励明显高于 rejected
    assert m["eval_reward_margin_before"] == 0 and m["eval_reward_margin"] > 0.2, m
    assert m["eval_reward_accuracy"] > m["eval_reward_accuracy_before"] + 0.3, m
    card = (tmp_path / "repo" / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "tiny-qwen2" and "dpo" in meta["tags"] and meta["license"] == "apache-2.0"
    assert f"{m['eval_reward_margin']:.4f}" in card and "预期用途" in card and "局限" in card
    assert (tmp_path / "repo" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "repo" / "dpo_hf.yaml").is_file() and (tmp_path / "repo" / "accelerate_single.yaml").is_file()
    assert m["push_status"] == "offline"   # 测试离线：不上传，只写好目录并说明


def test_recipe_is_valid_for_trl():
    from trl import DPOConfig, ModelConfig, ScriptArguments, TrlParser

    mod = load_script(SCRIPT)
    s, t, mc = TrlParser((ScriptArguments, DPOConfig, ModelConfig)).parse_args_and_config(
        args=["--config", str(mod.RECIPES / "dpo_hf.yaml"), "--output_dir", "/tmp/x", "--use_cpu", "true",
              "--bf16", "false"])
    assert t.beta == 0.1 and mc.use_peft and s.dataset_name == "data/preference/pairs.jsonl"


def test_bad_recipe_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.yaml"
    bad.write_text("beta: 0.1\nno_such_field: 3\n", encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--recipe", str(bad), "--output-dir", str(tmp_path / "o"), timeout=300)
    assert_user_error(proc, "--recipe")
