"""第 2 课 06：显存公式与实测峰值内存相差 ≤ 25%；典型情况的建议；坏参数一行报错。"""
import json

from tests.conftest import assert_claims, assert_user_error, load_script

SCRIPT = "lesson2_qlora_ptuning/06_method_selection/method_selector.py"


def test_formula_matches_measured_peaks(tmp_path, tiny_models, run_script):
    # 新进程里量：同一个 pytest 进程里先跑过的测试会留下分配器缓存，RSS 峰值差就不只是这一步的了
    run_script(SCRIPT, "--smoke", "--output-dir", str(tmp_path), timeout=600, check=True)
    m = saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert set(saved["estimate_error_pct"]) == {"full", "lora", "qlora", "ptuning_v2"}
    # 公式（权重 + 梯度 + 优化器 + 激活）与 tiny-llama 上一个训练步的实测峰值相差都在 25% 以内
    for method, err in m["estimate_error_pct"].items():
        assert abs(err) <= 25, (method, m["measurements"])
    assert m["within_25pct"] is True
    recs = {r["case"]: r for r in m["recommendations"]}
    # 70B 单张 48 GB：只有 QLoRA 放得下（QLoRA 论文的 65B/48GB）；7B 单卡 80 GB 放不下全参数（≈ 16 字节/参数）
    assert recs["70B on 1x48GB"]["method"] == "qlora"
    assert recs["7B on 1x80GB"]["estimate_gb"]["full"] > 80 and recs["7B on 1x80GB"]["method"] == "lora"
    # 8 张 80 GB 卡按 ZeRO-3 平分后每卡的估计小于单卡
    assert recs["70B on 8x80GB"]["estimate_gb"]["full"] < recs["70B on 1x48GB"]["estimate_gb"]["full"] / 4
    for r in recs.values():
        e = r["estimate_gb"]
        assert e["qlora"] < e["lora"] < e["full"]
    # 你的情况（--smoke 的默认：7B、1×24 GB、5000 条、效果优先）与表里同样硬件的典型情况给出同一个建议
    assert m["your_case"]["method"] == recs["7B on 1x24GB"]["method"], (m["your_case"], recs["7B on 1x24GB"])
    assert_claims(saved)


def test_params_and_goal(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    a = mod.Args(smoke=True, output_dir=str(tmp_path))
    # 数据少时效果优先也不选全参数；多任务选 P-Tuning v2（放得下时）
    assert mod.recommend(1e9, 80, 1, 200, "quality", a)["method"] == "lora"
    assert mod.recommend(1e9, 80, 1, 50000, "multitask", a)["method"] == "ptuning_v2"
    assert mod.recommend(1e9, 80, 1, 50000, "quality", a)["method"] == "full"


def test_bad_goal_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--goal", "speed", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--goal")
