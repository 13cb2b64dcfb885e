"""混合推理：按检索置信度在 闭卷 / RAG / 拒答转人工 之间路由；调用服务有超时、指数退避重试、熔断器，服务挂了切到本地备用模型。

  - 置信度：问题的词（jieba/英文词）按 BM25 的 idf 加权，有多少出现在检索到的前几块里（0..1）。
    高于 --rag-threshold 走 RAG（资料 + 问题），介于两个阈值之间闭卷作答（模型自己的知识），低于 --abstain-threshold 拒答转人工；
  - 服务：第 5 课的 OpenAI 兼容聊天服务（common.serving）作为真实子进程启动；每次调用有超时，失败按指数退避 + 抖动重试；
  - 熔断器：连续失败 --failure-threshold 次就"断开"（之后的请求不再等超时，直接走本地备用模型），
    过 --reset-timeout 秒进入"半开"放一个试探请求，成功就重新闭合；
  - 演示：跑到一半用 SIGKILL 杀掉服务进程，后面的问题由本地备用模型接住（failover_ms = 从杀掉到第一个备用回答的时间）；
    再把服务在同一端口重启，熔断器半开试探成功、重新闭合，请求回到服务上。

运行：
  python lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py            # CPU，smollm2-135m（服务与备用同一个）
  python lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py --smoke    # 极小模型
  python lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py --base-url http://gpu-host:8000 \\
      --model Qwen/Qwen2.5-7B-Instruct --fallback-model smollm2-135m --config configs/lesson7/hybrid_inference.yaml  # GPU 服务 + CPU 备用

你会看到（冒烟实测，繁忙的共享 2 核机器）：杀掉服务后没有一个请求失败（failover_worked = true），
failover_ms 约 1700（含两次退避重试）；熔断器 closed → open → half_open → closed；correct / abstained / wrong 计数
（极小模型答不对题，冒烟看的是容错）。
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import dataclass

from common import cli, data, metrics, models, retrieval, run, services
from common.errors import UserError

SMOKE = dict(questions=12, max_new_tokens=12, reset_timeout=1.0)
OUT_OF_KB = ["云帆智能的股票代码是多少？", "今天上海的天气怎么样？", "帮我写一首关于秋天的诗。",
             "Who won the football world cup in 1998?", "What is the CEO of Yunfan's home address?",
             "Can you recommend a good pizza place nearby?"]


@dataclass
class Args(retrieval.KBArgs):
    questions: int = cli.arg(24, "评测问题数（知识库内问题 + 6 个库外问题）", min=2)
    rag_threshold: float = cli.arg(0.6, "置信度 ≥ 它走 RAG", min=0, max=1)
    abstain_threshold: float = cli.arg(0.3, "置信度 < 它拒答转人工；两者之间闭卷作答", min=0, max=1)
    base_url: str = cli.arg(None, "已在运行的 OpenAI 兼容服务；不填则自己启动第 5 课的服务（common.serving）")
    fallback_model: str = cli.arg(None, "本地备用模型；默认与服务的模型相同")
    timeout: float = cli.arg(20.0, "单次调用超时（秒）", min=0.1)
    max_retries: int = cli.arg(2, "失败后重试次数（指数退避 + 抖动）", min=0)
    backoff: float = cli.arg(0.2, "第一次重试前等待的秒数，之后每次翻倍", min=0)
    failure_threshold: int = cli.arg(2, "连续失败几次熔断器断开", min=1)
    reset_timeout: float = cli.arg(3.0, "断开多少秒后进入半开、放一个试探请求", min=0.1)
    kill_at: float = cli.arg(0.4, "跑到百分之几的问题时杀掉服务（0 = 不杀）", min=0, max=1)
    restart_at: float = cli.arg(0.7, "跑到百分之几时在同一端口重启服务（≤ kill_at 则不重启）", min=0, max=1)
    max_new_tokens: int = cli.arg(32, "回答长度上限", min=1)


class CircuitBreaker:
    """三态熔断器：closed（正常）→ 连续失败 N 次 open（直接拒绝）→ 冷却后 half_open（放一个试探）→ 成功 closed。"""

    def __init__(self, threshold: int, reset_timeout: float):
        self.threshold, self.reset_timeout = threshold, reset_timeout
        self.state, self.failures, self.opened_at, self.log = "closed", 0, 0.0, []

    def _to(self, state: str) -> None:
        self.state = state
        self.log.append({"t": round(time.monotonic(), 3), "state": state})

    def allow(self) -> bool:
        if self.state == "open" and time.monotonic() - self.opened_at >= self.reset_timeout:
            self._to("half_open")
        return self.state != "open"

    def success(self) -> None:
        self.failures = 0
        if self.state != "closed":
            self._to("closed")

    def failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self.opened_at = time.monotonic()
            if self.state != "open":
                self._to("open")


def call_server(url: str, model: str, messages: list[dict], args, breaker: CircuitBreaker, rng) -> str | None:
    """带超时与指数退避重试的一次调用；熔断器断开时不发请求，直接返回 None（交给备用模型）。"""
    import httpx

    for attempt in range(args.max_retries + 1):
        if not breaker.allow():
            return None
        try:
            r = httpx.post(url.rstrip("/") + "/v1/chat/completions", timeout=args.timeout, json={
                "model": model, "messages": messages, "max_tokens": args.max_new_tokens, "temperature": 0})
            r.raise_for_status()
            breaker.success()
            return r.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, ValueError):
            breaker.failure()
            if attempt < args.max_retries:   # 指数退避 + 抖动：避免所有客户端同时重试把刚恢复的服务再压垮
                time.sleep(args.backoff * 2 ** attempt * (0.5 + rng.random()))
    return None


def confidence(bm25: retrieval.BM25Index, q: str, top: list[int]) -> float:
    """idf 加权的问题词覆盖率：问题里"有信息量"的词，在最匹配的那一块里出现了多少（语料里没有的词按高 idf 计）。"""
    words = set(retrieval.bm25_tokens(q))
    idf = bm25.bm25.idf
    unseen = max(idf.values()) if idf else 1.0
    weight = {w: max(idf.get(w, unseen), 0.0) for w in words}
    total = sum(weight.values())
    return max((sum(weight[w] for w in words & set(bm25.tokens[i])) / total for i in top), default=0.0) if total else 0.0


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args, smoke_threads=1)
    log = out.log
    if args.abstain_threshold > args.rag_threshold:
        raise UserError(f"--abstain-threshold {args.abstain_threshold}: 不能大于 --rag-threshold {args.rag_threshold}")

    # 1. 问题：知识库内的问答（有标准答案）+ 库外问题（应当拒答）；检索索引
    docs, by_id, qas = retrieval.load_kb(args.docs, args.qa)
    _, picked = data.split(qas, min(0.99, max(1, args.questions - len(OUT_OF_KB)) / len(qas)), args.seed)
    items = [{"question": q["question"], "gold": q["answer"]} for q in picked] + \
            [{"question": q, "gold": None} for q in OUT_OF_KB[:max(1, args.questions // 4)]]
    random.Random(args.seed).shuffle(items)
    chunks = retrieval.chunk_documents(docs, 300, 50)
    bm25 = retrieval.BM25Index([c.text for c in chunks])
    bm25.tokens = [retrieval.bm25_tokens(c.text) for c in chunks]

    # 2. 服务（真实子进程）与本地备用模型（预先加载，切换时不用等加载）
    model_name = args.resolved_model()
    fb_model, fb_tok = models.load_args(args, name=args.fallback_model)
    svc, url = None, args.base_url
    cmd = [sys.executable, "-m", "common.serving", "--model", model_name, "--port", "{port}"]
    if not url:
        svc = services.start(cmd, log_file=out.path("server.log"), deadline_s=180)
        url = svc.url
    breaker, rng = CircuitBreaker(args.failure_threshold, args.reset_timeout), random.Random(args.seed)
    kill_i = int(args.kill_at * len(items)) if args.kill_at and svc else None
    restart_i = int(args.restart_at * len(items)) if kill_i is not None and args.restart_at > args.kill_at else None

    # 3. 逐题：检索 → 置信度路由 → 调服务（重试/熔断）→ 失败则本地备用
    rows, killed_t, failover_ms = [], None, None
    try:
        for i, it in enumerate(items):
            if i == kill_i:
                os.killpg(svc.proc.pid, signal.SIGKILL)            # 真的杀掉服务进程（连同子进程）
                svc.proc.wait()
                killed_t = time.perf_counter()
                log.info(f"第 {i} 题前：SIGKILL 服务进程 pid {svc.proc.pid}")
            if i == restart_i:
                svc = services.start(cmd, log_file=out.path("server_restart.log"), deadline_s=180, port=svc.port)
                log.info(f"第 {i} 题前：服务已在同一端口 {svc.port} 重启")
            top = [j for j, _ in bm25.search(it["question"], 3)]
            conf = confidence(bm25, it["question"], top)
            route = "rag" if conf >= args.rag_threshold else ("closed_book" if conf >= args.abstain_threshold
                                                               else "abstain")
            row = {**it, "confidence": round(conf, 3), "route": route, "served_by": None, "answer": ""}
            if route != "abstain":
                ctx = "\n".join(chunks[j].text for j in top)
                content = (f"只根据资料回答，简短作答。\n资料：\n{ctx}\n\n问题：{it['question']}" if route == "rag"
                           else f"请简短回答：{it['question']}")
                msgs = [{"role": "user", "content": content}]
                t = time.perf_counter()
                ans = call_server(url, model_name, msgs, args, breaker, rng)
                row["served_by"] = "server"
                if ans is None:   # 服务不可用（重试用完或熔断器断开）：本地备用模型接手
                    ans = models.generate(fb_model, fb_tok, [data.prompt_text(fb_tok, msgs)], args.max_new_tokens, 1)[0]
                    row["served_by"] = "fallback"
                    if killed_t and failover_ms is None:
                        failover_ms = round((time.perf_counter() - killed_t) * 1000, 1)
                row["answer"], row["ms"] = ans, round((time.perf_counter() - t) * 1000, 1)
            rows.append(row)
            log.info(f"[{i:2d}] conf={conf:.2f} {route:11s} {row['served_by'] or '-':8s} {it['question'][:40]}")
    finally:
        if svc:
            svc.stop()

    # 4. 结果：correct / abstained / wrong；切换是否成功；熔断器状态记录
    correct = sum(r["route"] != "abstain" and r["gold"] is not None and metrics.contains_answer(r["answer"], r["gold"])
                  for r in rows)
    abstained = sum(r["route"] == "abstain" for r in rows)
    after_kill = rows[kill_i:restart_i] if kill_i is not None else []
    answered_after = [r for r in after_kill if r["route"] != "abstain"]
    failover_worked = bool(answered_after) and all(r["answer"] is not None and r["served_by"] for r in answered_after) \
        and any(r["served_by"] == "fallback" for r in answered_after)
    back = [r["served_by"] for r in rows[restart_i:] if r["served_by"]] if restart_i is not None else []
    states = [s["state"] for s in breaker.log]
    log.info(f"熔断器：{' → '.join(['closed'] + states)}；重启后由服务作答 {back.count('server')}/{len(back)}")
    return out.finish({"correct": correct, "abstained": abstained, "wrong": len(rows) - correct - abstained,
                       "abstained_out_of_kb": sum(r["route"] == "abstain" and r["gold"] is None for r in rows),
                       "out_of_kb": sum(r["gold"] is None for r in rows), "routes": {
                           k: sum(r["route"] == k for r in rows) for k in ("rag", "closed_book", "abstain")},
                       "failover_worked": failover_worked, "failover_ms": failover_ms or 0.0,
                       "breaker_states": states, "breaker_reclosed": "open" in states and states[-1] == "closed",
                       "served_by": {k: sum(r["served_by"] == k for r in rows) for k in ("server", "fallback")},
                       "server_after_restart": back.count("server"), "rows": rows, "questions": len(rows)},
                      summary=f"{len(rows)} 题：correct {correct} / abstained {abstained} / wrong "
                              f"{len(rows) - correct - abstained}；杀服务后切到本地备用 {failover_worked}"
                              f"（{failover_ms} ms），熔断器 {' → '.join(['closed'] + states)}")


if __name__ == "__main__":
    main(cli.parse(Args))
