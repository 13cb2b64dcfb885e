"""第 5 课 07：聊天服务。官方 openai 客户端（普通 + 流式）、4xx、32 并发只有 200/429、/metrics 计数、
真实无头 Chromium 里打字聊天、坏参数一行报错。服务都是真的子进程（python -m common.serving）。"""
from __future__ import annotations

import asyncio
import html
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, assert_claims, assert_user_error, load_script

SCRIPT = "lesson5_deployment_monitoring/07_serving/chat_server.py"
KEY = "sk-course-test"
MODEL = "tiny-qwen2"


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    """一个带 API key 的服务：队列上限 8（32 并发时一定有 429），提示上限 64 token（好测超长提示）。"""
    from common import services

    log = tmp_path_factory.mktemp("serving") / "server.log"
    cmd = [sys.executable, "-m", "common.serving", "--model", MODEL, "--port", "{port}", "--api-key", KEY,
           "--max-queue", "8", "--max-prompt-tokens", "64", "--max-tokens-limit", "64"]
    with services.start(cmd, log_file=log, deadline_s=300, env={"PYTHONPATH": str(REPO)}) as svc:
        yield svc


def prom(url: str) -> dict:
    """/metrics -> {(样本名, 排好序的标签): 值}。"""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in fam.samples}


def chat_counts(m: dict) -> dict:
    return {dict(k[1])["code"]: v for k, v in m.items()
            if k[0] == "chat_http_requests_total" and dict(k[1])["route"] == "/v1/chat/completions"}


def test_chat_server_script(tmp_path, tiny_models):
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    for key in ("answer", "stream_chunks", "ttft_ms", "bad_request_codes", "burst_200", "burst_429", "burst_5xx",
                "metrics_chat_requests", "requests_sent"):
        assert key in saved, key
    assert_claims(saved)
    assert m["answer"].strip() and m["stream_chunks"] >= 2 and m["ttft_ms"] > 0
    # 贪心解码：流式拼起来的文本与普通调用的回答完全相同
    assert m["stream_answer"] == m["answer"]
    assert m["bad_request_codes"] == {"max_tokens_too_large": 400, "unknown_model": 404, "empty_messages": 400}
    # 32 个并发、队列上限 8：放得下的 200，放不下的 429（机器快时生成线程来得及清队列，可能一个 429 也没有），
    # 绝没有 5xx、也没有挂起；/metrics 一个不少地数到了。一定出现 429 的情形见 test_32_concurrent_...
    assert m["burst_5xx"] == 0 and m["burst_200"] >= 8
    assert m["burst_200"] + m["burst_429"] == 32
    assert m["metrics_chat_requests"] == m["requests_sent"]
    assert m["mean_batch_size"] > 1.5, "并发请求应被凑成批"
    assert (tmp_path / "server.log").is_file()


def test_openai_client_both_modes(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert [x.id for x in client.models.list().data] == [MODEL]
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "云帆 App 是什么？"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20)
    text = r.choices[0].message.content
    assert text.strip() and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 20
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2, "流式应分多块到达"
    assert "".join(deltas) == text, "贪心解码下流式与普通调用的文本必须相同"
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # max_tokens 真的限制长度
    short = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
    assert short.usage.completion_tokens <= 2


@pytest.mark.parametrize("case,status,code", [
    ("no_key", 401, "invalid_api_key"), ("wrong_key", 401, "invalid_api_key"),
    ("bad_role", 400, None), ("zero_max_tokens", 400, None), ("huge_max_tokens", 400, None),
    ("not_json", 400, None), ("long_prompt", 400, "context_length_exceeded"),
    ("unknown_model", 404, "model_not_found"), ("n_2", 400, None), ("unknown_path", 404, "not_found"),
])
def test_bad_requests_get_4xx_in_openai_shape(server, case, status, code):
    good = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"bad_role": {**good, "messages": [{"role": "robot", "content": "hi"}]},
            "zero_max_tokens": {**good, "max_tokens": 0}, "huge_max_tokens": {**good, "max_tokens": 10000},
            "long_prompt": {**good, "messages": [{"role": "user", "content": "很长的问题 " * 200}]},
            "unknown_model": {**good, "model": "gpt-9"}, "n_2": {**good, "n": 2}}.get(case, good)
    if case == "no_key":
        headers = {}
    elif case == "wrong_key":
        headers = {"Authorization": "Bearer sk-wrong"}
    path = "/v1/nothing" if case == "unknown_path" else "/v1/chat/completions"
    if case == "not_json":
        r = httpx.post(server.url + path, content=b"{not json", headers={**headers, "Content-Type": "application/json"})
    else:
        r = httpx.post(server.url + path, json=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and (code is None or err["code"] == code), err
    assert httpx.get(server.url + "/health").status_code == 200   # 服务不受影响


def health_during(url: str, send):
    """send() 在另一个线程里跑的同时一直问 /health：返回 (send() 的结果, /health 最慢一次的秒数)。"""
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(1) as pool:
        c.get(url + "/health")   # 先把连接建好：量的是服务的应答，不是 TCP 握手
        job, worst = pool.submit(send), 0.0
        while True:   # 至少问一次；send 结束为止
            t0 = time.perf_counter()
            assert c.get(url + "/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            if job.done():
                return job.result(), worst
            time.sleep(0.005)


@pytest.mark.parametrize("upload", ["content_length", "chunked", "long_prompt_under_limit"])
def test_big_body_refused_while_health_keeps_answering(server, upload):
    """issue 22：20 MB 的请求体（带 key）曾被在事件循环里解析、分词 33 秒才 400，其间 /health 不应答。
    现在：按字节上限在解析之前 413（有 Content-Length 的先看它，分块上传边读边数）；没超字节上限的超长提示
    在线程里套模板，字符数就够判它超限，不分词。三种情形下 /health 都在 100 ms 内应答。"""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    size = 900_000 if upload == "long_prompt_under_limit" else 20_000_000
    question = "How do I reset the Yunfan App? " * (size // 31)
    body = json.dumps({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": question}]}).encode()
    assert (len(body) < 1 << 20) == (upload == "long_prompt_under_limit")   # 服务默认上限 1 MiB

    def send() -> httpx.Response:
        chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))   # 生成器：httpx 用分块传输，没有长度
        return httpx.post(server.url + "/v1/chat/completions", content=chunks if upload == "chunked" else body,
                          headers=headers, timeout=120)

    # 最多三次取最好的：忙的共享机上，空闲的服务偶尔也有 100 ms 的调度抖动；真的卡住（旧代码几十秒）则次次都卡
    for _ in range(3):
        r, worst = health_during(server.url, send)
        err = r.json()["error"]
        if upload == "long_prompt_under_limit":
            assert r.status_code == 400 and err["code"] == "context_length_exceeded", r.text
        else:
            assert r.status_code == 413 and err["code"] == "request_too_large", r.text
            assert "1048576 bytes" in err["message"] and "--max-body-bytes" in err["message"], err
        if worst < 0.1:
            break
    assert worst < 0.1, f"/health 最慢 {worst * 1000:.0f} ms"


@pytest.mark.parametrize("raw,field,said", [
    ('"max_tokens": true', "max_tokens", "true"), ('"temperature": NaN', "temperature", "NaN"),
    ('"temperature": true', "temperature", "true"), ('"top_p": Infinity', "top_p", "Infinity"),
    ('"stream": 1', "stream", "1"), ('"max_tokens": 4.0', "max_tokens", "4.0"),
])
def test_strict_types_name_the_field_and_the_value(server, raw, field, said):
    """布尔不当数字用（max_tokens: true 曾经 200）；NaN/inf 在消息里就叫 NaN/Infinity，不说成别的。"""
    body = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], {raw}}}'
    r = httpx.post(server.url + "/v1/chat/completions", content=body.encode(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(field + ":") and f"(got {said})" in err["message"], err


def test_page_escapes_the_model_id(tiny_models, tmp_path):
    """模型名（--served-model-name）原样拼进网页曾是 XSS：现在只以转义后的文本出现，脚本从 DOM 读它。"""
    from common import services

    evil = '</script><img src=x onerror="alert(1)">\'&'
    cmd = [sys.executable, "-m", "common.serving", "--model", MODEL, "--served-model-name", evil, "--port", "{port}"]
    with services.start(cmd, log_file=tmp_path / "server.log", deadline_s=300, env={"PYTHONPATH": str(REPO)}) as svc:
        page = httpx.get(svc.url + "/").text
        ids = [x["id"] for x in httpx.get(svc.url + "/v1/models").json()["data"]]
    assert ids == [evil]   # API 里还是原来的名字
    assert f"<title>Course chat · {html.escape(evil)}</title>" in page
    assert f'<code id="model">{html.escape(evil)}</code>' in page
    assert "<img" not in page and page.count("</script>") == 1 and "onerror=\"" not in page
    assert "__MODEL__" not in page


def test_32_concurrent_only_200_or_429_and_metrics_count_them(server):
    before = prom(server.url)

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            async def one(i: int) -> int:
                r = await c.post(server.url + "/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 12, "messages": [{"role": "user", "content": f"question {i}"}]})
                return r.status_code
            return await asyncio.gather(*[one(i) for i in range(32)])

    codes = asyncio.run(fire())
    assert set(codes) <= {200, 429}, codes                 # 零 5xx，也没有挂起（超时会抛异常）
    assert codes.count(200) >= 8 and codes.count(429) >= 1, codes   # 队列 8 个放得下，其余立刻 429
    after = prom(server.url)
    b, a = chat_counts(before), chat_counts(after)
    assert a.get("200", 0) - b.get("200", 0) == codes.count(200)
    assert a.get("429", 0) - b.get("429", 0) == codes.count(429)
    # 动态批处理：这一波的 generate 次数少于成功请求数（请求被凑成了批）
    calls = after[("chat_batch_size_count", ())] - before.get(("chat_batch_size_count", ()), 0)
    served = after[("chat_batch_size_sum", ())] - before.get(("chat_batch_size_sum", ()), 0)
    assert served == codes.count(200) and calls < served / 2, (calls, served)
    assert after[("chat_requests_in_flight", ())] <= 1   # 只剩抓 /metrics 这一刻
    assert after[("chat_generated_tokens_total", ())] > before.get(("chat_generated_tokens_total", ()), 0)
    assert after[("chat_time_to_first_token_seconds_count", ())] >= codes.count(200)


# ---------------------------------------------------------------- 浏览器：真实无头 Chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian 的 chromium；没有就用 apt 装（CI 容器里是 root）；装不上才跳过，并说明原因。"""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("没有 chromium，且不是 root/没有 apt-get，无法安装（apt-get install -y chromium）")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    p = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                       text=True, env=env, timeout=900)
    if p.returncode != 0:   # 软件源索引可能过期：更新一次再试
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        p = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True,
                           text=True, env=env, timeout=900)
    path = shutil.which("chromium")
    if not path:
        pytest.skip(f"apt-get install chromium 失败：{(p.stderr or p.stdout)[-300:]}")
    return path


class CDP:
    """最小的 Chrome DevTools Protocol 客户端（websocket 上的 JSON-RPC）。"""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws, self.n = connect(ws_url, max_size=2**24), 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:   # 跳过事件通知，等自己这条的回复
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(msg["error"])
                return msg.get("result", {})

    def js(self, expr: str):
        return self.call("Runtime.evaluate", expression=expr, returnByValue=True)["result"].get("value")

    def type(self, text: str) -> None:
        self.call("Input.insertText", text=text)   # 像输入法提交文字一样输入到有焦点的框

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      nativeVirtualKeyCode=13, **({"text": "\r"} if kind == "keyDown" else {}))


def wait_for(fn, deadline_s: float, what: str):
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        v = fn()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"{deadline_s:.0f} 秒内没有等到：{what}")


@pytest.mark.needs_service
@pytest.mark.slow
def test_chat_page_in_headless_chromium(server, chromium, tmp_path):
    profile = tmp_path / "profile"
    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                             "--remote-debugging-port=0", "--remote-allow-origins=*", server.url + "/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = Path(profile) / "DevToolsActivePort"   # --remote-debugging-port=0：端口写在这里
        port = wait_for(lambda: port_file.is_file() and port_file.read_text().split("\n")[0].strip(), 60,
                        "DevToolsActivePort")
        page = wait_for(lambda: [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json()
                                 if t["type"] == "page" and t["url"].startswith(server.url)], 60, "页面目标")[0]
        cdp = CDP(page["webSocketDebuggerUrl"])
        wait_for(lambda: cdp.js("document.readyState === 'complete' && !!document.getElementById('input')"), 30,
                 "页面加载")
        question = "What is the Yunfan App?"
        cdp.js("document.getElementById('key').focus()")
        cdp.type(KEY)
        cdp.js("document.getElementById('input').focus()")
        cdp.type(question)
        assert cdp.js("document.getElementById('input').value") == question
        cdp.press_enter()   # 回车提交表单（浏览器的隐式提交），页面用 fetch 流式读 SSE
        shown = wait_for(lambda: cdp.js("(() => { const a = document.querySelector('.msg.assistant');"
                                        " return a && a.dataset.done === '1' ? a.textContent : null })()"), 90,
                         "助手回答出现在页面上")
        assert cdp.js("document.querySelector('.msg.user').textContent") == "You: " + question
        # 屏幕上的回答 = 同一问题经 API 的贪心回答（页面用 max_tokens 64）
        r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": question}]})
        expected = r.json()["choices"][0]["message"]["content"]
        assert expected.strip() and shown == "AI: " + expected, (shown, expected)
        cdp.ws.close()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)


def test_bad_batch_size_is_one_line_error(tmp_path, run_script):
    proc = run_script(SCRIPT, "--smoke", "--max-batch-size", "0", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--max-batch-size")


def test_serve_mode_execs_the_same_server(tmp_path, tiny_models):
    """--serve：脚本把自己换成 python -m common.serving（exec），网页与 API 都在；SIGTERM 直接停掉服务。"""
    from common import services

    cmd = [sys.executable, str(REPO / SCRIPT), "--smoke", "--serve", "--port", "{port}"]
    with services.start(cmd, log_file=tmp_path / "serve.log", deadline_s=300) as svc:
        page = httpx.get(svc.url + "/").text
        assert "<title>Course chat · tiny-qwen2</title>" in page and "/v1/chat/completions" in page
        assert [x["id"] for x in httpx.get(svc.url + "/v1/models").json()["data"]] == [MODEL]
    assert svc.proc.returncode is not None   # exec 之后 pid 就是服务进程本身：停掉它就没有别的进程了


def test_server_bad_flag_is_one_line_error():
    p = subprocess.run([sys.executable, "-m", "common.serving", "--max-batch-size", "0"], capture_output=True,
                       text=True, timeout=300, cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
    assert_user_error(p, "--max-batch-size")


@pytest.mark.parametrize("weights", [b"", b"\xff" * 40, b"not a safetensors file"])
def test_broken_adapter_refused_before_the_server_starts(tmp_path, tiny_models, run_script, weights):
    """adapter_config.json 是 JSON 对象、权重文件在，但权重是坏的：在本进程一行点名 --adapter，不起服务子进程
    （没有 server.log），不写 metrics.json。以前要等服务启动、加载失败，错误只留在 server.log 里。"""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}', encoding="utf-8")
    (adapter / "adapter_model.safetensors").write_bytes(weights)
    out = tmp_path / "out"
    proc = run_script(SCRIPT, "--smoke", "--adapter", str(adapter), "--output-dir", str(out), timeout=180)
    assert_user_error(proc, "--adapter", "adapter_model.safetensors")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (out / "server.log").exists() and not (out / "metrics.json").exists()


def test_unused_data_flag_is_refused(tmp_path, run_script):
    """本脚本不读 --data：给了就一行拒绝，而不是悄悄用内置问题跑完、写出结果。"""
    proc = run_script(SCRIPT, "--smoke", "--data", "mine.jsonl", "--output-dir", str(tmp_path), timeout=180)
    assert_user_error(proc, "--data mine.jsonl", "不读数据文件")
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_compiled_decode_gives_the_same_greedy_tokens(tiny_models):
    """--compile：静态 KV 缓存 + torch.compile 的解码步（启动时先编译），fp32 极小模型上两行左填充的批，
    贪心 token 与不编译时逐个相同——编译只换执行方式，不换算的是什么。"""
    import torch

    from common import cli, serving

    engines = [serving._load_engine(cli.parse(serving._Args, ["--smoke", *flag]), ThreadPoolExecutor(1))
               for flag in ([], ["--compile"])]
    tok = engines[0].tok
    enc = tok(["Hello there", "A longer prompt for the second row of the batch"], return_tensors="pt",
              padding=True, padding_side="left")
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.inference_mode():
        eager = engines[0].model.generate(**enc, **kw)
        compiled = engines[1].model.generate(**enc, **kw, cache_implementation="static")
    # 真的走了编译过的调用（transformers 把它存在 _compiled_call）：条件不满足时 generate 会静悄悄退回 eager
    assert hasattr(engines[1].model, "_compiled_call") and not hasattr(engines[0].model, "_compiled_call")
    assert torch.equal(eager, compiled), (eager, compiled)


def test_int4_weights_serve_with_a_float_prefill_and_an_int8_output_layer(tiny_models):
    """--weights int4：解码层是 int4、输出层留 int8、预填充走留着的 fp32；贪心生成照常结束（长度或 EOS）。"""
    import torch

    from common import cli, serving

    engine = serving._load_engine(cli.parse(serving._Args, ["--smoke", "--weights", "int4"]), ThreadPoolExecutor(1))
    model, tok = engine.model, engine.tok
    layers = [m for m in model.modules() if hasattr(m, "weight_q")]
    assert model.get_output_embeddings().bits == 8 and {m.bits for m in layers} == {4, 8}
    assert all(m.dense is not None for m in layers)
    enc = tok(["Hello there"], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 6


def test_a_missing_int4_kernel_is_a_one_line_error(tiny_models, monkeypatch):
    """这版 torch 在这种 CPU 上没有 int4 核心（如某些 ARM 构建）：--weights int4 是一行 UserError，不是 traceback。"""
    import torch

    from common import cli, serving
    from common.errors import UserError

    def missing(*_a, **_k):
        raise NotImplementedError("Could not run '_convert_weight_to_int4pack_for_cpu' with arguments from CPU")

    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", missing)
    with pytest.raises(UserError, match=r"^--weights int4: 量化失败（Could not run .*）；换 --weights fp$"):
        serving._load_engine(cli.parse(serving._Args, ["--smoke", "--weights", "int4"]), ThreadPoolExecutor(1))
