"""压测 OpenAI 兼容的聊天服务：不同并发下的吞吐（req/s、tokens/s）、延迟 p50/p95、首 token 时间（TTFT）。

做法：闭环压测，每个并发档位 c 用 c 个协程各自"发一个、等回来、再发下一个"，共 --requests-per-level 个请求
（有上限，不会无限压）；全部用流式（SSE）请求，才量得到 TTFT；completion token 数取服务在最后一块里给的
usage（stream_options.include_usage）。它只说 OpenAI API，所以原样可以压 vLLM / TGI：
  vllm serve Qwen/Qwen2.5-7B-Instruct --port 8000      # GPU 上的扩展路径：连续批处理 + PagedAttention
  python lesson5_deployment_monitoring/07_serving/load_test.py --base-url http://127.0.0.1:8000 \\
      --model Qwen/Qwen2.5-7B-Instruct --concurrency 1,8,32,64
只压本机（127.0.0.1 / localhost / ::1）：压测别人的服务等于攻击；远端机器请在那台机器上运行本脚本。

batching_speedup_8 = 8 并发的吞吐（tokens/s）÷ 顺序（1 并发）的吞吐：动态批处理在 CPU 上带来多少。
每档的 mean_batch_size 读自服务的 /metrics（chat_batch_size 直方图在这一档里的增量）：不受机器忙闲影响地说明
请求确实被凑成了批（被压的是别家服务、没有这个指标时为 null）。

运行：
  python lesson5_deployment_monitoring/07_serving/load_test.py            # 自己起服务（smollm2-135m），1,4,8 并发
  python lesson5_deployment_monitoring/07_serving/load_test.py --smoke    # tiny-qwen2
  python lesson5_deployment_monitoring/07_serving/load_test.py --base-url http://127.0.0.1:8000 --concurrency 1,4,8

你会看到：并发从 1 到 8，mean_batch_size 变大（请求被凑成批，一次 generate 服务多个请求），所以 tokens/s
明显上升；代价是单个请求的延迟（p50）上升——每步要为整批算，还要等凑批窗口；所有请求都成功（压测有边界）；
图 load_test.png。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.3 分钟，1.2 GB，结论 4/4 成立
  ✓ 并发请求被凑成批：平均每次 generate 服务的请求数，并发八个 − 逐个顺序发：7（≥ 2）
  ✓ 动态批处理提高吞吐：tokens/s 并发八个 / 逐个顺序发：5.8（≥ 1.5）
  ✓ 批处理的代价：单个请求的延迟上升（p50 并发八个 / 逐个顺序发）：1.37（> 1）
  ✓ 闭环压测有边界、零失败：失败的请求 / 发出的请求：0（≤ 0）
<!-- /results -->
"""
from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from common import cli, data, run, safety, services
from common.errors import UserError, brief

# 只压本机：压测对别人的服务就是拒绝服务攻击，远端机器请登录到那台机器上运行
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# 自己起服务之前查 --model（与 chat_server.py 共用）：坏目录在本进程一行报错，不必等服务子进程启动、失败
_preflight = run.import_sibling(__file__, "_preflight")


@dataclass
class Args(cli.CommonArgs):
    base_url: str = cli.arg(None, "被压的服务地址（如 http://127.0.0.1:8000）；不填则自己用 common.serving 起一个")
    concurrency: str = cli.arg("1,4,8", "并发档位，逗号分隔（每档 1-256；总会加上 1 作顺序基线）")
    requests_per_level: int = cli.arg(32, "每个并发档位发多少个请求（有上限：压测要有边界）", min=1, max=1000)
    max_tokens: int = cli.arg(32, "每个请求生成多少 token", min=1, max=2048)
    api_key: str = cli.arg(None, "Bearer API key（被压服务要求时）")
    max_batch_size: int = cli.arg(8, "自己起服务时：动态批处理的批大小上限", min=1, max=256)
    server_weights: str = cli.arg("fp", "自己起服务时的 --weights：fp / int8 / int4（只量化权重，见 common.serving）",
                                  choices=["fp", "int8", "int4"])
    server_compile: bool = cli.arg(False, "自己起服务时加 --compile（编译解码一步；启动时多等一阵）")
    timeout_s: float = cli.arg(300.0, "单个请求的超时（秒）", min=1)
    data: str = cli.arg(None, "本脚本不读数据文件：压测的提示取自内置问答集 data/kb/qa.jsonl 的问题")

    smoke_model = "tiny-qwen2"

    def __post_init__(self) -> None:
        if self.data:   # CommonArgs 的 --data：给了却悄悄不用，学生会以为压的是自己的提示
            raise UserError(f"--data {self.data}: 这个脚本不读数据文件（压测的提示取自内置问答集 data/kb/qa.jsonl）")


# --smoke：每档 16 个短请求，够看出批处理的加速，又只要十几秒
SMOKE = dict(requests_per_level=16, max_tokens=16)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线是同一次运行里的顺序档（并发 1）
CLAIMS = [
    # 服务自己数的批大小：不看墙钟，机器忙闲都一样（README：忙碌的 2 核机上顺序 1.00、并发八个 5.33）
    run.Claim("并发请求被凑成批：平均每次 generate 服务的请求数，并发八个 − 逐个顺序发",
              'concurrency_8["mean_batch_size"] - concurrency_1["mean_batch_size"]', ">=", 2.0, 2.0),
    # 墙钟比值：忙碌的共享机上冒烟实测 1.99x–3.5x，不到稳定的 3 倍，冒烟不查
    run.Claim("动态批处理提高吞吐：tokens/s 并发八个 / 逐个顺序发", "batching_speedup_8", ">=", None, 1.5),
    # 同样是墙钟比值、冒烟不查：每步要为整批算，还要等凑批窗口，空闲机器上 p50 应当上升
    run.Claim("批处理的代价：单个请求的延迟上升（p50 并发八个 / 逐个顺序发）",
              'concurrency_8["p50_ms"] / concurrency_1["p50_ms"]', ">", None, 1.0),
    run.Claim("闭环压测有边界、零失败：失败的请求 / 发出的请求", "errors / requests", "<=", 0, 0),
]


def parse_levels(text: str) -> list[int]:
    """'1,4,8' -> [1, 4, 8]；上限 256：再高就不是在量服务，而是在量客户端自己的协程调度。"""
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--concurrency {text}: 应是逗号分隔的整数，如 1,4,8") from None
    if not levels or any(not 1 <= c <= 256 for c in levels):
        raise UserError(f"--concurrency {text}: 每个档位必须在 1-256 之间")
    return sorted(set(levels) | {1})   # 1 并发 = 顺序基线，加速比以它为分母


def check_target(url: str) -> str:
    """只允许本机地址；去掉末尾的 /v1，使 OpenAI 的 base_url 写法也能直接用。"""
    u = urlparse(url)
    # 比解析出的 hostname 而不是字符串前缀：http://127.0.0.1.example.com 这类地址骗不过去
    if u.scheme not in ("http", "https") or u.hostname not in LOOPBACK:
        raise UserError(f"--base-url {url}: 只压本机服务（http://127.0.0.1:端口）；远端请在那台机器上运行")
    return url.rstrip("/").removesuffix("/v1")


def percentile(xs: list[float], q: float) -> float:
    """线性插值分位数（numpy 同口径）；没有成功的请求时记 0，不让一档全失败就让整个压测崩掉。"""
    import numpy as np

    return float(np.percentile(xs, q)) if xs else 0.0


async def one(client, model: str, prompt: str, max_tokens: int) -> dict:
    """一个流式请求：总延迟、TTFT、completion token 数。

    失败不抛出：压测要数清楚失败了多少（429、超时），而不是在第一个失败处停下。
    """
    import openai

    t0, ttft, tokens, chunks = time.perf_counter(), None, 0, 0
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
            # include_usage：最后一块带服务自己数的 completion token 数；一块不一定恰好是一个 token
            stream_options={"include_usage": True})
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                ttft = ttft or time.perf_counter() - t0
                chunks += 1
            if getattr(ch, "usage", None):
                tokens = ch.usage.completion_tokens
    except openai.APIStatusError as e:
        return {"ok": False, "status": e.status_code}
    except openai.APIError as e:   # 超时、连接断开：没有状态码，记异常类名，同样算一次失败
        return {"ok": False, "status": type(e).__name__}
    # 服务没给 usage（有的兼容实现不支持 include_usage）时，退而用收到的文字块数估计
    return {"ok": True, "latency": time.perf_counter() - t0, "ttft": ttft or 0.0, "tokens": tokens or chunks}


async def level(client, model: str, prompts: list[str], c: int, n: int, max_tokens: int) -> dict:  # noqa: ANN001
    """一个并发档位：c 个协程闭环发 n 个请求（发一个、等回来、再发下一个）。

    闭环而不是按固定速率发：CPU 上的服务很容易被固定速率压垮，队列无限增长，量到的只是排队时间。
    """
    todo = iter(range(n))

    async def worker() -> list[dict]:
        # 共享迭代器：协程之间自然分活，总数恰好 n；每个协程返回自己的结果，不去改外层的列表
        return [await one(client, model, prompts[i % len(prompts)], max_tokens) for i in todo]

    t0 = time.perf_counter()
    results = [r for part in await asyncio.gather(*[worker() for _ in range(c)]) for r in part]
    # 吞吐按整档的墙钟算，不是各请求延迟之和：并发时请求在时间上重叠，求和会低估吞吐
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    # 延迟与 TTFT 只统计成功的请求：429 几毫秒就回来，混进去会把 p50 拉低，看起来反而更快
    lat, ttft = [r["latency"] * 1000 for r in ok], [r["ttft"] * 1000 for r in ok]
    return {"rps": round(len(ok) / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "p50_ms": round(percentile(lat, 50), 1), "p95_ms": round(percentile(lat, 95), 1),
            "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p95_ms": round(percentile(ttft, 95), 1),
            "ok": len(ok), "errors": len(results) - len(ok), "seconds": round(wall, 2)}


async def greedy_answers(client, model: str, prompts: list[str], max_tokens: int) -> list[str]:  # noqa: ANN001
    """贪心（temperature 0）逐个问几个问题、记下回答原文：换了权重精度、编译了解码步之后，make bench 拿它和
    fp32 服务的回答逐字比（速度换来的差别要量出来，不能只说"几乎不变"）。出错的问题记空串。"""
    import openai

    out = []
    for p in prompts:
        try:
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                     max_tokens=max_tokens, temperature=0)
            out.append(r.choices[0].message.content or "")
        except openai.APIError:
            out.append("")
    return out


def batch_totals(url: str) -> tuple[float, float] | None:
    """服务 /metrics 里 chat_batch_size 直方图的 (请求总数, generate 次数)；别家服务没有这个指标时返回 None。

    两档之间各读一次、相减，就是这一档里平均每次 generate 服务了几个请求：批处理是否生效，不看墙钟也知道。
    """
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(url + "/metrics", timeout=10).text
        found = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                 if s.name in ("chat_batch_size_sum", "chat_batch_size_count")}
    except (httpx.HTTPError, ValueError):   # 没有 /metrics，或格式不是 Prometheus 文本
        return None
    # vLLM / TGI 的指标名不同：没有就说"不知道"（null），不猜
    return (found["chat_batch_size_sum"], found["chat_batch_size_count"]) if len(found) == 2 else None


async def sweep(url: str, args: Args, model: str, prompts: list[str], levels: list[int], log) -> dict:  # noqa: ANN001
    """逐档压测；每档前后各读一次服务的批大小计数。"""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=args.api_key or "not-needed", max_retries=0,
                                timeout=args.timeout_s)
    await one(client, model, prompts[0], args.max_tokens)   # 预热：第一次请求含惰性初始化，不计入
    # 档位从低到高逐个压、不并行：每档独占服务，量到的延迟与批大小只属于这一档的并发
    out = {}
    for c in levels:
        before = batch_totals(url)
        out[c] = await level(client, model, prompts, c, args.requests_per_level, args.max_tokens)
        after = batch_totals(url)
        # 计数器从服务启动起累加（含预热与前几档）：只有前后两次读数之差才属于这一档
        calls = after[1] - before[1] if before and after else 0
        out[c]["mean_batch_size"] = round((after[0] - before[0]) / calls, 2) if calls else None
        r = out[c]
        log.info(f"并发 {c:>3}：{r['rps']:.2f} req/s，{r['tokens_per_s']:.1f} tok/s，p50 {r['p50_ms']:.0f} ms，"
                 f"p95 {r['p95_ms']:.0f} ms，TTFT p50 {r['ttft_p50_ms']:.0f} ms，每批 {r['mean_batch_size']} 个，"
                 f"失败 {r['errors']}")
    out["greedy"] = await greedy_answers(client, model, prompts[:8], args.max_tokens)
    await client.close()
    return out


def plot(out, results: dict) -> None:  # noqa: ANN001
    """左：吞吐随并发（批处理的收益）；右：延迟随并发（批处理的代价），两张并排看才知道取舍。"""
    fig, save = out.plot("load_test.png")
    cs = list(results)
    ax1 = fig.add_subplot(1, 2, 1)
    ax1.plot(cs, [results[c]["tokens_per_s"] for c in cs], "o-")
    ax1.set(xlabel="concurrency", ylabel="tokens / s", title="Throughput")
    ax2 = fig.add_subplot(1, 2, 2)
    for key in ("p50_ms", "p95_ms", "ttft_p50_ms"):
        ax2.plot(cs, [results[c][key] for c in cs], "o-", label=key)
    ax2.set(xlabel="concurrency", ylabel="ms", title="Latency")
    ax2.legend()
    save()


def target(args: Args, out) -> tuple[str, str, object]:  # noqa: ANN001
    """给了 --base-url 就压它（模型名从 /v1/models 读），否则自己起一个 common.serving。

    返回 (url, 模型名, 自己起的服务或 None)：只有自己起的服务才由本脚本负责停掉。
    """
    import httpx

    if args.base_url:
        url = check_target(args.base_url)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        try:
            served = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
            raise UserError(f"--base-url {args.base_url}: 读不到 /v1/models（{type(e).__name__}）") from None
        # 没写 --model 就用服务自己报的名字：名字对不上，common.serving 与 vLLM 都会回 404
        return url, args.model or served, None
    model = args.resolved_model()
    _preflight.check_model(model, args.source)   # 起服务之前查（--base-url 时 --model 只是被压服务里的模型名）
    # 队列上限 512：压测自己控制并发，不该被服务的 429 截断（那是 chat_server.py 演示的事）
    cmd = [sys.executable, "-m", "common.serving", "--model", model, "--source", args.source, "--port", "{port}",
           "--max-batch-size", str(args.max_batch_size), "--max-queue", "512", "--device", args.device,
           "--dtype", args.dtype, "--weights", args.server_weights] + (["--compile"] if args.server_compile else [])
    try:
        svc = services.start(cmd, log_file=out.path("server.log"), deadline_s=300,
                             env={"PYTHONPATH": str(run.REPO_ROOT)})
    except RuntimeError as e:   # 查过的目录仍可能加载失败（例如 config 的值不对）：一行点名，细节在 server.log
        raise UserError(f"--model {model}: 服务没能启动（{brief(e, 300)}）") from None
    return svc.url, model, svc


def main(args: Args) -> dict:
    # 秘密不落盘：--api-key 与 URL 里的账号密码在 run.start 写 argv.txt / config.json 之前拿走，之后只在内存里用
    args, secret = safety.scrub(cli.with_smoke(args, SMOKE))
    out = run.start(__file__, args)
    args = dataclasses.replace(args, **secret)
    levels = parse_levels(args.concurrency)

    # 1. 目标：现成的服务，或自己起一个（进程独立，压测客户端不和服务抢同一个解释器）
    url, model, svc = target(args, out)
    # 日志里的地址同样脱敏：日志会被贴进 issue、CI 记录，比 metrics.json 传得更远
    out.log.info(f"压测 {safety.redact_url(url)}（模型 {model}），并发 {levels}，每档 {args.requests_per_level} 个请求")

    # 2. 问题：知识库问答集里的真实问题（中英混合），每档用同一批，档与档之间只差并发
    prompts = [r["question"] for r in data.load_qa(data.DATA_DIR / "kb" / "qa.jsonl")][:64]

    # 3. 逐档压测；无论成败都停掉自己起的服务
    try:
        results = asyncio.run(sweep(url, args, model, prompts, levels, out.log))
    finally:
        if svc:
            svc.stop()

    # 4. 批处理加速比：并发 8（或最高档）对顺序的吞吐之比。墙钟比值随机器忙闲起伏，mean_batch_size 不会
    greedy = results.pop("greedy")
    metrics = {f"concurrency_{c}": r for c, r in results.items()}
    metrics["greedy"] = greedy   # 前 8 个问题的贪心回答原文（见 greedy_answers）
    # 优先用并发 8 作分子：CLAIMS 按 batching_speedup_8 写门槛；没测 8 档时退而用最高档（键名随之变）
    top = 8 if 8 in results else levels[-1]
    # 顺序档全失败时吞吐为 0：防除零，失败由 errors 如实报出，而不是让整个压测崩在这一行
    speedup = results[top]["tokens_per_s"] / max(results[levels[0]]["tokens_per_s"], 1e-9)
    metrics[f"batching_speedup_{top}"] = round(speedup, 2)
    metrics["errors"] = sum(r["errors"] for r in results.values())
    metrics["requests"] = sum(r["ok"] + r["errors"] for r in results.values())
    # 被压地址脱敏后再写：URL 里的账号密码不该落进 metrics.json
    metrics["target"] = "self-started common.serving" if svc else safety.redact_url(url)
    plot(out, results)
    return out.finish(metrics, summary=f"并发 {levels[0]}→{top}：{results[levels[0]]['tokens_per_s']:.1f}→"
                                       f"{results[top]['tokens_per_s']:.1f} tok/s（{speedup:.2f}×），p95 "
                                       f"{results[levels[0]]['p95_ms']:.0f}→{results[top]['p95_ms']:.0f} ms，"
                                       f"每批 {results[levels[0]]['mean_batch_size']}→"
                                       f"{results[top]['mean_batch_size']} 个请求", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
