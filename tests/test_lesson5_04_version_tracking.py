"""第 5 课 04：真实 mlflow server 上的版本管理。别名加载逐字一致、回滚一致、服务器中途停住训练照常、指标补传完整。"""
import json

import pytest

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/04_model_versioning/version_tracking.py"


@pytest.mark.needs_service
def test_registry_aliases_rollback_and_outage(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("registered_versions", "champion_version", "reload_matches", "survived_tracking_outage"):
        assert key in saved, key
    assert_claims(saved)
    assert m["registered_versions"] == 2
    # 晋升规则：eval_loss 更低的版本是 champion
    assert (m["v1_version"], m["v2_version"]) == (1, 2)
    assert m["champion_version"] == (2 if m["eval_loss_v2"] < m["eval_loss_v1"] else 1), m
    # 两个版本的回答确实不同，所以"按别名加载一致""回滚后一致"不是平凡成立
    assert m["v1_v2_answers_differ"] is True
    assert m["reload_matches"] is True and m["rollback_matches"] is True
    # 服务器进程被停住（SIGSTOP）期间：记录失败、进缓冲，训练跑完；恢复后 16 步全部在 MLflow 里
    assert m["outage_failed_logs"] >= 1 and m["outage_buffered_metrics"] >= 5
    assert m["survived_tracking_outage"] is True and m["metric_steps_in_mlflow"] == 16
    assert (tmp_path / "mlflow.db").is_file() and list((tmp_path / "mlartifacts").rglob("adapter_model.safetensors"))
    assert list((tmp_path / "wandb").glob("offline-run-*")), "W&B 离线运行目录应存在"

    # 学生再跑一次（同一个输出目录、同一个 SQLite 注册表）：版本接着编号成 3、4，晋升结论按本次的版本号判，仍成立
    again = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    assert (again["v1_version"], again["v2_version"]) == (3, 4)
    assert again["champion_version"] == (4 if again["eval_loss_v2"] < again["eval_loss_v1"] else 3), again
    assert_claims(json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8")))


def test_unreachable_tracking_uri_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--tracking-uri", "http://127.0.0.1:9", "--output-dir", str(tmp_path),
                      timeout=300)
    assert_user_error(proc, "--tracking-uri")
