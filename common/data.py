"""数据格式：读取、校验（报出文件:行号: 字段）、对话模板渲染与"只在助手回复上算损失"的掩码。

格式（详见 data/README.md）：
  SFT          alpaca {instruction, input?, output, system?} 或 chat {messages: [{role, content}]}
  偏好         {prompt, chosen, rejected}（字符串，或 TRL 风格的消息列表）
  KTO          {prompt, completion, label: bool}
  分类         {text, label}
  检索问答     {question, answer, doc_id? , gold_passage?}（两者至少一个）
  文档         一个文件夹里的 .txt / .md / .html（装了 pypdf 时还有 .pdf），id = 相对路径
绝不悄悄丢数据：第一条坏记录就报错退出（退出码 2）。
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
ROLES = ("system", "user", "assistant")


@dataclass
class Document:
    """知识库里的一篇文档。"""

    id: str
    text: str
    path: Path


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """读取 JSON（对象列表）或 JSONL；返回 [(行号, 记录)]，坏行报 `文件:行: 原因`。"""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: 文件不存在（--data/--qa 需要一个 JSON 或 JSONL 文件）")
    try:
        raw = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: 不是 UTF-8 文本（{e.reason}，字节位置 {e.start}）") from None
    stripped = raw.lstrip()
    if p.suffix == ".json" or stripped.startswith("["):
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: JSON 无法解析（{e.msg}）") from None
        if not isinstance(obj, list):
            raise UserError(f"{p}:1: JSON 文件顶层应为记录列表 [...]")
        recs = [(i + 1, r) for i, r in enumerate(obj)]   # JSON 数组里用"第几条"代替行号
    else:
        recs = []
        for no, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                recs.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{no}: 不是合法的 JSON 行（{e.msg}，第 {e.colno} 列）") from None
    if not recs:
        raise UserError(f"{p}: 文件里没有任何记录")
    for no, r in recs:
        if not isinstance(r, dict):
            raise UserError(f"{p}:{no}: 每条记录应为 JSON 对象 {{...}}，得到 {type(r).__name__}")
    return recs


def _need_str(p: Path, no: int, r: dict, key: str, optional: bool = False) -> str:
    if key not in r or r[key] is None:
        if optional:
            return ""
        raise UserError(f"{p}:{no}: 缺少字段 '{key}'（该格式需要: {', '.join(r.keys()) or '空记录'} 之外的 '{key}'）")
    if not isinstance(r[key], str):
        raise UserError(f"{p}:{no}: 字段 '{key}' 应为字符串，得到 {type(r[key]).__name__}")
    if not optional and not r[key].strip():
        raise UserError(f"{p}:{no}: 字段 '{key}' 为空")
    return r[key]


def _messages(p: Path, no: int, msgs: Any, key: str = "messages") -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"{p}:{no}: 字段 '{key}' 应为非空的消息列表 [{{role, content}}, ...]")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{p}:{no}: {key}[{i}] 需要 'role' 和 'content' 两个字段")
        if m["role"] not in ROLES:
            raise UserError(f"{p}:{no}: {key}[{i}].role = {m['role']!r}，只能是 {'/'.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{p}:{no}: {key}[{i}].content 应为字符串")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def alpaca_to_messages(r: dict) -> list[dict]:
    """alpaca 记录 -> 对话消息（instruction 与 input 用空行连接）。"""
    user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    msgs = [{"role": "system", "content": r["system"]}] if r.get("system") else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def load_sft(path: str | Path) -> list[list[dict]]:
    """SFT 数据（alpaca 或 chat 格式，可混用）-> 对话列表。"""
    p = Path(path)
    convs = []
    for no, r in read_records(p):
        if "messages" in r:
            msgs = _messages(p, no, r["messages"])
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{p}:{no}: 对话最后一条应是 assistant 的回复（它是要学习的目标）")
        elif "instruction" in r or "output" in r:
            _need_str(p, no, r, "instruction")
            _need_str(p, no, r, "output")
            _need_str(p, no, r, "input", optional=True)
            _need_str(p, no, r, "system", optional=True)
            msgs = alpaca_to_messages(r)
        else:
            raise UserError(f"{p}:{no}: 既不是 alpaca（instruction/output）也不是 chat（messages）格式，"
                            f"字段为 {sorted(r)}")
        convs.append(msgs)
    return convs


def load_preference(path: str | Path) -> list[dict]:
    """偏好对 {prompt, chosen, rejected}；字符串或消息列表（TRL 的 conversational 格式）。"""
    p = Path(path)
    out = []
    for no, r in read_records(p):
        rec = {}
        for k in ("prompt", "chosen", "rejected"):
            if k not in r:
                raise UserError(f"{p}:{no}: 缺少字段 '{k}'（偏好数据需要 prompt, chosen, rejected）")
            rec[k] = _messages(p, no, r[k], k) if isinstance(r[k], list) else _need_str(p, no, r, k)
        out.append(rec)
    return out


def load_kto(path: str | Path) -> list[dict]:
    """KTO 记录 {prompt, completion, label: bool}。"""
    p = Path(path)
    out = []
    for no, r in read_records(p):
        rec = {k: _need_str(p, no, r, k) for k in ("prompt", "completion")}
        if not isinstance(r.get("label"), bool):
            raise UserError(f"{p}:{no}: 字段 'label' 应为 true/false，得到 {r.get('label')!r}")
        out.append({**rec, "label": r["label"]})
    return out


def load_classification(path: str | Path) -> tuple[list[dict], list[str]]:
    """分类数据 {text, label} -> (记录, 排好序的标签集合)。"""
    p = Path(path)
    out = [{"text": _need_str(p, no, r, "text"), "label": _need_str(p, no, r, "label")}
           for no, r in read_records(p)]
    labels = sorted({r["label"] for r in out})
    if len(labels) < 2:
        raise UserError(f"{p}: 至少需要两个不同的 label，只找到 {labels}")
    return out, labels


def load_qa(path: str | Path, docs: dict[str, Document] | None = None) -> list[dict]:
    """检索问答 {question, answer, doc_id?, gold_passage?}；给了 docs 时检查 doc_id 存在、原文包含 gold_passage。"""
    p = Path(path)
    out = []
    for no, r in read_records(p):
        rec = {"question": _need_str(p, no, r, "question"), "answer": _need_str(p, no, r, "answer")}
        rec["doc_id"] = _need_str(p, no, r, "doc_id", optional=True) or None
        rec["gold_passage"] = _need_str(p, no, r, "gold_passage", optional=True) or None
        if not rec["doc_id"] and not rec["gold_passage"]:
            raise UserError(f"{p}:{no}: 需要 'doc_id' 或 'gold_passage' 至少一个（用来判断检索是否命中）")
        if docs is not None and rec["doc_id"]:
            if rec["doc_id"] not in docs:
                raise UserError(f"{p}:{no}: doc_id {rec['doc_id']!r} 不在文档集合里（id 是相对 --docs 的路径）")
            if rec["gold_passage"] and rec["gold_passage"] not in docs[rec["doc_id"]].text:
                raise UserError(f"{p}:{no}: gold_passage 不是文档 {rec['doc_id']} 原文的片段")
        rec["lang"] = r.get("lang") or detect_lang(rec["question"])
        out.append(rec)
    return out


def detect_lang(text: str) -> str:
    """粗判中英：含 CJK 字符即中文（只用于分组统计，不用于清洗）。"""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def html_to_text(html: str) -> str:
    """HTML -> 可见文本：去掉 script/style/nav/footer 等样板，段落之间换行。"""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for t in soup(["script", "style", "nav", "footer", "noscript", "head"]):
        t.decompose()
    lines = [ln.strip() for ln in soup.get_text("\n").splitlines()]
    return "\n".join(ln for ln in lines if ln)


def read_document(path: Path) -> str:
    """读取一个文档的纯文本（txt/md 原样；html 取可见文本；pdf 用 pypdf）。"""
    suf = path.suffix.lower()
    if suf == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:
            raise UserError(f"{path}: 读取 PDF 需要 pypdf（pip install pypdf）") from None
        return "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: 不是 UTF-8 文本（字节位置 {e.start}）") from None
    return html_to_text(text) if suf in (".html", ".htm") else text


DOC_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf")


def load_documents(folder: str | Path) -> list[Document]:
    """读取文件夹里所有文档（递归，按路径排序，id 为相对路径）。"""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{root}: 文件夹不存在（--docs 需要一个装有 .txt/.md/.html/.pdf 的文件夹）")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in DOC_SUFFIXES)
    if not files:
        raise UserError(f"{root}: 没有找到 {'/'.join(DOC_SUFFIXES)} 文档")
    return [Document(f.relative_to(root).as_posix(), read_document(f), f) for f in files]


def split(items: list, val_fraction: float = 0.1, seed: int = 42, min_val: int = 1) -> tuple[list, list]:
    """确定性地打乱并切分出验证集。"""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(min_val, int(round(len(items) * val_fraction)))
    if n_val >= len(items):
        raise UserError(f"数据只有 {len(items)} 条，不够切出验证集")
    return [items[i] for i in idx[n_val:]], [items[i] for i in idx[:n_val]]


def tokenize_chat(tok, messages: list[dict], max_length: int = 512) -> dict:
    """按对话模板编码，labels 只保留助手回复的 token（其余为 -100）。

    做法与模板无关：对第 i 条助手消息，分别渲染"到它之前 + 生成提示"和"到它为止"，
    两者 token 长度之差就是它的 token 区间。这对任何 chat template 都成立，不需要 {% generation %} 标记。
    """
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_ids(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True)))
        end = len(_ids(tok.apply_chat_template(messages[: i + 1], tokenize=True)))
        for j in range(start, min(end, len(ids))):
            mask[j] = 1
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if k else -100 for t, k in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "assistant_masks": mask}


def _ids(x: Any) -> list[int]:
    if hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def prompt_text(tok, messages: list[dict]) -> str:
    """去掉最后一条助手回复，渲染成"等模型作答"的提示文本。"""
    ctx = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return tok.apply_chat_template(ctx, tokenize=False, add_generation_prompt=True)
