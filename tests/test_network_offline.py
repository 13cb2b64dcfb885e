"""默认路径不联网：在网络守卫下加载三档模型与默认向量模型、生成、切块检索。"""
import os
import subprocess
import sys

from tests.conftest import REPO

CODE = """
from common import models, retrieval
for name in ("tiny-qwen2", "tiny-llama", "tiny-glm", "smollm2-135m"):
    m, t = models.load(name)
    enc = t("hello", return_tensors="pt")
    m.generate(**enc, max_new_tokens=2, do_sample=False)
emb = retrieval.load_embedder()
print(retrieval.embed(emb, ["退货政策", "return policy"]).shape)
print("OK")
"""


def test_default_paths_open_no_network(tmp_path, tiny_models):
    log = tmp_path / "net.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "netguard"), "NETGUARD_LOG": str(log)}
    env.pop("HF_HUB_OFFLINE", None)   # 即使用户没设离线变量，common 也默认离线
    env.pop("TRANSFORMERS_OFFLINE", None)
    p = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout
    assert not log.exists(), f"有代码尝试联网：{log.read_text()}"


def test_guard_really_blocks(tmp_path):
    """守卫本身有效：否则上面的测试不可能失败。"""
    log = tmp_path / "net.log"
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "netguard"), "NETGUARD_LOG": str(log)}
    code = ("import socket\ntry:\n    socket.create_connection(('example.com', 80), timeout=2)\n"
            "except OSError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], env=env, timeout=60)
    assert log.exists() and "example.com" in log.read_text()
