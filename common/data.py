"""数据读取与校验、对话模板渲染与"只在助手回复上算损失"的掩码。
格式见 data/README.md：SFT（alpaca 或 chat messages）、偏好对、分类、检索问答，以及文档文件夹（id = 相对路径）。
绝不悄悄丢数据：第一条坏记录就报 `文件:行: 原因` 并以退出码 2 结束。
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

from common.errors import UserError, brief
from common.run import get_logger

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
_ROLES = ("system", "user", "assistant")
_LANGS = ("zh", "en")
_DOC_SUFFIXES = (".txt", ".md", ".html", ".htm", ".pdf")
_SURROGATE = re.compile("[\ud800-\udfff]")
_WS = re.compile(r"[ \t\n\r]*")
_TOO_DEEP = "JSON 嵌套太深（超过 Python 的递归上限，正常的数据不会嵌套上千层）"


@dataclass
class Document:
    """知识库里的一篇文档。"""

    id: str
    text: str
    path: Path


def _path_problem(p: Path, what: str, want_dir: bool = False) -> str | None:
    """p 不是普通文件（want_dir 时：不是文件夹）就返回一行准确的原因，否则 None。FIFO 要在读之前认出：读它会一直等。"""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        if p.is_symlink():
            return f"{p}: 是断开的符号链接（指向 {os.readlink(p)}，目标不存在）"
        return f"{p}: {'文件夹' if want_dir else '文件'}不存在（{what}）"
    except NotADirectoryError:
        return f"{p}: 路径中间有一段是文件而不是文件夹（{what}）"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{p}: 符号链接成环（链接绕一圈又指回自己），读不到任何东西"
        return f"{p}: 无法访问（{e.strerror}）"
    if want_dir:
        return None if stat.S_ISDIR(mode) else f"{p}: 不是文件夹（{what}）"
    if stat.S_ISDIR(mode):
        return f"{p}: 是一个文件夹，不是文件（{what}）"
    if stat.S_ISFIFO(mode):
        return f"{p}: 是命名管道（FIFO），不是普通文件：读它会一直等写入方，所以不读"
    if not stat.S_ISREG(mode):
        return f"{p}: 是设备或套接字之类的特殊文件，不是普通文件"
    return None


def _read_text(p: Path, what: str) -> str:
    """先确认是普通文件（what：要的是什么文件），再读 UTF-8 文本（去掉记事本爱加的 BOM）；读不了就一行说原因。"""
    if why := _path_problem(p, what):
        raise UserError(why)
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise UserError(f"{p}:{line}: 不是 UTF-8 文本（{e.reason}，字节位置 {e.start}）") from None
    except OSError as e:
        raise UserError(f"{p}: 读取失败（{e.strerror or e}）") from None


def read_json(path: str | Path, what: str) -> Any:
    """读一个完整的 JSON 文件，顶层什么都行（trainer_state.json、模型的 config.json）：FIFO、非 UTF-8、语法错误、
    嵌套过深都是一行 `文件:行: 原因`；里面的结构由调用方检查（点名 `文件: 键`）。"""
    return _loads(Path(path), _read_text(Path(path), what))


def _loads(p: Path, raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: JSON 无法解析（{e.msg}）") from None
    except RecursionError:
        raise UserError(f"{p}:1: {_TOO_DEEP}") from None


def _check_strings(p: Path, no: int, rec: Any) -> None:
    """孤立的代理字符（JSON 里的 "\\ud800"）能通过 json 解析，却不是合法 Unicode：分词、写 UTF-8 时才崩，先拦下。"""
    stack = [("", rec)]
    while stack:                       # 用显式栈而不是递归：嵌套再深也不会 RecursionError
        where, x = stack.pop()
        if isinstance(x, str):
            if m := _SURROGATE.search(x):
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
    def line_at(k: int) -> int:
        return raw.count("\n", 0, k) + 1

    i = _WS.match(raw, 0).end()
    if not raw.startswith("[", i):
        _loads(p, raw)                 # 语法错误先报（带行号）；语法没错才是顶层类型不对
        raise UserError(f"{p}:1: JSON 文件顶层应为记录列表 [...]（每行一个对象的文件请用 .jsonl 后缀）")
    dec, recs, line, pos = json.JSONDecoder(), [], 1, 0
    i = _WS.match(raw, i + 1).end()
    more = not raw.startswith("]", i)
    while more:
        try:
            obj, end = dec.raw_decode(raw, i)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}:{e.lineno}: JSON 无法解析（{e.msg}）") from None
        except RecursionError:
            raise UserError(f"{p}:{line_at(i)}: {_TOO_DEEP}") from None
        line, pos = line + raw.count("\n", pos, i), i          # 行号增量地数：大文件也只扫一遍
        recs.append((line, obj))
        i = _WS.match(raw, end).end()
        more = raw.startswith(",", i)
        if more:
            i = _WS.match(raw, i + 1).end()
        elif not raw.startswith("]", i):
            raise UserError(f"{p}:{line_at(i)}: JSON 无法解析（数组元素之间应是逗号，或以 ] 结束）")
    i += 1                                                      # 越过 ]
    if _WS.match(raw, i).end() != len(raw):
        raise UserError(f"{p}:{line_at(i)}: JSON 无法解析（数组 ] 之后还有多余内容）")
    return recs


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """读取 JSON（对象列表）或 JSONL；返回 [(行号, 记录)]，坏行报 `文件:行: 原因`。
    JSONL 只按 \\n 分行（\\r\\n 也行）：str.splitlines 还会在 U+2028、\\x0b、\\x1c 等字符处断行，
    而这些字符可以合法地出现在 JSON 字符串里，那样会把一条好记录劈成两半。
    """
    p = Path(path)
    raw = _read_text(p, "--data/--qa 需要一个 JSON 或 JSONL 文件")
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


def need_str(p: Path, no: int, r: dict, key: str, optional: bool = False, where: str = "") -> str:
    """第 no 行记录里（where 是嵌套的位置，如 "turns[2]."）的字符串字段；缺少、不是字符串、为空：`文件:行: 原因`。"""
    if key not in r or r[key] is None:
        if optional:
            return ""
        # 键用 repr：用户的键名可以含换行，原样拼进来错误就不是一行了（fuzz 找到的）
        raise UserError(f"{p}:{no}: 缺少字段 '{where}{key}'（这里只有 {_short_repr(list(r)) if r else '空记录'}）")
    if not isinstance(r[key], str):
        raise UserError(f"{p}:{no}: 字段 '{where}{key}' 应为字符串，得到 {type(r[key]).__name__}")
    if not optional and not r[key].strip():
        raise UserError(f"{p}:{no}: 字段 '{where}{key}' 为空")
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


def load_sft(path: str | Path) -> list[list[dict]]:
    """SFT 数据（alpaca 或 chat 格式，可混用）-> 对话列表；alpaca 的 instruction 与 input 用空行连接。"""
    p = Path(path)
    convs = []
    for no, r in read_records(p):
        if "messages" in r:
            msgs = _messages(p, no, r["messages"])
            if msgs[-1]["role"] != "assistant":
                raise UserError(f"{p}:{no}: 对话最后一条应是 assistant 的回复（它是要学习的目标）")
        elif "instruction" in r or "output" in r:
            user, output = need_str(p, no, r, "instruction"), need_str(p, no, r, "output")
            if extra := need_str(p, no, r, "input", optional=True):
                user += f"\n\n{extra}"
            system = need_str(p, no, r, "system", optional=True)
            msgs = [{"role": "system", "content": system}] if system else []
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        else:
            raise UserError(f"{p}:{no}: 既不是 alpaca（instruction/output）也不是 chat（messages）格式，"
                            f"字段为 {sorted(r)}")
        convs.append(msgs)
    return convs


def load_preference(path: str | Path) -> list[dict]:
    """偏好对 {prompt, chosen, rejected}；字符串或消息列表（TRL 的 conversational 格式）。"""
    p = Path(path)   # 三个字段都要：缺哪个 need_str 点名哪个
    return [{k: _messages(p, no, r[k], k) if isinstance(r.get(k), list) else need_str(p, no, r, k)
             for k in ("prompt", "chosen", "rejected")} for no, r in read_records(p)]


def norm_text(text) -> str:
    """规范化：NFKC（全角 "Ｌ５" 折成 "L5"）、小写、去掉空白和标点；消息列表取各条 content。"同一条"都按它判。"""
    text = unicodedata.normalize("NFKC", text if isinstance(text, str) else " ".join(m["content"] for m in text))
    return "".join(ch for ch in text.lower() if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def preference_split(path: str | Path | None, val_fraction: float, seed: int = 42,
                     min_train: int = 4) -> tuple[list[dict], list[dict]]:
    """偏好对 -> (训练, 留出)；path 为 None 时用项目自带的 data/preference/pairs.jsonl。对太少时一行报错。
    chosen 与 rejected 规范化后相同的对没有偏好信号（DPO/BT 梯度恰为 0，留出准确率必记错）：去掉并记一行。"""
    path = path or DATA_DIR / "preference" / "pairs.jsonl"
    pairs = load_preference(path)
    kept = [p for p in pairs if norm_text(p["chosen"]) != norm_text(p["rejected"])]
    if not kept:
        raise UserError(f"{path}: 全部 {len(pairs)} 对的 chosen 与 rejected 相同（规范化后），没有偏好信号，无法训练")
    if len(kept) < len(pairs):
        get_logger().info(f"{path}: 去掉 {len(pairs) - len(kept)} 对 chosen 与 rejected 相同（规范化后）的偏好对")
    train, held = split(kept, val_fraction, seed)
    if len(train) < min_train or len(held) < 2:
        raise UserError(f"{path}: 偏好对太少（训练 {len(train)}、留出 {len(held)}），至少需要约 {min_train + 6} 对")
    return train, held


def preference_conversational(pairs: list[dict]) -> list[dict]:
    """字符串偏好对 -> TRL 的对话格式（prompt 是 user 消息，chosen/rejected 是 assistant 消息），模板由 TRL 套。"""
    roles = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}
    return [{k: p[k] if isinstance(p[k], list) else [{"role": role, "content": p[k]}] for k, role in roles.items()}
            for p in pairs]


def load_classification(path: str | Path) -> tuple[list[dict], list[str]]:
    """分类数据 {text, label} -> (记录, 排好序的标签集合)。"""
    p = Path(path)
    out = [{"text": need_str(p, no, r, "text"), "label": need_str(p, no, r, "label")}
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
        rec = {"question": need_str(p, no, r, "question"), "answer": need_str(p, no, r, "answer")}
        rec["doc_id"] = need_str(p, no, r, "doc_id", optional=True) or None
        rec["gold_passage"] = need_str(p, no, r, "gold_passage", optional=True) or None
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


def _read_document(path: Path) -> str:
    """一个文档的纯文本（txt/md 原样；html 只留可见文本；pdf 用 pypdf）。load_documents 已确认它是普通文件。"""
    if path.suffix.lower() == ".pdf":
        from pypdf import PdfReader  # 导入要 1 秒：只在真有 PDF 时付

        try:
            text = "\n".join(page.extract_text() or "" for page in PdfReader(path).pages)
        except Exception as e:  # noqa: BLE001 - pypdf 对坏文件抛的异常五花八门（PdfReadError、KeyError、ValueError……）
            why = f"{type(e).__name__}: {brief(e, 150)}"
            raise UserError(f"{path}: PDF 无法解析，文件可能损坏、被截断或加密（{why}）") from None
    else:
        text = _read_text(path, "文档应是普通文件")
    if path.suffix.lower() in (".html", ".htm"):
        from bs4 import BeautifulSoup

        try:
            soup = BeautifulSoup(text, "html.parser")
            for t in soup(["script", "style", "nav", "footer", "noscript", "head"]):
                t.decompose()
            text = "\n".join(ln.strip() for ln in soup.get_text("\n").splitlines() if ln.strip())
        except RecursionError:
            raise UserError(f"{path}: HTML 标签嵌套太深，无法解析") from None
    if m := _SURROGATE.search(text):   # PDF 抽出的文字偶尔带孤立代理字符：后面分词、写 UTF-8 都会崩
        raise UserError(f"{path}: 含孤立的代理字符 \\u{ord(m.group()):04x}（不是合法的 Unicode 字符）")
    return text


def _skip_link(link: Path, root: Path, is_dir: bool) -> str | None:
    """文件夹里的符号链接：返回跳过它的原因（一行，进日志）；只有该跟随时返回 None。
    唯一跟随的：文件链接指向文件夹内、后缀不是文档因而不会按自己路径读入的普通文件（如 a.md -> a.markdown）。
    先 resolve(strict=True) 再做任何判断：成环的链接（a.md -> b.md -> a.md）在这里变成一条日志，不是 traceback。
    """
    try:
        target = link.resolve(strict=True)
    except FileNotFoundError:
        return f"{link}: 断开的符号链接（指向 {os.readlink(link)}），跳过"
    except (OSError, RuntimeError):   # 成环：Python 3.12 及以前抛 RuntimeError("Symlink loop")，3.13 起抛 OSError
        return f"{link}: 符号链接成环，跳过"
    if not target.is_relative_to(root):
        return f"{link}: 指向文档文件夹之外（{target}），出于安全不跟随，跳过"
    if not is_dir and target.suffix.lower() not in _DOC_SUFFIXES and target.is_file():
        return None
    return (f"{link}: 指向文件夹内的{'文件夹' if is_dir else '文件'} {target.relative_to(root).as_posix()}，"
            "它按自己的路径读入一次，链接跳过（不重复入库）")


def _walk_error(e: OSError) -> None:
    raise UserError(f"{e.filename}: 无法读取文件夹（{e.strerror}）")


def load_documents(folder: str | Path, skipped: list[tuple[str, str]] | None = None) -> list[Document]:
    """读取文件夹里所有文档（递归，按路径排序，id 为相对路径）。
    跳过并在日志里逐条说明（若给了 skipped，也把 (路径, 原因) 追加进去）：符号链接（见 _skip_link：指向文件夹
    之外的不跟随，否则 --docs 会把别处的文件读进知识库；之内的是别名，目标按自己的路径读入一次）、FIFO 与设备、
    清洗后是空的文档（入库只会产生空块）。其余读不了的（非 UTF-8、坏 PDF）直接报错退出：不悄悄丢数据。
    """
    root = Path(folder)
    if why := _path_problem(root, "--docs 需要一个装有 .txt/.md/.html/.pdf 的文件夹", want_dir=True):
        raise UserError(why)
    real_root = root.resolve()
    files, notes = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error, followlinks=False):
        base = Path(dirpath)
        # os.walk 不进入链接的子文件夹，但会把它列在 dirnames 里
        entries = [(base / n, True) for n in dirnames if (base / n).is_symlink()]
        entries += [(base / n, False) for n in filenames if Path(n).suffix.lower() in _DOC_SUFFIXES]
        for f, is_dir in entries:
            if f.is_symlink() and (note := _skip_link(f, real_root, is_dir)):
                notes.append(note)
            elif why := _path_problem(f, "文档应是普通文件"):
                notes.append(f"{why}，跳过")
            else:
                files.append(f)
    docs = []
    for f in sorted(files, key=lambda f: f.relative_to(root).parts):
        text = _read_document(f)
        # 清洗后什么都没剩（只有空白和零宽空格、BOM 这类不可见的格式字符）
        if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in text):
            what = "HTML 里没有可见文字" if f.suffix.lower() in (".html", ".htm") else "没有文字"
            notes.append(f"{f}: 清洗后是空文档（{what}），不入库")
        else:
            docs.append(Document(f.relative_to(root).as_posix(), text, f))
    for n in notes:
        get_logger().warning(n)
    if skipped is not None:
        skipped.extend(tuple(n.split(": ", 1)) for n in notes)
    if not docs:
        extra = f"（跳过了 {len(notes)} 个，原因见上面的日志）" if notes else ""
        raise UserError(f"{root}: 没有找到可用的 {'/'.join(_DOC_SUFFIXES)} 文档{extra}")
    return docs


def split(items: list, val_fraction: float = 0.1, seed: int = 42) -> tuple[list, list]:
    """确定性地打乱并切分出验证集（至少 1 条）。"""
    idx = list(range(len(items)))
    random.Random(seed).shuffle(idx)
    n_val = max(1, int(round(len(items) * val_fraction)))
    if n_val >= len(items):
        raise UserError(f"数据只有 {len(items)} 条，不够切出验证集")
    return [items[i] for i in idx[n_val:]], [items[i] for i in idx[:n_val]]


def tokenize_chat(tok, messages: list[dict], max_length: int = 512) -> dict:
    """按对话模板编码，labels 只保留助手回复的 token（其余为 -100）。
    做法与模板无关：对第 i 条助手消息，分别渲染"到它之前 + 生成提示"和"到它为止"，
    两者 token 长度之差就是它的 token 区间。这对任何 chat template 都成立，不需要 {% generation %} 标记。
    """
    def encode(msgs: list[dict], gen: bool = False) -> list[int]:
        return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False))

    ids = encode(messages)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start, end = len(encode(messages[:i], gen=True)), len(encode(messages[: i + 1]))
            for j in range(start, min(end, len(ids))):
                mask[j] = 1
    ids, mask = ids[:max_length], mask[:max_length]
    labels = [t if k else -100 for t, k in zip(ids, mask)]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "assistant_masks": mask}


def prompt_text(tok, messages: list[dict]) -> str:
    """去掉最后一条助手回复，渲染成"等模型作答"的提示文本。"""
    ctx = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return tok.apply_chat_template(ctx, tokenize=False, add_generation_prompt=True)
