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

import errno
import json
import os
import random
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_ROLES = ("system", "user", "assistant")
_LANGS = ("zh", "en")


@dataclass
class Document:
    """知识库里的一篇文档。"""

    id: str
    text: str
    path: Path


def _stat(p: Path, what: str, noun: str = "文件") -> tuple[os.stat_result | None, str | None]:
    """stat 一个路径（跟随符号链接）；出问题时返回一行准确的原因：不存在 / 断开的链接 / 链接成环 / 无权限。"""
    try:
        return p.stat(), None
    except FileNotFoundError:
        if p.is_symlink():
            return None, f"{p}: 是断开的符号链接（指向 {os.readlink(p)}，目标不存在）"
        return None, f"{p}: {noun}不存在（{what}）"
    except NotADirectoryError:
        return None, f"{p}: 路径中间有一段是文件而不是文件夹（{what}）"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, f"{p}: 符号链接成环（链接绕一圈又指回自己），读不到任何东西"
        return None, f"{p}: 无法访问（{e.strerror}）"


def _not_a_file(p: Path, what: str) -> str | None:
    """p 不是一个可读的普通文件时，返回一行准确的原因（不存在 / 是文件夹 / 链接成环 / FIFO ……）；是就返回 None。"""
    st, why = _stat(p, what)
    if why:
        return why
    if stat.S_ISDIR(st.st_mode):
        return f"{p}: 是一个文件夹，不是文件（{what}）"
    if stat.S_ISFIFO(st.st_mode):
        return f"{p}: 是命名管道（FIFO），不是普通文件：读它会一直等写入方，所以不读"
    if not stat.S_ISREG(st.st_mode):
        return f"{p}: 是设备或套接字之类的特殊文件，不是普通文件"
    return None


def _not_a_dir(p: Path, what: str) -> str | None:
    """p 不是一个文件夹时返回一行原因；是就返回 None。"""
    st, why = _stat(p, what, "文件夹")
    if why:
        return why
    return None if stat.S_ISDIR(st.st_mode) else f"{p}: 不是文件夹（{what}）"


def _read_text(p: Path) -> str:
    """读 UTF-8 文本（开头的 BOM 会被去掉，Windows 记事本爱加它）；读不了就一行说清原因。"""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: 不是 UTF-8 文本（{e.reason}，字节位置 {e.start}）") from None
    except OSError as e:
        raise UserError(f"{p}: 读取失败（{e.strerror or e}）") from None


_SURROGATE = re.compile("[\ud800-\udfff]")
_WS = re.compile(r"[ \t\n\r]*")
_TOO_DEEP = "JSON 嵌套太深（超过 Python 的递归上限，正常的数据不会嵌套上千层）"


def _check_strings(p: Path, no: int, rec: Any) -> None:
    """孤立的代理字符（JSON 里的 "\\ud800"）能通过 json 解析，却不是合法 Unicode：
    分词器和写 UTF-8 时才崩，这里先拦下。"""
    stack = [("", rec)]
    while stack:                       # 用显式栈而不是递归：嵌套再深也不会 RecursionError
        where, x = stack.pop()
        if isinstance(x, str):
            m = _SURROGATE.search(x)
            if m:
                raise UserError(f"{p}:{no}: 字段 {where or '(值)'} 含孤立的代理字符 \\u{ord(m.group()):04x}"
                                "（不是合法的 Unicode 字符，多半是截断的 emoji 转义）")
        elif isinstance(x, dict):
            for k, v in x.items():
                k_safe = k.encode("utf-8", "backslashreplace").decode("utf-8")   # 键名本身也可能带坏字符
                name = f"{where}.{k_safe}" if where else repr(k_safe)
                stack += [(f"{name} 的键名", k), (name, v)]
        elif isinstance(x, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(x))


def _json_array(p: Path, raw: str) -> list[tuple[int, Any]]:
    """逐个元素解析 JSON 数组，记下每条记录开始的真实行号（报错时能指到行）。"""
    dec = json.JSONDecoder()
    i = _WS.match(raw, 0).end()
    if not raw.startswith("[", i):
        try:
            json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: JSON 无法解析（{e.msg}）") from None
        except RecursionError:
            raise UserError(f"{p}:1: {_TOO_DEEP}") from None
        raise UserError(f"{p}:1: JSON 文件顶层应为记录列表 [...]（每行一个对象的文件请用 .jsonl 后缀）")
    recs, pos, line = [], 0, 1

    def line_at(k: int) -> int:
        nonlocal pos, line
        line += raw.count("\n", pos, k)
        pos = k
        return line

    i = _WS.match(raw, i + 1).end()
    if raw.startswith("]", i):
        i += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(raw, i)
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{e.lineno}: JSON 无法解析（{e.msg}）") from None
            except RecursionError:
                raise UserError(f"{p}:{line_at(i)}: {_TOO_DEEP}") from None
            recs.append((line_at(i), obj))
            i = _WS.match(raw, end).end()
            if raw.startswith(",", i):
                i = _WS.match(raw, i + 1).end()
            elif raw.startswith("]", i):
                i += 1
                break
            else:
                raise UserError(f"{p}:{line_at(min(i, len(raw)))}: JSON 无法解析（数组元素之间应是逗号，或以 ] 结束）")
    if _WS.match(raw, i).end() != len(raw):
        raise UserError(f"{p}:{line_at(i)}: JSON 无法解析（数组 ] 之后还有多余内容）")
    return recs


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """读取 JSON（对象列表）或 JSONL；返回 [(行号, 记录)]，坏行报 `文件:行: 原因`。

    JSONL 只按 \\n 分行（\\r\\n 也行）：str.splitlines 还会在 U+2028、\\x0b、\\x1c 等字符处断行，
    而这些字符可以合法地出现在 JSON 字符串里，那样会把一条好记录劈成两半。
    """
    p = Path(path)
    why = _not_a_file(p, "--data/--qa 需要一个 JSON 或 JSONL 文件")
    if why:
        raise UserError(why)
    raw = _read_text(p)
    if p.suffix.lower() == ".json" or raw.lstrip().startswith("["):
        recs = _json_array(p, raw)
    else:
        recs = []
        for no, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                recs.append((no, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{p}:{no}: 不是合法的 JSON 行（{e.msg}，第 {e.colno} 列）") from None
            except RecursionError:
                raise UserError(f"{p}:{no}: {_TOO_DEEP}") from None
    if not recs:
        raise UserError(f"{p}: 文件里没有任何记录")
    for no, r in recs:
        if not isinstance(r, dict):
            raise UserError(f"{p}:{no}: 每条记录应为 JSON 对象 {{...}}，得到 {type(r).__name__}")
        _check_strings(p, no, r)
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
        if m["role"] not in _ROLES:
            raise UserError(f"{p}:{no}: {key}[{i}].role = {_short_repr(m['role'])}，只能是 {'/'.join(_ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{p}:{no}: {key}[{i}].content 应为字符串")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _alpaca_to_messages(r: dict) -> list[dict]:
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
            msgs = _alpaca_to_messages(r)
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


def preference_split(path: str | Path | None, val_fraction: float, seed: int = 42,
                     min_train: int = 4) -> tuple[list[dict], list[dict]]:
    """偏好对 -> (训练, 留出)；path 为 None 时用项目自带的 data/preference/pairs.jsonl。对太少时一行报错。"""
    path = path or DATA_DIR / "preference" / "pairs.jsonl"
    train, held = split(load_preference(path), val_fraction, seed)
    if len(train) < min_train or len(held) < 2:
        raise UserError(f"{path}: 偏好对太少（训练 {len(train)}、留出 {len(held)}），至少需要约 {min_train + 6} 对")
    return train, held


def preference_conversational(pairs: list[dict]) -> list[dict]:
    """字符串偏好对 -> TRL 的对话格式（prompt 是 user 消息，chosen/rejected 是 assistant 消息），模板由 TRL 套。"""
    def msgs(x: Any, role: str) -> list[dict]:
        return x if isinstance(x, list) else [{"role": role, "content": x}]
    return [{"prompt": msgs(p["prompt"], "user"), "chosen": msgs(p["chosen"], "assistant"),
             "rejected": msgs(p["rejected"], "assistant")} for p in pairs]


def _load_kto(path: str | Path) -> list[dict]:
    """KTO 记录 {prompt, completion, label: bool}。"""
    p = Path(path)
    out = []
    for no, r in read_records(p):
        rec = {k: _need_str(p, no, r, k) for k in ("prompt", "completion")}
        if not isinstance(r.get("label"), bool):
            raise UserError(f"{p}:{no}: 字段 'label' 应为 true/false，得到 {_short_repr(r.get('label'))}")
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
                raise UserError(f"{p}:{no}: doc_id {_short_repr(rec['doc_id'])} 不在文档集合里"
                                "（id 是相对 --docs 的路径）")
            if rec["gold_passage"] and rec["gold_passage"] not in docs[rec["doc_id"]].text:
                raise UserError(f"{p}:{no}: gold_passage 不是文档 {rec['doc_id']} 原文的片段")
        # data/README.md 的约定：answer 逐字出现在 gold_passage 里（EM/F1 与"答案是否被检索到"都靠它）
        if rec["gold_passage"] and rec["answer"] not in rec["gold_passage"]:
            raise UserError(f"{p}:{no}: answer {_short_repr(rec['answer'])} 没有逐字出现在 gold_passage 里"
                            "（gold_passage 应是包含答案的原文片段）")
        if r.get("lang") is not None and r["lang"] not in _LANGS:
            raise UserError(f"{p}:{no}: 字段 'lang' = {_short_repr(r['lang'])}，只能是 {' / '.join(_LANGS)}"
                            "（或者不写，按问题文字自动判断）")
        rec["lang"] = r.get("lang") or detect_lang(rec["question"])
        out.append(rec)
    return out


def _short_repr(x: Any, n: int = 60) -> str:
    """报错里引用用户的值：太长就截断（一条 5 MB 的记录不该把整段塞进一行错误）。"""
    s = repr(x)
    return s if len(s) <= n else s[: n - 3] + "..."


def detect_lang(text: str) -> str:
    """粗判中英：含 CJK 字符即中文（只用于分组统计，不用于清洗）。"""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def _html_to_text(html: str) -> str:
    """HTML -> 可见文本：去掉 script/style/nav/footer 等样板，段落之间换行。"""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for t in soup(["script", "style", "nav", "footer", "noscript", "head"]):
        t.decompose()
    lines = [ln.strip() for ln in soup.get_text("\n").splitlines()]
    return "\n".join(ln for ln in lines if ln)


def _read_document(path: Path) -> str:
    """读取一个文档的纯文本（txt/md 原样；html 取可见文本；pdf 用 pypdf）；读不了就一行说清哪个文件、为什么。"""
    suf = path.suffix.lower()
    why = _not_a_file(path, "文档应是普通文件")
    if why:
        raise UserError(why)
    if suf == ".pdf":
        try:
            from pypdf import PdfReader
        except ImportError:
            raise UserError(f"{path}: 读取 PDF 需要 pypdf（pip install pypdf）") from None
        try:
            text = "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
        except Exception as e:  # noqa: BLE001 - pypdf 对坏文件抛的异常五花八门（PdfReadError、KeyError、ValueError……）
            msg = str(e).splitlines()[0][:150] if str(e) else ""
            raise UserError(f"{path}: PDF 无法解析，文件可能损坏、被截断或加密（{type(e).__name__}: {msg}）") from None
    else:
        text = _read_text(path)
        if suf in (".html", ".htm"):
            try:
                text = _html_to_text(text)
            except RecursionError:
                raise UserError(f"{path}: HTML 标签嵌套太深，无法解析") from None
    m = _SURROGATE.search(text)
    if m:   # PDF 抽出的文字偶尔带孤立代理字符：后面分词、写 UTF-8 都会崩
        raise UserError(f"{path}: 含孤立的代理字符 \\u{ord(m.group()):04x}（不是合法的 Unicode 字符）")
    return text


_DOC_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf")


def _is_blank(text: str) -> bool:
    """清洗后是否什么都没剩：只有空白和不可见的格式字符（零宽空格、BOM 等）。"""
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text)


def _link_note(link: Path, root: Path, is_dir: bool) -> str:
    """文件夹里的符号链接怎么处理，以及为什么（一行，写进日志）。"""
    try:
        target = link.resolve(strict=True)
    except FileNotFoundError:
        return f"{link}: 断开的符号链接（指向 {os.readlink(link)}），跳过"
    except (OSError, RuntimeError):
        return f"{link}: 符号链接成环，跳过"
    if not target.is_relative_to(root):
        return f"{link}: 指向文档文件夹之外（{target}），出于安全不跟随，跳过"
    kind = "文件夹" if is_dir else "文件"
    return (f"{link}: 指向文件夹内的{kind} {target.relative_to(root).as_posix()}，"
            "它按自己的路径读入一次，链接跳过（不重复入库）")


def load_documents(folder: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[Document]:
    """读取文件夹里所有文档（递归，按路径排序，id 为相对路径）。

    跳过并在日志里逐条说明（若给了 skipped，也把 (路径, 原因) 追加进去）：
    - 符号链接：指向文件夹之外的不跟随（否则 --docs 会把别处的文件读进知识库）；指向文件夹之内的是别名，
      目标已按自己的路径读入，链接本身跳过，这样文件和子文件夹的链接一视同仁，也不会重复、不会成环；
    - 不是普通文件的（FIFO、设备）；
    - 清洗后是空的文档（空文件、只有空白、HTML 只有样板）：入库只会产生空块。
    其余读不了的（非 UTF-8、坏 PDF）直接报错退出：不悄悄丢数据。
    """
    root = Path(folder)
    why = _not_a_dir(root, "--docs 需要一个装有 .txt/.md/.html/.pdf 的文件夹")
    if why:
        raise UserError(why)
    real_root = root.resolve()
    files, notes = [], []

    def walk_error(e: OSError) -> None:
        raise UserError(f"{e.filename}: 无法读取文件夹（{e.strerror}）")

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error, followlinks=False):
        base = Path(dirpath)
        for name in dirnames:                 # os.walk 不进入链接的子文件夹，但会把它列在这里
            if (base / name).is_symlink():
                notes.append(_link_note(base / name, real_root, is_dir=True))
        for name in filenames:
            f = base / name
            if f.suffix.lower() not in _DOC_SUFFIXES:
                continue
            if f.is_symlink():
                target = f.resolve()
                # 唯一跟随的情况：链接留在文件夹内、目标本身因后缀不是文档而不会被读入（如 a.md -> a.markdown）
                follow = target.is_relative_to(real_root) and target.suffix.lower() not in _DOC_SUFFIXES
                if not (follow and target.is_file()):
                    notes.append(_link_note(f, real_root, is_dir=False))
                    continue
            why = _not_a_file(f, "文档应是普通文件")
            if why:
                notes.append(f"{why}，跳过")
                continue
            files.append(f)
    files.sort(key=lambda f: f.relative_to(root).parts)
    docs = []
    for f in files:
        text = _read_document(f)
        if _is_blank(text):
            what = "HTML 里没有可见文字" if f.suffix.lower() in (".html", ".htm") else "没有文字"
            notes.append(f"{f}: 清洗后是空文档（{what}），不入库")
            continue
        docs.append(Document(f.relative_to(root).as_posix(), text, f))
    if notes:
        from common.run import get_logger

        for n in notes:
            get_logger().warning(n)
        if skipped is not None:
            skipped.extend((n.split(": ", 1)[0], n.split(": ", 1)[1]) for n in notes)
    if not docs:
        extra = f"（跳过了 {len(notes)} 个，原因见上面的日志）" if notes else ""
        raise UserError(f"{root}: 没有找到可用的 {'/'.join(_DOC_SUFFIXES)} 文档{extra}")
    return docs


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
