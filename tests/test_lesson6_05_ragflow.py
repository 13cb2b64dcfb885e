"""第 6 课 05：RAGFlow 部署文件与 ragflow-sdk 接线检查；没有服务时 reachable=False 且退出码 0。

真实 RAGFlow 需要 Docker（MySQL + MinIO + Redis + Elasticsearch + RAGFlow），CI 里没有，连服务的那条路径不在这里测。
"""
from __future__ import annotations

import json
import socket

import pytest

from common.errors import UserError
from tests.conftest import assert_claims, load_script

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
    assert_claims(saved)   # CLAIMS：compose 检查、SDK 签名、上传内容（离线就能检查的三条）


def test_local_path_as_model_is_refused(tmp_path, monkeypatch):
    """--model 是 RAGFlow 服务端的模型名：给了本地路径（别的课的用法）一行拒绝，不写 metrics.json；模型名照常通过。"""
    monkeypatch.delenv("RAGFLOW_URL", raising=False)
    mod = load_script(SCRIPT)
    for bad in (str(tmp_path), str(tmp_path / "no_such_model"), "./outputs/lesson1/model"):
        with pytest.raises(UserError, match=r"^--model .*服务端的对话模型名"):
            mod.main(mod.Args(smoke=True, model=bad, output_dir=str(tmp_path / "out")))
        assert not (tmp_path / "out" / "metrics.json").exists()
    m = mod.main(mod.Args(smoke=True, model="qwen-plus@Tongyi-Qianwen", output_dir=str(tmp_path / "ok")))
    assert m["reachable"] is False and m["model"] == "qwen-plus@Tongyi-Qianwen"


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
    problems, _ = mod.pre.check_compose(tmp_path)
    assert any("mysql" in p and "latest" in p for p in problems)
    assert any("MINIO_PORT" in p for p in problems)


def test_closed_port_is_refused_not_timed_out(tmp_path):
    """没人监听的端口：连接被拒绝（ConnectionError），而不是等到超时（ConnectTimeout）；脚本正常返回 = 退出码 0。

    不量墙钟：忙机器上的秒数说明不了什么，异常的种类才说明"立刻知道连不上"。
    """
    with socket.socket() as s:          # 绑定后立刻关闭：拿到一个此刻没人监听的回环端口
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mod = load_script(SCRIPT)
    m = mod.main(mod.Args(smoke=True, ragflow_url=f"http://127.0.0.1:{port}", api_key="ragflow-test",
                          connect_timeout=60.0, output_dir=str(tmp_path)))
    assert m["reachable"] is False and m["ragflow_url"].endswith(str(port))
    assert m["probe_error"] == "ConnectionError"


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


class _Doc:
    def __init__(self, rid: str, name: str):
        self.id, self.name, self.run, self.progress = rid, name, "DONE", 1.0


class _Chunk:
    def __init__(self, document_id: str, content: str):
        self.document_id, self.content = document_id, content


class _FakeDataSet:
    """ragflow_sdk.DataSet 的替身：上传即解析完成，分页列出文档。"""

    id, name = "ds-1", "llm-course-kb-test"

    def __init__(self):
        self.docs: list[_Doc] = []

    def upload_documents(self, batch):
        new = [_Doc(f"rid-{len(self.docs) + i}", p["display_name"]) for i, p in enumerate(batch)]
        self.docs += new
        return new

    def async_parse_documents(self, document_ids):
        assert len(document_ids) == len(self.docs)

    def list_documents(self, page, page_size):
        return self.docs[(page - 1) * page_size:page * page_size]


class _FakeRAGFlow:
    """ragflow_sdk.RAGFlow 的替身：retrieve 按 gold 返回金标块或另一篇文档的块；对话助手没有配置。"""

    gold, qas, made = True, {}, []

    def __init__(self, api_key, base_url):
        self.deleted = []
        _FakeRAGFlow.made.append(self)

    def create_dataset(self, name, embedding_model, chunk_method):
        self.ds = _FakeDataSet()
        return self.ds

    def retrieve(self, dataset_ids, question, page_size, similarity_threshold, top_k):
        qa = self.qas[question]
        by_name = {d.name: d.id for d in self.ds.docs}
        own = by_name[qa["doc_id"].replace("/", "__")]
        other = next(rid for rid in by_name.values() if rid != own)
        return [_Chunk(own if self.gold else other, qa["gold_passage"] or "")]

    def create_chat(self, name, dataset_ids, llm):
        raise RuntimeError("no default chat model configured")

    def delete_datasets(self, ids):
        self.deleted.append(ids)


def test_service_path_scores_retrieval_and_cleans_up(monkeypatch):
    """连服务那条路（建库、上传、解析、检索、问答、清理）用 SDK 替身走一遍。

    替身返回金标块时 recall@5 = 1，返回另一篇文档的块时 = 0（同一个测试里的对照）；对话助手不可用时
    answer_accuracy=None 而不是整体失败；两次都删掉了本次建的知识库。
    连上服务时的结论（RAGFlow recall@5 不比本地 BM25 差）对前者成立、对后者不成立：基线是真的在量。
    """
    import dataclasses
    import logging

    import ragflow_sdk

    from common import cli

    mod = load_script(SCRIPT)
    monkeypatch.setattr(ragflow_sdk, "RAGFlow", _FakeRAGFlow)
    args = dataclasses.replace(cli.with_smoke(mod.Args(smoke=True), mod.SMOKE), model=None)
    log = logging.getLogger("test")
    payload, name_to_doc, qas, _ = mod.build_upload(args, log)
    monkeypatch.setattr(_FakeRAGFlow, "qas", {q["question"]: q for q in qas})
    recall = {}
    for gold in (True, False):
        monkeypatch.setattr(_FakeRAGFlow, "gold", gold)
        monkeypatch.setattr(_FakeRAGFlow, "made", [])
        r = mod.evaluate_on_service(args, "http://127.0.0.1:9", "ragflow-test", payload, name_to_doc, qas, log)
        recall[gold] = r["recall_at_5"]
        r["local_bm25_recall_at_5"] = mod.local_bm25_recall(args, qas)
        assert [c.check(r, "smoke")["held"] for c in mod.ONLINE_CLAIMS] == [gold], r
        assert r["docs_parsed"] == len(payload) and r["answer_accuracy"] is None
        assert _FakeRAGFlow.made[0].deleted == [["ds-1"]]
    assert recall[True] == 1.0 > recall[False] == 0.0
