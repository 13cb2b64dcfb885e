"""第 5 课 06：多样性诊断。贪心每次回答相同（被标为坍缩），温度采样多样得多；指标函数本身可靠。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/06_diversity_debug/diversity_evaluation.py"


def test_decoding_settings_change_diversity(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for name in ("greedy", "temp_0.7", "temp_1.0", "top_p_0.9", "top_k_20", "rep_penalty_1.3"):
        for key in ("distinct_1", "distinct_2", "self_bleu"):
            assert key in saved[name], (name, key)
    assert_claims(saved)
    g, t = m["greedy"], m["temp_1.0"]
    # 贪心：同一问题的 4 个回答逐字相同 -> self-BLEU 接近 1、句向量离散度 0、被标为坍缩
    assert g["self_bleu"] > 0.9 and g["embedding_dispersion"] < 1e-3 and g["mode_collapse"] is True
    # 温度 1.0 采样：明显更多样
    assert t["distinct_2"] > g["distinct_2"] + 0.3 and t["self_bleu"] < g["self_bleu"] - 0.5, (g, t)
    assert t["mode_collapse"] is False
    assert set(m["models"]) == {"sft", "dpo"} and isinstance(m["mode_collapse"], bool)
    assert (tmp_path / "diversity.png").stat().st_size > 0


def test_metric_functions():
    mod = load_script(SCRIPT)
    same = ["the robot vacuum is great"] * 3
    assert mod.self_bleu(same) > 0.99 and mod.distinct_n(same, 2) == 4 / 12
    varied = ["the robot vacuum is great", "please reset the lock", "退款三天到账"]
    assert mod.self_bleu(varied) < 0.1 and mod.distinct_n(varied, 2) == 1.0
    assert mod.repetition("a b c a b c a b c") > 0.5 and mod.repetition("a b c d e") == 0


def test_bad_num_samples_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--num-samples", "1", "--output-dir", str(tmp_path))
    assert_user_error(proc, "--num-samples")
