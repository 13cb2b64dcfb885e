"""课程的聊天服务：FastAPI + uvicorn，说 OpenAI 的 /v1/chat/completions（普通 + SSE 流式）。

还有 GET /v1/models、/health（模型加载完才 200）、Prometheus /metrics、聊天网页 /；可选 Bearer API key
（hmac.compare_digest 常数时间比较）；坏请求 4xx，错误体与 OpenAI 同形 {"error": {...}}；max_tokens 与提示
长度有上限；等待队列有界，满了立刻 429（不崩、不挂起）。

并发怎么在 CPU 上真正有用：动态批处理。调度协程从队列取第一个请求后再等 --batch-wait-ms，把这段时间里
到达的（采样参数相同的）请求凑成一批，交给唯一的生成线程做一次 model.generate（左填充）；生成时每一步
由一个 StoppingCriteria 读出各行的新 token、增量解码、推给各自的请求（流式就是这样一个个 token 出去的），
行到了自己的 max_tokens / stop / EOS 就标记完成，整批都完成时 generate 提前结束。批越大，每个 token 的
矩阵乘越"胖"，CPU 的吞吐越高；代价是先到的请求最多多等一个等待窗口。

运行：
  python -m common.serving --port 8000                          # smollm2-135m
  python -m common.serving --smoke --port 8000                  # tiny-qwen2
  python -m common.serving --model DIR --adapter LORA_DIR --api-key sk-xxx --port 8000
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import Request  # 路由函数的注解按模块全局解析（from __future__ import annotations）
from pydantic import BaseModel, Field

ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions")


@dataclass
class ServerConfig:
    """服务的上限与批处理参数（命令行同名）。"""

    max_batch_size: int = 8          # 一次 generate 最多几个请求
    batch_wait_ms: float = 15.0      # 凑批的等待窗口：越长批越满，单个请求的延迟越高
    max_queue: int = 64              # 排队上限，满了 429
    max_tokens_limit: int = 512      # 单个请求的 max_tokens 上限
    default_max_tokens: int = 128    # 请求没写 max_tokens 时
    max_prompt_tokens: int = 1024    # 提示（套模板后）的 token 上限
    api_key: str | None = None


@dataclass
class Pending:
    """一个排队/生成中的请求；生成线程通过 loop.call_soon_threadsafe 把事件放进 events。"""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    t0: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def key(self) -> tuple:
        """同一批必须共用采样参数（generate 一次只收一组）。"""
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)

    def emit(self, *event: Any) -> None:
        """线程安全地把事件交给请求所在的事件循环。"""
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Metrics:
    """Prometheus 指标（每个应用一个 registry，同一进程里起多个应用也不冲突）。"""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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

    def __init__(self, tok, batch: list[Pending], prompt_len: int, eos_ids: set[int], metrics: Metrics):
        self.tok, self.batch, self.prompt_len, self.eos, self.m = tok, batch, prompt_len, eos_ids, metrics
        self.ids: list[list[int]] = [[] for _ in batch]
        self.sent = [""] * len(batch)
        self.done = [p.cancelled for p in batch]

    def _finish(self, i: int, reason: str) -> None:
        self.done[i] = True
        self.batch[i].emit("done", reason, len(self.ids[i]))

    def __call__(self, input_ids, scores, **kw):  # noqa: ANN001
        import torch

        new = input_ids[:, -1].tolist()
        for i, (p, t) in enumerate(zip(self.batch, new)):
            if self.done[i]:
                continue
            if p.cancelled:   # 客户端断开：这一行不用再算了
                self.done[i] = True
                continue
            if t in self.eos:
                self._finish(i, "stop")
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
                self._finish(i, "stop")
            elif len(self.ids[i]) >= p.max_tokens:
                self._finish(i, "length")
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """模型 + 有界队列 + 动态批处理调度器（一个协程凑批，一个线程生成）。"""

    def __init__(self, model, tok, model_id: str, cfg: ServerConfig):
        self.model, self.tok, self.model_id, self.cfg = model, tok, model_id, cfg
        self.metrics = Metrics()
        self.queue: asyncio.Queue | None = None
        self.carry: deque[Pending] = deque()   # 采样参数和当前批不同的请求，留到下一批
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="generate")
        self.lock = threading.Lock()
        eos = getattr(model.generation_config, "eos_token_id", None) or tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.batches = 0

    def prompt(self, messages: list[dict]) -> tuple[str, int]:
        """套对话模板，返回 (提示文本, token 数)。"""
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, len(self.tok(text, add_special_tokens=False)["input_ids"])

    def submit(self, p: Pending) -> bool:
        """放进有界队列；满了返回 False（调用方回 429）。"""
        try:
            self.queue.put_nowait(p)
        except asyncio.QueueFull:
            return False
        self.metrics.queue_depth.set(self.queue.qsize() + len(self.carry))
        return True

    async def _next(self, timeout: float | None) -> Pending | None:
        if self.carry:
            return self.carry.popleft()
        if timeout is None:
            return await self.queue.get()
        if timeout <= 0:
            return self.queue.get_nowait() if not self.queue.empty() else None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None

    async def scheduler(self) -> None:
        """凑批循环：取一个请求，再在等待窗口内收同参数的请求，交给生成线程。"""
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next(None)
            if first.cancelled:
                continue
            batch, skipped = [first], []
            deadline = loop.time() + self.cfg.batch_wait_ms / 1000
            while len(batch) < self.cfg.max_batch_size:
                p = await self._next(deadline - loop.time())
                if p is None:
                    break
                if p.cancelled:
                    continue
                (batch if p.key() == first.key() else skipped).append(p)
            self.carry.extend(skipped)
            self.metrics.queue_depth.set(self.queue.qsize() + len(self.carry))
            self.metrics.batch_size.observe(len(batch))
            self.batches += 1
            await loop.run_in_executor(self.worker, self._generate, batch)

    def _generate(self, batch: list[Pending]) -> None:
        """在生成线程里跑一次批量 generate；出错时每个请求都收到 error（→ 500），调度继续。"""
        import torch
        from transformers import StoppingCriteriaList

        tok = self.tok
        try:
            side = tok.padding_side
            tok.padding_side = "left"   # 左填充：每行的新 token 都接在自己最后一个真实 token 后面
            enc = tok([p.prompt for p in batch], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.model.device)
            tok.padding_side = side
            prog = _Progress(tok, batch, enc["input_ids"].shape[1], self.eos_ids, self.metrics)
            first = batch[0]
            sample = dict(do_sample=True, temperature=first.temperature, top_p=first.top_p) \
                if first.temperature > 0 else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            for p in batch:
                self.metrics.prompt_tokens.inc(p.prompt_tokens)
            with torch.inference_mode():
                self.model.generate(**enc, max_new_tokens=max(p.max_tokens for p in batch),
                                    pad_token_id=tok.pad_token_id, stopping_criteria=StoppingCriteriaList([prog]),
                                    **sample)
            for i in range(len(batch)):   # generate 因长度上限结束、而行还没标记完成时
                if not prog.done[i]:
                    prog._finish(i, "length")
        except Exception as e:  # noqa: BLE001 —— 服务不能因为一批出错就停；错误交给每个请求，回 500
            for p in batch:
                p.emit("error", f"{type(e).__name__}: {e}")


# ---------------------------------------------------------------- HTTP 层


class TextPart(BaseModel):
    """OpenAI 的内容片段（只支持文本）。"""

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """一条对话消息。"""

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]


class ChatRequest(BaseModel):
    """POST /v1/chat/completions 的请求体（OpenAI 字段；多余字段忽略）。"""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)   # 省略时贪心（可复现）；OpenAI 默认是 1
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1)                 # 一次只生成一个候选
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


class APIError(Exception):
    """在处理函数里抛出，变成 OpenAI 形状的错误响应。"""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type_, self.param, self.code = status, message, type_, param, code


def _metrics_middleware(app, metrics: Metrics):  # noqa: ANN001
    """纯 ASGI 中间件：按路由和状态码计数，计时到最后一个字节（流式响应也准）。"""

    async def wrapped(scope, receive, send):  # noqa: ANN001
        if scope["type"] != "http":
            return await app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"   # 未知路径归一类：防止标签爆炸
        status, t0 = {"code": 500}, time.perf_counter()
        chat = route == "/v1/chat/completions"

        async def send_wrapper(message):  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        if chat:
            metrics.in_flight.inc()
        try:
            await app(scope, receive, send_wrapper)
        finally:
            if chat:
                metrics.in_flight.dec()
            metrics.requests.labels(route, str(status["code"])).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - t0)

    return wrapped


def create_app(engine: Engine):
    """把 Engine 包成 FastAPI 应用（模型已加载好；uvicorn 开始监听时 /health 就是 200）。"""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.exceptions import HTTPException as StarletteHTTPException

    cfg, m = engine.cfg, engine.metrics

    @asynccontextmanager
    async def lifespan(_app):  # noqa: ANN001
        engine.queue = asyncio.Queue(maxsize=cfg.max_queue)
        task = asyncio.create_task(engine.scheduler())
        yield
        task.cancel()
        engine.worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="course chat server", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_req: Request, e: APIError):
        return _error(e.status, e.message, e.type_, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, e: RequestValidationError):
        err = (e.errors() or [{}])[0]
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body" and not isinstance(x, int))
        return _error(400, f"{loc or 'body'}: {err.get('msg', 'invalid request')}", param=loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}", "server_error")

    def auth(request: Request) -> None:
        if not cfg.api_key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        # 常数时间比较：逐字节比较会在第一个不同字节处提前返回，响应时间泄露 key 的前缀
        if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
            raise APIError(401, "Incorrect API key provided (Authorization: Bearer <key>)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "batches": engine.batches}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return CHAT_PAGE.replace("__MODEL__", engine.model_id)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def list_models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "llm-course"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(req: ChatRequest, request: Request):
        if req.model != engine.model_id:
            raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{engine.model_id}`",
                           param="model", code="model_not_found")
        max_tokens = req.max_completion_tokens or req.max_tokens or cfg.default_max_tokens
        if max_tokens > cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit {cfg.max_tokens_limit}",
                           param="max_tokens")
        msgs = [{"role": x.role, "content": x.content if isinstance(x.content, str)
                 else "".join(part.text for part in x.content)} for x in req.messages]
        prompt, n_prompt = engine.prompt(msgs)
        if n_prompt > cfg.max_prompt_tokens:
            raise APIError(400, f"prompt has {n_prompt} tokens, limit is {cfg.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        p = Pending(prompt, n_prompt, max_tokens, req.temperature, req.top_p, stop, asyncio.get_running_loop())
        if not engine.submit(p):
            raise APIError(429, f"server busy: queue full ({cfg.max_queue} waiting); retry later",
                           "rate_limit_exceeded", code="rate_limit_exceeded")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        base = {"id": rid, "created": created, "model": engine.model_id}
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_sse(p, base, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts = []
        try:
            while True:
                ev = await p.events.get()
                if ev[0] == "delta":
                    parts.append(ev[1])
                elif ev[0] == "done":
                    break
                else:
                    raise APIError(500, ev[1], "server_error")
        except asyncio.CancelledError:
            p.cancelled = True
            raise
        return JSONResponse({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "finish_reason": ev[1]}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": ev[2], "total_tokens": n_prompt + ev[2]}})

    async def _sse(p: Pending, base: dict, usage: bool):
        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                ev = await p.events.get()
                if ev[0] == "delta":
                    yield chunk({"content": ev[1]})
                elif ev[0] == "done":
                    yield chunk({}, ev[1])
                    if usage:
                        body = {**base, "object": "chat.completion.chunk", "choices": [], "usage": {
                            "prompt_tokens": p.prompt_tokens, "completion_tokens": ev[2],
                            "total_tokens": p.prompt_tokens + ev[2]}}
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                else:   # 响应头已经发出 200，只能在流里报错
                    yield f"data: {json.dumps({'error': {'message': ev[1], 'type': 'server_error'}})}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            p.cancelled = True   # 正常结束或客户端断开：都不再需要这一行

    return _wrap(app, m)


def _wrap(app, m: Metrics):  # noqa: ANN001
    """把指标中间件挂在最外层（连异常处理产生的 4xx/5xx 也计数），同时保留 app 属性供测试取用。"""
    wrapped = _metrics_middleware(app, m)
    wrapped.app = app   # type: ignore[attr-defined]
    return wrapped


def load_engine(model: str, source: str = "auto", adapter: str | None = None, device: str = "auto",
                dtype: str = "auto", served_name: str | None = None, cfg: ServerConfig | None = None) -> Engine:
    """加载模型（可选 LoRA adapter，合并后服务）并建 Engine。"""
    from common import models

    mdl, tok = models.load(model, source=source, device=device, dtype=dtype)
    if adapter:
        from peft import PeftModel

        mdl = PeftModel.from_pretrained(mdl, adapter).merge_and_unload()   # 合并后推理没有额外开销
    mdl.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return Engine(mdl, tok, served_name or model, cfg or ServerConfig())


def main(argv: list[str] | None = None) -> None:
    """命令行入口：python -m common.serving --model M --port N。"""
    ap = argparse.ArgumentParser(prog="python -m common.serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="模型名/目录（默认 smollm2-135m；--smoke 时 tiny-qwen2）")
    ap.add_argument("--source", default="auto", help="auto / hf / modelscope")
    ap.add_argument("--adapter", default=None, help="LoRA adapter 目录：加载后合并进模型")
    ap.add_argument("--served-model-name", default=None, help="API 里的模型名（默认 = --model）")
    ap.add_argument("--host", default="127.0.0.1", help="监听地址（默认只在本机）")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", default=os.environ.get("CHAT_API_KEY"), help="Bearer key（或环境变量 CHAT_API_KEY）")
    ap.add_argument("--max-batch-size", type=int, default=ServerConfig.max_batch_size)
    ap.add_argument("--batch-wait-ms", type=float, default=ServerConfig.batch_wait_ms)
    ap.add_argument("--max-queue", type=int, default=ServerConfig.max_queue)
    ap.add_argument("--max-tokens-limit", type=int, default=ServerConfig.max_tokens_limit)
    ap.add_argument("--default-max-tokens", type=int, default=ServerConfig.default_max_tokens)
    ap.add_argument("--max-prompt-tokens", type=int, default=ServerConfig.max_prompt_tokens)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto：GPU bf16；CPU 上极小模型 fp32，其余按 models.pick_dtype")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU 线程数（0 = 自动：极小模型 1，其余 torch 默认）")
    ap.add_argument("--smoke", action="store_true", help="极小模型 tiny-qwen2")
    a = ap.parse_args(argv)
    for name in ("max_batch_size", "max_queue", "max_tokens_limit", "default_max_tokens", "max_prompt_tokens"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} 必须 ≥ 1")
    if a.batch_wait_ms < 0:
        ap.error("--batch-wait-ms 必须 ≥ 0")
    import torch
    import uvicorn

    from common.errors import UserError
    from common.run import get_logger
    from common.tiny import TINY_NAMES

    name = a.model or ("tiny-qwen2" if a.smoke else "smollm2-135m")
    tiny = name in TINY_NAMES
    # 极小模型（hidden 128）的矩阵太小：多线程同步、bf16 转换的开销都比省下的多（忙碌的 2 核机上实测
    # 单线程 fp32 比默认 2 线程 bf16 快 20 倍以上）。大模型保持 torch 默认
    threads = a.threads or (1 if tiny else 0)
    if threads:
        torch.set_num_threads(threads)
    dtype = "float32" if a.dtype == "auto" and tiny and a.device != "cuda" else a.dtype
    cfg = ServerConfig(a.max_batch_size, a.batch_wait_ms, a.max_queue, a.max_tokens_limit,
                       min(a.default_max_tokens, a.max_tokens_limit), a.max_prompt_tokens, a.api_key or None)
    log = get_logger()
    if a.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning(f"监听 {a.host} 且没有 --api-key：同网段任何人都能调用")
    try:
        engine = load_engine(name, a.source, a.adapter, a.device, dtype, a.served_model_name, cfg)
    except UserError as e:
        print(f"错误: {e}", flush=True)
        raise SystemExit(2) from None
    log.info(f"动态批处理：每批 ≤ {cfg.max_batch_size}，等待窗口 {cfg.batch_wait_ms} ms，队列上限 {cfg.max_queue}；"
             f"API key {'开' if cfg.api_key else '关'}；CPU 线程 {torch.get_num_threads()}")
    uvicorn.run(create_app(engine), host=a.host, port=a.port, log_level="warning", access_log=False)


CHAT_PAGE = """<!doctype html>
<html lang="zh"><head><meta charset="utf-8"><title>Course chat · __MODEL__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:760px;margin:2em auto;padding:0 1em;color:#222}
#log{border:1px solid #ddd;border-radius:8px;padding:1em;min-height:12em;white-space:pre-wrap}
.msg{margin:.4em 0}.user{color:#0550ae}.assistant{color:#1a7f37}
form{display:flex;gap:.5em;margin-top:1em}#input{flex:1;padding:.5em}#key{width:9em}
</style></head><body>
<h2>Chat with <code>__MODEL__</code></h2>
<div id="log"></div>
<form id="form"><input id="input" placeholder="Type a message, Enter to send" autocomplete="off">
<input id="key" placeholder="API key (optional)" type="password"><button id="send">Send</button></form>
<script>
const log = document.getElementById("log"), input = document.getElementById("input");
const keyBox = document.getElementById("key"), history = [];
keyBox.value = localStorage.getItem("apiKey") || "";
function bubble(role, text) {
  const d = document.createElement("div"); d.className = "msg " + role;
  d.textContent = (role === "user" ? "You: " : "AI: ") + text; log.appendChild(d); return d;
}
document.getElementById("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = input.value.trim(); if (!text) return;
  input.value = ""; localStorage.setItem("apiKey", keyBox.value);
  history.push({role: "user", content: text}); bubble("user", text);
  const out = bubble("assistant", ""); let answer = "";
  const headers = {"Content-Type": "application/json"};
  if (keyBox.value) headers["Authorization"] = "Bearer " + keyBox.value;
  try {
    const resp = await fetch("/v1/chat/completions", {method: "POST", headers,
      body: JSON.stringify({model: "__MODEL__", messages: history, stream: true, max_tokens: 64})});
    if (!resp.ok) { out.textContent = "Error " + resp.status + ": " + (await resp.json()).error.message; return; }
    const reader = resp.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buf += dec.decode(value, {stream: true});
      const events = buf.split("\\n\\n"); buf = events.pop();
      for (const e of events) {
        const data = e.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const delta = JSON.parse(data).choices?.[0]?.delta?.content;
        if (delta) { answer += delta; out.textContent = "AI: " + answer; }   // token 一个个出现
      }
    }
    history.push({role: "assistant", content: answer});
  } catch (err) { out.textContent = "Error: " + err; }
  out.dataset.done = "1";
});
</script></body></html>
"""

if __name__ == "__main__":
    main()
