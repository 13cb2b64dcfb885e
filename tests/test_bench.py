"""make bench（benchmarks/bench.py）：表的每一行都在结果文件里，比值与目标按同一次运行的两个数算，
没跑成的步骤写原因而不是 0。真正的测量要空闲的机器、约 20 分钟，不在测试里跑。
"""
import json

from tests.conftest import REPO, load_script

bench = load_script("benchmarks/bench.py")


def _found() -> dict:
    """一份伪造的各步骤指标（展平后的键），数值故意让一条目标达到、一条达不到。"""
    return {"train": {"matmul_peak_gflops": 100.0, "tricks.padded.tokens_per_s": 200.0,
                      "tricks.packed.tokens_per_s": 300.0, "tricks.packed_ckpt.tokens_per_s": 250.0,
                      "tricks.packed.mfu": 0.3, "tricks.packed.peak_mem_mb": 1000.0,
                      "tricks.packed_ckpt.peak_mem_mb": 600.0},
            "serve": {"concurrency_1.tokens_per_s": 30.0, "concurrency_8.tokens_per_s": 120.0}}


def test_ratios_targets_and_missing_steps():
    table = {r["what"]: r for r in bench.rows(_found(), {"llama_cpp": "llama-server 没有测：没有编译器"})}
    assert len(table) == len(bench.ROWS)   # 每一行都在，没测到的也在
    packed = table["训练：打包 ÷ 填充 tokens/s"]
    assert packed["value"] == 1.5 and packed["held"] is True
    mfu = table["训练：打包的 MFU"]
    assert mfu["value"] == 0.3 and mfu["held"] is False   # 0.3 < 0.4：达不到就是 ✗，不被"有数"掩盖
    ckpt = table["训练：打包 + 重算 ÷ 打包 的峰值内存"]
    assert ckpt["value"] == 0.6 and ckpt["held"] is True
    # 分母那一步没跑：值为空、原因点名那一步，而不是除出一个 0 或把行删掉
    peer = table["本课服务 ÷ llama-server：1 并发 tokens/s"]
    assert peer["value"] is None and peer["held"] is None and "没有编译器" in peer["why_missing"]
    ev = table["评估 tokens/s ÷ 训练 tokens/s（LoRA，同一次运行）"]
    assert ev["value"] is None and "eval" in ev["why_missing"]


def test_recorded_result_has_every_row():
    path = REPO / "results" / "bench-cpu-2core.json"
    if not path.exists():   # 还没在空闲机器上跑过 make bench：README 的块如实写"还没有记录"
        import course
        assert "还没有记录" in course.render_bench(path)
        return
    b = json.loads(path.read_text(encoding="utf-8"))
    assert [r["what"] for r in b["rows"]] == [r[0] for r in bench.ROWS]
    for r in b["rows"]:   # 每行要么有数，要么写明为什么没有
        assert r["value"] is not None or r["why_missing"], r


def test_result_keeps_only_the_keys_the_table_uses():
    """结果文件只存表里用到的指标（分子与分母都算）：--only 重跑几步时，其余步骤从这里接着算比值。"""
    used = bench._used("llama_cpp", {"concurrency_1": {"tokens_per_s": 60.0, "p50_ms": 9.0}, "target": "x",
                                     "concurrency_8": {"tokens_per_s": 150.0}})
    assert used == {"concurrency_1.tokens_per_s": 60.0, "concurrency_8.tokens_per_s": 150.0}
    assert "tricks.padded.tokens_per_s" in bench._used("train", {"tricks": {"padded": {"tokens_per_s": 1.0}}})


def test_greedy_answers_are_compared_word_for_word_with_the_fp32_server():
    """速度换来的差别要量出来：每个压测步骤的贪心回答与 fp32 服务（serve）逐字比，相同的比例进表。"""
    used = bench._used("serve_compiled", {"concurrency_1": {"tokens_per_s": 70.0}, "greedy": ["a", "b", "c", "d"]})
    assert used["greedy"] == ["a", "b", "c", "d"]   # 原文整段留着：不同步骤之间要逐字比
    found = {"serve": {"greedy": ["a", "b", "c", "d"]}, "serve_compiled": used,
             "llama_cpp": {"greedy": ["a", "x", "y", "d"]}, "train": {"matmul_peak_gflops": 1.0}}
    bench.greedy_agreement(found)
    assert found["serve_compiled"]["greedy_same_as_fp32"] == 1.0
    assert found["llama_cpp"]["greedy_same_as_fp32"] == 0.5
    assert "greedy_same_as_fp32" not in found["train"]
    table = {r["what"]: r for r in bench.rows(found, {})}
    assert table["llama-server（Q4_1）：贪心回答与 fp32 服务逐字相同的比例（8 个问题）"]["value"] == 0.5
