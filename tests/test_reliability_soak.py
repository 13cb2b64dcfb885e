"""可靠性 · 聊天服务浸泡测试（issue 22）：64 个并发客户端连续压 RELIABILITY_SOAK_S 秒（默认 60），其中 10 个是恶意的。

恶意客户端各干一种坏事，干完再来：超大请求体（有长度的、分块上传的）、坏 JSON、max_tokens 写成 true、
temperature 写成 NaN、一万层嵌套的 JSON、慢速攻击（发了请求头，请求体一字节一字节地挤，然后断开）、错的 key、
没有 key、不存在的模型。另一个线程每 ~100 ms 问一次 /health，量它的应答时间。

断言：整个过程中没有一个 ≥ 500 的响应（客户端看到的，与服务自己 /metrics 数的，两边都查）；/health 的 p99 < 200 ms
（问不通、超时都按超时计）；正常客户端只见到 200 / 429，恶意客户端只见到 4xx；压完服务还活着、还能正常回答。

时长：环境变量 RELIABILITY_SOAK_S（秒）。标了 slow（CI 也跑）：默认 60 秒就是 issue 要的规模，整个测试约 80 秒
（另加启动服务）；整套测试在 2 核上太挤时可以临时调小，但报告里的数字按 60 秒量。
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import REPO

KEY = "sk-soak-test"
MODEL = "tiny-qwen2"
DURATION = float(os.environ.get("RELIABILITY_SOAK_S", "60") or 60)
CLIENTS, HOSTILE = 64, 10
HEALTH_EVERY = 0.1          # 秒
HEALTH_P99_LIMIT = 0.2      # 秒
# 临时（lead 会删；修好一个就把它改成 False）：本测试找到的 common/serving.py 的两个问题
# 1) 慢速攻击的客户端在请求体传完之前断开：_read_body 让 starlette 的 ClientDisconnect 冒出去，
#    服务日志里一段 traceback、/metrics 里记一个 500（客户端已断开，收不到）
KNOWN_DISCONNECT_500 = False
# 2) 生成线程里 self.tok([...], padding=True, padding_side="left") 与事件循环线程池里 engine.prompt 的
#    self.tok(text) 同时用同一个 fast tokenizer（Rust 里的 padding 状态是共享的）：批没被填充，整批 500
KNOWN_TOKENIZER_RACE_500 = False
RACE = "Unable to create tensor"
ERRORS: Counter = Counter()    # 5xx 的响应体（前 200 字）→ 次数
HOSTILE_KINDS = ["oversized", "oversized_chunked", "malformed_json", "bool_max_tokens", "nan_temperature",
                 "deep_json", "slow_loris", "wrong_key", "no_key", "unknown_model"]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """带 key 的服务，默认的请求体上限（1 MiB）与队列上限（64）：64 个客户端里有人会排不上队（429），这是预期的。"""
    from common import services

    log = tmp_path_factory.mktemp("soak") / "server.log"
    cmd = [sys.executable, "-m", "common.serving", "--model", MODEL, "--port", "{port}", "--api-key", KEY,
           "--max-tokens-limit", "16"]
    with services.start(cmd, log_file=log, deadline_s=300, env={"PYTHONPATH": str(REPO)}) as svc:
        svc.log = log
        yield svc


def good_body(rng: random.Random) -> dict:
    question = rng.choice(["云帆 App 怎么重置？", "How do I reset the R3?", "L5 的电池能用多久？", "hello"])
    return {"model": MODEL, "max_tokens": rng.randint(1, 8), "messages": [{"role": "user", "content": question}]}


async def normal_client(url: str, deadline: float, seen: Counter, rng: random.Random) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline:
            r = await c.post("/v1/chat/completions", json=good_body(rng), headers=headers)
            seen[r.status_code] += 1
            if r.status_code >= 500:
                ERRORS[f"{r.status_code} {r.text[:200]}"] += 1
            if r.status_code == 200:
                assert r.json()["choices"][0]["message"]["role"] == "assistant"
            elif r.status_code == 429:
                await asyncio.sleep(0.05)   # 像真的客户端那样稍后重试


async def slow_loris(host: str, port: int, seen: Counter) -> None:
    """发完请求头，请求体说有 100 KB，实际几十毫秒挤一个字节，两秒后断开：不能占住服务。"""
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
    writer.write(head.encode())
    try:
        for ch in '{"model": "' * 8:
            writer.write(ch.encode())
            await writer.drain()
            await asyncio.sleep(0.03)
        seen["slow_loris_gave_up"] += 1
    except ConnectionError:
        seen["slow_loris_cut_off"] += 1
    finally:
        writer.close()
        try:
            line = await asyncio.wait_for(reader.readline(), 0.5)   # 服务若已回应（比如超时 4xx），记下状态码
            if line.startswith(b"HTTP/"):
                seen[int(line.split()[1])] += 1
        except (asyncio.TimeoutError, ConnectionError, ValueError, IndexError):
            pass
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def hostile_client(url: str, kind: str, deadline: float, seen: Counter) -> None:
    base = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    ok_headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = json.dumps({**base, "messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    bodies = {"malformed_json": b'{"model": "tiny-qwen2", "messages": [',
              "bool_max_tokens": json.dumps({**base, "max_tokens": True}).encode(),
              "nan_temperature": json.dumps({**base, "temperature": float("nan")}).encode(),   # 写出 NaN
              "deep_json": b'{"model": "tiny-qwen2", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
              "unknown_model": json.dumps({**base, "model": "gpt-9"}).encode(), "oversized": big}
    headers = {"wrong_key": {**ok_headers, "Authorization": "Bearer sk-wrong"},
               "no_key": {"Content-Type": "application/json"}}.get(kind, ok_headers)
    host, port = httpx.URL(url).host, httpx.URL(url).port
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < deadline:
            if kind == "slow_loris":
                await slow_loris(host, port, seen)
                continue
            if kind == "oversized_chunked":   # 没有 Content-Length：服务边读边数，超了就停
                async def chunks():
                    for i in range(0, len(big), 65536):
                        yield big[i:i + 65536]
                content = chunks()
            else:
                content = bodies.get(kind, json.dumps(base).encode())
            try:
                r = await c.post("/v1/chat/completions", content=content, headers=headers)
                seen[r.status_code] += 1
            except httpx.TransportError:       # 服务拒绝后关掉连接、不再读剩下的上传：算被拒，不算 5xx
                seen["closed_early"] += 1


def poll_health(url: str, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """每 ~100 ms 问一次 /health：(距开始的秒数, 应答秒数)；出错、超时、非 200 都记成超时（2 秒）。"""
    t_start = time.monotonic()
    with httpx.Client(base_url=url, timeout=2) as c:
        c.get("/health")                       # 先建好连接：量的是服务的应答，不是 TCP 握手
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                took = time.monotonic() - t0 if c.get("/health").status_code == 200 else 2.0
            except httpx.HTTPError:
                took = 2.0
            samples.append((t0 - t_start, took))
            stop.wait(max(0.0, HEALTH_EVERY - took))


def server_5xx(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "chat_http_requests_total" and str(s.labels.get("code", "")).startswith("5"))


@pytest.mark.slow
@pytest.mark.soak
def test_64_clients_with_10_hostile_no_5xx_and_health_stays_fast(server):
    normal_seen, hostile_seen = Counter(), {k: Counter() for k in HOSTILE_KINDS}
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_health, args=(server.url, stop, samples), daemon=True)
    poller.start()

    async def soak() -> None:
        deadline = time.monotonic() + DURATION
        rngs = [random.Random(i) for i in range(CLIENTS - HOSTILE)]
        await asyncio.gather(*(normal_client(server.url, deadline, normal_seen, r) for r in rngs),
                             *(hostile_client(server.url, k, deadline, hostile_seen[k]) for k in HOSTILE_KINDS))

    t0 = time.monotonic()
    try:
        asyncio.run(soak())
    finally:
        stop.set()
        poller.join(10)
    took = time.monotonic() - t0

    lat = sorted(x for _, x in samples)
    p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    windows = {}                                # 每 10 秒一个窗口里最慢的一次（"自始至终"都快，不只是平均快）
    for t, x in samples:
        windows[int(t // 10)] = max(windows.get(int(t // 10), 0.0), x)
    hostile_total = Counter()
    for c in hostile_seen.values():
        hostile_total.update(c)
    print(f"\n浸泡 {took:.0f} 秒：正常客户端 {dict(normal_seen)}；恶意客户端 "
          f"{ {k: dict(v) for k, v in hostile_seen.items()} }；/health {len(lat)} 次，p50 {p50 * 1000:.1f} ms，"
          f"p99 {p99 * 1000:.1f} ms，最慢 {lat[-1] * 1000:.0f} ms；各 10 秒窗口最慢（ms）"
          f"{[round(v * 1000) for _, v in sorted(windows.items())]}")

    # 1. /health 自始至终应答得快；正常客户端只见 200 / 429（5xx 在第 3 步单独查），恶意客户端只见 4xx
    assert len(lat) >= DURATION / HEALTH_EVERY / 3, f"/health 只问到 {len(lat)} 次：轮询线程被饿住了"
    assert p99 < HEALTH_P99_LIMIT, f"/health p99 {p99 * 1000:.0f} ms ≥ {HEALTH_P99_LIMIT * 1000:.0f} ms"
    assert set(normal_seen) - {500} <= {200, 429} and normal_seen[200] >= CLIENTS - HOSTILE, dict(normal_seen)
    for kind, seen in hostile_seen.items():
        codes = {c for c in seen if isinstance(c, int)}
        assert sum(seen.values()) >= 1, f"恶意客户端 {kind} 一次都没发出去"
        assert codes <= set(range(400, 500)), f"恶意客户端 {kind} 得到了 4xx 以外的回应：{dict(seen)}"
    # 2. 压完了服务还在、还能正常回答
    r = httpx.post(server.url + "/v1/chat/completions", json=good_body(random.Random(0)),
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and server.alive(), r.text
    # 3. 没有 5xx：客户端看到的，与服务自己 /metrics 数的（客户端已经断开、没收到的那种也算）
    fivexx = {code: n for c in (normal_seen, hostile_total) for code, n in c.items()
              if isinstance(code, int) and code >= 500}
    n5xx, log = server_5xx(server.url), server.log.read_text(encoding="utf-8", errors="replace")
    disconnects = log.count("\nstarlette.requests.ClientDisconnect")
    known = []
    if fivexx and KNOWN_TOKENIZER_RACE_500 and set(fivexx) == {500} and all(RACE in e for e in ERRORS):
        known.append(f"正常请求 {fivexx[500]} 个 500（{RACE}…：分词器被两个线程同时用）")
    if disconnects and KNOWN_DISCONNECT_500 and log.count("Traceback") == disconnects:
        known.append(f"{disconnects} 次 ClientDisconnect traceback")
    if known and n5xx == disconnects + sum(fivexx.values()) and len(known) == bool(fivexx) + bool(disconnects):
        pytest.xfail("已知问题（临时，lead 会删）：" + "；".join(known) + f"；见 {server.log}")
    assert not fivexx, f"出现了 5xx：{fivexx}，响应体 {dict(ERRORS)}；服务日志 {server.log}"
    assert n5xx == 0, f"服务自己的 /metrics 数到了 {n5xx} 个 5xx；服务日志 {server.log}"
