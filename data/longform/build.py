"""生成 data/longform/sft_long.jsonl：像学生自己整理的"长回答"SFT 数据（alpaca 格式，中英混合）。

为什么要它：课程自带的 SFT 数据回答都很短（smollm2 模板下平均约 80 token），而学生第一次用自己的数据
（客服文档、说明书、政策条款整理成的问答）时，回答动辄几百 token：截断、填充浪费、内存、训练时长的问题
只有在这种数据上才会出现。第 1 课 05（--data 跑自己的数据、packing、梯度检查点）和第 3 课 03（padded /
packed / packed+检查点的吞吐对比）都用它。

怎么来的（确定性、许可干净）：全部取自本项目自己写的文档 data/domain/docs（电动车电池科普）和 data/kb/docs
（云帆客服知识库），以及 data/kb/qa.jsonl 的问题；不抓网页、不用模型生成。五类记录：
  article   "写一篇题为《标题》的说明" -> 整篇文档（分节）
  sections  "根据《标题》介绍 A、B（、C）" -> 连续 2-3 节原文
  qa_long   kb/qa.jsonl 的问题 -> 先给含答案的原句，再给所在小节（及相邻小节）作详细说明
  outline   input = 整篇文档，"为它写提纲，每节一句话" -> 每节标题 + 该节第一句
  steps     input = 一节原文，"把这段改写成要点列表" -> 按句切开的要点
只保留回答在 [MIN_TOKENS, MAX_TOKENS] 个 token（smollm2 分词器）之间的记录，固定种子打乱后写出。

运行：python data/longform/build.py            # 需要 smollm2-135m 的分词器（课程缓存里已有，见 common/models.py）
      python data/longform/build.py --check    # 只重新生成并核对与仓库里的文件逐字节相同
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common import data, models  # noqa: E402

OUT = Path(__file__).resolve().parent / "sft_long.jsonl"
MIN_TOKENS, MAX_TOKENS = 100, 800   # 回答（助手回复）的 token 数范围
MAX_TOTAL = 1024                     # 整条（模板 + 问题 + 输入 + 回答）上限：超过默认 --max-length 的要有，但别太多
# 每类最多取几条：让长度分布像一份真实的学生数据（多数 150-500 token，少数很长的整篇文档）
QUOTA = {"qa_long": 90, "sections": 90, "steps": 20, "article": 10, "outline": 10}
SEED = 16


def sections_of(path: Path) -> tuple[str, list[tuple[str, str]]]:
    """文档 -> (标题, [(小节标题, 小节正文)])。md 按 ##，html 按 <h2>，txt 按空行分块（块首行是小标题）。"""
    raw = path.read_text(encoding="utf-8")
    suf = path.suffix
    if suf == ".md":
        title = re.search(r"^# (.+)$", raw, re.M).group(1).strip()
        parts = re.split(r"^## ", raw, flags=re.M)
        intro = parts[0].split("\n", 1)[1].strip() if "\n" in parts[0] else ""
        secs = [(p.split("\n", 1)[0].strip(), p.split("\n", 1)[1].strip()) for p in parts[1:]]
    elif suf == ".html":
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(raw, "html.parser")
        title = soup.find("h1").get_text(strip=True)
        intro, secs = "", []
        for h in soup.find_all("h2"):
            body = []
            for sib in h.find_next_siblings():
                if sib.name in ("h1", "h2", "footer", "nav"):
                    break
                if sib.name in ("ul", "ol"):
                    body += [("- " if sib.name == "ul" else f"{i}. ") + li.get_text(" ", strip=True)
                             for i, li in enumerate(sib.find_all("li"), 1)]
                else:
                    body.append(sib.get_text(" ", strip=True))
            secs.append((h.get_text(strip=True), "\n".join(body)))
    else:   # .txt：标题 + 下划线，然后空行分隔的块
        blocks = [b.strip() for b in re.split(r"\n\s*\n", raw.strip()) if b.strip()]
        title = blocks[0].splitlines()[0].strip()
        intro, secs = "", []
        for b in blocks[1:]:
            lines = b.splitlines()
            if len(lines) >= 2 and len(lines[0]) <= 60:
                head, body = lines[0].strip(), "\n".join(lines[1:]).strip()
                if head.startswith("Q:") and body.startswith("A:"):
                    head, body = head[2:].strip(), body[2:].strip()
                secs.append((head, body))
            elif secs:
                secs[-1] = (secs[-1][0], secs[-1][1] + "\n" + b)
            else:
                intro = b
    return title, [("", intro)] * bool(intro) + [s for s in secs if s[1]]


def render(secs: list[tuple[str, str]], level: str = "##") -> str:
    return "\n\n".join((f"{level} {h}\n{b}" if h else b) for h, b in secs)


def first_sentence(text: str) -> str:
    text = re.sub(r"^\s*(-|\d+\.)\s*", "", text.strip().splitlines()[0])
    m = re.search(r"^(.+?[。！？!?]|.+?\.(?=\s|$))", text)
    return (m.group(1) if m else text).strip()


def sentences(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(-|\d+\.)\s*", "", line).strip()
        out += [s.strip() for s in re.findall(r"[^。！？!?]+[。！？!?]?|[^.]+\.?(?=\s|$)", line) if len(s.strip()) > 3]
    return out


def is_zh(text: str) -> bool:
    return data.detect_lang(text) == "zh"


def build(tok) -> list[dict]:
    docs = sorted((ROOT / "data" / "domain" / "docs").glob("*.md")) + \
        sorted(p for p in (ROOT / "data" / "kb" / "docs").rglob("*") if p.suffix in (".md", ".txt", ".html"))
    parsed = {p: sections_of(p) for p in docs}
    recs: list[dict] = []
    for title, secs in parsed.values():
        zh = is_zh(title)
        named = [s for s in secs if s[0]]
        # article：整篇
        recs.append({"instruction": f"请写一篇题为《{title}》的说明文档，分小节介绍。" if zh else
                     f'Write a help article titled "{title}", organised in sections.',
                     "input": "", "output": render(secs), "kind": "article"})
        # sections：连续 2-3 节
        for i in range(0, len(named) - 1, 2):
            group = named[i:i + 3] if len(named) - i == 3 else named[i:i + 2]
            heads = "、".join(f"“{h}”" for h, _ in group) if zh else ", ".join(f'"{h}"' for h, _ in group)
            recs.append({"instruction": f"根据《{title}》，详细介绍{heads}这几部分。" if zh else
                         f'Based on "{title}", explain the parts {heads} in detail.',
                         "input": "", "output": render(group, "###"), "kind": "sections"})
        # outline：读整篇，写提纲
        outline = "\n".join(f"{i}. {h}：{first_sentence(b)}" if zh else f"{i}. {h}: {first_sentence(b)}"
                            for i, (h, b) in enumerate(named, 1))
        recs.append({"instruction": "为下面这篇文档写一份提纲：列出每一节的标题，并用原文的一句话概括该节。" if zh else
                     "Write an outline of the document below: list every section title with one sentence "
                     "from the text that sums it up.", "input": render(secs), "output": outline, "kind": "outline"})
        # steps：把最长的两节改写成要点
        for h, b in sorted(named, key=lambda s: -len(s[1]))[:2]:
            pts = sentences(b)
            if len(pts) >= 3:
                recs.append({"instruction": f"把《{title}》中“{h}”这一节整理成要点列表。" if zh else
                             f'Turn the section "{h}" of "{title}" into a bullet list of key points.',
                             "input": b, "output": "\n".join(f"- {s}" for s in pts), "kind": "steps"})
    # qa_long：检索问答的问题 + 含答案的原句 + 所在小节和下一节作为详细说明
    kb = ROOT / "data" / "kb" / "docs"
    for q in data.load_qa(ROOT / "data" / "kb" / "qa.jsonl"):
        title, secs = parsed[kb / q["doc_id"]]
        idx = next((i for i, (_, b) in enumerate(secs) if q["gold_passage"] in b), None)
        if idx is None:   # html 的 gold_passage 是元素文本，空白可能与这里的拼接不同：退回整篇
            idx = 0
        zh = q["lang"] == "zh"
        lead = (f"简短回答：{q['gold_passage']}\n\n详细说明（摘自《{title}》）：\n\n" if zh else
                f"Short answer: {q['gold_passage']}\n\nIn more detail (from \"{title}\"):\n\n")
        recs.append({"instruction": q["question"], "input": "", "output": lead + render(secs[idx:idx + 2], "###"),
                     "kind": "qa_long"})
    # 按回答 token 数过滤（用 smollm2 的对话模板量：与训练时一致）
    kept, rng = [], random.Random(SEED)
    for r in recs:
        enc = data.tokenize_chat(tok, data.alpaca_to_messages(r), 10**6)
        r["answer_tokens"], r["tokens"] = sum(enc["assistant_masks"]), len(enc["input_ids"])
    for kind, quota in QUOTA.items():
        ok = [r for r in recs if r["kind"] == kind and MIN_TOKENS <= r["answer_tokens"] <= MAX_TOKENS
              and r["tokens"] <= MAX_TOTAL]
        kept += rng.sample(ok, min(quota, len(ok)))
    rng.shuffle(kept)
    return [{k: r[k] for k in ("instruction", "input", "output")} for r in kept], recs, kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="只核对生成结果与仓库里的文件一致")
    a = ap.parse_args()
    tok = models.load_tokenizer("smollm2-135m")
    rows, allrecs, kept = build(tok)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if a.check:
        same = OUT.read_text(encoding="utf-8") == text
        print("sft_long.jsonl 与生成结果一致" if same else "sft_long.jsonl 与生成结果不一致：请重新运行 build.py")
        sys.exit(0 if same else 1)
    OUT.write_text(text, encoding="utf-8")
    kinds = {}
    for r in kept:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    zh = sum(is_zh(r["instruction"]) for r in rows)
    for key in ("answer_tokens", "tokens"):
        v = sorted(r[key] for r in kept)
        print(f"{key}: 平均 {sum(v) / len(v):.0f}，中位 {v[len(v) // 2]}，p90 {v[int(len(v) * 0.9)]}，最大 {v[-1]}")
    over = [sum(r["tokens"] > n for r in kept) for n in (256, 512)]
    print("整条超过 256 / 512 token 的：", over[0], "/", over[1])
    print(f"候选 {len(allrecs)} 条，保留 {len(rows)} 条（中 {zh} / 英 {len(rows) - zh}）：{kinds}；"
          f"{OUT.stat().st_size / 1024:.0f} KB -> {OUT}")


if __name__ == "__main__":
    main()
