"""第 6 课 05：RAGFlow 部署文件与 ragflow-sdk 接线检查；没有服务时 reachable=False 且退出码 0。

真实 RAGFlow 需要 Docker（MySQL + MinIO + Redis + Elasticsearch + RAGFlow），CI 里没有，连服务的那条路径不在这里测。
"""
from __future__ import annotations

import json
import socket
import time

from tests.conftest import load_script

SCRIPT = "lesson6_rag/05_ragflow_deployment/ragflow_demo.py"


def test_offline_checks_pass(tmp_path, monkeypatch):
    monkeypatch.delenv("RAGFLOW_URL", raising=False)
    monkeypatch.delenv("RAGFLOW_API_KEY", raising=False)
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, output_dir=str(tmp_path)))
    assert m["reachable"] is False
    assert m["compose_ok"] is True and m["client_ok"] is True
    assert m["docs_ready"] >= 40 and m["docs_bytes"] > 10_000 and m["upload_body_bytes"] > m["docs_bytes"]
    assert {"ragflow-cpu", "mysql", "minio", "redis", "es01"} <= set(m["compose"]["services"])
    assert m["compose"]["images"]["ragflow-cpu"] == "infiniflow/ragflow:v0.22.1"
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert {"reachable", "compose_ok", "client_ok", "docs_ready"} <= set(saved)


def test_compose_check_catches_problems(tmp_path):
    """把镜像改成 latest、删掉一个 .env 变量：检查必须报出来（证明 compose_ok 不是摆设）。"""
    mod = load_script(SCRIPT)
    src = mod.HERE
    (tmp_path / "nginx").mkdir()
    for f in ("nginx.conf", "proxy.conf", "ragflow.conf"):
        (tmp_path / "nginx" / f).write_text((src / "nginx" / f).read_text())
    compose = (src / "docker-compose.yml").read_text().replace("mysql:8.0.39", "mysql:latest")
    (tmp_path / "docker-compose.yml").write_text(compose)
    env = "\n".join(ln for ln in (src / ".env.example").read_text().splitlines() if not ln.startswith("MINIO_PORT="))
    (tmp_path / ".env.example").write_text(env)
    problems, _ = mod.check_compose(tmp_path)
    assert any("mysql" in p and "latest" in p for p in problems)
    assert any("MINIO_PORT" in p for p in problems)


def test_closed_port_is_unreachable_quickly(tmp_path):
    with socket.socket() as s:          # 绑定后立刻关闭：拿到一个此刻没人监听的回环端口
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mod = load_script(SCRIPT)
    t0 = time.perf_counter()
    # 探测超时给 60 秒：没人监听的端口立刻拒绝连接，不该等到超时（30 秒的余量经得起忙机器上的数倍噪声）
    m = mod.main(mod.Args(smoke=True, ragflow_url=f"http://127.0.0.1:{port}", api_key="ragflow-test",
                          connect_timeout=60.0, output_dir=str(tmp_path)))       # 正常返回 = 退出码 0
    assert time.perf_counter() - t0 < 30
    assert m["reachable"] is False and m["ragflow_url"].endswith(str(port))


def test_malformed_url_is_user_error(run_script, tmp_path):
    proc = run_script(SCRIPT, "--smoke", "--ragflow-url", "htp:/nowhere", "--output-dir", str(tmp_path))
    assert proc.returncode == 2
    assert "--ragflow-url" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_qa_file_names_line(run_script, tmp_path):
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "q", "answer": "a", "doc_id": "faq/general_faq_zh.md"}\n{"question": "q2"}\n')
    proc = run_script(SCRIPT, "--smoke", "--qa", str(bad), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr
