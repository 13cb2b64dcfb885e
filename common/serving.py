"""课程的聊天服务器本身（被 services.start 当子进程启动的那个 HTTP 服务；本模块不启动别的进程）。

FastAPI + uvicorn，说 OpenAI 的 /v1/chat/completions（普通 + SSE 流式），还有 /v1/models、/health、Prometheus
/metrics、聊天网页 /（common/chat_page.html）。坏请求 4xx，错误体与 OpenAI 同形；请求体、max_tokens、提示长度、
等待队列都有上限，超了立刻 4xx/429，不崩、不挂起。CPU 上让并发真正有用的是动态批处理：一个窗口里到达的请求
凑成一批，唯一的生成线程做一次 model.generate，StoppingCriteria 每步把新 token 推给各自的请求（原理和实测数字
见 lesson5_deployment_monitoring/07_serving/README.md）。

运行：
  python -m common.serving --port 8000                          # smollm2-135m
  python -m common.serving --smoke --port 8000                  # tiny-qwen2
  python -m common.serving --model DIR --adapter LORA_DIR --api-key sk-xxx --port 8000
  python -m common.serving --weights int4 --compile --port 8000    # CPU 上单路最快：int4 权重 + 编译解码步
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import html
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# 路由函数的注解按模块全局解析（from __future__ import annotations），所以 FastAPI 的名字都在模块顶层导入
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from common import cli

_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions")
_CHAT_PAGE = Path(__file__).with_name("chat_page.html")   # 网页单独成文件：HTML/JS 不混在 Python 字符串里


@dataclass
class _Args:
    """python -m common.serving 的参数：与课程脚本同一套 cli.parse，坏值一行报错、退出码 2。"""

    model: str = cli.arg(None, "模型名/目录（默认 smollm2-135m；--smoke 时 tiny-qwen2）")
    source: str = cli.arg("auto", "auto / hf / modelscope")
    adapter: str = cli.arg(None, "LoRA adapter 目录：加载后合并进模型")
    served_model_name: str = cli.arg(None, "API 里的模型名（默认 = --model）")
    host: str = cli.arg("127.0.0.1", "监听地址（默认只在本机）")
    port: int = cli.arg(8000, "端口")
    api_key: str = cli.arg(None, "Bearer key（或环境变量 CHAT_API_KEY）")
    max_batch_size: int = cli.arg(8, "一次 generate 最多几个请求", min=1)
    batch_wait_ms: float = cli.arg(15.0, "凑批的等待窗口：越长批越满，单个请求的延迟越高", min=0)
    max_queue: int = cli.arg(64, "排队上限，满了 429", min=1)
    max_tokens_limit: int = cli.arg(512, "单个请求的 max_tokens 上限", min=1)
    default_max_tokens: int = cli.arg(128, "请求没写 max_tokens 时（不超过 --max-tokens-limit）", min=1)
    max_prompt_tokens: int = cli.arg(1024, "提示（套模板后）的 token 上限", min=1)
    max_body_bytes: int = cli.arg(1 << 20, "请求体字节上限：超了 413，解析 JSON 之前就拒绝", min=1)
    device: str = cli.arg("auto", "auto / cpu / cuda")
    dtype: str = cli.arg("auto", "auto：GPU bf16；CPU 上极小模型 fp32，其余按 models.pick_dtype")
    threads: int = cli.arg(0, "torch CPU 线程数（0 = 自动：极小模型 1，其余 torch 默认）")
    weights: str = cli.arg("fp", "线性层权重：fp = 按 --dtype；int8 / int4 = 解码用只量化权重的 int8 / int4"
                           "（int4 每 32 个一组、输出层留 int8），提示的预填充用留着的 fp32（CPU；多占一份 fp32 权重的"
                           "内存，逐 token 解码更快，见 make bench；贪心输出与 fp32 有出入）",
                           choices=["fp", "int8", "int4"])
    compile: bool = cli.arg(False, "torch.compile 解码那一步（静态 KV 缓存）：启动时先编译（要等一阵、要 C++ 编译器），"
                            "之后逐 token 更快；见 make bench")
    smoke: bool = cli.arg(False, "极小模型 tiny-qwen2")


@dataclass
class _Pending:
    """一个排队/生成中的请求；生成线程通过 loop.call_soon_threadsafe 把事件放进 events。"""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    t0: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def key(self) -> tuple:
        """同一批必须共用采样参数（generate 一次只收一组）。"""
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)

    def emit(self, *event: Any) -> None:
        """线程安全地把事件交给请求所在的事件循环。"""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class _Metrics:
    """Prometheus 指标（每个应用一个 registry，同一进程里起多个应用也不冲突）。"""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("chat_http_requests", "HTTP requests by route and status code", ["route", "code"],
                                registry=r)
        self.latency = Histogram("chat_request_latency_seconds", "Request latency until the last byte", ["route"],
                                 registry=r, buckets=(.01, .05, .1, .25, .5, 1, 2, 5, 10, 30, 60, 120))
        self.ttft = Histogram("chat_time_to_first_token_seconds", "Arrival to first generated token", registry=r,
                              buckets=(.01, .05, .1, .25, .5, 1, 2, 5, 10, 30))
        self.gen_tokens = Counter("chat_generated_tokens", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens processed", registry=r)
        self.in_flight = Gauge("chat_requests_in_flight", "Chat requests being handled", registry=r)
        self.queue_depth = Gauge("chat_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Histogram("chat_batch_size", "Requests per generate() call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))


class _Progress:
    """StoppingCriteria：每一步读各行的新 token，增量解码推给请求，返回哪些行已完成。"""

    def __init__(self, tok, batch: list[_Pending], eos_ids: set[int], metrics: _Metrics):  # noqa: ANN001
        self.tok, self.batch, self.eos, self.m = tok, batch, eos_ids, metrics
        self.ids: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done = [p.cancelled for p in batch]

    def finish(self, i: int, reason: str) -> None:
        self.done[i] = True
        self.batch[i].emit("done", reason, len(self.ids[i]))

    def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
        import torch

        for i, (p, t) in enumerate(zip(self.batch, input_ids[:, -1].tolist())):
            if self.done[i] or p.cancelled:   # 客户端断开：这一行不用再算了
                self.done[i] = True
                continue
            if t in self.eos:
                self.finish(i, "stop")
                continue
            if not self.ids[i]:
                self.m.ttft.observe(time.perf_counter() - p.t0)
            self.ids[i].append(t)
            self.m.gen_tokens.inc()
            text = self.tok.decode(self.ids[i], skip_special_tokens=True, clean_up_tokenization_spaces=False)
            cut = min((text.find(s) for s in p.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
            # 半个 UTF-8 字符（中文常被切成几个字节 token）先不发，等下一个 token 补全
            if text.startswith(self.sent[i]) and not text.endswith("\ufffd") and len(text) > len(self.sent[i]):
                p.emit("delta", text[len(self.sent[i]):])
                self.sent[i] = text
            if cut >= 0:
                self.finish(i, "stop")
            elif len(self.ids[i]) >= p.max_tokens:
                self.finish(i, "length")
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class _Engine:
    """模型 + 有界队列 + 动态批处理调度器（一个协程凑批，一个线程生成）。"""

    def __init__(self, model, tok, model_id: str, cfg: _Args, worker: ThreadPoolExecutor):  # noqa: ANN001
        self.model, self.tok, self.model_id, self.cfg, self.worker = model, tok, model_id, cfg, worker
        self.metrics = _Metrics()
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=cfg.max_queue)   # 3.10 起队列用到时才绑定事件循环
        eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        # 一个 token 至多盖住词表里最长那一项的字符数（字节级 BPE 一个字符记一个字节，只会多算）：数 token 的下界
        self.max_token_chars = max(len(t) for t in tok.get_vocab())
        # 生成线程专用一份分词器：fast tokenizer 的 padding 设置存在共享的 Rust 对象里，生成线程按批左填充、
        # 线程池里 prompt() 不填充地数 token，两边同时用一个对象会互相改掉设置（批没被填充，整批 500）
        self.gen_tok = copy.deepcopy(tok)
        self.batches = 0

    def prompt(self, messages: list[dict]) -> tuple[str, int]:
        """套对话模板并数 token，超过 --max-prompt-tokens 就 400。在线程里跑：大提示的分词要算好一阵。"""
        limit = self.cfg.max_prompt_tokens
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # 字符多到下界已经超限就不分词：分词器的 Rust 代码持有 GIL，1 MB 的提示即使在线程里也让事件循环停近半秒
        least = -(-len(text) // self.max_token_chars)
        n = least if least > limit else len(self.tok(text, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise _APIError(400, f"prompt has {f'at least {n}' if n == least else n} tokens, limit is {limit}",
                            param="messages", code="context_length_exceeded")
        return text, n

    async def scheduler(self) -> None:
        """凑批循环：等到一个请求，再等一个窗口让后来的到齐，按采样参数分组交给生成线程。"""
        loop, cfg = asyncio.get_running_loop(), self.cfg
        while True:
            waiting = [await self.queue.get()]
            if self.queue.qsize() < cfg.max_batch_size - 1:   # 队列里已经够一批就不必等
                await asyncio.sleep(cfg.batch_wait_ms / 1000)
            while len(waiting) < cfg.max_batch_size and not self.queue.empty():
                waiting.append(self.queue.get_nowait())
            self.metrics.queue_depth.set(self.queue.qsize())
            groups: dict[tuple, list[_Pending]] = {}
            for p in waiting:
                if not p.cancelled:   # 等的时候客户端已经断开：不算
                    groups.setdefault(p.key(), []).append(p)
            for batch in groups.values():   # generate 一次只收一组采样参数
                self.metrics.batch_size.observe(len(batch))
                self.batches += 1
                try:
                    await loop.run_in_executor(self.worker, self._generate, batch)
                except RuntimeError as e:   # 线程池已关闭（服务正在停止）：告诉这批请求，别让它们挂着
                    for p in batch:
                        p.emit("error", f"server shutting down: {e}")

    def _generate(self, batch: list[_Pending]) -> None:
        """在生成线程里跑一次批量 generate；出错时每个请求都收到 error（→ 500），调度继续。"""
        import torch
        from transformers import StoppingCriteriaList

        try:
            # 左填充：每行的新 token 都接在自己最后一个真实 token 后面（按调用传，不改共用的 tokenizer）
            enc = self.gen_tok([p.prompt for p in batch], return_tensors="pt", padding=True, padding_side="left",
                               add_special_tokens=False).to(self.model.device)
            prog = _Progress(self.tok, batch, self.eos_ids, self.metrics)
            first = batch[0]
            sample = dict(do_sample=True, temperature=first.temperature, top_p=first.top_p) \
                if first.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            self.metrics.prompt_tokens.inc(sum(p.prompt_tokens for p in batch))
            if self.cfg.compile:   # 编译过的解码步只在静态 KV 缓存上用（形状固定，才编译得了）
                sample["cache_implementation"] = "static"
            with torch.inference_mode():
                self.model.generate(**enc, max_new_tokens=max(p.max_tokens for p in batch),
                                    pad_token_id=self.tok.pad_token_id, stopping_criteria=StoppingCriteriaList([prog]),
                                    **sample)
            for i in [i for i, done in enumerate(prog.done) if not done]:   # generate 到了长度上限而行还没完成
                prog.finish(i, "length")
        except Exception as e:  # noqa: BLE001 —— 服务不能因为一批出错就停；错误交给每个请求，回 500
            for p in batch:
                p.emit("error", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- HTTP 层


class _TextPart(BaseModel):
    """OpenAI 的内容片段（只支持文本）。"""

    type: Literal["text"]
    text: str


class _Message(BaseModel):
    """一条对话消息。"""

    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]


class _ChatRequest(BaseModel):
    """POST /v1/chat/completions 的请求体（OpenAI 字段；多余字段忽略）。
    strict：JSON 的 true 不当 1 用、"2" 不当 2 用（max_tokens: true 曾经 200）；NaN/inf 进不了采样参数。
    """

    model_config = ConfigDict(strict=True, allow_inf_nan=False)
    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)   # 省略时贪心（可复现）；OpenAI 默认是 1
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)                 # 一次只生成一个候选
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None


class _APIError(Exception):
    """任何出错都归结成它，再变成 OpenAI 形状的错误体：openai 客户端据此抛出对应的异常类。"""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"message": message, "type": type_, "param": param, "code": code}


async def _as_openai_error(_req: Request, e: Exception):
    """各种异常（请求体校验失败、404、未捕获的 bug）统一成 OpenAI 的错误形状。"""
    if isinstance(e, ValidationError):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if not isinstance(x, int))
        got = err.get("input")
        # 标量原样说出来（JSON 写法）：NaN 就说 NaN，true 就说 true，客户端一眼看出错在哪
        got = f" (got {json.dumps(got)})" if isinstance(got, (bool, int, float)) else ""
        e = _APIError(400, f"{loc or 'body'}: {err.get('msg', 'invalid request')}{got}", param=loc or None)
    elif isinstance(e, HTTPException):
        e = _APIError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
    elif not isinstance(e, _APIError):   # bug：只说类型，不把内部细节发给客户端
        e = _APIError(500, f"internal error: {type(e).__name__}", "server_error")
    return JSONResponse({"error": e.body}, status_code=e.status)


def _metrics_middleware(app, metrics: _Metrics):  # noqa: ANN001
    """纯 ASGI 中间件：按路由和状态码计数，计时到最后一个字节（流式响应也准）。"""
    async def wrapped(scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http":
            return await app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"   # 未知路径归一类：防止标签爆炸
        code = ["500"]   # 应用没发出响应头就崩了时记 500

        async def send_wrapper(message):  # noqa: ANN001
            if message["type"] == "http.response.start":
                code[0] = str(message["status"])
            await send(message)

        busy = metrics.in_flight.track_inprogress() if route == "/v1/chat/completions" else nullcontext()
        try:
            with busy, metrics.latency.labels(route).time():
                await app(scope, receive, send_wrapper)
        finally:
            metrics.requests.labels(route, code[0]).inc()

    return wrapped


async def _read_body(request: Request, limit: int) -> bytes:
    """读请求体，超过 limit 字节就 413（先看 Content-Length；分块上传边读边数，超了就停读，余下的 uvicorn 丢掉）。
    在任何解析之前查：否则一个 20 MB 的请求体要在事件循环里解析、套模板、分词，那几十秒里连 /health 都不应答。"""
    too_big = _APIError(413, f"request body exceeds this server's limit of {limit} bytes (--max-body-bytes)",
                        code="request_too_large")
    if int(request.headers.get("content-length") or 0) > limit:   # 写得不对的 Content-Length 已被 uvicorn 拒绝
        raise too_big
    body = bytearray()   # bytearray：一字节一块的上传也是线性时间
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
    except ClientDisconnect:   # 请求体没传完客户端就走了：不是服务的错，记 499（nginx 的约定），不留 traceback
        raise _APIError(499, "client closed the connection before sending the whole body",
                        code="client_closed_request") from None
    return bytes(body)


async def _admit(engine: _Engine, req: _ChatRequest) -> _Pending:
    """检查上限、套模板、入队；任何一步不行都是 4xx/429，模型一个 token 都不用算。"""
    cfg = engine.cfg
    if req.model != engine.model_id:
        raise _APIError(404, f"The model `{req.model}` does not exist; this server serves `{engine.model_id}`",
                        param="model", code="model_not_found")
    max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
    if max_tokens > cfg.max_tokens_limit:
        raise _APIError(400, f"max_tokens {max_tokens} exceeds this server's limit {cfg.max_tokens_limit}",
                        param="max_tokens")
    msgs = [{"role": x.role, "content": x.content if isinstance(x.content, str)
             else "".join(part.text for part in x.content)} for x in req.messages]
    # 套模板、分词放进线程：事件循环照常应答 /health、推送别的请求的 token
    prompt, n_prompt = await asyncio.get_running_loop().run_in_executor(None, engine.prompt, msgs)
    stop = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
    p = _Pending(prompt, n_prompt, max_tokens, req.temperature, req.top_p, stop)
    try:   # 有界队列：满了立刻 429，不堆积、不挂起
        engine.queue.put_nowait(p)
    except asyncio.QueueFull:
        raise _APIError(429, f"server busy: queue full ({cfg.max_queue} waiting); retry later",
                        "rate_limit_exceeded", code="rate_limit_exceeded") from None
    engine.metrics.queue_depth.set(engine.queue.qsize())
    return p


async def _complete(p: _Pending, base: dict) -> dict:
    """非流式：收齐所有片段再一次回出去。"""
    parts = []
    try:
        while (ev := await p.events.get())[0] == "delta":
            parts.append(ev[1])
    except asyncio.CancelledError:   # 客户端断开：生成线程看到 cancelled 就不再算这一行
        p.cancelled = True
        raise
    if ev[0] != "done":
        raise _APIError(500, ev[1], "server_error")
    return {**base, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": ev[1]}],
        "usage": {"prompt_tokens": p.prompt_tokens, "completion_tokens": ev[2],
                  "total_tokens": p.prompt_tokens + ev[2]}}


async def _sse(p: _Pending, base: dict, usage: bool):
    """流式：每个片段一个 SSE 事件，结尾 [DONE]（与 OpenAI 相同，官方客户端据此结束迭代）。"""
    def chunk(delta: dict | None, finish: str | None = None, **extra: Any) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else []
        body = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (ev := await p.events.get())[0] == "delta":
            yield chunk({"content": ev[1]})
        if ev[0] == "done":
            yield chunk({}, ev[1])
            if usage:
                yield chunk(None, usage={"prompt_tokens": p.prompt_tokens, "completion_tokens": ev[2],
                                         "total_tokens": p.prompt_tokens + ev[2]})
        else:   # 响应头已经发出 200，只能在流里报错
            yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        p.cancelled = True   # 正常结束或客户端断开：都不再需要这一行


def _create_app(engine: _Engine):
    """把 Engine 包成 ASGI 应用（模型已加载好；uvicorn 开始监听时 /health 就是 200）。"""
    cfg, m = engine.cfg, engine.metrics
    # 模型名来自命令行，什么字符都可能有：转义后才进网页（页面的脚本从 DOM 读它，不拼进 JS 源码）
    page_html = _CHAT_PAGE.read_text(encoding="utf-8").replace("__MODEL__", html.escape(engine.model_id))

    @asynccontextmanager
    async def lifespan(_app):  # noqa: ANN001
        task = asyncio.create_task(engine.scheduler())
        yield
        task.cancel()
        engine.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="course chat server", lifespan=lifespan, docs_url=None, redoc_url=None)
    for exc in (_APIError, ValidationError, HTTPException, Exception):
        app.add_exception_handler(exc, _as_openai_error)

    def auth(request: Request) -> None:
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        # 常数时间比较：逐字节比较会在第一个不同字节处提前返回，响应时间泄露 key 的前缀
        if cfg.api_key and not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise _APIError(401, "Incorrect API key provided (Authorization: Bearer <key>)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "batches": engine.batches}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "llm-course"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(request: Request):
        # 先鉴权（依赖项）、再按字节上限读、最后才解析：没带 key 的大请求体一个字节都不解析
        req = _ChatRequest.model_validate_json(await _read_body(request, cfg.max_body_bytes))
        p = await _admit(engine, req)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.model_id}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(p, base, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _complete(p, base))

    # 指标中间件挂在最外层：连异常处理产生的 4xx/5xx 也计数
    return _metrics_middleware(app, m)


def _load_engine(a: _Args, worker: ThreadPoolExecutor) -> _Engine:
    """加载模型（可选 LoRA adapter，合并后服务）并建 Engine；在生成线程 worker 里调用。"""
    from common import models
    from common.errors import UserError, brief
    from common.run import get_logger
    from common.tiny import TINY_NAMES

    name = a.model or ("tiny-qwen2" if a.smoke else "smollm2-135m")
    if a.adapter:   # 先查 adapter：不然要等基座模型加载完，PEFT 才报一串与 --adapter 无关的 OSError
        models.check_dir(a.adapter, "--adapter", adapter=True)
    tiny = name in TINY_NAMES
    # 极小模型（hidden 128）的矩阵太小：多线程同步、bf16 转换的开销都比省下的多（忙碌的 2 核机上实测
    # 单线程 fp32 比默认 2 线程 bf16 快 20 倍以上）。大模型保持 torch 默认
    if a.threads or tiny:
        import torch

        torch.set_num_threads(a.threads or 1)
    dtype = "float32" if a.dtype == "auto" and tiny and a.device != "cuda" else a.dtype
    mdl, tok = models.load(name, source=a.source, device=a.device, dtype=dtype)
    if a.adapter:
        from peft import PeftModel

        mdl = PeftModel.from_pretrained(mdl, a.adapter).merge_and_unload()   # 合并后推理没有额外开销
    if a.weights != "fp":   # 先合并 adapter 再量化：量化后的层不再是 nn.Linear，PEFT 合并不了
        if mdl.device.type != "cpu":
            raise UserError(f"--weights {a.weights}: 只在 CPU 上（GPU 上用 --dtype bfloat16 或 GPU 的量化核心）")
        # 预填充一次几十上百行，torch 的量化核心按行循环、比 fp32 GEMM 慢一倍：留一份 fp32 权重给它（第 1 课 06
        # 量 int8 的困惑度时不留，量的就是纯 int8）
        try:
            n = models.weight_only(mdl, bits={"int8": 8, "int4": 4}[a.weights], float_prefill=True)
        except (RuntimeError, NotImplementedError) as e:   # 这版 torch 在这种 CPU 上没有对应的量化核心
            raise UserError(f"--weights {a.weights}: 量化失败（{brief(e, 150)}）；换 --weights fp") from None
        get_logger().info(f"--weights {a.weights}：{n} 个线性层解码用 {a.weights} 权重（int4 时输出层 int8）、"
                          f"预填充用 fp32 权重，激活 {mdl.dtype}")
    mdl.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if a.compile:
        _compile_decode(mdl, tok)
    return _Engine(mdl, tok, a.served_model_name or name, a, worker)


def _compile_decode(mdl, tok) -> None:  # noqa: ANN001
    """--compile：transformers 的 generate 用静态 KV 缓存时把解码那一步交给 torch.compile（预填充照旧 eager）。
    启动时按两种提示长度、两种批大小各生成几个 token：首次编译和"形状变了 → 按动态形状重编译"都发生在 /health
    就绪之前，而不是让第一批用户等半分钟。之后形状再变也不重编译。"""
    import torch
    from transformers import CompileConfig

    from common.errors import UserError, brief
    from common.run import get_logger

    cc = CompileConfig(mode="default")   # 默认的 reduce-overhead 是 CUDA graphs，CPU 上没有
    cc._compile_all_devices = True   # transformers 5.23 只在 CUDA 上自动编译；这个开关（它的内部字段）让 CPU 也编译
    mdl.generation_config.compile_config = cc
    t0 = time.perf_counter()
    try:
        for texts in (["Hi"], ["Warm up the compiled decode step, please"], ["Hi", "A second, longer row"]):
            enc = tok(texts, return_tensors="pt", padding=True, padding_side="left").to(mdl.device)
            with torch.inference_mode():
                mdl.generate(**enc, max_new_tokens=4, do_sample=False, temperature=None, top_p=None, top_k=None,
                             cache_implementation="static", pad_token_id=tok.pad_token_id)
    except Exception as e:  # noqa: BLE001 —— inductor 的失败（没有 C++ 编译器、不支持的算子）五花八门
        raise UserError(f"--compile: 编译失败（{type(e).__name__}: {brief(e, 150)}）；"
                        "去掉 --compile 即可照常服务") from None
    get_logger().info(f"--compile：解码一步已编译（{time.perf_counter() - t0:.0f} 秒）")


def _main(argv: list[str] | None = None) -> None:
    """命令行入口：python -m common.serving --model M --port N。坏参数、坏模型都是一行错误 + 退出码 2。"""
    a = cli.parse(_Args, argv)   # 先解析：坏参数不必等 torch 导入完才报错
    import torch
    import uvicorn

    from common.run import get_logger

    a.api_key = a.api_key or os.environ.get("CHAT_API_KEY") or None   # 环境变量：key 不出现在 ps 的命令行里
    a.default_max_tokens = min(a.default_max_tokens, a.max_tokens_limit)
    log = get_logger()
    if a.host not in ("127.0.0.1", "localhost", "::1") and not a.api_key:
        log.warning(f"监听 {a.host} 且没有 --api-key：同网段任何人都能调用")
    # 在生成线程里加载（torch 的 OpenMP 线程池每个调用线程一个：有两个池时闲着那个空转抢核，解码慢一半，见 make bench）
    worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
    engine = worker.submit(_load_engine, a, worker).result()   # UserError 经 cli.parse 的钩子变成一行错误、退出码 2
    log.info(f"动态批处理：每批 ≤ {a.max_batch_size}，等待窗口 {a.batch_wait_ms} ms，队列上限 {a.max_queue}；"
             f"API key {'开' if a.api_key else '关'}；CPU 线程 {torch.get_num_threads()}")
    # 停止时最多等 5 秒让进行中的请求收尾（CPU 上一个长回答可能要几十秒，不能让 SIGTERM 挂住）
    uvicorn.run(_create_app(engine), host=a.host, port=a.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    _main()
