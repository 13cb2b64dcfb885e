"""第 3 课 03：训练加速实测。打包去掉填充且损失不变、梯度检查点降峰值内存、打包不串样本、MFU 有意义、坏参数一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson3_distributed/03_training_acceleration/acceleration_tricks.py"


def test_packing_removes_padding_and_checkpointing_saves_memory(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("packing_speedup", "ckpt_mem_ratio", "mfu", "tricks"):
        assert key in saved, key
    t = m["tricks"]
    assert {"padded", "packed", "packed_ckpt", "padding_free", "padded_eager", "packed_accum"} <= set(t)
    for name, r in t.items():
        # MFU 的分子按真实 token 算（不含填充与重算）：超过 1 说明 FLOPs 数错了
        assert 0 < r["mfu"] < 1, (name, r)
        # 所有招数训练的是同样多的真实 token：前向位置数 × (1 − 填充比例) = 真实 token 数
        assert abs(r["forward_tokens"] * (1 - r["padding_fraction"]) - m["real_tokens"]) < 1e-3 * r["forward_tokens"]
    # 长回答数据长短不齐：按批内最长补齐要浪费约 40% 的位置，打包后只剩行尾的零头
    assert t["padded"]["padding_fraction"] > 0.25 and t["packed"]["padding_fraction"] < 0.1, t
    assert t["padding_free"]["padding_fraction"] == 0
    # 打包省下的是前向要算的位置：同样的真实 token，打包的前向位置数比填充少四分之一以上。
    # （吞吐比 packing_speedup 在 metrics 里，但繁忙的共享 CPU 上每招只跑一遍，计时比值不拿来断言）
    assert t["packed"]["forward_tokens"] < 0.75 * t["padded"]["forward_tokens"], t
    # 打包不改变损失：同两条样本，填充成矩形与打包成一行（position_ids 归零、段首 label 置 -100）的损失相同；
    # 拼在一行的两条样本与各自单独前向的 logits 一致（position_ids 归零 -> 块对角掩码）
    assert m["packed_vs_padded_loss_diff"] < 1e-5 and m["packed_max_logit_diff"] < 1e-4, m
    # 梯度检查点：只存层边界，反向时重算，峰值内存下降（约 0.85；极小模型的 logits 占大头，所以降得不多）
    assert m["ckpt_mem_ratio"] < 0.95, (t["packed_ckpt"], t["packed"])
    # eager 注意力把 s×s 的分数矩阵存下来，sdpa 不存：eager 的峰值内存更高
    assert t["padded_eager"]["peak_mem_mb"] > t["padded"]["peak_mem_mb"], t
    assert (tmp_path / "acceleration_tricks.png").stat().st_size > 0
    assert_claims(saved)


def test_unknown_trick_and_bad_data_are_one_line_errors(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--tricks", "padded", "warp_drive", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--tricks warp_drive")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2"}\n', encoding="utf-8")
    proc = run_script(SCRIPT, "--smoke", "--data", str(bad), "--output-dir", str(tmp_path / "o"), timeout=180)
    assert_user_error(proc, f"{bad}:2")
