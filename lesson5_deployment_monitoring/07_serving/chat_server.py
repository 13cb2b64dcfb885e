"""把模型上线：OpenAI 兼容的聊天服务（FastAPI + uvicorn），用官方 openai 客户端调用，用 Prometheus 监控。

服务本体在 common/serving.py（第 5 课 01、第 7 课也用它）：POST /v1/chat/completions（普通 + SSE 流式）、
GET /v1/models、/health、/metrics、聊天网页 /；可选 Bearer API key；坏请求 4xx（OpenAI 的错误形状）；
队列有界，满了 429。CPU 上让并发真正有用的是动态批处理：同时到达的请求在一个小等待窗口里凑成一批，
一次 model.generate 生成（左填充，每步把各行的新 token 推给各自的请求）。

本脚本：1) 用 common.services 真的启动服务子进程并等 /health；2) openai 客户端普通调用；3) 流式调用，
量首 token 时间（TTFT）；4) 故意发坏请求看 4xx；5) 一次并发突发，统计状态码；6) 抓 /metrics 核对计数；7) 停服务。

运行：
  python lesson5_deployment_monitoring/07_serving/chat_server.py            # CPU，smollm2-135m
  python lesson5_deployment_monitoring/07_serving/chat_server.py --smoke    # tiny-qwen2
  python lesson5_deployment_monitoring/07_serving/chat_server.py --serve --port 8000   # 一直服务，浏览器打开
      http://127.0.0.1:8000/ 聊天，Ctrl-C 停止（--model 目录 --adapter LoRA 目录 可服务自己训练的模型）
  python lesson5_deployment_monitoring/07_serving/chat_server.py --model Qwen/Qwen2.5-7B-Instruct --source hf \\
      --config configs/lesson5/chat_server_gpu.yaml   # GPU；真正的高并发请换 vLLM：vllm serve <model>（同一套 API）

你会看到：普通与流式回答都通过官方 openai 客户端拿到，贪心解码下流式拼起来的文本与普通调用逐字相同；
首 token 时间远小于流式总时间（流式让用户先看到字）；max_tokens 超限得到 400、模型名错得到 404、空消息也被
挡在生成之前；--burst 个并发请求（默认 32）只有 200/429（队列满时立刻 429）、没有 5xx、没有挂起；动态批处理让
一次 generate 平均服务不止一个请求；/metrics 里的计数与发出的一致。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：0.5 分钟，1.2 GB，结论 6/6 成立
  ✓ 流式与普通调用是同一个回答（贪心解码）：流式拼起来的文本 == 普通调用的回答：1（≥ 1）
  ✓ 坏请求在生成之前就被挡下：超限 max_tokens、错模型名、空消息都得到客户端错误码：1（≥ 1）
  ✓ 并发突发里每个请求要么被服务、要么队列满立刻被拒，没有服务端错误、没有挂起：(成功 + 拒绝) / 发出：1（≥ 1）
  ✓ 监控计数可信：/metrics 数到的 chat 请求与客户端发出的相差：0（≤ 0）
  ✓ 动态批处理把并发请求凑成批：平均每次 generate 服务的请求数：5（≥ 1.5）
  ✓ 流式让用户先看到字：首 token 时间 / 流式总时间：0.06463（≤ 0.5）
<!-- /results -->
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass

from common import cli, run, services
from common.errors import UserError, brief

# 起服务之前查 --model / --adapter（与 load_test.py 共用）：坏目录在本进程一行报错，不必等服务子进程启动、失败
_preflight = run.import_sibling(__file__, "_preflight")


@dataclass
class Args(cli.CommonArgs):
    adapter: str = cli.arg(None, "LoRA adapter 目录：加载后合并进模型再服务")
    port: int = cli.arg(0, "端口；0 = 自动找空闲端口（--serve 时默认 8000）", min=0, max=65535)
    api_key: str = cli.arg(None, "Bearer API key（不填则不校验）；也可用环境变量 CHAT_API_KEY")
    max_batch_size: int = cli.arg(8, "动态批处理：一次 generate 最多几个请求", min=1, max=256)
    batch_wait_ms: float = cli.arg(15.0, "凑批等待窗口（毫秒）：越长批越满，单个请求多等这么久", min=0, max=1000)
    max_queue: int = cli.arg(64, "排队上限：满了立刻回 429，不无限堆积", min=1)
    max_tokens: int = cli.arg(48, "每个演示请求生成多少 token", min=1, max=512)
    burst: int = cli.arg(32, "并发突发：同时发多少个请求", min=1, max=256)
    serve: bool = cli.arg(False, "只启动服务并一直运行（Ctrl-C 停止），不跑演示")
    host: str = cli.arg("127.0.0.1", "--serve 时的监听地址；对外开放请同时设 --api-key")
    data: str = cli.arg(None, "本脚本不读数据文件：演示问题写在脚本里，并发突发发的是编号问题")

    smoke_model = "tiny-qwen2"

    def __post_init__(self) -> None:
        if self.data:   # CommonArgs 的 --data：给了却悄悄不用，学生会以为服务演示用的是自己的数据
            raise UserError(f"--data {self.data}: 这个脚本不读数据文件（演示问题写在脚本里，并发突发发的是编号问题）")


# --smoke：极小模型、短回答；队列上限 8 远小于 32 个并发，繁忙的机器上 429 一定会出现
SMOKE = dict(max_tokens=16, burst=32, max_queue=8)
# 中英各一问：中文检验增量解码不会把半个 UTF-8 字符发出去（中文常被切成几个字节 token）
QUESTIONS = ["云帆 App 怎么修改绑定手机号？", "How do I reset my password?"]

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里测
CLAIMS = [
    run.Claim("流式与普通调用是同一个回答（贪心解码）：流式拼起来的文本 == 普通调用的回答",
              "stream_answer == answer", ">=", 1, 1),
    # 只要求落在 4xx、不绑定具体的码：要证明的是"挡在生成之前、是客户端的错"，不是某个校验层选了哪个码
    run.Claim("坏请求在生成之前就被挡下：超限 max_tokens、错模型名、空消息都得到客户端错误码",
              "all(400 <= c < 500 for c in bad_request_codes.values())", ">=", 1, 1),
    # 比的是 200 与 429 之和：空闲的机器上生成线程来得及清队列，可能一个 429 都没有，那也是对的
    run.Claim("并发突发里每个请求要么被服务、要么队列满立刻被拒，没有服务端错误、没有挂起：(成功 + 拒绝) / 发出",
              "(burst_200 + burst_429) / burst_sent", ">=", 1, 1),
    run.Claim("监控计数可信：/metrics 数到的 chat 请求与客户端发出的相差", "abs(metrics_chat_requests - requests_sent)",
              "<=", 0, 0),
    # 顺序请求时每次 generate 只服务 1 个；同一等待窗口里到达的并发请求被凑成批
    run.Claim("动态批处理把并发请求凑成批：平均每次 generate 服务的请求数", "mean_batch_size", ">=", 1.5, 1.5),
    # 墙钟比值：极小模型一个 token 只要几毫秒，TTFT 与总时间差不到 3 倍、随机器忙闲起伏，冒烟不查
    run.Claim("流式让用户先看到字：首 token 时间 / 流式总时间", "ttft_ms / stream_total_ms", "<=", None, 0.5),
]


def server_cmd(args: Args, port: str = "{port}") -> list[str]:
    """启动服务的命令行（与 python -m common.serving 完全相同，也是第 7 课的用法）。

    服务放在子进程里：客户端与服务各占一个进程，和真实部署一样互不影响；"{port}" 由 services.start 换成空闲端口。
    """
    # 启动服务之前查模型与 adapter：否则错误只在 server.log 里，这里只能说"服务没能启动"
    _preflight.check_model(args.resolved_model(), args.source)
    cmd = [sys.executable, "-m", "common.serving", "--model", args.resolved_model(), "--source", args.source,
           "--port", port, "--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms),
           "--max-queue", str(args.max_queue), "--device", args.device, "--dtype", args.dtype]
    if args.adapter:
        _preflight.check_adapter(args.adapter)
        cmd += ["--adapter", args.adapter]
    # 命令行上的 key 在本机 ps 里看得见：与别人共用机器时，让服务从环境变量 CHAT_API_KEY 读
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    return cmd


def ask(client, model: str, q: str, max_tokens: int) -> tuple[str, float]:  # noqa: ANN001
    """普通（非流式）调用：返回 (回答, 毫秒)。整段回答生成完才返回，延迟 = 全部 token 的时间。"""
    t0 = time.perf_counter()
    # 不传 temperature：本服务缺省用贪心（OpenAI 缺省是 1），流式与普通调用才可能逐字相同
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens)
    return r.choices[0].message.content, (time.perf_counter() - t0) * 1000


def ask_stream(client, model: str, q: str, max_tokens: int) -> dict:  # noqa: ANN001
    """流式调用：逐块收 token，量首 token 时间。

    聊天界面看的是 TTFT（用户多久看到第一个字），不是总时间；贪心解码下拼起来的文本应与普通调用逐字相同。
    """
    t0, ttft, parts = time.perf_counter(), None, []
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                            max_tokens=max_tokens, stream=True)
    for chunk in stream:
        # choices 可能为空（只带 usage 的收尾块），delta 也可能只有 role 没有文字：这些都不算首 token
        delta = chunk.choices[0].delta.content if chunk.choices else None
        if delta:
            ttft = ttft or (time.perf_counter() - t0) * 1000
            parts.append(delta)
    return {"answer": "".join(parts), "chunks": len(parts), "ttft_ms": ttft or 0.0,
            "total_ms": (time.perf_counter() - t0) * 1000}


def bad_requests(client, model: str) -> dict:  # noqa: ANN001
    """坏请求：服务应回 4xx 和 OpenAI 形状的错误（openai 客户端据此抛出对应异常）。

    挡在生成之前：超长的 max_tokens 不挡，一个请求就能占住生成线程几分钟。
    """
    import openai

    codes = {}
    cases = {"max_tokens_too_large": dict(model=model, max_tokens=100000),
             "unknown_model": dict(model="no-such-model", max_tokens=4),
             "empty_messages": dict(model=model, max_tokens=4, messages=[])}
    for name, kw in cases.items():
        # 其余两例配一条正常消息：每个请求只坏一处，拿到的状态码才能归到那一处
        kw.setdefault("messages", [{"role": "user", "content": "hi"}])
        try:
            client.chat.completions.create(**kw)
            codes[name] = 200
        except openai.APIStatusError as e:
            codes[name] = e.status_code
    return codes


async def burst(url: str, model: str, n: int, max_tokens: int, api_key: str | None) -> dict:
    """n 个请求同时发出（httpx，不重试），统计状态码。

    不用 openai 客户端：它遇到 429 会自动退避重试，就看不到服务"满了立刻拒绝"的行为了。
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # 超时放宽到 300 秒：排在队尾的请求要等前面几批生成完，CPU 上可能很久；这样超时才真的意味着挂起
    async with httpx.AsyncClient(timeout=300, headers=headers) as c:
        async def one(i: int) -> int:
            r = await c.post(url + "/v1/chat/completions", json={
                "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"问题 {i}"}]})
            return r.status_code

        t0 = time.perf_counter()
        # gather 让 n 个请求几乎同时到达：这样才能一下子填满有界队列，看到 429 和凑批
        codes = await asyncio.gather(*[one(i) for i in range(n)])
    return {"accepted_200": codes.count(200), "rejected_429": codes.count(429),
            "server_errors": sum(c >= 500 for c in codes), "seconds": time.perf_counter() - t0}


def scrape(url: str) -> dict:
    """读 /metrics（Prometheus 文本格式），取出课程关心的几个数。

    用 prometheus_client 自带的解析器读，和 Prometheus 服务器抓取时看到的是同一份文本。
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    by_code, out = {}, {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            # 服务注册的 Counter 叫 chat_http_requests，导出时 prometheus_client 自动加 _total 后缀；
            # 只数聊天接口：就绪轮询 /health 与抓取 /metrics 本身也按 route 计数，混进来就和发出的对不上
            if s.name == "chat_http_requests_total" and s.labels["route"] == "/v1/chat/completions":
                # 按状态码各一条样本：200、400、404、429 分开计，合起来才是总请求数
                by_code[s.labels["code"]] = by_code.get(s.labels["code"], 0) + int(s.value)
            # 直方图导出成 _sum / _count 两条：相除就是平均每次 generate 服务了几个请求
            elif s.name in ("chat_generated_tokens_total", "chat_batch_size_sum", "chat_batch_size_count",
                            "chat_time_to_first_token_seconds_count"):
                out[s.name] = s.value
    out["chat_requests_by_code"] = by_code
    return out


def serve_forever(args: Args) -> None:
    """--serve：本进程换成服务进程（exec），一直运行到 Ctrl-C。

    exec 而不是再起一个子进程：Ctrl-C / SIGTERM 直接交给服务自己处理（uvicorn 收尾最多 5 秒），不会留下孤儿进程。
    """
    args = cli.with_smoke(args, SMOKE)
    port = str(args.port or 8000)
    cmd = server_cmd(args, port) + ["--host", args.host]
    run.get_logger().info(f"聊天网页：http://{args.host}:{port}/   OpenAI base_url：http://{args.host}:{port}/v1")
    # cmd[0] 就是 sys.executable：execve 的 argv 要含程序名本身；PYTHONPATH 让 -m common.serving 找到这份仓库
    os.execve(sys.executable, cmd, {**os.environ, "PYTHONPATH": str(run.REPO_ROOT)})


def demo_calls(args: Args, url: str, out) -> dict:  # noqa: ANN001
    """官方 openai 客户端：普通两问、流式一问、三个坏请求，再发一次并发突发。"""
    import openai

    model = args.resolved_model()
    # 换个 base_url 就能指向 vLLM / TGI / OpenAI：客户端代码一行不用改
    # max_retries=0：官方客户端默认遇到 429/5xx 会自动重试，演示要看到服务第一次的原始应答；
    # api_key 为 None 时客户端去读 OPENAI_API_KEY、读不到就报错：服务不校验时给一个占位值
    client = openai.OpenAI(base_url=url + "/v1", api_key=args.api_key or "not-needed", max_retries=0, timeout=300)
    answers = [ask(client, model, q, args.max_tokens) for q in QUESTIONS]
    for q, (a, ms) in zip(QUESTIONS, answers):
        out.log.info(f"{q} -> {a[:60]!r}（{ms:.0f} ms）")
    # 流式问的是普通调用问过的第一问：贪心解码下两者应逐字相同，CLAIMS 第一条比的就是它
    st = ask_stream(client, model, QUESTIONS[0], args.max_tokens)
    out.log.info(f"流式：{st['chunks']} 块，TTFT {st['ttft_ms']:.0f} ms，总 {st['total_ms']:.0f} ms")
    codes = bad_requests(client, model)
    out.log.info(f"坏请求状态码：{codes}")
    # 队列放得下的排队等批处理，放不下的立刻 429；绝不 5xx，也不挂起
    b = asyncio.run(burst(url, model, args.burst, args.max_tokens, args.api_key))
    out.log.info(f"{args.burst} 个并发：200 ×{b['accepted_200']}，429 ×{b['rejected_429']}，"
                 f"5xx ×{b['server_errors']}，{b['seconds']:.1f} 秒")
    return {"answers": answers, "stream": st, "codes": codes, "burst": b}


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    model = args.resolved_model()

    # 1. 真的启动服务子进程：PYTHONPATH 指向本仓库，子进程用的就是这份 common/serving.py
    env = {"PYTHONPATH": str(run.REPO_ROOT)}
    try:
        svc = services.start(server_cmd(args), ready_path="/health", log_file=out.path("server.log"),
                             deadline_s=300, env=env, port=args.port or None)
    except RuntimeError as e:   # 超时或子进程退出：services.start 抛的 RuntimeError 带日志末尾，只取第一行点名
        raise UserError(f"--model {model}: 服务没能启动（{brief(e, 300)}）") from None
    with svc:
        # 2.-5. 普通、流式、坏请求、并发突发：都经 HTTP，和任何外部客户端看到的一样
        d = demo_calls(args, svc.url, out)
        # 6. 监控：/metrics 里的计数应与上面发出的请求一一对应（数不对，告警和看板就不可信）
        prom = scrape(svc.url)
    answers, st, codes, b = d["answers"], d["stream"], d["codes"], d["burst"]
    # 发出的 chat 请求 = 普通两问 + 流式一问 + 坏请求 + 突发：坏请求与 429 也经过计数中间件，都要算上
    sent = len(QUESTIONS) + 1 + len(codes) + args.burst
    counted = sum(prom["chat_requests_by_code"].values())
    batches = prom.get("chat_batch_size_count", 0)
    mean_batch = prom.get("chat_batch_size_sum", 0) / max(batches, 1)   # > 1 说明并发请求真的被凑成了批
    out.log.info(f"/metrics：chat 请求 {counted}（发出 {sent}），按状态码 {prom['chat_requests_by_code']}；"
                 f"{batches:.0f} 次 generate，平均每批 {mean_batch:.2f} 个请求")

    # 7. 服务已停（with 退出时 SIGTERM）；结果
    return out.finish({
        "answer": answers[0][0], "answer_en": answers[1][0], "latency_ms": round(answers[0][1], 1),
        "stream_chunks": st["chunks"], "stream_answer": st["answer"], "ttft_ms": round(st["ttft_ms"], 1),
        "stream_total_ms": round(st["total_ms"], 1), "burst_sent": args.burst,
        "bad_request_codes": codes, "burst_200": b["accepted_200"], "burst_429": b["rejected_429"],
        "burst_5xx": b["server_errors"], "metrics_chat_requests": counted, "requests_sent": sent,
        "metrics_by_code": prom["chat_requests_by_code"],
        "generated_tokens": prom.get("chat_generated_tokens_total", 0), "mean_batch_size": round(mean_batch, 2)},
        summary=f"服务应答正常；{args.burst} 并发 200×{b['accepted_200']} 429×{b['rejected_429']} "
                f"5xx×{b['server_errors']}；TTFT {st['ttft_ms']:.0f} ms；平均每批 {mean_batch:.2f} 个请求",
        claims=CLAIMS)


if __name__ == "__main__":
    cli_args = cli.parse(Args)
    serve_forever(cli_args) if cli_args.serve else main(cli_args)   # --serve：只当服务用，不跑演示与测量
