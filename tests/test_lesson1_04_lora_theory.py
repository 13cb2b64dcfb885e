"""第 1 课 04：LoRA 为什么可行。全参数微调的 ΔW 能量集中在前几个奇异方向；LoRA 参数量随秩线性增长。"""
import json

import pytest

from common.errors import UserError
from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson1_sft/04_lora_theory/lora_parameter_viz.py"


def test_delta_w_is_low_rank_and_lora_counts_match(tmp_path, tiny_models, shared_smoke):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    shared_smoke.share(SCRIPT, tmp_path)   # 可复现测试拿它当两次运行里的一次
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("delta_energy_top8", "lora_params", "full_params"):
        assert key in saved
    # ΔW 的前 8 个方向装下的能量远多于同形状的随机矩阵，也多于预训练权重本身
    assert m["delta_energy_top8"] > m["random_energy_top8"] + 0.3, m
    assert m["delta_energy_top8"] > m["weight_energy_top8"] + 0.1, m
    by_rank = m["delta_energy_by_rank"]
    assert all(by_rank[a] <= by_rank[b] for a, b in zip(list(by_rank), list(by_rank)[1:]))
    # PEFT 真实清点的参数量 = r·(d_in + d_out) 之和，随秩线性增长，远小于全量
    lp = {int(r): n for r, n in m["lora_params"].items()}
    assert m["lora_params_match_formula"] and set(lp) == {1, 2, 4, 8, 16, 32, 64}
    assert all(lp[2 * r] == 2 * lp[r] for r in lp if 2 * r in lp)
    assert lp[8] < 0.1 * m["full_params"]
    assert {"q_proj", "v_proj", "down_proj"} <= set(m["lora_target_modules"])
    assert (tmp_path / "delta_w_spectrum.png").stat().st_size > 0 and (tmp_path / "energy_vs_rank.png").is_file()
    assert_claims(saved)


def test_bad_data_line_is_one_line_error(tmp_path, run_script):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "你好", "output": "你好！"}\n{"instruction": "少了 output"}\n', encoding="utf-8")
    p = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "out"), timeout=600)
    assert_user_error(p, f"{bad}:2", "output")


@pytest.mark.parametrize("targets,missing", [("no_such_module", "no_such_module"), ("q_proj,v_prj", "v_prj"),
                                             ("layers", "layers")])
def test_unknown_target_module_lists_the_real_names(tmp_path, tiny_models, targets, missing):
    """--target-modules 里有对不上的名字（PEFT：全都对不上是 traceback，部分对不上悄悄忽略）：一行点名参数、
    对不上的名字，并列出模型里 Linear 层的名字（issue 22 第 6 组）。"""
    import torch

    from common import cli

    mod = load_script(SCRIPT)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(UserError) as e:
            mod.main(cli.parse(mod.Args, ["--smoke", "--target-modules", targets, "--output-dir", str(tmp_path)]))
    finally:
        torch.set_num_threads(threads)   # 冒烟的 run.start 改了线程数，出错时没走到 finish 还原
    msg = str(e.value)
    assert msg.startswith(f"--target-modules {targets}: ") and f"名为 {missing} 的" in msg and "\n" not in msg, msg
    assert "q_proj" in msg and "down_proj" in msg and "all-linear" in msg, msg
    assert not (tmp_path / "metrics.json").exists()
