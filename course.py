"""跑完整门课：按顺序运行每个课程脚本（各自一个进程），汇总 metrics.json 与图片到 outputs/report.html。

运行：
  python course.py --smoke               # 全部脚本的冒烟模式（极小模型，每个 1 线程、两个并排跑），课前检查用
  python course.py                       # 默认模式（smollm2-135m，CPU 上每个脚本几分钟）
  python course.py --lesson 1 --smoke    # 只跑第 1 课
  python course.py --only lora           # 只跑路径里含 lora 的脚本（也可用通配符 '*rag*'）
  python course.py --report-only         # 不运行，只用已有结果重新生成报告
  python course.py --smoke --outputs /tmp/course   # 输出（每个脚本的目录、日志、报告）写到别处
  python course.py --full --lesson 1     # 参考运行：默认模式，记录到 results/cpu-2core/（已记录且脚本没改的跳过）
  python course.py --full --compare results/cpu-2core   # 与参考比：结论翻转、墙钟 > 1.5 倍、内存 > 1.25 倍 → 退出 1
  python course.py --readme              # 用 results/ 重写 README 里标记的测量块（不手抄数字）
  python course.py --smoke --strict      # 有结论（CLAIMS）不成立也算失败
  python course.py --smoke --device cuda # GPU 检查：每个脚本加 --device cuda；机器上缺库的脚本跳过并说明缺什么

你会看到：每个脚本的通过/失败、结论 ✓/总数、用时与峰值内存表，以及一份自包含（图片内嵌）的 HTML 报告，
每个脚本的结论与参考运行并排；有脚本失败（--strict 时还有结论不成立）时退出码非 0。
"""
from __future__ import annotations

import argparse
import ast
import base64
import contextlib
import fnmatch
import hashlib
import html
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from pathlib import Path

from common import run as common_run

REPO = Path(__file__).resolve().parent
OUTPUTS = common_run.outputs_root()   # 默认 outputs/；--outputs 改它（并通过环境变量传给每个脚本）
REFERENCE = REPO / "results" / "cpu-2core"   # 参考运行：空闲 2 核 CPU、默认模式、一次一个脚本
SLOWER, FATTER = 1.5, 1.25   # --compare：墙钟超过参考 1.5 倍、峰值内存超过 1.25 倍算退步（同一台机器上的噪声远小于此）


def discover(lessons: list[int] | None = None, only: str | None = None) -> list[Path]:
    """课程脚本：lessonN_*/NN_*/ 下的 .py（按课、按编号排序）。"""
    scripts = []
    for lesson_dir in sorted(REPO.glob("lesson[0-9]_*")):
        n = int(lesson_dir.name[len("lesson")])
        if lessons and n not in lessons:
            continue
        for topic in sorted(p for p in lesson_dir.iterdir() if p.is_dir() and p.name[:2].isdigit()):
            scripts.extend(sorted(f for f in topic.glob("*.py") if not f.name.startswith(("_", "test"))))
    if only:
        pat = only if any(c in only for c in "*?[") else f"*{only}*"
        scripts = [s for s in scripts if fnmatch.fnmatch(s.relative_to(REPO).as_posix(), pat)]
    return scripts


def out_dir_of(script: Path, outputs: Path | None = None) -> Path:
    """脚本的默认输出目录：<outputs>/<lesson>/<NN_topic>/，与 common.run.default_output_dir 相同。"""
    return (outputs or OUTPUTS) / script.resolve().parent.relative_to(REPO.resolve())


def _wait_with_rusage(proc: subprocess.Popen, timeout: int) -> tuple[int, float]:
    """等子进程结束，返回 (退出码, 峰值 RSS MB)。wait4 的 ru_maxrss 含它已回收的子进程（服务、launcher）。

    超时就杀掉整个进程组（脚本可能起了子进程），退出码记 124（与 coreutils timeout 一致）。
    """
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (124 if fired.is_set() else proc.returncode), usage.ru_maxrss / 1024


def run_one(script: Path, smoke: bool, timeout: int, outputs: Path | None = None, extra: tuple = (),
            threads: int | None = None) -> dict:
    """在独立进程里运行一个脚本，日志写到 <outputs>/logs/；脚本的输出目录也在 outputs 下（经环境变量告诉它）。"""
    outputs = outputs or OUTPUTS
    rel = script.relative_to(REPO).as_posix()
    log = outputs / "logs" / (rel.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script)] + (["--smoke"] if smoke else []) + list(extra)
    # LLM_COURSE_RUNNER：脚本知道自己是被整门课调起的（如第 5 课 03 的安全闸门失败时只报告、不以退出码 1 结束）
    env = {**os.environ, "PYTHONUNBUFFERED": "1", common_run.OUTPUTS_ENV: str(outputs), "LLM_COURSE_RUNNER": "1"}
    if threads:   # 并排跑的冒烟：每个进程 threads 个线程（run.start 只降不升），两个脚本不抢同一个核
        env["OMP_NUM_THREADS"] = str(threads)
    metrics_file = out_dir_of(script, outputs) / "metrics.json"
    metrics_file.unlink(missing_ok=True)   # 失败的运行不能拿上一次的 metrics.json 冒充
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        code, rss = _wait_with_rusage(proc, timeout)
    secs = time.perf_counter() - t0
    if code == 124:
        with log.open("a", encoding="utf-8") as f:
            f.write(f"\n超时：超过 {timeout} 秒\n")
    text = log.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    metrics = json.loads(metrics_file.read_text(encoding="utf-8")) if metrics_file.exists() else {}
    claims = metrics.get("claims", [])
    missing = re.findall(r"No module named '([\w.]+)'", text) if code else []
    return {"script": rel, "ok": code == 0, "code": code, "seconds": round(secs, 1), "peak_rss_mb": round(rss),
            "summary": lines[-1][:300] if lines else "", "log": str(log), "claims": claims,
            "missing_module": missing[-1] if missing else None,
            "claims_failed": sum(c["held"] is False for c in claims), "metrics": metrics}


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows.extend(_flatten(v, key + "."))
        else:
            rows.append((key, v))
    return rows


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return html.escape(json.dumps(v, ensure_ascii=False)[:200])
    return html.escape(str(v))


def _script_sha(script: Path) -> str:
    """脚本代码的指纹：脚本本身和它旁边只属于这一课的 _*.py（common 变了不算：那由 --compare 抓）。

    取的是语法树（去掉所有文档字符串）：改注释、改说明、重写 --readme 生成的块、换行排版都不改变行为，
    不该让参考记录作废；改了一个数、一个名字、一行代码才算。
    """
    h = hashlib.sha256()
    for f in sorted([script, *script.parent.glob("_*.py")]):
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]


def _machine() -> dict:
    """参考运行是在什么机器上量的：数字只在同样的硬件上可比。"""
    from importlib.metadata import version

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": version("torch"), "python": platform.python_version()}


def _commit() -> str:
    """当前提交（工作区有未提交的改动时加 -dirty：这样的记录不能算数）。"""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "lesson*", "common"], capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty else "")


def record_path(ref: Path, rel: str) -> Path:
    """results/cpu-2core/<lesson>/<topic>/<脚本名>.json（一个主题可以有几个脚本，如第 5 课 07）。"""
    lesson, topic, name = Path(rel).parts
    return ref / lesson / topic / f"{Path(name).stem}.json"


def record(r: dict, script: Path, ref: Path) -> Path:
    """把一次运行写成参考记录：结论、数值型指标、墙钟、峰值内存、吞吐、提交与机器（小文件，提交进仓库）。"""
    flat = dict(_flatten({k: v for k, v in r["metrics"].items() if k != "claims"}))
    numbers = {k: v for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rec = {"script": r["script"], "ok": r["ok"], "code": r["code"], "mode": r["metrics"].get("mode"),
           "model": r["metrics"].get("model"), "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
           "claims": r["claims"], "tokens_per_s": {k: v for k, v in numbers.items() if "tokens_per_s" in k},
           "metrics": numbers, "script_sha": _script_sha(script), "commit": _commit(), "machine": _machine(),
           "recorded_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = record_path(ref, r["script"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def load_record(ref: Path, rel: str) -> dict | None:
    f = record_path(ref, rel)
    return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None


def compare(results: list[dict], ref: Path) -> list[str]:
    """与参考运行比：每条翻转的结论、墙钟超过 SLOWER 倍、峰值内存超过 FATTER 倍、参考通过而这次失败。"""
    problems = []
    for r in results:
        old = load_record(ref, r["script"])
        if old is None:
            continue
        before = {c["expr"]: c["held"] for c in old["claims"]}
        for c in r["claims"]:
            was = before.get(c["expr"])
            if was is not None and c["held"] is not None and was != c["held"]:
                arrow = "✓→✗" if was else "✗→✓"
                problems.append(f"{r['script']}: 结论翻转 {arrow} {c['statement']}（{c['expr']} = {c['value']}）")
        if r["seconds"] > SLOWER * old["seconds"]:
            problems.append(f"{r['script']}: 墙钟 {r['seconds']} 秒 > {SLOWER} × 参考 {old['seconds']} 秒")
        if old.get("peak_rss_mb") and r["peak_rss_mb"] > FATTER * old["peak_rss_mb"]:
            problems.append(f"{r['script']}: 峰值内存 {r['peak_rss_mb']} MB > {FATTER} × 参考 {old['peak_rss_mb']} MB")
        if old["ok"] and not r["ok"]:
            problems.append(f"{r['script']}: 参考运行通过，这次失败（退出码 {r['code']}）")
    return problems


_BEGIN, _END = "<!-- results:", "<!-- /results -->"   # README 里由 --readme 生成的块：<!-- results:NAME --> … 结束标记
_MARK = {True: "✓", False: "✗", None: "–"}
_OPS = {">=": "≥", "<=": "≤", ">": ">", "<": "<"}


def _held(rec: dict) -> str:
    checked = [c for c in rec["claims"] if c["held"] is not None]
    return f"{sum(c['held'] for c in checked)}/{len(checked)}"


LAPTOP_MINUTES, LAPTOP_GB = 10, 8   # 学生笔记本的标准：默认运行 ≤ 10 分钟、≤ 8 GB（2 核）


def _cost(rec: dict) -> str:
    """墙钟与峰值内存；超过笔记本标准的照实标出（"超过 10 分钟"），不让学生课上才发现。"""
    minutes, gb = rec["seconds"] / 60, rec["peak_rss_mb"] / 1024
    over = [f"超过 {LAPTOP_MINUTES} 分钟"] * (minutes > LAPTOP_MINUTES) + [f"超过 {LAPTOP_GB} GB"] * (gb > LAPTOP_GB)
    return f"{minutes:.1f} 分钟，{gb:.1f} GB" + (f"（{'、'.join(over)}）" if over else "")


# 超过笔记本标准的脚本为什么超（不含数字：数字由参考运行生成），以及笔记本上怎么跑小一点
_WHY_OVER = {
    "lesson3_distributed/03_training_acceleration/acceleration_tricks.py":
        "六种招数在同一进程里从同一份权重各训一遍（并排比才公平），内存峰值来自填充批，最高的是 eager 注意力那一行——"
        "它正是为了让你看到填充与 SDPA 各省掉了什么；8 GB 的笔记本上用 --tricks packed,packed_ckpt,padding_free",
    "lesson4_alignment/02_rlhf_pipeline/rlhf_pipeline.py":
        "PPO 同时放着 actor、ref、critic、奖励模型四份权重；先跑 03、再用 --reward-model 跳过阶段 2 可以少一份",
    "lesson5_deployment_monitoring/06_diversity_debug/diversity_evaluation.py":
        "六种解码设置各采样一批，再训几步 DPO 比较模型；笔记本上用 --dpo-steps 0 只比解码设置",
    "lesson4_alignment/01_alignment_overview/compare_methods.py":
        "四种偏好损失各从同一个 SFT 起点训一遍、再用同一把尺子评估；笔记本上用 --methods dpo,simpo 只比两种",
    "lesson4_alignment/03_reward_model_training/train_reward_model.py":
        "奖励模型每步同时前向 chosen 与 rejected；笔记本上减小 --per-device-train-batch-size 或 --max-steps",
    "lesson4_alignment/04_dpo/dpo_train.py":
        "β 扫描：每个 β 从同一起点训一遍、再在留出对上用策略与参考各评估一遍；笔记本上用 --betas 0.1 只跑主实验",
    "lesson5_deployment_monitoring/02_dpo_hf/dpo_hf_run.py":
        "按上 GPU 的同一份配方训 40 步、每步 8 对（chosen + rejected 各一遍前向，再加参考前向），峰值是这些激活；"
        "笔记本上复制 configs/lesson5/recipes/dpo_hf.yaml，调小 per_device_train_batch_size 与 max_steps，"
        "再用 --recipe 指给它",
    "lesson5_deployment_monitoring/05_customer_support_case/customer_alignment.py":
        "一条龙：SFT 40 步、让 SFT 模型回答全部训练工单、再 DPO 20 步，每一段之后都在留出工单上生成评估；"
        "笔记本上用 --feedback-tickets 40 --dpo-steps 10",
    "lesson2_qlora_ptuning/03_ptuning/ptuning_v2_demo.py":
        "四种参数高效方法各训一遍再各评估一遍；笔记本上用 --methods 挑两种比",
}


# 效率一览：每个比值都来自同一个脚本、同一次参考运行里并排量的两个数（同一进程、同一批数据），旁边是目标。
# (脚本, 比的是什么, 分子的指标键, 分母的指标键或 None, 目标方向, 目标值)；目标取自 issue 24，没定目标的只要求方向对
_EFFICIENCY = [
    ("lesson1_sft/05_lora_finetune/lora_chatglm_demo.py", "LoRA 训练：评估 tokens/s ÷ 训练 tokens/s",
     "eval_tokens_per_s", "train_tokens_per_s", ">=", 2.0),
    ("lesson1_sft/05_lora_finetune/lora_chatglm_demo.py", "LoRA 训练：评估时间 ÷ 训练时间",
     "eval_seconds", "train_seconds", "<=", 0.1),
    ("lesson3_distributed/03_training_acceleration/acceleration_tricks.py",
     "打包训练的 MFU（分母是同一进程实测的 fp32 矩阵乘峰值）", "tricks.packed.mfu", None, ">=", 0.4),
    ("lesson3_distributed/03_training_acceleration/acceleration_tricks.py", "打包 ÷ 填充：训练 tokens/s",
     "tricks.packed.tokens_per_s", "tricks.padded.tokens_per_s", ">", 1.0),
    ("lesson3_distributed/03_training_acceleration/acceleration_tricks.py", "打包 + 重算 ÷ 打包：训练峰值内存",
     "tricks.packed_ckpt.peak_mem_mb", "tricks.packed.peak_mem_mb", "<", 1.0),
    ("lesson1_sft/06_cpu_deploy/cpu_inference_case.py", "生成：KV 缓存开 ÷ 关的 tokens/s",
     "kv_cache_speedup", None, ">", 1.0),
    ("lesson1_sft/06_cpu_deploy/cpu_inference_case.py", "生成：批 8 ÷ 批 1 的总 tokens/s",
     "batch_throughput_gain", None, ">", 1.0),
    ("lesson1_sft/06_cpu_deploy/cpu_inference_case.py", "生成：int8 ÷ fp32 的 tokens/s",
     "int8_speedup", None, ">", 1.0),
    ("lesson1_sft/06_cpu_deploy/cpu_inference_case.py", "生成（批 1 解码）：bf16 ÷ fp32 的 tokens/s（AMX 也不加速）",
     "bf16_speedup", None, None, None),
    ("lesson1_sft/06_cpu_deploy/cpu_inference_case.py", "预填充：fp32 ÷ bf16 的首 token 延迟（CPU 有 AMX 时 > 1）",
     "bf16_prefill_speedup", None, None, None),
    ("lesson5_deployment_monitoring/07_serving/load_test.py", "聊天服务：并发 8 ÷ 逐个顺序的 tokens/s（动态批处理）",
     "batching_speedup_8", None, ">=", 2.0),
    ("lesson7_hybrid_rag/06_performance_testing/performance_benchmark.py",
     "检索：BM25 ÷ FAISS Flat 的延迟（最大规模、单客户端最快一次）", "at_largest.bm25.min_ms", "at_largest.flat.min_ms",
     ">", 1.0),
    ("lesson7_hybrid_rag/06_performance_testing/performance_benchmark.py",
     "检索：FAISS Flat 多客户端 ÷ 单客户端的 req/s（最大规模）", "throughput_gain.flat", None, ">", 1.0),
]
_CHECK = {">=": lambda v, t: v >= t, "<=": lambda v, t: v <= t, ">": lambda v, t: v > t, "<": lambda v, t: v < t}


def render_efficiency(ref: Path = REFERENCE) -> str:
    """效率一览表：比值、目标、达到没有、出自哪个脚本；脚本还没记录的照实写"未记录"。"""
    lines = ["| 比的是什么 | 参考运行 | 目标 | 达到 | 出自 |", "|---|---|---|---|---|"]
    for rel, what, num, den, op, goal in _EFFICIENCY:
        rec = load_record(ref, rel)
        m = rec["metrics"] if rec else {}
        value = m.get(num) / m[den] if m.get(num) is not None and m.get(den) else None if den else m.get(num)
        target = f"{_OPS[op]} {goal:g}" if op else "—"
        held = "—" if value is None or not op else _MARK[_CHECK[op](value, goal)]
        shown = f"{value:.3g}" if value is not None else ("未记录" if not rec else "—")
        lines.append(f"| {what} | {shown} | {target} | {held} | `{Path(rel).parent.name}/{Path(rel).name}` |")
    return "\n".join(lines)


def render_bench(path: Path = REPO / "results" / "bench-cpu-2core.json") -> str:
    """make bench 的表：每行一个量、目标、达到没有、出自哪个脚本；没测到的行写原因（如 llama-server 没编成）。"""
    if not path.exists():
        return "还没有记录：在空闲的机器上运行 make bench，再 python course.py --readme。"
    b = json.loads(path.read_text(encoding="utf-8"))
    m = b["machine"]
    lines = [f"{m['cpu']}，{m['cores']} 核，torch {m['torch']}；{b['recorded_at']}，提交 {b['commit']}，"
             f"共 {b['seconds'] / 60:.1f} 分钟", "", "| 量 | 实测 | 目标 | 达到 | 出自 |", "|---|---|---|---|---|"]
    for r in b["rows"]:
        shown = f"{r['value']:.4g}" if r["value"] is not None else f"没有测（{r['why_missing']}）"
        target = f"{_OPS[r['op']]} {r['goal']:g}" if r["op"] else "—"
        held = "—" if r["held"] is None else _MARK[r["held"]]
        lines.append(f"| {r['what']} | {shown} | {target} | {held} | `{Path(r['source']).name}` |")
    return "\n".join(lines)


def render_over(ref: Path = REFERENCE) -> str:
    """超过笔记本标准（默认运行 > 10 分钟或 > 8 GB）的脚本，逐个说为什么、笔记本上怎么办；都没超就说都没超。"""
    lines = []
    for s in discover():
        rel = s.relative_to(REPO).as_posix()
        rec = load_record(ref, rel)
        if rec and (rec["seconds"] > LAPTOP_MINUTES * 60 or rec["peak_rss_mb"] > LAPTOP_GB * 1024):
            lines += _wrap(f"- `{rel}`：{_cost(rec)}。{_WHY_OVER.get(rel, '原因还没写（course.py 的 _WHY_OVER）')}",
                           indent="  ")
    return "\n".join(lines) or f"已记录的脚本都在 {LAPTOP_MINUTES} 分钟、{LAPTOP_GB} GB 以内。"


def _claim_lines(rec: dict | None, indent: str = "") -> list[str]:
    lines = []
    for c in rec["claims"] if rec else []:
        value = "—" if c["value"] is None else f"{c['value']:.4g}"
        limit = f"{_OPS[c['op']]} {c['threshold']:g}" if c["threshold"] is not None else "不检查"
        lines.append(f"{indent}{_MARK[c['held']]} {c['statement']}：{c['expr']} = {value}（{limit}）")
    return lines


def declared_claims(script: Path) -> list:
    """脚本模块级的 CLAIMS（run.Claim 列表）：导入脚本本身（不运行 main；重依赖都在 main 里才 import）。"""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_claims_{script.stem}", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclass 解析字符串注解时按模块名找回它
    spec.loader.exec_module(mod)
    return list(getattr(mod, "CLAIMS", []))


def _wrap(line: str, width: int = 116, indent: str = "    ") -> list[str]:
    """按显示宽度折行（汉字占 2 列），尽量折在空格或中文标点后；生成块放进文档字符串也过得了 ruff 的 120 列。"""
    def cols(t: str) -> int:
        return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in t)

    out = []
    while cols(line) > width:
        cut = width // 2   # 在前 width 列里找最后一个可折处；找不到就硬折
        while cols(line[:cut + 1]) <= width:
            cut += 1
        soft = max(line.rfind(ch, len(indent) + 1, cut) for ch in " ，：、；/（")
        cut = soft + 1 if soft > len(indent) else cut
        out.append(line[:cut].rstrip())
        line = indent + line[cut:].lstrip()
    return [*out, line]


def render_block(name: str, ref: Path = REFERENCE, script: str = "") -> str:
    """生成块的内容。course = 全部脚本一张表；lessonN = 这一课每个脚本的结论与实测值；script = 文档字符串里那段；
    over = 超过笔记本标准的脚本；efficiency = 效率一览。"""
    if name == "over":
        return render_over(ref)
    if name == "efficiency":
        return render_efficiency(ref)
    if name == "bench":
        return render_bench()
    if name.startswith("script"):   # "script"：文档字符串里；"script:x.py"：课题文件夹 README 里，指同目录的脚本
        if ":" in name:
            script = (Path(script).parent / name.split(":", 1)[1].strip()).as_posix()
        rec = load_record(ref, script)
        if not rec:   # 还没量：至少列出这个脚本承诺什么（默认模式的门槛），值等参考运行来填
            return "\n".join(["参考运行：还没有记录（python course.py --full --only " + Path(script).name + "）",
                              *[x for c in declared_claims(REPO / script)
                                for x in _wrap(f"  – {c.statement}（默认模式 {_OPS[c.op]} {c.default:g}）"
                                               if c.default is not None else f"  – {c.statement}（默认模式不检查）")]])
        head = f"参考运行（{rec['model']}，{rec['machine']['cores']} 核 CPU）：{_cost(rec)}，结论 {_held(rec)} 成立"
        lines = _wrap(head + _stale(rec, script))
        for c in rec["claims"]:   # 文档字符串里只放结论与数值（表达式在 metrics.json 和报告里）
            value = "—" if c["value"] is None else f"{c['value']:.4g}"
            limit = f"{_OPS[c['op']]} {c['threshold']:g}" if c["threshold"] is not None else "不检查"
            lines += _wrap(f"  {_MARK[c['held']]} {c['statement']}：{value}（{limit}）")
        return "\n".join(lines)
    scripts = [s.relative_to(REPO).as_posix() for s in discover([int(name[6:])] if name != "course" else None)]
    if name == "course":   # 记录不全在同一种 CPU 上：墙钟只在同样的硬件上可比，所以先说各是在哪种上量的
        cpus: dict[str, int] = {}
        for rel in scripts:
            if rec := load_record(ref, rel):
                cpus[rec["machine"]["cpu"]] = cpus.get(rec["machine"]["cpu"], 0) + 1
        where = "；".join(f"{cpu}：{n} 个脚本" for cpu, n in sorted(cpus.items(), key=lambda x: -x[1]))
        head = [f"记录所在的 CPU（都是 2 核）——{where}", ""] if cpus else []
    lines = [*head, "| 脚本 | 结论（成立/检查） | 2 核 CPU 墙钟，峰值内存 | 记录于 |", "|---|---|---|---|"] \
        if name == "course" else []
    for rel in scripts:
        rec = load_record(ref, rel)
        if name == "course":
            cpu = next((v for v in ("AMD", "Intel", "Apple") if v in rec["machine"]["cpu"]), "") if rec else ""
            cells = (f"{_held(rec)} | {_cost(rec)} | {rec['commit']}{'，' + cpu if cpu else ''}{_stale(rec, rel)} |"
                     if rec else "未记录 | | |")
            lines.append(f"| `{rel}` | {cells}")
        else:
            lines.append(f"- `{rel}`：" + (f"{_cost(rec)}（{rec['model']}，{rec['mode']} 模式）" + _stale(rec, rel)
                                           if rec else "未记录；它承诺（默认模式的门槛）："))
            lines += [f"  - {x}" for x in _claim_lines(rec)] if rec else [
                f"  - 待测：{c.statement}（{_OPS[c.op]} {c.default:g}）" if c.default is not None
                else f"  - 默认模式不检查：{c.statement}" for c in declared_claims(REPO / rel)]
    return "\n".join(lines)


def _stale(rec: dict, rel: str) -> str:
    """记录之后脚本代码又改过（指纹不同）：数字还是旧代码量的，照实标出来，直到重录。"""
    return "" if rec.get("script_sha") == _script_sha(REPO / rel) else "；记录之后脚本改过，待重录"


def _without_blocks(text: str) -> str:
    """去掉生成块的内容（保留标记）。"""
    return _rewrite(text, lambda name: "")


def _rewrite(text: str, fill) -> str:
    """把每个 <!-- results:NAME --> … <!-- /results --> 之间换成 fill(NAME)。"""
    parts, pos = [], 0
    while (i := text.find(_BEGIN, pos)) >= 0:
        head_end = text.index("-->", i) + 3
        end = text.index(_END, head_end)
        parts += [text[pos:head_end], "\n" + fill(text[i + len(_BEGIN):head_end - 3].strip()) + "\n"]
        pos = end
    return "".join(parts) + text[pos:]


def rewrite_readmes(check: bool = False, ref: Path = REFERENCE) -> list[Path]:
    """用 results/ 重写 README.md、各课 README 与脚本文档字符串里的生成块；check=True 只返回内容过期的文件。"""
    stale = []
    for f in [REPO / "README.md", *sorted(REPO.glob("lesson[0-9]_*/README.md")),
              *sorted(REPO.glob("lesson[0-9]_*/[0-9][0-9]_*/README.md")), *discover()]:
        text = f.read_text(encoding="utf-8")
        rel = f.relative_to(REPO).as_posix()
        new = _rewrite(text, lambda name, rel=rel: render_block(name, ref, rel))
        if new != text:
            stale.append(f)
            if not check:
                f.write_text(new, encoding="utf-8")
    return stale


CSS = """body{font-family:system-ui,'Noto Sans CJK SC',sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}table{border-collapse:collapse;
margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}th{background:#f2f2f2}
.ok{color:#0a0;font-weight:bold}.fail{color:#c00;font-weight:bold}img{max-width:100%;border:1px solid #ddd;
margin:.5em 0}code{background:#f5f5f5;padding:1px 4px}.metrics td:first-child{font-family:monospace}"""


def _cell(c: dict | None) -> str:
    if c is None:
        return ""
    value = "—" if c["value"] is None else f"{c['value']:.4g}"
    return f"<span class='{'fail' if c['held'] is False else 'ok'}'>{_MARK[c['held']]}</span> {value}"


def _claims_html(m: dict, rec: dict | None) -> str:
    """结论表：本次运行与参考运行（2 核 CPU、默认模式、smollm2）并排，外加参考的墙钟与峰值内存。"""
    ref_rows = {c["expr"]: c for c in rec["claims"]} if rec else {}
    rows = m.get("claims") or (rec["claims"] if rec else [])
    if not rows:
        return ""
    cost = "<p>还没有参考运行。</p>" if not rec else (
        f"<p>参考运行（{html.escape(rec['machine']['cpu'])}，{rec['machine']['cores']} 核，{rec['mode']} 模式，"
        f"{html.escape(str(rec['model']))}）：在 2 核笔记本上 {_cost(rec)}。</p>")
    out = [cost, "<table><tr><th>结论</th><th>表达式</th><th>本次</th><th>参考</th></tr>"]
    for c in rows:
        now = _cell(c) if m.get("claims") else ""
        out.append(f"<tr><td>{html.escape(c['statement'])}</td><td><code>{html.escape(c['expr'])}</code></td>"
                   f"<td>{now}</td><td>{_cell(ref_rows.get(c['expr']))}</td></tr>")
    return "\n".join(out + ["</table>"])


def write_report(results: list[dict], scripts: list[Path], path: Path, outputs: Path | None = None,
                 ref: Path = REFERENCE) -> Path:
    """把每个脚本的 metrics.json、结论（与参考并排）与 PNG 汇总成一个自包含的 HTML 页面。"""
    by_script = {r["script"]: r for r in results}
    parts = [f"<!doctype html><html lang='zh'><meta charset='utf-8'><title>LLM 课程运行报告</title>"
             f"<style>{CSS}</style><h1>LLM 课程运行报告</h1>"
             f"<p>生成时间 {time.strftime('%Y-%m-%d %H:%M:%S')}；Python {sys.version.split()[0]}。</p>"]
    if results:
        passed = sum(r["ok"] for r in results)
        parts.append(f"<p>本次运行 {len(results)} 个脚本：<span class='ok'>{passed} 通过</span>，"
                     f"<span class='fail'>{len(results) - passed} 失败</span>。</p>")
    parts.append("<table><tr><th>脚本</th><th>状态</th><th>秒</th><th>总结</th></tr>")
    for s in scripts:
        rel = s.relative_to(REPO).as_posix()
        r = by_script.get(rel)
        status = ("<span class='ok'>通过</span>" if r["ok"] else f"<span class='fail'>失败 ({r['code']})</span>") \
            if r else "（本次未运行）"
        parts.append(f"<tr><td><a href='#{html.escape(rel)}'>{html.escape(rel)}</a></td><td>{status}</td>"
                     f"<td>{r['seconds'] if r else ''}</td><td>{html.escape(r['summary']) if r else ''}</td></tr>")
    parts.append("</table>")
    for s in scripts:
        rel = s.relative_to(REPO).as_posix()
        d = out_dir_of(s, outputs)
        parts.append(f"<h2 id='{html.escape(rel)}'>{html.escape(rel)}</h2>")
        mfile = d / "metrics.json"
        parts.append(_claims_html(json.loads(mfile.read_text(encoding="utf-8")) if mfile.exists() else {},
                                  load_record(ref, rel)))
        if mfile.exists():
            m = json.loads(mfile.read_text(encoding="utf-8"))
            parts.append("<table class='metrics'><tr><th>指标</th><th>数值</th></tr>")
            parts.extend(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
                         for k, v in _flatten(m) if k != "claims")   # 结论已在上面的表里
            parts.append("</table>")
        else:
            parts.append("<p>没有 metrics.json。</p>")
        for png in sorted(d.glob("*.png")):
            b64 = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<p><code>{html.escape(png.name)}</code><br><img alt='{html.escape(png.name)}' "
                         f"src='data:image/png;base64,{b64}'></p>")
    if not scripts:
        parts.append("<p>还没有课程脚本。</p>")
    parts.append("</html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="每个脚本都用 --smoke 运行")
    ap.add_argument("--full", action="store_true",
                    help="参考运行：默认模式，记录到 results/cpu-2core/（在空闲机器上、一次一个脚本）")
    ap.add_argument("--lesson", type=int, action="append", help="只跑第 N 课（可重复）")
    ap.add_argument("--only", help="只跑路径匹配的脚本（子串或通配符）")
    ap.add_argument("--timeout", type=int, default=1800, help="单个脚本的超时秒数")
    ap.add_argument("--report-only", action="store_true", help="不运行，只用已有结果生成报告")
    ap.add_argument("--outputs", help="输出根目录（默认 outputs/，或环境变量 LLM_COURSE_OUTPUTS）")
    ap.add_argument("--record", help="把每次运行写成参考记录到这个目录（--full 默认 results/cpu-2core）")
    ap.add_argument("--rerun", action="store_true", help="记录时连已记录、脚本没改过的也重跑")
    ap.add_argument("--compare", help="与这个参考目录比：结论翻转、墙钟 > 1.5 倍、峰值内存 > 1.25 倍 → 退出码 1")
    ap.add_argument("--strict", action="store_true", help="有结论（CLAIMS）不成立也算失败")
    ap.add_argument("--readme", action="store_true", help="只用 results/ 重写 README 里的生成块，然后退出")
    ap.add_argument("--jobs", type=int,
                    help="并排跑几个脚本（只用于 --smoke：默认 = CPU 核数，最多 2；记录 / 比较与默认模式 1）")
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    help="给每个脚本加 --device（GPU 检查：--smoke --device cuda；缺库的脚本跳过并说明缺什么）")
    args = ap.parse_args(argv)
    if args.full and args.smoke:
        ap.error("--full 是默认模式的参考运行，不能和 --smoke 一起用")
    if args.device and args.record and Path(args.record).resolve() == REFERENCE:
        ap.error(f"--device {args.device}: results/cpu-2core 只收空闲 2 核 CPU 上的参考运行，换个 --record 目录")
    if args.full and not args.record and not args.compare and not args.device:
        args.record = str(REFERENCE)
    if args.jobs is not None and args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: 至少 1")
    measured = not args.smoke or args.record or args.compare   # 要记录 / 比较墙钟与内存：并排跑量出的数没有意义
    if args.jobs and args.jobs > 1 and measured:
        ap.error(f"--jobs {args.jobs}: 只有不记录、不比较的 --smoke 能并排跑；其余一次一个脚本")
    args.jobs = args.jobs or (1 if measured else min(2, os.cpu_count() or 1))
    return args


def _run_all(args: argparse.Namespace, scripts: list[Path], outputs: Path, console) -> list[dict]:
    """默认 / 记录模式一个接一个地跑（并排跑的两个脚本互相拖慢，量出的时间没有意义）；冒烟模式每个脚本只用
    1 个线程，--jobs 个脚本并排跑（默认 = CPU 核数，最多 2）。记录模式下跳过已记录且没改过的脚本。"""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    record_dir = Path(args.record) if args.record else None
    done: dict[Path, dict] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("课程", total=len(scripts))

        def one(s: Path) -> tuple[Path, dict | None, str]:
            rel = s.relative_to(REPO).as_posix()
            old = load_record(record_dir, rel) if record_dir else None
            if old and old["ok"] and old["script_sha"] == _script_sha(s) and not args.rerun:
                return s, None, f"{rel}: 已记录（脚本没改过），跳过；--rerun 重跑"
            bar.update(task, description=f"运行 {rel}")
            r = run_one(s, args.smoke, args.timeout, outputs, ("--device", args.device) if args.device else (),
                        threads=1 if args.jobs > 1 else None)
            if args.device and r["missing_module"]:   # GPU 机器常常只装了一部分库：缺库不算脚本的错，跳过并说缺什么
                return s, None, f"{rel}: 跳过，这台机器没装 {r['missing_module']}（pip install 后重跑）"
            if record_dir:
                record(r, s, record_dir)
            mark = "[green]通过[/]" if r["ok"] else f"[red]失败 ({r['code']})，日志 {r['log']}[/]"
            claims = f"，结论 {len(r['claims']) - r['claims_failed']}/{len(r['claims'])}" if r["claims"] else ""
            return s, r, f"{rel}: {mark} {r['seconds']} 秒，峰值 {r['peak_rss_mb']} MB{claims}"

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for fut in as_completed([pool.submit(one, s) for s in scripts]):
                s, r, line = fut.result()
                bar.console.print(line)
                bar.advance(task)
                if r is not None:
                    done[s] = r
    return [done[s] for s in scripts if s in done]   # 报告按课程顺序，不按完成顺序


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """运行选中的脚本并生成报告；返回退出码（有失败、--strict 时结论不成立、--compare 有退步则为 1）。"""
    args = _parse(argv)
    if args.readme:
        for f in rewrite_readmes():
            print(f"已重写 {f.relative_to(REPO)}")
        return 0
    if args.device == "cuda" and not _cuda_available():   # 说清楚、退出 2：不悄悄在 CPU 上跑完冒充 GPU 检查
        print("--device cuda: 这台机器没有可用的 CUDA；GPU 检查（python course.py --smoke --device cuda）"
              "要在有 GPU 的机器上跑", file=sys.stderr)
        return 2
    outputs = Path(args.outputs).resolve() if args.outputs else OUTPUTS
    from rich.console import Console
    from rich.table import Table

    console = Console()
    scripts = discover(args.lesson, args.only)
    if not scripts:
        console.print("没有匹配的课程脚本（检查 --lesson / --only）。")
    results = [] if args.report_only else _run_all(args, scripts, outputs, console)
    ref = Path(args.compare) if args.compare else REFERENCE
    report = write_report(results, scripts, outputs / "report.html", outputs, ref)
    t = Table(title="课程运行结果")
    for col in ("脚本", "状态", "结论", "秒", "峰值 MB"):
        t.add_column(col)
    for r in results:
        t.add_row(r["script"], "[green]通过[/]" if r["ok"] else "[red]失败[/]",
                  f"{len(r['claims']) - r['claims_failed']}/{len(r['claims'])}", f"{r['seconds']}",
                  f"{r['peak_rss_mb']}")
    console.print(t)
    failed = [r for r in results if not r["ok"] or (args.strict and r["claims_failed"])]
    problems = compare(results, ref) if args.compare else []
    for line in problems:
        console.print(f"[red]退步[/] {line}")
    strict = "（--strict：结论不成立也算失败）" if args.strict else ""
    console.print(f"报告：{report}；{len(results) - len(failed)}/{len(results)} 通过{strict}，"
                  f"共 {sum(r['seconds'] for r in results):.0f} 秒")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
