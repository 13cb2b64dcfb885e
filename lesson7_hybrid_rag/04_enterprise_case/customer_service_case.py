"""企业客服案例（云帆知识库）：意图路由 FAQ 直答 → RAG 生成 → 转人工，多轮对话先把追问改写成独立问题。

  - 转人工：投诉、要求人工、资金纠纷等意图（中英关键词规则），或检索置信度太低（首个块与问题几乎没有共同词）；
  - FAQ：从 faq/ 文档里解析出"问题 → 答案"，BM25 找最像的一条，问题词重合度（Jaccard）够高就直接给标准答案，
    不调模型——最快也最稳；
  - RAG：BM25 + 向量 RRF 融合检索（向量权重小：英文 MiniLM 在中文上弱，见第 01 节），模型只依据资料作答并附来源；
  - 多轮：追问（"那它的电池呢？""And what about E05?"）缺主语，先与上一轮的独立问题合并成独立问题再检索
    （--condense rules；真实的大模型可用 --condense llm 让模型改写）；同时跑一遍不改写的版本做对照。
  评测用项目为本节写的留出多轮对话 data/kb/dialogues.jsonl（任何阈值都没有在它上面调过）。

运行：
  python lesson7_hybrid_rag/04_enterprise_case/customer_service_case.py            # CPU，smollm2-135m
  python lesson7_hybrid_rag/04_enterprise_case/customer_service_case.py --smoke    # 极小模型
  python lesson7_hybrid_rag/04_enterprise_case/customer_service_case.py --model Qwen/Qwen2.5-7B-Instruct --source hf \\
      --condense llm --embedding-model BAAI/bge-small-zh-v1.5 --config configs/lesson7/customer_service_case.yaml  # GPU

你会看到（留出多轮对话上）：路由准确率远高于"全猜最多的那条路"；FAQ 直答接住一部分轮次，准确率明显高于模型
生成的 RAG 一路；转人工的精确率和召回率都高；追问的检索来源准确率 改写后明显高于不改写（缺主语的追问单独检索
找不到对的文档）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：1.6 分钟，1.8 GB，结论 4/4 成立
  ✓ 追问改写让检索找对文档：改写后 − 不改写的追问来源准确率：0.4444（≥ 0.2）
  ✓ 路由胜过全猜最多的那条路：路由准确率 − 金标里最多那条路的占比：0.3929（≥ 0.3）
  ✓ 转人工又准又全：精确率与召回率中较小的 − 转人工的基础比例（随便猜的精确率）：0.8214（≥ 0.5）
  ✓ FAQ 直答比模型生成稳：FAQ 一路的准确率 − RAG 一路的准确率：0.8235（≥ 0.3）
<!-- /results -->
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from common import answers, cli, data, models, retrieval, run
from common.errors import UserError

# 冒烟只缩短生成：路由、FAQ、检索都不经过模型，对话一轮都不能少，否则下面那几条结论就没有样本可比
SMOKE = dict(max_new_tokens=16)
# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线（不改写的对照、"全猜最多的那条路"、
# 转人工的基础比例、模型生成的回答）都在同一次运行、同一批留出对话上量。路由与检索不经过模型，两种模式门槛相同
CLAIMS = [
    run.Claim("追问改写让检索找对文档：改写后 − 不改写的追问来源准确率",
              "followup_source_accuracy - followup_source_accuracy_no_condense", ">=", 0.2, 0.2),
    run.Claim("路由胜过全猜最多的那条路：路由准确率 − 金标里最多那条路的占比",
              "routing_accuracy - max(gold_route_share.values())", ">=", 0.3, 0.3),
    run.Claim("转人工又准又全：精确率与召回率中较小的 − 转人工的基础比例（随便猜的精确率）",
              'min(handoff_precision, handoff_recall) - gold_route_share["handoff"]', ">=", 0.5, 0.5),
    # 冒烟门槛反而更高：极小模型生成的 RAG 回答几乎从不包含标准答案，两路的差距只会更大
    run.Claim("FAQ 直答比模型生成稳：FAQ 一路的准确率 − RAG 一路的准确率",
              'routes["faq"]["accuracy"] - routes["rag"]["accuracy"]', ">=", 0.5, 0.3),
]
# 转人工意图：投诉、要人工、钱的纠纷——这些对话里答得再准也不如尽快交给人
# 用关键词规则而不是模型判意图：漏转人工的代价最高，规则可审计、可逐条补，也不受小模型能力的影响
HANDOFF = re.compile(r"投诉|人工|经理|退款.*投诉|报警|律师|赔偿|到底管不管|human|agent|complain|manager|lawyer|"
                     r"charged twice|refund.*now|bank", re.I)
# 追问的样子：代词 / "那…" 开头、"…呢？" 结尾（省略了主语，单独拿去检索会找错）
# 英文词用 \b 限定边界：否则 item、hand 里的 it、and 也会把普通问题当成追问
ELLIPSIS = re.compile(r"^(那|它|这个|整机|一般|锁定)|呢[？?]?$|\b(it|that|and|what about|this one)\b", re.I)
ROUTES = ("faq", "rag", "handoff")


@dataclass
class Args(retrieval.KBArgs):
    dialogues: str = cli.arg(None, "多轮对话 JSONL {id, turns: [{user, route, answer, doc_id}]}；"
                                   "默认 data/kb/dialogues.jsonl")
    faq_threshold: float = cli.arg(0.5, "FAQ 直答的问题词重合度（Jaccard）阈值", min=0, max=1)
    min_overlap: float = cli.arg(0.2, "检索置信度下限：问题的词出现在首个块里的比例低于它就转人工", min=0, max=1)
    dense_weight: float = cli.arg(0.2, "RAG 检索里向量一路的 RRF 权重（BM25 为 1 - 它）", min=0, max=1)
    top_k: int = cli.arg(3, "放进提示词的块数", min=1)
    condense: str = cli.arg("rules", "追问改写：rules（合并上一轮的独立问题）/ llm（让模型改写）/ none",
                            choices=["rules", "llm", "none"])
    max_new_tokens: int = cli.arg(48, "回答长度上限", min=1)


def load_dialogues(path: Path) -> list[dict]:
    """读多轮对话并检查字段；坏行报 文件:行号（读入时就报，而不是评测到一半抛 KeyError）。"""
    out = []
    for no, r in data.read_records(path):
        data.need_str(path, no, r, "id")           # 写进逐轮记录，用来回头找是哪段对话
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns:
            raise UserError(f"{path}:{no}: 需要非空的 'turns' 列表")
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("route") not in ROUTES:
                raise UserError(f"{path}:{no}: turns[{i}] 需要 'route'（{' / '.join(ROUTES)}）")
            # answer / doc_id 可以不写（这一轮不计准确率/来源），写了就必须是字符串：评测时要做子串比较
            data.need_str(path, no, t, "user", where=f"turns[{i}].")
            data.need_str(path, no, t, "answer", optional=True, where=f"turns[{i}].")
            data.need_str(path, no, t, "doc_id", optional=True, where=f"turns[{i}].")
        out.append(r)
    return out


def parse_faq(docs) -> list[dict]:
    """FAQ 文档 → 问答条目：markdown 的 "## 问题"，或以 ？/? 结尾的短行，其后的段落是答案。"""
    entries = []
    for d in docs:
        if not d.id.startswith("faq/"):
            continue
        q, ans = None, []
        for line in d.text.splitlines() + ["## END?"]:   # 末尾补一个假问题行：最后一条问答也能在循环里收进来
            s = line.strip().lstrip("#").strip()
            # 短于 80 字符才算问题行：答案段落里偶尔也有以问号结尾的长句（反问），不能把它切成新问题
            if s.endswith(("？", "?")) and len(s) < 80:
                if q and ans:   # 去掉"一、"之类的编号：它不是问题的一部分，留着会拉低与用户问题的 Jaccard
                    entries.append({"question": re.sub(r"^[一二三四五六七八九十]+、", "", q), "answer": " ".join(ans),
                                    "doc_id": d.id})
                q, ans = s, []
            # q 为空时（第一个问题之前的标题、导语）不收进任何答案
            elif q and s:
                ans.append(s)
    return entries


def jaccard(a: str, b: str) -> float:
    """两个问题的词重合度：BM25 只排先后，"最像的一条"可能根本不是同一个问题，直答前要一个绝对的门槛。"""
    x, y = set(retrieval.bm25_tokens(a)), set(retrieval.bm25_tokens(b))
    # max(1, …)：两边都分不出词（全是标点）时分母为 0
    return len(x & y) / max(1, len(x | y))


def condense_rules(history: list[str], q: str) -> str:
    """规则改写：追问（省略主语/代词开头/很短）就接在上一轮的独立问题后面，让检索带上上文的主语。"""
    if not history:
        return q
    # ≤ 3 个词的问题（"电池呢？""E05?"）单独检索常常找错文档：缺的正是上一轮的主语
    short = len(retrieval.bm25_tokens(q)) <= 3
    return f"{history[-1]} {q}" if ELLIPSIS.search(q.strip()) or short else q


class ServiceDesk:
    """客服台：FAQ 索引、知识库的 BM25 + 向量索引、回答用的模型；respond() 处理一轮对话。"""

    def __init__(self, args: Args, docs, faq: list[dict]):
        self.args, self.faq = args, faq
        # FAQ 为空时放一个占位问题：BM25Okapi 不接受空语料，respond() 里也会因 faq 为空而跳过这一路
        self.faq_bm25 = retrieval.BM25Index([f["question"] for f in faq] or ["∅"])
        # 切块参数与第 01 节的默认（300 / 50）一致：本节讲路由与多轮，不再开切块参数
        self.chunks = retrieval.chunk_documents(docs, 300, 50)
        self.bm25 = retrieval.BM25Index([c.text for c in self.chunks])
        self.embedder = retrieval.load_embedder(args.embedding_model, models.pick_device(args.device).type)
        self.dense = retrieval.DenseIndex(retrieval.embed(self.embedder, [c.text for c in self.chunks]))
        self.model, self.tok = models.load_args(args)

    def retrieve(self, q: str) -> list[int]:
        """BM25 与向量各取 30 个，按权重 RRF 融合后留前 top_k 块。"""
        # 各取 30 个再融合而不是只取 top_k：一路排第 4、另一路排第 1 的块若被提前截掉，就进不了融合
        b = [i for i, _ in self.bm25.search(q, 30)]
        d = [i for i, _ in self.dense.search_vectors(retrieval.embed(self.embedder, [q]), 30)[0]]
        # rrf 的 k 用默认 60（与第 01 节 --rrf-k 相同）；向量权重小的原因见模块 docstring
        return retrieval.rrf([b, d], [1 - self.args.dense_weight, self.args.dense_weight])[:self.args.top_k]

    def ask_llm(self, prompt: str) -> str:
        """贪心生成一个回答（批大小 1：一轮一问，客服场景本来就是逐条来的）。"""
        # 先套模型自己的对话模板：models.generate 只收套好模板的字符串，指令模型看到裸文本会当成要续写的正文
        chat = [data.prompt_text(self.tok, [{"role": "user", "content": prompt}])]
        return models.generate(self.model, self.tok, chat, self.args.max_new_tokens, 1)[0]

    def standalone(self, history: list[str], q: str, condense: str) -> str:
        """把追问改写成独立问题：--condense llm 让模型改写（大模型才改得好），rules 用规则，none 不改。"""
        if condense == "llm" and history:
            # 只给最近两轮上文：上文越长，小模型越容易把旧话题当成主语，提示词也更长更慢
            return self.ask_llm("把追问改写成一个独立、完整的问题，只输出问题。\n上文：" + " / ".join(history[-2:])
                                # 模型输出空串时退回原问题：拿空查询去检索什么也找不到
                                + f"\n追问：{q}") or q
        return condense_rules(history, q) if condense == "rules" else q

    def respond(self, history: list[str], q: str, condense: str) -> dict:
        """一轮：转人工意图 → FAQ 直答 → （改写追问）RAG → 置信度太低转人工。"""
        # 先判转人工：投诉的客户最不该收到一段模型生成的套话，哪怕知识库里有相关内容
        if HANDOFF.search(q):
            return {"route": "handoff", "reason": "intent", "standalone": q}
        if self.faq:   # FAQ 直答：标准答案，不调模型，最快也不会说错
            j, _ = self.faq_bm25.search(q, 1)[0]
            if jaccard(q, self.faq[j]["question"]) >= self.args.faq_threshold:
                return {"route": "faq", "answer": self.faq[j]["answer"], "sources": [self.faq[j]["doc_id"]],
                        "standalone": q}
        # 转人工与 FAQ 两步都按原话判：追问（"那它的电池呢？"）在这两步不会命中，只有走到 RAG 才被改写
        standalone = self.standalone(history, q, condense)
        top = self.retrieve(standalone)
        words = set(retrieval.bm25_tokens(standalone))
        # 只看融合后的首个块：它是最可信的一块，连它都与问题不沾边，后面的更不用说
        shared = words & set(retrieval.bm25_tokens(self.chunks[top[0]].text))
        # 首个块与问题几乎没有共同词：知识库里多半没有答案，让模型硬答只会编，不如转人工
        if len(shared) < self.args.min_overlap * max(1, len(words)):
            return {"route": "handoff", "reason": "low_confidence", "standalone": standalone}
        # 来源按检索名次报全部 top_k 篇：客服要能点开核对，不只看模型最后用了哪段
        # 这里没像第 02 节那样把资料包成"数据"（safety.as_data）：防注入不是本节重点，资料里的指令文字模型可能照做
        ctx = "\n".join(f"[{n}] {self.chunks[i].text}" for n, i in enumerate(top, 1))
        answer = self.ask_llm(f"只根据下面的资料回答客户的问题，简短作答。\n{ctx}\n\n问题：{standalone}")
        return {"route": "rag", "answer": answer, "sources": [self.chunks[i].doc_id for i in top],
                "standalone": standalone}


def run_dialogues(desk: ServiceDesk, dialogues: list[dict], condense: str) -> list[dict]:
    """逐段对话跑一遍（改写）与对照（不改写）；对照只重跑"改写确实改了问题"的 RAG 追问，其余轮与改写版相同。"""
    turns = []
    for dlg in dialogues:
        hist = []
        for n, t in enumerate(dlg["turns"]):
            r = desk.respond(hist, t["user"], condense)
            rewritten = n and r["route"] == "rag" and r["standalone"] != t["user"]
            plain = desk.respond(hist, t["user"], "none") if rewritten else r
            turns.append({"dialogue": dlg["id"], "turn": n, "gold_route": t["route"], "gold": t.get("answer", ""),
                          "gold_doc": t.get("doc_id", ""), **r,
                          "plain_sources": plain.get("sources", []), "plain_route": plain["route"]})
            # 历史里存改写后的独立问题：下一轮追问再接它时，主语已经在里面了
            hist.append(r["standalone"])
    return turns


def correct(t: dict) -> bool:
    """转人工：金标也是转人工才算对；直答 / RAG：回答包含标准答案（没有标准答案的轮不算对）。"""
    if t["route"] == "handoff":
        return t["gold_route"] == "handoff"
    return bool(t["gold"]) and answers.contains_answer(t["answer"], t["gold"])


def route_metrics(turns: list[dict]) -> dict:
    """每个路由的占比与准确率、转人工的精确率/召回率、改写前后追问的检索来源准确率。"""
    per_route = {}
    for route in ROUTES:
        mine = [t for t in turns if t["route"] == route]
        per_route[route] = {"share": round(len(mine) / len(turns), 4),
                            "accuracy": round(sum(map(correct, mine)) / max(1, len(mine)), 4),
                            # 转人工没有来源，记 None 而不是 0：0 会被读成"全找错了"
                            "source_accuracy": round(sum(t["gold_doc"] in t.get("sources", []) for t in mine)
                                                     / max(1, len(mine)), 4) if route != "handoff" else None,
                            "turns": len(mine)}
    # 转人工两头都要看：精确率低 = 人工坐席被不必要的对话占满；召回率低 = 该转的愤怒客户被机器人挡住
    pred_h = [t["route"] == "handoff" for t in turns]
    gold_h = [t["gold_route"] == "handoff" for t in turns]
    tp = sum(p and g for p, g in zip(pred_h, gold_h))
    # 只评金标为 RAG 的追问：FAQ 直答与转人工轮的来源与改写无关，混进来只会冲淡差别
    follow = [t for t in turns if t["turn"] > 0 and t["gold_route"] == "rag"]
    return {"routes": per_route, "handoff_precision": round(tp / max(1, sum(pred_h)), 4),
            # 金标路由的分布：路由准确率要胜过"全猜最多的那条路"，转人工精确率要胜过它的基础比例
            "gold_route_share": {r: round(sum(t["gold_route"] == r for t in turns) / len(turns), 4) for r in ROUTES},
            "handoff_recall": round(tp / max(1, sum(gold_h)), 4),
            "routing_accuracy": round(sum(t["route"] == t["gold_route"] for t in turns) / len(turns), 4),
            "followup_source_accuracy": round(sum(t["gold_doc"] in t.get("sources", []) for t in follow)
                                              / max(1, len(follow)), 4),
            "followup_source_accuracy_no_condense": round(sum(t["gold_doc"] in t["plain_sources"] for t in follow)
                                                          / max(1, len(follow)), 4)}


def plot_routes(out, per_route: dict, n_turns: int) -> None:
    """每条路的占比与准确率并排：占比大而准确率低的那条路最值得先改。"""
    fig, save = out.plot("routes.png")
    ax = fig.add_subplot(111)
    ax.bar([r + " share" for r in ROUTES], [per_route[r]["share"] for r in ROUTES])
    ax.bar([r + " acc" for r in ROUTES], [per_route[r]["accuracy"] for r in ROUTES])
    # 占比与准确率都在 0..1：固定纵轴，不同运行的图可以直接对比
    ax.set(ylim=(0, 1), title=f"routing on {n_turns} held-out dialogue turns")
    save()


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 先查两个模型目录（不到一秒）：坏的 --model 不该等知识库切块、向量模型加载完才报
    models.check_dir(models.resolve(out.model_name, args.source), trust_remote_code=args.trust_remote_code)
    if (name := args.embedding_model) and (name.startswith(("/", ".", "~")) or os.path.lexists(name)):
        models.check_dir(name, "--embedding-model")   # hub id 留给加载时报

    # 1. 知识库、FAQ 条目、留出的多轮对话（阈值都没在这些对话上调过，报出来的才是真实表现）
    # 问答集在这里用不上（评测用多轮对话），但 load_kb 仍会检查问答引用的文档都在知识库里
    docs, by_id, _ = retrieval.load_kb(args.docs, args.qa)
    dialogues = load_dialogues(Path(args.dialogues) if args.dialogues else data.DATA_DIR / "kb" / "dialogues.jsonl")
    faq = parse_faq(docs)
    if not faq:
        out.log.warning("知识库里没有 faq/ 文档：FAQ 直答这一路不会触发")
    desk = ServiceDesk(args, docs, faq)
    out.log.info(f"{len(docs)} 篇文档 → {len(desk.chunks)} 块，{len(faq)} 条 FAQ；{len(dialogues)} 段对话 "
                 f"{sum(len(d['turns']) for d in dialogues)} 轮")

    # 2. 逐轮处理：转人工意图 → FAQ 直答 → （改写追问）RAG → 置信度太低转人工；同时跑不改写的对照
    turns = run_dialogues(desk, dialogues, args.condense)
    with out.path("transcript.jsonl").open("w", encoding="utf-8") as f:   # 逐轮记录：路由、改写后的问题、来源、回答
        f.writelines(json.dumps(t, ensure_ascii=False) + "\n" for t in turns)

    # 3. 指标：每个路由的占比与准确率、转人工精确率/召回率、改写对追问的帮助
    m = route_metrics(turns)
    r, src, src_plain = m["routes"], m["followup_source_accuracy"], m["followup_source_accuracy_no_condense"]
    out.log.info(f"路由准确率 {m['routing_accuracy']}；追问的来源准确率：改写 {src} / 不改写 {src_plain}")
    plot_routes(out, r, len(turns))
    return out.finish({**m, "condense": args.condense, "turns": len(turns), "dialogues": len(dialogues),
                       "faq_entries": len(faq)},
                      summary=f"{len(turns)} 轮：路由准确率 {m['routing_accuracy']}；FAQ 占 {r['faq']['share']}"
                              f"（准确率 {r['faq']['accuracy']}），转人工 P/R "
                              f"{m['handoff_precision']:.2f}/{m['handoff_recall']:.2f}；"
                              f"追问来源准确率 {src_plain} → {src}（改写）",
                      claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
