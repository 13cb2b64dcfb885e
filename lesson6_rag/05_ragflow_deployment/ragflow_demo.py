"""RAGFlow 部署与评测：docker compose 起一套 RAGFlow，再用官方 ragflow-sdk 建知识库、上传、解析、检索、问答并打分。

运行：
  python lesson6_rag/05_ragflow_deployment/ragflow_demo.py            # 没有服务：检查 compose 与 SDK 接线，说明不可达，退出码 0
  python lesson6_rag/05_ragflow_deployment/ragflow_demo.py --smoke    # 同上（连上服务时只问 5 题）
  python lesson6_rag/05_ragflow_deployment/ragflow_demo.py \
      --ragflow-url http://127.0.0.1:9380 --api-key ragflow-xxxx --model qwen-plus@Tongyi-Qianwen   # 真实服务
  （也可用环境变量 RAGFLOW_URL / RAGFLOW_API_KEY；服务怎么起见同目录 README.md）

你会看到：没有服务时一行"RAGFlow 不可达"，compose_ok=True、client_ok=True、docs_ready=知识库文件数；
连上服务时再给出 RAGFlow 自己切块 + 混合检索的 recall_at_5，以及它的对话助手的 answer_accuracy。
"""

import inspect
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from common import cli, metrics, retrieval, run, safety
from common.errors import UserError

HERE = Path(__file__).resolve().parent
REQUIRED_SERVICES = ("ragflow-cpu", "mysql", "minio", "redis", "es01")
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


@dataclass
class Args(retrieval.KBArgs):
    embedding_model: str = cli.arg(None, "RAGFlow 里的向量模型名（如 BAAI/bge-large-zh-v1.5@BAAI）；不填用服务端默认")
    ragflow_url: str = cli.arg(None, "RAGFlow HTTP API 地址（SVR_HTTP_PORT，如 http://127.0.0.1:9380）；或环境变量 RAGFLOW_URL")
    api_key: str = cli.arg(None, "RAGFlow API key（网页右上角头像 → API）；或环境变量 RAGFLOW_API_KEY")
    dataset_name: str = cli.arg("llm-course-kb", "在 RAGFlow 里新建的知识库名前缀（会加上时间戳）")
    top_k: int = cli.arg(5, "每题取回的块数（recall@5 需要 ≥5）", min=1)
    parse_timeout: float = cli.arg(900.0, "等待 RAGFlow 解析完全部文档的最长秒数", min=1)
    connect_timeout: float = cli.arg(3.0, "探测服务是否可达的超时秒数", min=0.1)
    keep_dataset: bool = cli.arg(False, "评测后保留知识库和对话助手（默认删掉，避免越积越多）")

    # 这里的"模型"是 RAGFlow 对话助手用的 LLM（在服务端配置），本机不加载任何模型
    smoke_model = "ragflow-server-default"
    default_model = "ragflow-server-default"


SMOKE = dict(max_questions=5)   # 冒烟：连上服务时只问 5 题


def read_env(path: Path) -> dict[str, str]:
    """读 .env 模板（KEY=VALUE），按 compose 的规则展开 ${X:-默认值}。"""
    env: dict[str, str] = {}
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if "=" not in line:
            raise UserError(f"{path}:{no}: 应为 KEY=VALUE")
        k, v = line.split("=", 1)
        env[k.strip()] = expand(v.strip().strip("'\""), env)
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """展开 ${NAME} 与 ${NAME:-默认值}。"""
    return VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or "").lstrip(":-"), text)


def check_compose(folder: Path) -> tuple[list[str], dict]:
    """解析 docker-compose.yml：服务齐全、镜像钉死版本、端口、卷、引用的变量都在 .env.example 里。"""
    import yaml

    compose_path, env_path = folder / "docker-compose.yml", folder / ".env.example"
    compose = yaml.safe_load(compose_path.read_text(encoding="utf-8"))
    env = read_env(env_path)
    problems = [f"缺少服务 {s}" for s in REQUIRED_SERVICES if s not in compose.get("services", {})]
    for no, line in enumerate(compose_path.read_text(encoding="utf-8").splitlines(), 1):
        for m in VAR.finditer(line.split(" #")[0] if not line.lstrip().startswith("#") else ""):
            if m.group(2) is None and m.group(1) not in env:
                problems.append(f"{compose_path.name}:{no}: ${{{m.group(1)}}} 不在 .env.example 里")
    declared = set(compose.get("volumes") or {})
    images = {}
    for name, svc in compose.get("services", {}).items():
        image = expand(svc.get("image", ""), env)
        images[name] = image
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if not tag or tag in FLOATING_TAGS:
            problems.append(f"{name}: 镜像 {image!r} 没有钉死版本")
        for p in svc.get("ports", []):
            host, _, inside = expand(str(p), env).rpartition(":")
            if not (host.isdigit() and inside.isdigit()):
                problems.append(f"{name}: 端口映射 {p!r} 展开后不是 宿主:容器")
        for v in svc.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("./"):
                if Path(src).suffix and not (folder / src).is_file():   # 挂载的配置文件必须随文件夹提供
                    problems.append(f"{name}: 挂载的 {src} 不存在")
            elif src not in declared:
                problems.append(f"{name}: 命名卷 {src} 没在顶层 volumes 里声明")
        if svc.get("env_file", ".env") != ".env":
            problems.append(f"{name}: env_file 应为 .env（由 .env.example 复制）")
    api_ports = [expand(str(p), env) for p in compose["services"].get("ragflow-cpu", {}).get("ports", [])]
    if not any(p.endswith(":9380") for p in api_ports):
        problems.append("ragflow-cpu 没有映射 HTTP API 端口 9380")
    return problems, {"services": sorted(compose.get("services", {})), "images": images,
                      "api_port": env.get("SVR_HTTP_PORT"), "profiles": env.get("COMPOSE_PROFILES")}


def check_client() -> tuple[list[str], str]:
    """ragflow-sdk 能导入，本脚本要调的方法都在、参数名都对（inspect.signature）。"""
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
        missing = [p for p in params if p not in inspect.signature(fn).parameters]
        if missing:
            problems.append(f"{cls}.{meth} 缺少参数 {missing}")
    return problems, ragflow_sdk.__version__


def is_hit(chunk, qa: dict, rid_to_doc: dict[str, str]) -> bool:
    """RAGFlow 自己切的块：来自金标文档，且与金标段落（SQuAD 式规范化后）互相包含。"""
    if qa.get("doc_id") and rid_to_doc.get(chunk.document_id) != qa["doc_id"]:
        return False
    gold = qa.get("gold_passage")
    return not gold or metrics.contains_answer(chunk.content, gold) or metrics.contains_answer(gold, chunk.content)


def list_all(ds) -> list:
    """分页列出知识库里的全部文档（解析状态在 run / progress 上）。"""
    out, page = [], 1
    while True:
        batch = ds.list_documents(page=page, page_size=100)
        out += batch
        if len(batch) < 100:
            return out
        page += 1


def main(args: Args) -> dict:
    # 秘密不落盘：--api-key 与 URL 里的账号密码先拿走（sys.argv 里也抹成 ***），argv.txt / config.json / 日志里都没有
    args, secret = safety.scrub(cli.with_smoke(args, SMOKE))
    out = run.start(__file__, args)
    log = out.log

    # 1. 部署文件：compose 能解析、服务齐全、镜像版本钉死、变量都有定义
    compose_problems, compose_info = check_compose(HERE)
    for p in compose_problems:
        log.error(f"compose: {p}")
    log.info(f"compose: {len(compose_info['services'])} 个服务，RAGFlow 镜像 {compose_info['images'].get('ragflow-cpu')}")

    # 2. 客户端接线：SDK 方法签名与本脚本的调用一致
    client_problems, sdk_version = check_client()
    for p in client_problems:
        log.error(f"ragflow-sdk: {p}")

    # 3. 真的构建上传内容：读出知识库每个文件的字节，按 SDK 的 multipart 格式编码（不发送）
    import requests

    docs, _, qas = retrieval.load_kb(args.docs, args.qa, max_questions=args.max_questions)
    payload = [{"display_name": d.id.replace("/", "__"), "blob": d.path.read_bytes()} for d in docs]
    name_to_doc = {p["display_name"]: d.id for p, d in zip(payload, docs)}
    body = requests.Request("POST", "http://ragflow.invalid/api/v1/datasets/x/documents",
                            files=[("file", (p["display_name"], p["blob"])) for p in payload]).prepare().body
    log.info(f"知识库 {len(payload)} 个文件 {sum(len(p['blob']) for p in payload)} 字节（multipart {len(body)} 字节），"
             f"问答 {len(qas)} 题")
    result = {"reachable": False, "compose_ok": not compose_problems, "client_ok": not client_problems,
               "docs_ready": len(payload), "docs_bytes": sum(len(p["blob"]) for p in payload),
               "upload_body_bytes": len(body), "questions": len(qas), "ragflow_sdk": sdk_version,
               "compose": compose_info}

    # 4. 服务可达吗？没给地址 / 连不上：一行说明，退出码 0（离线也能跑完这一课的检查部分）
    url = (secret.get("ragflow_url") or args.ragflow_url or os.environ.get("RAGFLOW_URL") or "").rstrip("/")
    key = secret.get("api_key") or os.environ.get("RAGFLOW_API_KEY")
    shown = safety.redact_url(url)   # http://user:密码@host 里的账号密码同样是秘密：日志和 metrics 只写 ***
    if not url:
        log.info("RAGFlow 不可达：没有给 --ragflow-url（或环境变量 RAGFLOW_URL）；按 README 用 docker compose 启动后再试")
        return out.finish(result)
    u = urlparse(url)
    try:
        _ = u.port   # 端口不是数字时 urlparse 在这里才报 ValueError
    except ValueError:
        raise UserError(f"--ragflow-url {shown!r}: 端口不是数字") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UserError(f"--ragflow-url {shown!r}: 应形如 http://127.0.0.1:9380")
    try:
        probe = requests.get(f"{url}/api/v1/datasets", params={"page_size": 1}, timeout=args.connect_timeout,
                             headers={"Authorization": f"Bearer {key or ''}"})
    except requests.RequestException as e:
        log.info(f"RAGFlow 不可达：{shown}（{type(e).__name__}）；服务起来了吗？docker compose ps 看看")
        return out.finish({**result, "ragflow_url": shown})
    try:
        code, message = probe.json().get("code"), probe.json().get("message")
    except ValueError:
        raise UserError(f"--ragflow-url {shown}: 有应答（HTTP {probe.status_code}）但不是 RAGFlow API；"
                        "应指向 SVR_HTTP_PORT（默认 9380），不是网页端口") from None
    if not key or code != 0:
        raise UserError(f"--api-key: RAGFlow 拒绝了请求（{message or '没有给 key'}）；在网页右上角头像 → API 里生成")
    result["reachable"] = True
    if compose_problems or client_problems:
        raise UserError("compose 或 ragflow-sdk 检查未通过（见上面的错误），先修好再连服务")

    # 5. 建知识库、上传、异步解析；轮询解析状态，带截止时间
    from ragflow_sdk import Chat, RAGFlow

    rag = RAGFlow(api_key=key, base_url=url)
    ds, chat = None, None
    try:
        ds = rag.create_dataset(name=f"{args.dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                embedding_model=args.embedding_model, chunk_method="naive")
        uploaded = []
        for i in range(0, len(payload), 8):        # 分批上传，单个请求不至于太大
            uploaded += ds.upload_documents(payload[i:i + 8])
        rid_to_doc = {d.id: name_to_doc.get(d.name, d.name) for d in uploaded}
        ds.async_parse_documents([d.id for d in uploaded])
        t0, deadline = time.monotonic(), time.monotonic() + args.parse_timeout
        while True:
            states = {d.id: (str(d.run).upper(), float(d.progress or 0)) for d in list_all(ds)}
            finished = [i for i, (r, p) in states.items() if r in ("DONE", "FAIL", "CANCEL") or p >= 1.0]
            if len(finished) >= len(uploaded) or time.monotonic() > deadline:
                break
            log.info(f"解析中 {len(finished)}/{len(uploaded)} …")
            time.sleep(3)
        parsed = sum(r == "DONE" or p >= 1.0 for r, p in states.values())
        if len(finished) < len(uploaded):
            log.warning(f"解析超过 --parse-timeout {args.parse_timeout:.0f} 秒：只用已解析的 {parsed} 篇评测")
        result.update(docs_parsed=parsed, parse_seconds=round(time.monotonic() - t0, 1))

        # 6. 检索：RAGFlow 的混合检索（关键词 + 向量），按金标段落 / 文档判命中
        hits = []
        for qa in qas:
            chunks = rag.retrieve(dataset_ids=[ds.id], question=qa["question"], page_size=args.top_k,
                                  similarity_threshold=0.0, top_k=1024)
            hits.append([is_hit(c, qa, rid_to_doc) for c in chunks[:args.top_k]])
        result.update(recall_at_5=round(retrieval.recall_at_k(hits, 5), 4), mrr=round(retrieval.mrr(hits), 4))

        # 7. 问答：RAGFlow 的对话助手（LLM 在服务端配置）；答案规范化后包含金标答案即算对
        try:
            llm = Chat.LLM(rag, {"model_name": args.model}) if args.model else None
            chat = rag.create_chat(name=f"{ds.name}-chat", dataset_ids=[ds.id], llm=llm)
            session = chat.create_session("course-eval")
            answers = [next(iter(session.ask(qa["question"], stream=False))).content for qa in qas]
            result["answer_accuracy"] = round(sum(metrics.contains_answer(a, qa["answer"])
                                                  for qa, a in zip(qas, answers)) / max(1, len(qas)), 4)
        except Exception as e:  # noqa: BLE001 - 最常见：服务端还没配置默认对话模型
            log.warning(f"对话助手不可用（{str(e)[:150]}）：在网页的 模型供应商 里配置 LLM 后再试")
            result["answer_accuracy"] = None
    except Exception as e:  # noqa: BLE001 - SDK 把服务端的拒绝原因放在异常消息里，换成一行
        raise UserError(f"RAGFlow 返回错误：{str(e)[:200]}") from None
    finally:
        if not args.keep_dataset:
            if chat is not None:
                rag.delete_chats(ids=[chat.id])
            if ds is not None:
                rag.delete_datasets(ids=[ds.id])
    return out.finish({**result, "ragflow_url": shown},
                      summary=f"recall@5={result['recall_at_5']}, answer_accuracy={result['answer_accuracy']}, "
                              f"docs_parsed={result['docs_parsed']}/{len(payload)}")


if __name__ == "__main__":
    main(cli.parse(Args))
