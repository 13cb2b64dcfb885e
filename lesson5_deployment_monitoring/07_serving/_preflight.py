"""第 5 课 07 的两个脚本（chat_server.py、load_test.py）共用：起服务子进程之前，在本进程里查 --model / --adapter。

服务在子进程里加载模型：坏目录要等子进程启动、失败，错误只留在 server.log 里，父进程只知道"服务没能启动"。
这里不加载模型（那是子进程的事，大模型加载一次就够久了），只做不花时间的检查（models.check_dir）：目录、
config，权重文件只读 safetensors 的文件头（几 KB），截断、损坏、随便什么字节都在这里一行报出。
"""
from __future__ import annotations

from common import models


def check_model(name: str, source: str) -> None:
    """--model：内置名、本地目录或 hub id 先解析成本地目录（需要时下载，子进程随后直接用缓存），再查目录与权重。"""
    # 先 resolve 成本地目录：check_dir 只认目录，直接把 hub id 交给它会被当成"不存在的目录"拒绝
    models.check_dir(models.resolve(name, source))   # 目录、config、safetensors 文件头


def check_adapter(name: str) -> None:
    """--adapter：adapter_config.json 是 JSON 对象、adapter_model.safetensors 在且读得出文件头。"""
    # adapter=True：LoRA 目录里没有完整模型的 config.json，要查的是 adapter_config.json 与 adapter 权重
    models.check_dir(name, "--adapter", adapter=True)
