"""混合推理：按检索置信度在 闭卷 / RAG / 拒答转人工 之间路由；调用服务有超时、指数退避重试、熔断器，
服务挂了切到本地备用模型。

  - 拒答：问题在知识库里的 BM25 最高分低于阈值就转人工。分数的尺度随知识库变，阈值不手填而是校准：
    取不参与评测的库内问答（校准题，都是"该答"的）的最高分的 --abstain-quantile 分位（默认 0.1 = 约一成
    可答问题被转人工）——换成学生自己的 --docs/--qa 也成立；
  - 置信度：问题的词（jieba/英文词）按 idf 加权，有多少出现在检索到的前几块里（0..1）。
    ≥ --rag-threshold 走 RAG（资料 + 问题），否则闭卷作答（检索到的资料不像答案，塞进提示词反而误导）；
  - 服务：第 5 课的 OpenAI 兼容聊天服务（common.serving）作为真实子进程启动；每次调用有超时，失败按指数退避 + 抖动重试；
  - 熔断器：连续失败 --failure-threshold 次就"断开"（之后的请求不再等超时，直接走本地备用模型），
    过 --reset-timeout 秒进入"半开"放一个试探请求，成功就重新闭合；
  - 演示：跑到一半用 SIGKILL 杀掉服务进程，后面的问题由本地备用模型接住（failover_ms = 从杀掉到第一个备用回答的时间）；
    再把服务在同一端口重启，熔断器半开试探成功、重新闭合，请求回到服务上。

运行：
  python lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py            # CPU，smollm2-135m（服务与备用同一个）
  python lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py --smoke    # 极小模型
  python lesson7_hybrid_rag/05_hybrid_inference/hybrid_inference.py --base-url http://gpu-host:8000 \\
      --model Qwen/Qwen2.5-7B-Instruct --fallback-model smollm2-135m \\
      --config configs/lesson7/hybrid_inference.yaml                     # GPU 服务 + CPU 备用

你会看到：杀掉服务后没有一个请求失败（failover_worked = true），该答的题都由本地备用模型接住；
failover_ms 里含切换那一题的超时与 --max-retries 次退避重试，熔断器断开后的题不再白等；熔断器
closed → open → half_open → closed，服务重启后请求回到服务上；校准过的拒答让库外问题转人工得明显比库内问题多，
库内问题被误拒的比例接近 --abstain-quantile。词面信号有它的边界：提到知识库里的公司、却问库里没有的事
（"云帆智能的股票代码"）的问题分数照样高，拦不住——日志逐题列出分数，可以自己看；
correct / abstained / wrong 计数（--smoke 的极小模型答不对题，冒烟看的是容错）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：0.7 分钟，1.1 GB，结论 5/5 成立
  ✓ 杀掉服务后该答的题全由本地备用接住：杀后备用作答的题 / 杀后该答的题：1（≥ 1）
  ✓ 服务重启后熔断器重新闭合、请求回到服务：重启后由服务作答的题 / 重启后作答的题：1（≥ 0.5）
  ✓ 校准过的拒答挡住库外问题：库外问题的拒答率 − 库内问题的拒答率：0.5（≥ 0.3）
  ✓ 阈值在校准题上定，误拒受控：库内问题的拒答率 − --abstain-quantile：-0.1（≤ 0.15）
  ✓ 熔断器断开后请求不再白等：断开后每题在服务上耗掉的时间（平均）/ 切换那一题耗掉的时间：0.2972（≤ 0.5）
<!-- /results -->
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time
from dataclasses import dataclass

from common import answers, cli, data, models, retrieval, run, services
from common.errors import UserError

# 冒烟把冷却缩到 1 秒：题少、每题快，冷却太长的话服务重启后的几题都落在冷却期里，看不到半开 → 闭合
SMOKE = dict(questions=12, max_new_tokens=12, reset_timeout=1.0)
# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（该答的题、库内问题、切换那一题）都在同一次运行里
CLAIMS = [
    run.Claim("杀掉服务后该答的题全由本地备用接住：杀后备用作答的题 / 杀后该答的题",
              "after_kill_fallback / after_kill_needed", ">=", 1, 1),
    run.Claim("服务重启后熔断器重新闭合、请求回到服务：重启后由服务作答的题 / 重启后作答的题",
              "server_after_restart / after_restart_answered", ">=", 0.5, 0.5),
    # 原先用"词覆盖率 < 0.3"拒答：库内问题的覆盖率中位数只有 0.31（问法与文档措辞不同），库内一半被误拒。
    # 现在用 BM25 最高分 + 校准阈值（库内 135 题对 6 道库外题：AUROC 0.82，覆盖率只有 0.61）
    # 冒烟门槛放宽：12 题里库外只有 3 道（questions // 4），一道题就差三成多
    run.Claim("校准过的拒答挡住库外问题：库外问题的拒答率 − 库内问题的拒答率",
              "abstain_rate_out_of_kb - abstain_rate_in_kb", ">=", 0.2, 0.3),
    # 冒烟库内只剩 6 题，误拒一题就是 0.17：门槛比默认宽
    run.Claim("阈值在校准题上定，误拒受控：库内问题的拒答率 − --abstain-quantile",
              "abstain_rate_in_kb - abstain_quantile", "<=", 0.25, 0.15),
    # 时间之比：分母是切换那一题（连续失败加两次退避，种子固定），分子是断开后其余备用回答在服务上的耗时；
    # 冒烟只有 9 题，杀掉到重启之间只有一题要答，没有"之后"可比：只在默认模式检查
    run.Claim("熔断器断开后请求不再白等：断开后每题在服务上耗掉的时间（平均）/ 切换那一题耗掉的时间",
              "open_wait_ms / failover_wait_ms", "<=", None, 0.5),
]
# 库外题中英各半，还故意放了两道提到"云帆"的：词面信号拦不住它们（见 docstring），评测里要让这个边界露出来
OUT_OF_KB = ["云帆智能的股票代码是多少？", "今天上海的天气怎么样？", "帮我写一首关于秋天的诗。",
             "Who won the football world cup in 1998?", "What is the CEO of Yunfan's home address?",
             "Can you recommend a good pizza place nearby?"]


@dataclass
class Args(retrieval.KBArgs):
    questions: int = cli.arg(24, "评测问题数（知识库内问题 + 6 个库外问题）", min=2)
    rag_threshold: float = cli.arg(0.6, "词覆盖置信度 ≥ 它走 RAG，否则闭卷", min=0, max=1)
    abstain_quantile: float = cli.arg(0.1, "拒答阈值 = 校准题 BM25 最高分的这个分位（≈ 可答问题被转人工的比例）",
                                      min=0, max=0.5)
    abstain_threshold: float = cli.arg(None, "直接给拒答阈值（BM25 分数，尺度随知识库变）；不给就按分位校准", min=0)
    base_url: str = cli.arg(None, "已在运行的 OpenAI 兼容服务；不填则自己启动第 5 课的服务（common.serving）")
    fallback_model: str = cli.arg(None, "本地备用模型；默认与服务的模型相同")
    # 超时要比一次正常的 CPU 生成长得多：太短会把慢而正常的请求当成失败，误触熔断
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
        """状态变化记进 log：测试与 metrics 据此检查 closed → open → half_open → closed 走全了。"""
        self.state = state
        self.log.append({"t": round(time.monotonic(), 3), "state": state})

    def allow(self) -> bool:
        """能不能发请求：断开时不发（不再白等超时）；冷却期一过转为半开，放一个试探请求。"""
        # 不开定时器：下次有人调 allow() 时才看冷却期过没过，熔断器不需要后台线程
        if self.state == "open" and time.monotonic() - self.opened_at >= self.reset_timeout:
            self._to("half_open")
        # 半开时这里每次都放行：本脚本逐题串行，同一时刻只有一个试探；多线程客户端要另加"只放一个"的锁
        return self.state != "open"

    def success(self) -> None:
        """成功一次就清零：熔断看的是"连续"失败，偶发的一次超时不该慢慢累积到断开。"""
        self.failures = 0
        if self.state != "closed":
            self._to("closed")

    def failure(self) -> None:
        """半开时的试探失败立刻再断开：服务还没好，不能把整批请求放过去再等一轮超时。"""
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            # 用 monotonic 而不是 time.time：系统校时会让墙钟跳变，冷却期可能被算成负数或一下子过完
            self.opened_at = time.monotonic()
            if self.state != "open":
                self._to("open")


def call_server(url: str, model: str, messages: list[dict], args, breaker: CircuitBreaker, rng) -> str | None:
    """带超时与指数退避重试的一次调用；熔断器断开时不发请求，直接返回 None（交给备用模型）。"""
    import httpx

    # 每次尝试前都问熔断器：重试途中一旦断开，剩下的重试也不再发
    for attempt in range(args.max_retries + 1):
        if not breaker.allow():
            return None
        try:
            # 直接用 httpx 而不是 openai 客户端：后者自带重试（默认 2 次），会和这里的重试、熔断计数叠在一起
            r = httpx.post(url.rstrip("/") + "/v1/chat/completions", timeout=args.timeout, json={
                "model": model, "messages": messages, "max_tokens": args.max_new_tokens, "temperature": 0})
            # 4xx/5xx 也算失败：服务进程还活着却在报错，不能当成答上了
            r.raise_for_status()
            breaker.success()
            # content 可能是 null：记成空串，因为 None 在这里表示"服务不可用"，会让调用方去叫备用模型
            return r.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, KeyError, ValueError):   # 回答格式不对也算失败：返回错误页的服务和挂掉没区别
            breaker.failure()
            if attempt < args.max_retries:   # 指数退避 + 抖动：避免所有客户端同时重试把刚恢复的服务再压垮
                # 抖动系数在 0.5..1.5；rng 有种子，退避时长可复现，CLAIMS 里"切换那一题"的耗时才稳定
                time.sleep(args.backoff * 2 ** attempt * (0.5 + rng.random()))
    return None


def confidence(bm25: retrieval.BM25Index, q: str, top: list[int]) -> float:
    """idf 加权的问题词覆盖率：问题里"有信息量"的词，在最匹配的那一块里出现了多少（语料里没有的词按高 idf 计）。"""
    words = set(retrieval.bm25_tokens(q))
    # rank-bm25 把出现在一半以上块里的词（idf 为负）改成 0.25 × 平均 idf；极小语料上平均 idf 本身
    # 可能为负，所以下面还要截到 0
    idf = bm25.bm25.idf
    # 语料里没出现过的词按最高 idf 计：问"股票代码"时，知识库里压根没有的"股票"恰恰是最说明问题的词
    unseen = max(idf.values()) if idf else 1.0
    weight = {w: max(idf.get(w, unseen), 0.0) for w in words}   # 权重不为负，覆盖率才落在 0..1
    total = sum(weight.values())
    if not total:
        return 0.0
    # 取前几块里最好的那一块而不是把几块合起来算：几块各沾一点词，合起来覆盖率会虚高，其实没有哪一块像答案
    return max((sum(weight[w] for w in words & set(bm25.tokens[i])) / total for i in top), default=0.0)


def load_items(args: Args) -> tuple[list[dict], list, retrieval.BM25Index, list[str]]:
    """知识库内的问答（有标准答案）+ 库外问题（应当拒答），打乱；知识库切块建 BM25；其余库内问题留作校准题。"""
    docs, by_id, qas = retrieval.load_kb(args.docs, args.qa)
    # 库外问题约占四分之一（最多 6 道）：太少看不出拒答是否可靠，太多则服务 / 备用模型的切换演示没几题可看
    n_out = min(len(OUT_OF_KB), max(1, args.questions // 4))
    # 第一份留作校准、第二份评测，两者不重叠：阈值不是在考题上定的；库内题数 + 库外题数 = --questions
    calib, picked = data.split(qas, min(0.99, max(1, args.questions - n_out) / len(qas)), args.seed)
    items = [{"question": q["question"], "gold": q["answer"]} for q in picked] + \
            [{"question": q, "gold": None} for q in OUT_OF_KB[:n_out]]
    random.Random(args.seed).shuffle(items)   # 打乱：杀服务的时刻不会总落在同一类问题上
    # 切块参数与第 01 节的默认（300 / 50）一致
    chunks = retrieval.chunk_documents(docs, 300, 50)
    bm25 = retrieval.BM25Index([c.text for c in chunks])
    bm25.tokens = [retrieval.bm25_tokens(c.text) for c in chunks]   # 置信度要看每块有哪些词
    return items, chunks, bm25, [q["question"] for q in calib]


def calibrate(args: Args, bm25: retrieval.BM25Index, calib: list[str]) -> float:
    """拒答阈值 = 校准题（库内、不参与评测）BM25 最高分的 --abstain-quantile 分位：只用可答的题就能定，
    含义对任何知识库都一样——"约这么多比例的可答问题会被转人工"。"""
    import numpy as np

    if args.abstain_threshold is not None:
        return args.abstain_threshold
    # 少于 10 题时分位数只由一两道题决定（0.1 分位几乎就是最小值），阈值会随抽样乱跳
    if len(calib) < 10:
        raise UserError(f"--qa 评测用掉 {args.questions} 题后只剩 {len(calib)} 道校准题（至少 10）："
                        "调小 --questions，或直接给 --abstain-threshold")
    # 每道校准题只取最高分：route_of 比较的也是最高分，尺子要一致
    return float(np.quantile([bm25.search(q, 1)[0][1] for q in calib], args.abstain_quantile))


def route_of(args: Args, top_score: float, threshold: float, conf: float) -> str:
    """BM25 最高分低于校准阈值：知识库里没有这类内容，拒答转人工；否则看词覆盖决定 RAG 还是闭卷。"""
    return "abstain" if top_score < threshold else ("rag" if conf >= args.rag_threshold else "closed_book")


def ask(args: Args, url: str, fallback, item: dict, route: str, ctx: str, breaker, rng) -> tuple[str, str]:
    """先问服务（超时 / 重试 / 熔断）；服务不可用时本地备用模型接手。返回 (回答, 谁答的, 在服务上耗掉的毫秒数)。"""
    content = (f"只根据资料回答，简短作答。\n资料：\n{ctx}\n\n问题：{item['question']}" if route == "rag"
               else f"请简短回答：{item['question']}")
    msgs = [{"role": "user", "content": content}]
    t = time.perf_counter()
    ans = call_server(url, args.resolved_model(), msgs, args, breaker, rng)
    # 备用作答时这段是白等的（连接失败 + 退避）：熔断器断开后它应接近 0
    waited = round((time.perf_counter() - t) * 1000, 1)
    if ans is not None:
        return ans, "server", waited
    fb_model, fb_tok = fallback   # 备用模型早已加载好：切换的代价只是一次本地生成，不用等加载
    return (models.generate(fb_model, fb_tok, [data.prompt_text(fb_tok, msgs)], args.max_new_tokens, 1)[0],
            "fallback", waited)


def kill_server(svc, log, i: int) -> float:
    """SIGKILL 整个服务进程组（连同它派生的子进程）：模拟 OOM / 宕机，进程来不及做任何收尾。"""
    os.killpg(svc.proc.pid, signal.SIGKILL)
    # 等它真的退出后再记时刻：failover_ms 从服务确实不在了算起
    svc.proc.wait()
    log.info(f"第 {i} 题前：SIGKILL 服务进程 pid {svc.proc.pid}")
    return time.perf_counter()


def answer_all(args: Args, out, items, kb, fallback, cmd) -> tuple[list[dict], dict]:
    """逐题：检索 → 置信度路由 → 调服务（重试/熔断）→ 失败则本地备用；中途杀掉服务、再在同一端口重启。"""
    svc, url = None, args.base_url
    chunks, bm25, threshold = kb
    if not url:
        # deadline_s 给 180：服务要先在 CPU 上加载模型，services.start 默认的 60 秒可能不够
        svc = services.start(cmd, log_file=out.path("server.log"), deadline_s=180)
        url = svc.url
    breaker, rng = CircuitBreaker(args.failure_threshold, args.reset_timeout), random.Random(args.seed)
    # 只杀自己启动的服务：--base-url 指向的是别人的服务，不能动
    kill_i = int(args.kill_at * len(items)) if args.kill_at and svc else None
    restart_i = int(args.restart_at * len(items)) if kill_i is not None and args.restart_at > args.kill_at else None
    rows, killed_t, failover_ms = [], None, None
    try:
        for i, it in enumerate(items):
            if i == kill_i:
                killed_t = kill_server(svc, out.log, i)
            if i == restart_i:   # 同一端口重启：客户端不换地址，靠熔断器半开试探发现服务回来了
                svc = services.start(cmd, log_file=out.path("server_restart.log"), deadline_s=180, port=svc.port)
                out.log.info(f"第 {i} 题前：服务已在同一端口 {svc.port} 重启")
            hits = bm25.search(it["question"], 3)
            top = [j for j, _ in hits]
            conf = confidence(bm25, it["question"], top)
            route = route_of(args, hits[0][1], threshold, conf)
            row = {**it, "top_bm25": round(hits[0][1], 2), "confidence": round(conf, 3), "route": route,
                   "served_by": None, "answer": ""}
            if route != "abstain":
                t = time.perf_counter()
                row["answer"], row["served_by"], row["wait_ms"] = ask(args, url, fallback, it, route,
                                                                      "\n".join(chunks[j].text for j in top),
                                                                      breaker, rng)
                row["ms"] = round((time.perf_counter() - t) * 1000, 1)
                if row["served_by"] == "fallback" and killed_t and failover_ms is None:
                    # 切换时间 = 从杀掉服务到第一个备用回答：含重试的退避等待，这正是用户多等的那段
                    failover_ms = round((time.perf_counter() - killed_t) * 1000, 1)
            rows.append(row)
            out.log.info(f"[{i:2d}] bm25={hits[0][1]:5.1f} conf={conf:.2f} {route:11s} {row['served_by'] or '-':8s} "
                         f"{it['question'][:40]}")
    finally:
        # finally 里停服务：中途异常或 Ctrl-C 也不会留下占着端口的服务进程（stop 可重复调用）
        if svc:
            svc.stop()
    return rows, {"kill_i": kill_i, "restart_i": restart_i, "failover_ms": failover_ms,
                  "states": [s["state"] for s in breaker.log]}


def summarize(rows: list[dict], run_info: dict) -> dict:
    """correct / abstained / wrong；杀掉服务后的每个问题是否都有回答、是否由备用模型接住；重启后是否回到服务。"""
    kill_i, restart_i, states = run_info["kill_i"], run_info["restart_i"], run_info["states"]
    correct = sum(r["route"] != "abstain" and r["gold"] is not None and answers.contains_answer(r["answer"], r["gold"])
                  for r in rows)
    abstained = sum(r["route"] == "abstain" for r in rows)
    n_out = sum(r["gold"] is None for r in rows)
    ab_out = sum(r["route"] == "abstain" and r["gold"] is None for r in rows)
    # restart_i 为 None 时切片到末尾：不重启就看杀掉之后的全部题
    after_kill = rows[kill_i:restart_i] if kill_i is not None else []
    answered_after = [r for r in after_kill if r["route"] != "abstain"]
    # 切换成功 = 杀掉之后该答的题一个不漏，而且确实有题是备用模型答的（否则说明根本没测到切换）
    failover_worked = bool(answered_after) and all(r["answer"] is not None and r["served_by"] for r in answered_after) \
        and any(r["served_by"] == "fallback" for r in answered_after)
    back = [r["served_by"] for r in rows[restart_i:] if r["served_by"]] if restart_i is not None else []
    # 第一个备用回答之前在服务上白等的时间（连续失败到熔断器断开，含退避）vs 之后每个备用回答的（断开了就不再等）
    waits = [r["wait_ms"] for r in rows if r["served_by"] == "fallback"]
    return {"correct": correct, "abstained": abstained, "wrong": len(rows) - correct - abstained,
            "abstained_out_of_kb": ab_out, "out_of_kb": n_out,
            "abstain_rate_out_of_kb": round(ab_out / max(n_out, 1), 4),
            "abstain_rate_in_kb": round((abstained - ab_out) / max(len(rows) - n_out, 1), 4),
            "routes": {k: sum(r["route"] == k for r in rows) for k in ("rag", "closed_book", "abstain")},
            "failover_worked": failover_worked, "failover_ms": run_info["failover_ms"] or 0.0,
            # 先看 "open" in states：从没断开过时 states 是空列表，states[-1] 会 IndexError，也不该算"重新闭合"
            "breaker_states": states, "breaker_reclosed": "open" in states and states[-1] == "closed",
            "served_by": {k: sum(r["served_by"] == k for r in rows) for k in ("server", "fallback")},
            "server_after_restart": back.count("server"), "after_restart_answered": len(back),
            "after_kill_needed": len(answered_after),
            "after_kill_fallback": sum(r["served_by"] == "fallback" for r in answered_after),
            "failover_wait_ms": waits[0] if waits else None,
            "open_wait_ms": round(sum(waits[1:]) / len(waits[1:]), 1) if len(waits) > 1 else None,
            "rows": rows, "questions": len(rows)}


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 先查两个模型目录：服务的 --model 在子进程里才加载，坏目录要等服务起、停之后才报；本地路径点名自己的参数
    for flag, name in (("--model", args.resolved_model()), ("--fallback-model", args.fallback_model or "")):
        local = name.startswith(("/", ".", "~")) or os.path.lexists(name)
        if name:
            models.check_dir(name if local else models.resolve(name, args.source), flag,
                             trust_remote_code=args.trust_remote_code)

    # 1. 问题：知识库内的问答（有标准答案）+ 库外问题（应当拒答）；检索索引；拒答阈值在校准题上定
    items, chunks, bm25, calib = load_items(args)
    threshold = calibrate(args, bm25, calib)
    out.log.info(f"拒答阈值 BM25 {threshold:.2f}（" + (f"{len(calib)} 道校准题最高分的 {args.abstain_quantile:g} 分位）"
                                                   if args.abstain_threshold is None else "--abstain-threshold）"))

    # 2. 本地备用模型（预先加载，切换时不用等加载）；服务是第 5 课的聊天服务，作为真实子进程启动
    # 备用默认与服务同一个模型：用户看不出切换；真实部署里备用常是更小的 CPU 模型（见运行示例的 --fallback-model）
    fallback = models.load_args(args, name=args.fallback_model)
    # "{port}" 由 services.start 换成空闲端口；重启时传回同一个端口，客户端地址不变
    cmd = [sys.executable, "-m", "common.serving", "--model", args.resolved_model(), "--port", "{port}"]

    # 3. 逐题：检索 → 置信度路由 → 调服务（重试/熔断）→ 失败则本地备用；中途 SIGKILL 服务再重启
    rows, run_info = answer_all(args, out, items, (chunks, bm25, threshold), fallback, cmd)

    # 4. 结果：correct / abstained / wrong；切换是否成功；熔断器状态记录
    m = {**summarize(rows, run_info), "abstain_threshold": round(threshold, 3),
         "abstain_quantile": args.abstain_quantile, "calibration_questions": len(calib)}
    states, fo = m["breaker_states"], run_info["failover_ms"]
    out.log.info(f"熔断器：{' → '.join(['closed'] + states)}；重启后由服务作答 {m['server_after_restart']} 题")
    return out.finish(m, summary=f"{len(rows)} 题：correct {m['correct']} / abstained {m['abstained']} / wrong "
                                 f"{m['wrong']}；杀服务后切到本地备用 {m['failover_worked']}（{fo} ms），"
                                 f"熔断器 {' → '.join(['closed'] + states)}",
                      claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
