"""第 5 课 01：数据到上线一条龙。SFT 降损失、DPO 过闸门、注册进 MLflow（@champion）、服务经 API 应答；
闸门不过就不上线。"""
import json

import pytest

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/01_qwen_workflow/qwen_alignment_workflow.py"


@pytest.mark.needs_service
def test_data_to_online(tmp_path, tiny_models):
    from mlflow import MlflowClient

    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("sft_eval_loss_after", "dpo_reward_accuracy", "gate_passed", "registered_version", "served_answer"):
        assert key in saved, key
    assert_claims(saved)
    assert m["sft_eval_loss_after"] < m["sft_eval_loss_before"] - 0.05, m
    assert m["dpo_reward_accuracy"] > 0.5 and m["dpo_reward_margin"] > 0, m
    assert m["gate_passed"] is True and m["registered_version"] == 1
    assert m["served_answer"].strip(), "上线后的服务应经 API 返回回答"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mv = MlflowClient(uri, uri).get_model_version_by_alias("course-assistant", "champion")
    assert int(mv.version) == 1
    assert list((tmp_path / "merged").glob("*.safetensors")) and not list((tmp_path / "merged").glob("adapter_*"))


@pytest.mark.slow
def test_failed_gate_stops_before_registration(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path), sft_steps=1, dpo_steps=1, gate_min_dpo_accuracy=1.0,
                          gate_min_sft_gain=5.0))
    assert m["gate_passed"] is False and m["registered_version"] == 0 and m["served_answer"] == ""
    assert not (tmp_path / "merged").exists() and not (tmp_path / "mlflow.db").exists()


def test_bad_gate_threshold_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--gate-min-dpo-accuracy", "1.5", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--gate-min-dpo-accuracy")
