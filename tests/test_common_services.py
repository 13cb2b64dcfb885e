"""common.services：真实子进程起在空闲端口、轮询到应答才返回、任何退出路径上都停掉；起不来时说清原因。"""
import sys

import httpx
import pytest

from common import services

HTTP = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]


def test_start_ready_and_stop(tmp_path):
    (tmp_path / "health").write_text("ok", encoding="utf-8")
    with services.start(HTTP + ["--directory", str(tmp_path)], ready_path="/health",
                        log_file=tmp_path / "srv.log", deadline_s=60) as svc:
        assert svc.alive() and svc.url == f"http://127.0.0.1:{svc.port}"
        assert httpx.get(svc.url + "/health").text == "ok"     # start 返回时服务已经应答
    assert not svc.alive() and svc.proc.returncode is not None   # 退出 with 时已停掉并回收
    with pytest.raises(httpx.HTTPError):
        httpx.get(svc.url + "/health", timeout=2)
    svc.stop()   # 可重复调用


def test_stops_on_exception(tmp_path):
    (tmp_path / "health").write_text("ok", encoding="utf-8")
    with pytest.raises(ZeroDivisionError):
        with services.start(HTTP + ["--directory", str(tmp_path)], ready_path="/health") as svc:
            raise ZeroDivisionError("出错的 with 块")
    assert not svc.alive()


def test_process_that_exits_is_reported(tmp_path):
    log = tmp_path / "bad.log"
    with pytest.raises(RuntimeError, match="退出码 3"):
        services.start([sys.executable, "-c", "import sys; print('boom {port}'); sys.exit(3)"], log_file=log,
                       deadline_s=30)
    assert "boom" in log.read_text()


def test_free_port_is_bindable():
    import socket

    port = services.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
