"""第 3 课 02：超大模型的 ZeRO-3 方案。参数从真实架构数出来、放不下的方案说明原因、
生成的配置都被 DeepSpeed/accelerate 接受。"""
import json

import pytest

from common import train
from common.errors import UserError
from tests.conftest import REPO, assert_claims, assert_user_error, load_script

SCRIPT = "lesson3_distributed/02_8gpu_config/ds_config_builder.py"


def test_plans_for_671b_moe_and_70b_dense(tmp_path):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    # 参数量来自 transformers 的真实架构（meta 设备），与官方公布的规模一致
    assert abs(m["params"]["deepseek-v3-671b"] / 1e9 - 671) < 1 and abs(m["params"]["llama3-70b"] / 1e9 - 70.6) < 0.5
    for key, p in m["plans"].items():
        assert {"mem_per_gpu_gb", "fits"} <= set(p), key
        assert p["fits"] == (p["why"] == "放得下"), p
    plans = m["plans"]
    # 单节点不 offload：70B 的优化器分片就超过 80 GB；671B 在 16 节点也放不下，主因是一次要聚齐的 MoE 专家层
    assert not plans["llama3-70b/1n/zero3+none"]["fits"] and "optimizer" in plans["llama3-70b/1n/zero3+none"]["why"]
    assert not plans["deepseek-v3-671b/16n/zero3+none"]["fits"]
    assert plans["deepseek-v3-671b/16n/zero3+none"]["breakdown_gb"]["gathered_layer"] > 40
    # 节点越多每卡越省；offload 越多每卡越省，但每节点内存越多
    assert plans["llama3-70b/4n/zero3+none"]["mem_per_gpu_gb"] < plans["llama3-70b/1n/zero3+none"]["mem_per_gpu_gb"]
    assert plans["llama3-70b/1n/zero3+opt+param"]["mem_per_gpu_gb"] < plans["llama3-70b/1n/zero3+opt"]["mem_per_gpu_gb"]
    assert plans["llama3-70b/1n/zero3+opt"]["cpu_per_node_gb"] > 0 \
        == plans["llama3-70b/1n/zero3+none"]["cpu_per_node_gb"]
    # 671B 在 1 节点即使全部 offload 显存够了，也因每节点内存不够而放不下
    assert "内存" in plans["deepseek-v3-671b/1n/zero3+opt+param"]["why"]
    # 推荐方案：生成的 DeepSpeed JSON 与 accelerate YAML 各自被原库接受
    from accelerate.commands.config.config_args import ClusterConfig

    assert set(m["recommended"]) == {"deepseek-v3-671b", "llama3-70b"}
    for name, rec in m["recommended"].items():
        p = plans[rec["plan"]]
        assert p["fits"]
        cfg = json.loads((tmp_path / rec["ds_config"]).read_text(encoding="utf-8"))
        train.validate_ds_config(cfg, p["gpus"], rec["ds_config"])
        per_step = cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"]
        assert cfg["train_batch_size"] == per_step * p["gpus"]
        acc = ClusterConfig.from_yaml_file(str(tmp_path / rec["accelerate"]))
        assert acc.num_processes == p["gpus"] and acc.num_machines == p["nodes"]
        hostfile = next(tmp_path.glob(f"hostfile_{name}_*")).read_text().splitlines()
        assert len(hostfile) == p["nodes"] and all(line.endswith("slots=8") for line in hostfile)
        assert all(k in rec["commands"] for k in ("deepspeed", "torchrun", "accelerate"))
    assert (tmp_path / "mem_per_gpu.png").stat().st_size > 0
    assert_claims(json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8")))


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    files = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert files
    for f in files:
        acc = ClusterConfig.from_yaml_file(str(f))
        if acc.distributed_type == "DEEPSPEED":
            assert (REPO / acc.deepspeed_config["deepspeed_config_file"]).is_file(), f


def test_unknown_model_is_one_line_error(tmp_path, run_script):
    mod = load_script(SCRIPT)
    with pytest.raises(UserError, match="--models"):
        mod.count("gpt-5")
    proc = run_script(SCRIPT, "--smoke", "--models", "gpt-5", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--models gpt-5")
