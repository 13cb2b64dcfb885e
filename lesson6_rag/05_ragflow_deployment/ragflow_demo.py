"""RAGFlow 部署与评测：docker compose 起一套 RAGFlow，再用官方 ragflow-sdk 建知识库、上传、解析、检索、问答并打分。

运行：
  python lesson6_rag/05_ragflow_deployment/ragflow_demo.py          # 没有服务：检查 compose 与 SDK 接线，退出码 0
  python lesson6_rag/05_ragflow_deployment/ragflow_demo.py --smoke  # 同上（连上服务时只问 5 题）
  python lesson6_rag/05_ragflow_deployment/ragflow_demo.py \
      --ragflow-url http://127.0.0.1:9380 --api-key ragflow-xxxx --model qwen-plus@Tongyi-Qianwen   # 真实服务
  （也可用环境变量 RAGFLOW_URL / RAGFLOW_API_KEY；服务怎么起见同目录 README.md）

你会看到：没有服务时一行"RAGFlow 不可达"，compose_ok=True、client_ok=True、docs_ready=知识库文件数；
连上服务时再给出 RAGFlow 自己切块 + 混合检索的 recall_at_5（对照同一批题上本地 jieba BM25 的
local_bm25_recall_at_5），以及它的对话助手的 answer_accuracy。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（ragflow-server-default，2 核 CPU）：0.1 分钟，0.3 GB，结论 3/3 成立
  ✓ compose 文件通过部署前检查（服务齐全、镜像钉死版本、端口与卷、变量都有定义）：1（≥ 1）
  ✓ 本脚本对 ragflow-sdk 的 11 个调用与已装 SDK 的方法签名一致：1（≥ 1）
  ✓ 上传内容真的编码出来了、每个文件的字节都在里面：multipart 请求体字节 / 知识库文件总字节：1.09（≥ 1）
<!-- /results -->
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from common import answers, cli, retrieval, run, safety
from common.errors import UserError

HERE = Path(__file__).resolve().parent
# 部署前检查（compose 文件、SDK 签名）放在旁边的 _preflight.py：不连服务也能跑，一秒内发现"一定会失败"的配置
pre = run.import_sibling(__file__, "_preflight")


@dataclass
class Args(retrieval.KBArgs):
    embedding_model: str = cli.arg(None, "RAGFlow 里的向量模型名（如 BAAI/bge-large-zh-v1.5@BAAI）；不填用服务端默认")
    model: str = cli.arg(None, "RAGFlow 对话助手用的 LLM（服务端的 模型名@供应商，如 qwen-plus@Tongyi-Qianwen）；"
                               "不填用服务端默认。本机不加载任何模型")
    ragflow_url: str = cli.arg(None, "RAGFlow HTTP API 地址（SVR_HTTP_PORT，如 http://127.0.0.1:9380）；"
                                     "或环境变量 RAGFLOW_URL")
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
# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；这三条离线也能检查（部署文件、SDK 接线、上传内容）
CLAIMS = [
    run.Claim("compose 文件通过部署前检查（服务齐全、镜像钉死版本、端口与卷、变量都有定义）",
              "compose_ok", ">=", 1, 1),
    run.Claim("本脚本对 ragflow-sdk 的 11 个调用与已装 SDK 的方法签名一致", "client_ok", ">=", 1, 1),
    run.Claim("上传内容真的编码出来了、每个文件的字节都在里面：multipart 请求体字节 / 知识库文件总字节",
              "upload_body_bytes / docs_bytes", ">=", 1.0, 1.0),
]
# 连上服务时多一条：RAGFlow 自己切块 + 混合检索，对照同一批题、同一种命中判定下本地 jieba BM25 的 recall@5
# （冒烟只问 5 题，一题就是 0.2：冒烟时允许差一题）
ONLINE_CLAIMS = [
    run.Claim("RAGFlow 的混合检索不比本地 BM25 差：RAGFlow − 本地 BM25 的 recall@5（同一批题、同一种命中判定）",
              "recall_at_5 - local_bm25_recall_at_5", ">=", -0.2, -0.05),
]


def is_hit(chunk, qa: dict, rid_to_doc: dict[str, str]) -> bool:
    """RAGFlow 自己切的块：来自金标文档，且与金标段落（SQuAD 式规范化后）互相包含。

    不能用 common.retrieval.is_hit 的字符区间判定：RAGFlow 自己切块，不告诉我们块在原文里的起点。
    """
    # 有 doc_id 时先看块出自哪篇：金标段落可能是一句常见话，别的文档里碰巧出现同一句不算命中
    if qa.get("doc_id") and rid_to_doc.get(chunk.document_id) != qa["doc_id"]:
        return False
    gold = qa.get("gold_passage")
    # 没有金标段落的题只按文档判；"互相包含"是因为 RAGFlow 的块可能包住金标（块更长），
    # 也可能只是金标的一部分（金标被切开）
    return not gold or answers.contains_answer(chunk.content, gold) or answers.contains_answer(gold, chunk.content)


def local_bm25_recall(args: Args, qas: list[dict], k: int = 5) -> float:
    """同一批题在本地 jieba BM25（第 02 课的 recursive 切块，300 字）上的 recall@k：RAGFlow 的检索该比过的基线。

    命中用与 RAGFlow 相同的 is_hit（来自金标文档、与金标段落互相包含）：两边用同一把尺子，差值才只来自检索本身。
    """
    from types import SimpleNamespace

    docs, _, _ = retrieval.load_kb(args.docs, args.qa)
    # 切块参数写死成 300 / 50（与 02、04 课的默认一致）：本脚本没有 --chunk-size，RAGFlow 那边的切块由服务端决定
    chunks = retrieval.chunk_documents(docs, 300, 50)
    # 本地块的 document_id 就是 doc_id：给 is_hit 一张恒等映射，两边才能共用同一个命中判定
    bm25, same_id = retrieval.BM25Index([c.text for c in chunks]), {d.id: d.id for d in docs}
    # SimpleNamespace 假扮 RAGFlow 的 Chunk：is_hit 只用到 document_id 与 content 两个属性
    hits = [[is_hit(SimpleNamespace(document_id=chunks[i].doc_id, content=chunks[i].text), qa, same_id)
             for i, _ in bm25.search(qa["question"], k)] for qa in qas]
    return round(retrieval.recall_at_k(hits, k), 4)


def list_all(ds) -> list:
    """分页列出知识库里的全部文档（解析状态在 run / progress 上）：只取第一页，文档多于一页时永远"解析不完"。"""
    out, page = [], 1
    while True:
        # page_size 与下面 len(batch) < 100 的 100 必须是同一个数：一页没装满，才说明这是最后一页
        batch = ds.list_documents(page=page, page_size=100)
        out += batch
        if len(batch) < 100:
            return out
        page += 1


def preflight(log) -> dict:
    """部署文件与客户端接线：compose 能解析、服务齐全、镜像钉死、变量有定义；SDK 方法签名与本脚本的调用一致。"""
    compose_problems, compose_info = pre.check_compose(HERE)
    for p in compose_problems:
        log.error(f"compose: {p}")
    log.info(f"compose: {len(compose_info['services'])} 个服务，"
             f"RAGFlow 镜像 {compose_info['images'].get('ragflow-cpu')}")
    client_problems, sdk_version = pre.check_client()
    for p in client_problems:
        log.error(f"ragflow-sdk: {p}")
    return {"compose_ok": not compose_problems, "client_ok": not client_problems, "ragflow_sdk": sdk_version,
            "compose": compose_info}


def build_upload(args: Args, log) -> tuple[list[dict], dict, list[dict], dict]:
    """读出知识库每个文件的字节，按 SDK 的 multipart 格式编码（不发送）。返回 (上传内容, 文件名→文档 id, 问答, 大小)。

    离线时也真的编码一遍：文件读不了、编码出错，在这里就暴露，而不是连上服务、建好知识库之后。
    """
    import requests

    docs, _, qas = retrieval.load_kb(args.docs, args.qa, max_questions=args.max_questions)
    # RAGFlow 的文档名不能带 "/"：子文件夹的相对路径换成 "__"，再用 name_to_doc 换回金标里的 doc_id
    # 上传原始字节而不是解析后的文本：PDF / HTML 的版面分析交给 RAGFlow 自己做，这正是要评测的一部分
    payload = [{"display_name": d.id.replace("/", "__"), "blob": d.path.read_bytes()} for d in docs]
    name_to_doc = {p["display_name"]: d.id for p, d in zip(payload, docs)}
    # .invalid 是保留域名（RFC 2606），永远解析不到：这里只 prepare() 出请求体量字节数，不会真的发出去
    body = requests.Request("POST", "http://ragflow.invalid/api/v1/datasets/x/documents",
                            files=[("file", (p["display_name"], p["blob"])) for p in payload]).prepare().body
    log.info(f"知识库 {len(payload)} 个文件 {sum(len(p['blob']) for p in payload)} 字节"
             f"（multipart {len(body)} 字节），问答 {len(qas)} 题")
    return payload, name_to_doc, qas, {"docs_ready": len(payload), "docs_bytes": sum(len(p["blob"]) for p in payload),
                                       "upload_body_bytes": len(body), "questions": len(qas)}


def probe(url: str, key: str | None, shown: str, timeout: float) -> str | None:
    """服务可达且 key 有效时返回 None；连不上时返回异常类名（ConnectionError = 端口没人听，ConnectTimeout = 超时）。

    地址写错、key 被拒是用户的错：UserError 一行说清；连不上则不是错——离线也要能跑完这一课的检查部分。
    """
    import requests

    u = urlparse(url)
    try:
        _ = u.port   # 端口不是数字时 urlparse 在这里才报 ValueError
    except ValueError:
        raise UserError(f"--ragflow-url {shown!r}: 端口不是数字") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UserError(f"--ragflow-url {shown!r}: 应形如 http://127.0.0.1:9380")
    try:
        # 列 1 个知识库就够：这个接口要鉴权，一次请求同时验证了"地址可达"和"key 有效"
        resp = requests.get(f"{url}/api/v1/datasets", params={"page_size": 1}, timeout=timeout,
                            headers={"Authorization": f"Bearer {key or ''}"})
    except requests.RequestException as e:
        return type(e).__name__
    try:
        code, message = resp.json().get("code"), resp.json().get("message")
    except ValueError:   # 最常见：指到了网页端口（nginx 返回 HTML）
        raise UserError(f"--ragflow-url {shown}: 有应答（HTTP {resp.status_code}）但不是 RAGFlow API；"
                        "应指向 SVR_HTTP_PORT（默认 9380），不是网页端口") from None
    # RAGFlow 把结果码放在返回体的 code 里（0 = 成功）：只看 HTTP 状态码，会把"key 无效"当成可达
    if not key or code != 0:
        raise UserError(f"--api-key: RAGFlow 拒绝了请求（{message or '没有给 key'}）；在网页右上角头像 → API 里生成")
    return None


def upload_and_parse(ds, payload: list[dict], name_to_doc: dict, timeout: float, log) -> tuple[dict, dict]:
    """上传、异步解析，轮询解析状态直到全部结束或超过截止时间。返回 (RAGFlow 文档 id→doc_id, 解析统计)。"""
    uploaded = []
    for i in range(0, len(payload), 8):        # 分批上传，单个请求不至于太大
        uploaded += ds.upload_documents(payload[i:i + 8])
    # RAGFlow 给每个文档另发一个 id：映射回知识库的 doc_id，命中判定才对得上金标
    rid_to_doc = {d.id: name_to_doc.get(d.name, d.name) for d in uploaded}
    ds.async_parse_documents([d.id for d in uploaded])
    # 解析（版面分析、切块、向量化）在服务端的任务队列里异步跑，CPU 上可能要几分钟：轮询 + 截止时间，不死等
    t0, deadline = time.monotonic(), time.monotonic() + timeout
    while True:
        states = {d.id: (str(d.run).upper(), float(d.progress or 0)) for d in list_all(ds)}
        # 失败、取消也算结束：只等 DONE 的话，一篇解析失败就会一直等到 --parse-timeout
        finished = [i for i, (r, p) in states.items() if r in ("DONE", "FAIL", "CANCEL") or p >= 1.0]
        if len(finished) >= len(uploaded) or time.monotonic() > deadline:
            break
        log.info(f"解析中 {len(finished)}/{len(uploaded)} …")
        time.sleep(3)   # 每 3 秒查一次：解析以分钟计，查得更勤只会给服务端添负担
    parsed = sum(r == "DONE" or p >= 1.0 for r, p in states.values())
    if len(finished) < len(uploaded):   # 超时不报错：用已解析的部分评测，日志里说清楚
        log.warning(f"解析超过 --parse-timeout {timeout:.0f} 秒：只用已解析的 {parsed} 篇评测")
    return rid_to_doc, {"docs_parsed": parsed, "parse_seconds": round(time.monotonic() - t0, 1)}


def eval_retrieval(rag, ds, qas: list[dict], rid_to_doc: dict, top_k: int) -> dict:
    """RAGFlow 的混合检索（关键词 + 向量），按金标段落 / 文档判命中，算 recall@5 与 MRR。"""
    hits = []
    for qa in qas:
        # similarity_threshold=0：不让服务端先按分数滤掉块，否则 recall 量的是"阈值"而不是检索排序
        # top_k 是服务端参与相似度计算的候选数（SDK 默认值就是 1024），page_size 才是返回的块数
        chunks = rag.retrieve(dataset_ids=[ds.id], question=qa["question"], page_size=top_k,
                              similarity_threshold=0.0, top_k=1024)
        hits.append([is_hit(c, qa, rid_to_doc) for c in chunks[:top_k]])
    return {"recall_at_5": round(retrieval.recall_at_k(hits, 5), 4), "mrr": round(retrieval.mrr(hits), 4)}


def eval_chat(rag, ds, qas: list[dict], model: str | None, keep: bool, log) -> float | None:
    """RAGFlow 的对话助手（LLM 在服务端配置）逐题作答；答案规范化后包含金标答案即算对。对话助手不可用时返回 None。"""
    from ragflow_sdk import Chat

    chat = None
    try:
        llm = Chat.LLM(rag, {"model_name": model}) if model else None
        chat = rag.create_chat(name=f"{ds.name}-chat", dataset_ids=[ds.id], llm=llm)
        session = chat.create_session("course-eval")
        # Session.ask 的函数体里有 yield：stream=False 时也返回一个生成器（只产出一条完整回答），next 取出它
        replies = [next(iter(session.ask(qa["question"], stream=False))).content for qa in qas]
        return round(sum(answers.contains_answer(a, qa["answer"]) for qa, a in zip(qas, replies)) / max(1, len(qas)),
                     4)
    except Exception as e:  # noqa: BLE001 - 最常见：服务端还没配置默认对话模型；检索的结果照样有用，不整体失败
        log.warning(f"对话助手不可用（{str(e)[:150]}）：在网页的 模型供应商 里配置 LLM 后再试")
        return None
    finally:
        if chat is not None and not keep:   # 每次运行都建一个新助手：不删会在网页里越积越多
            rag.delete_chats(ids=[chat.id])


def evaluate_on_service(args: Args, url: str, key: str, payload: list[dict], name_to_doc: dict, qas: list[dict],
                        log) -> dict:
    """建知识库（名字带时间戳，不碰已有的）、上传解析、检索评测、问答评测；结束时删掉本次建的知识库。"""
    from ragflow_sdk import RAGFlow

    rag, ds = RAGFlow(api_key=key, base_url=url), None
    try:
        # chunk_method="naive" 是 RAGFlow 的通用切块（按长度与分隔符），与本地的 recursive 切块最接近，比较才公平
        ds = rag.create_dataset(name=f"{args.dataset_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                embedding_model=args.embedding_model, chunk_method="naive")
        rid_to_doc, parse_stats = upload_and_parse(ds, payload, name_to_doc, args.parse_timeout, log)
        retrieval_stats = eval_retrieval(rag, ds, qas, rid_to_doc, args.top_k)
        accuracy = eval_chat(rag, ds, qas, args.model, args.keep_dataset, log)
        return {**parse_stats, **retrieval_stats, "answer_accuracy": accuracy}
    except Exception as e:  # noqa: BLE001 - SDK 把服务端的拒绝原因放在异常消息里，换成一行
        raise UserError(f"RAGFlow 返回错误：{str(e)[:200]}") from None
    finally:
        if ds is not None and not args.keep_dataset:
            rag.delete_datasets(ids=[ds.id])


def main(args: Args) -> dict:
    # 秘密不落盘：--api-key 与 URL 里的账号密码先拿走（sys.argv 里也抹成 ***），argv.txt / config.json / 日志里都没有
    args, secret = safety.scrub(cli.with_smoke(args, SMOKE))
    out = run.start(__file__, args)
    log = out.log
    # --model 是服务端的模型名：给了本地路径多半是把别的课的用法搬了过来，悄悄交给服务只会在对话那步才失败
    if args.model and (args.model.startswith(("/", ".", "~")) or os.path.lexists(args.model)):
        raise UserError(f"--model {args.model}: 这里要的是 RAGFlow 服务端的对话模型名（如 qwen-plus@Tongyi-Qianwen），"
                        "不是本地路径：本机不加载任何模型")

    # 1. 部署文件与客户端接线：compose 能解析、服务齐全、镜像版本钉死、变量都有定义；SDK 签名与本脚本的调用一致
    checks = preflight(log)

    # 2. 真的构建上传内容：读出知识库每个文件的字节，按 SDK 的 multipart 格式编码（不发送）
    payload, name_to_doc, qas, sizes = build_upload(args, log)
    result = {"reachable": False, "compose_ok": checks["compose_ok"], "client_ok": checks["client_ok"], **sizes,
              "ragflow_sdk": checks["ragflow_sdk"], "compose": checks["compose"]}

    # 3. 服务可达吗？没给地址 / 连不上：一行说明，退出码 0（离线也能跑完这一课的检查部分）
    # 先取 safety.scrub 收走的原值：args 里的 key 已是 None、带账号密码的 URL 已脱敏成 ***，直接用会连不上
    url = (secret.get("ragflow_url") or args.ragflow_url or os.environ.get("RAGFLOW_URL") or "").rstrip("/")
    key = secret.get("api_key") or os.environ.get("RAGFLOW_API_KEY")
    shown = safety.redact_url(url)   # http://user:密码@host 里的账号密码同样是秘密：日志和 metrics 只写 ***
    if not url:
        log.info("RAGFlow 不可达：没有给 --ragflow-url（或环境变量 RAGFLOW_URL）；"
                 "按 README 用 docker compose 启动后再试")
        return out.finish(result, claims=CLAIMS)
    error = probe(url, key, shown, args.connect_timeout)
    if error:
        log.info(f"RAGFlow 不可达：{shown}（{error}）；服务起来了吗？docker compose ps 看看")
        return out.finish({**result, "ragflow_url": shown, "probe_error": error}, claims=CLAIMS)
    result["reachable"] = True
    if not (checks["compose_ok"] and checks["client_ok"]):   # 配置有错还连服务，只会得到更难懂的错误
        raise UserError("compose 或 ragflow-sdk 检查未通过（见上面的错误），先修好再连服务")

    # 4. 在服务上评测：建知识库、上传、解析，RAGFlow 自己的混合检索与对话助手，各自打分
    result.update(evaluate_on_service(args, url, key, payload, name_to_doc, qas, log))
    result["local_bm25_recall_at_5"] = local_bm25_recall(args, qas)   # 同一批题的本地基线
    return out.finish({**result, "ragflow_url": shown}, claims=CLAIMS + ONLINE_CLAIMS,
                      summary=f"recall@5={result['recall_at_5']}（本地 BM25 {result['local_bm25_recall_at_5']}）, "
                              f"answer_accuracy={result['answer_accuracy']}, "
                              f"docs_parsed={result['docs_parsed']}/{len(payload)}")


if __name__ == "__main__":
    main(cli.parse(Args))
