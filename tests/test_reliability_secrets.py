"""可靠性 · 秘密（issue 8 第 10 项）：API key、token、密码只从环境变量或参数来，绝不写进输出。

埋一个独一无二的假 key，跑真实脚本，然后在它的整个输出目录（argv.txt、config.json、metrics.json、日志、
mlflow 的 sqlite 库……）和 stdout/stderr 里逐字节找：一处都不许有。
"""
import os
import socket
import subprocess
import sys

import pytest

from common import safety
from tests.conftest import REPO, load_script

PLANTED = "sk-planted-7f3a9c2e5b1d4f60"        # 假 key：足够特别，出现即泄漏
PLANTED_PW = "pw-planted-91c0e4d2aa"


def _leaks(folder, secrets: list[str]) -> list[str]:
    """在一个输出目录的所有文件里逐字节找秘密值；返回 "文件: 秘密前 4 位…" 列表。"""
    files = [f for f in sorted(folder.rglob("*")) if f.is_file() and not f.is_symlink()]
    return [f"{f}: {s[:4]}…" for f in files for s in secrets if s.encode() in f.read_bytes()]


def test_redaction_helpers():
    argv = ["x.py", "--api-key", PLANTED, f"--hf-token={PLANTED}", "--lr", "1", "--config", "c.yaml"]
    assert safety.redact_argv(argv) == ["x.py", "--api-key", "***", "--hf-token=***", "--lr", "1", "--config",
                                        "c.yaml"]
    url = f"http://alice:{PLANTED_PW}@127.0.0.1:9380/api/v1"
    assert safety.redact_url(url) == "http://***@127.0.0.1:9380/api/v1"
    assert PLANTED_PW not in safety._redact_text(f"连不上 {url}")
    assert safety._is_secret_name("WANDB_API_KEY") and safety._is_secret_name("MLFLOW_TRACKING_PASSWORD")


def test_scrub_removes_secret_fields_and_argv(monkeypatch):
    mod = load_script("lesson6_rag/05_ragflow_deployment/ragflow_demo.py")
    monkeypatch.setattr(sys, "argv", ["ragflow_demo.py", "--api-key", PLANTED, "--smoke"])
    args, found = safety.scrub(mod.Args(smoke=True, api_key=PLANTED))
    assert args.api_key is None and found == {"api_key": PLANTED}
    assert PLANTED not in " ".join(sys.argv)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]          # 关掉后这个端口上没人监听：连接立即被拒


def _run(args: list[str], env_extra: dict, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env)


def test_ragflow_key_from_flag_and_url_never_reach_the_outputs(tmp_path):
    out = tmp_path / "out"
    url = f"http://alice:{PLANTED_PW}@127.0.0.1:{_closed_port()}"
    p = _run([str(REPO / "lesson6_rag/05_ragflow_deployment/ragflow_demo.py"), "--smoke", "--api-key", PLANTED,
              "--ragflow-url", url, "--output-dir", str(out)], {}, tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "metrics.json").is_file() and (out / "argv.txt").is_file()
    assert _leaks(out, [PLANTED, PLANTED_PW]) == []
    assert PLANTED not in p.stdout + p.stderr and PLANTED_PW not in p.stdout + p.stderr
    assert "--api-key ***" in (out / "argv.txt").read_text(encoding="utf-8")


@pytest.mark.slow
def test_tracking_keys_from_env_never_reach_the_outputs(tmp_path, tiny_models):
    """W&B / MLflow / HF / RAGFlow 的 key 放在环境变量里，跑一次带 mlflow 跟踪的训练：输出里找不到它们。"""
    out = tmp_path / "out"
    env = {k: f"{PLANTED}-{k.lower()}" for k in safety._SECRET_ENV}
    env["WANDB_MODE"] = "offline"
    p = _run([str(REPO / "lesson1_sft/03_hf_finetune/hf_finetune_scaffold.py"), "--smoke", "--max-steps", "4",
              "--report-to", "mlflow", "--output-dir", str(out)], env, tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "metrics.json").is_file() and (out / "mlflow.db").is_file()
    assert _leaks(out, list(env.values())[:-1]) == []
    assert PLANTED not in p.stdout + p.stderr
