"""第 6 课 05 的部署前检查：不连服务、不起容器，先把"一定会失败"的配置挑出来。

docker compose 起一套 RAGFlow 要拉几 GB 镜像、等几分钟；镜像没钉版本、变量没定义、SDK 签名变了这类错，
在这里一秒内就能发现，不必等到容器起完、第一次调用时才看到一行看不懂的 500。
"""
from __future__ import annotations

import inspect
import re
from pathlib import Path

from common.errors import UserError

# RAGFlow 的五件套：少了任何一个，ragflow 容器起得来、却在第一次上传或检索时才报错
REQUIRED_SERVICES = ("ragflow-cpu", "mysql", "minio", "redis", "es01")
# 浮动标签：今天能跑的 compose，下周 pull 到新版本就可能起不来（RAGFlow 各版本的表结构、配置项都变过）
FLOATING_TAGS = {"latest", "nightly", "dev", "main", "stable", "edge"}
VAR = re.compile(r"\$\{(\w+)(:?-[^}]*)?\}")          # ${NAME} / ${NAME:-默认值} / ${NAME-默认值}
# 本脚本要调用的 SDK 方法与会传的参数：SDK 升级改了签名时，在连服务之前就能发现
SDK_CALLS = [("RAGFlow", "__init__", ("api_key", "base_url")),
             ("RAGFlow", "create_dataset", ("name", "embedding_model", "chunk_method")),
             ("DataSet", "upload_documents", ("document_list",)),
             ("DataSet", "async_parse_documents", ("document_ids",)),
             ("DataSet", "list_documents", ("page", "page_size")),
             ("RAGFlow", "retrieve", ("dataset_ids", "question", "page_size", "similarity_threshold", "top_k")),
             ("RAGFlow", "create_chat", ("name", "dataset_ids", "llm")),
             ("Chat", "create_session", ("name",)),
             ("Session", "ask", ("question", "stream")),
             ("RAGFlow", "delete_chats", ("ids",)),
             ("RAGFlow", "delete_datasets", ("ids",))]


def read_env(path: Path) -> dict[str, str]:
    """读 .env 模板（KEY=VALUE），按 compose 的规则展开 ${X:-默认值}。"""
    env: dict[str, str] = {}
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "=" not in line:
            raise UserError(f"{path}:{no}: 应为 KEY=VALUE")
        k, v = line.split("=", 1)
        # 按出现顺序展开：后面的变量可以引用前面的（.env.example 里 ${SVR_HTTP_PORT} 之类），与 compose 一致
        # .env 里的值可以带引号：compose 会去掉外层引号，这里也去掉，否则 "9380" 带着引号就不是数字端口
        env[k.strip()] = expand(v.strip().strip("'\""), env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """展开 ${NAME} 与 ${NAME:-默认值}（未定义或为空都取默认值；严格说 ${NAME-默认值} 只在未定义时取，这里不区分）。"""
    # lstrip(":-") 去掉 :- 或 - 前缀；代价是以 - 开头的默认值（${X:--1}）会丢掉负号，
    # 本目录的 compose 与 .env 没有这种写法
    return VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or "").lstrip(":-"), text)


def check_compose(folder: Path) -> tuple[list[str], dict]:
    """解析 docker-compose.yml：服务齐全、镜像钉死版本、端口、卷、引用的变量都在 .env.example 里。"""
    import yaml

    compose_path, env_path = folder / "docker-compose.yml", folder / ".env.example"
    # safe_load 只构造普通的 dict / list，不执行 YAML 里的任意 Python 标签
    compose = yaml.safe_load(compose_path.read_text(encoding="utf-8"))
    env = read_env(env_path)
    problems = [f"缺少服务 {s}" for s in REQUIRED_SERVICES if s not in compose.get("services", {})]
    # 逐行扫变量（而不是解析后的 YAML）：报错时能给出行号；没有默认值又不在 .env 里的变量，compose 会静默换成空串
    for no, line in enumerate(compose_path.read_text(encoding="utf-8").splitlines(), 1):
        # 整行注释和行尾注释里的 ${X} 不算：注释里举例的变量 compose 不会展开
        for m in VAR.finditer(line.split(" #")[0] if not line.lstrip().startswith("#") else ""):
            if m.group(2) is None and m.group(1) not in env:   # 带默认值（:- 或 -）的变量不要求在 .env 里
                problems.append(f"{compose_path.name}:{no}: ${{{m.group(1)}}} 不在 .env.example 里")
    declared = set(compose.get("volumes") or {})
    images = {}
    for name, svc in compose.get("services", {}).items():
        image = expand(svc.get("image", ""), env)
        images[name] = image
        # 只在最后一段里找冒号：registry 地址自带的端口（host:5000/img）不会被误当成标签
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag in FLOATING_TAGS:
            problems.append(f"{name}: 镜像 {image!r} 没有钉死版本")
        # 端口写成 "${X}:80" 而 X 没定义时展开成 ":80"：不是一个能用的 宿主:容器 映射，服务不在你以为的端口上
        for p in svc.get("ports", []):
            host, _, inside = expand(str(p), env).rpartition(":")
            if not (host.isdigit() and inside.isdigit()):
                problems.append(f"{name}: 端口映射 {p!r} 展开后不是 宿主:容器")
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                if Path(src).suffix and not (folder / src).is_file():   # 挂载的配置文件必须随文件夹提供
                    problems.append(f"{name}: 挂载的 {src} 不存在")
            elif src not in declared:   # 没声明的命名卷 compose 直接拒绝启动
                problems.append(f"{name}: 命名卷 {src} 没在顶层 volumes 里声明")
        # compose 按 env_file 把变量交给容器：写成别的文件名，按 README 从 .env.example 复制出的 .env 就不会被读到
        if svc.get("env_file", ".env") != ".env":
            problems.append(f"{name}: env_file 应为 .env（由 .env.example 复制）")
    # SDK 连的是 HTTP API（9380），不是网页端口（80）：没映射出来，网页能打开、脚本却连不上
    api_ports = [expand(str(p), env) for p in compose["services"].get("ragflow-cpu", {}).get("ports", [])]
    if not any(p.endswith(":9380") for p in api_ports):
        problems.append("ragflow-cpu 没有映射 HTTP API 端口 9380")
    return problems, {"services": sorted(compose.get("services", {})), "images": images,
                      "api_port": env.get("SVR_HTTP_PORT"), "profiles": env.get("COMPOSE_PROFILES")}


def check_client() -> tuple[list[str], str]:
    """ragflow-sdk 能导入，本脚本要调的方法都在、参数名都对（inspect.signature）。

    SDK 的方法用关键字参数调用：参数改名后旧名字只会在真正调用时才报 TypeError——那时知识库已经建了一半。
    """
    try:
        import ragflow_sdk
        from ragflow_sdk.modules.session import Session
    except ImportError as e:
        return [f"无法导入 ragflow_sdk（{e}）：pip install ragflow-sdk==0.22.1"], ""
    classes = {"RAGFlow": ragflow_sdk.RAGFlow, "DataSet": ragflow_sdk.DataSet, "Chat": ragflow_sdk.Chat,
               "Session": Session}
    problems = []
    for cls, meth, params in SDK_CALLS:
        fn = getattr(classes[cls], meth, None)
        if fn is None:
            problems.append(f"{cls}.{meth} 不存在")
            continue
        # 只查参数名、不查类型：本脚本按关键字传参，参数改名才是到运行时才炸的那种变化
        missing = [p for p in params if p not in inspect.signature(fn).parameters]
        if missing:
            problems.append(f"{cls}.{meth} 缺少参数 {missing}")
    return problems, ragflow_sdk.__version__
