"""跑完整门课：按顺序运行每个课程脚本（各自一个进程），汇总 metrics.json 与图片到 outputs/report.html。

运行：
  python course.py --smoke               # 全部脚本的冒烟模式（极小模型），CI 与课前检查用
  python course.py                       # 默认模式（smollm2-135m，CPU 上每个脚本几分钟）
  python course.py --lesson 1 --smoke    # 只跑第 1 课
  python course.py --only lora           # 只跑路径里含 lora 的脚本（也可用通配符 '*rag*'）
  python course.py --report-only         # 不运行，只用已有结果重新生成报告
  python course.py --smoke --outputs /tmp/course   # 输出（每个脚本的目录、日志、报告）写到别处

你会看到：每个脚本的通过/失败与用时表，以及一份自包含（图片内嵌）的 HTML 报告；有脚本失败时退出码非 0。
"""
from __future__ import annotations

import argparse
import base64
import fnmatch
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import run as common_run

REPO = Path(__file__).resolve().parent
OUTPUTS = common_run.outputs_root()   # 默认 outputs/；--outputs 改它（并通过环境变量传给每个脚本）


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
    """脚本的默认输出目录：就是脚本自己用的 common.run.default_output_dir（根目录 outputs）。"""
    return common_run.default_output_dir(script, outputs or OUTPUTS)


def run_one(script: Path, smoke: bool, timeout: int, outputs: Path | None = None) -> dict:
    """在独立进程里运行一个脚本，日志写到 <outputs>/logs/；脚本的输出目录也在 outputs 下（经环境变量告诉它）。"""
    outputs = outputs or OUTPUTS
    rel = script.relative_to(REPO).as_posix()
    log = outputs / "logs" / (rel.replace("/", "__") + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script)] + (["--smoke"] if smoke else [])
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", common_run.OUTPUTS_ENV: str(outputs)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout, env=env)
        code, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        raw = e.stdout or ""
        code, text = 124, raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        text += f"\n超时：超过 {timeout} 秒\n"
    secs = time.perf_counter() - t0
    log.write_text(text, encoding="utf-8")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return {"script": rel, "ok": code == 0, "code": code, "seconds": round(secs, 1),
            "summary": lines[-1][:300] if lines else "", "log": str(log)}


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


CSS = """body{font-family:system-ui,'Noto Sans CJK SC',sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}table{border-collapse:collapse;
margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}th{background:#f2f2f2}
.ok{color:#0a0;font-weight:bold}.fail{color:#c00;font-weight:bold}img{max-width:100%;border:1px solid #ddd;
margin:.5em 0}code{background:#f5f5f5;padding:1px 4px}.metrics td:first-child{font-family:monospace}"""


def write_report(results: list[dict], scripts: list[Path], path: Path, outputs: Path | None = None) -> Path:
    """把每个脚本的 metrics.json 与 PNG 汇总成一个自包含的 HTML 页面。"""
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
        if mfile.exists():
            m = json.loads(mfile.read_text(encoding="utf-8"))
            parts.append("<table class='metrics'><tr><th>指标</th><th>数值</th></tr>")
            parts.extend(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in _flatten(m))
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


def main(argv: list[str] | None = None) -> int:
    """运行选中的脚本并生成报告；返回退出码（有失败则为 1）。"""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="每个脚本都用 --smoke 运行")
    ap.add_argument("--lesson", type=int, action="append", help="只跑第 N 课（可重复）")
    ap.add_argument("--only", help="只跑路径匹配的脚本（子串或通配符）")
    ap.add_argument("--timeout", type=int, default=1800, help="单个脚本的超时秒数")
    ap.add_argument("--report-only", action="store_true", help="不运行，只用已有结果生成报告")
    ap.add_argument("--outputs", help="输出根目录（默认 outputs/，或环境变量 LLM_COURSE_OUTPUTS）")
    args = ap.parse_args(argv)
    outputs = Path(args.outputs).resolve() if args.outputs else OUTPUTS

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console()
    scripts = discover(args.lesson, args.only)
    results: list[dict] = []
    if not args.report_only:
        if not scripts:
            console.print("没有匹配的课程脚本（检查 --lesson / --only）。")
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console) as bar:
            task = bar.add_task("课程", total=len(scripts))
            for s in scripts:
                bar.update(task, description=f"运行 {s.relative_to(REPO)}")
                r = run_one(s, args.smoke, args.timeout, outputs)
                results.append(r)
                mark = "[green]通过[/]" if r["ok"] else f"[red]失败 ({r['code']})，日志 {r['log']}[/]"
                bar.console.print(f"{r['script']}: {mark} {r['seconds']} 秒")
                bar.advance(task)
    report = write_report(results, discover(args.lesson, args.only), outputs / "report.html", outputs)
    t = Table(title="课程运行结果")
    for col in ("脚本", "状态", "秒"):
        t.add_column(col)
    for r in results:
        t.add_row(r["script"], "[green]通过[/]" if r["ok"] else "[red]失败[/]", f"{r['seconds']}")
    console.print(t)
    failed = [r for r in results if not r["ok"]]
    console.print(f"报告：{report}；{len(results) - len(failed)}/{len(results)} 通过，"
                  f"共 {sum(r['seconds'] for r in results):.0f} 秒")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
