"""SFT 数据预处理流水线：原始文档 → 清洗 → 指令记录 → 对话格式 → train/val JSONL + 数据卡。

微调的上限由数据决定。本脚本把一堆"脏"文档（HTML 样板、全角与零宽字符、重复与近重复段落、
手机号/邮箱/身份证号、其它语言）变成第 1 课训练脚本可以直接读取的对话数据，每条规则删了多少、
改了多少都计数，最后写一份数据卡（data_card.md）说明这份数据从哪来、经过了什么。

运行：
  python lesson1_sft/02_data_preprocess/data_pipeline.py            # CPU，另用 smollm2 分词器数 token 长度
  python lesson1_sft/02_data_preprocess/data_pipeline.py --smoke    # 同一条流水线，不数 token（SMOKE）
  python lesson1_sft/02_data_preprocess/data_pipeline.py --docs my_docs/ --minhash-threshold 0.8 \
      --model Qwen/Qwen2.5-7B-Instruct --source hf --config configs/lesson1/data_pipeline.yaml
      # 自己的文档（.txt/.md/.html/.pdf）+ 目标模型的分词器统计 token 长度（流水线本身只用 CPU）

你会看到：每条规则（完全重复、近重复、过短、过长、非中英文）删掉的段落数都 > 0，
records_out = records_in - 删除总数；手机号/邮箱/身份证号按类型计数并替换成 <PHONE>/<EMAIL>/<ID_CARD>；
输出目录里有 train.jsonl、val.jsonl（chat messages 格式，common.data.load_sft 可直接读）、
data_card.md 和 funnel.png（每一步之后还剩多少段落）。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：0.1 分钟，0.5 GB，结论 4/4 成立
  ✓ 每条清洗规则都真删了段落：删得最少的那条规则删掉的段落数：1（≥ 1）
  ✓ 漏斗对得上账：读入段落 − 各规则删除之和 − 输出记录，差几条：0（≤ 0）
  ✓ 三类个人信息（手机号/邮箱/身份证号）都找到并遮盖：最少的那类的个数：3（≥ 1）
  ✓ 脱敏后输出里不再有号码：写出的 train/val 里残留的号码数 / 脱敏前找到的号码数：0（≤ 0）
<!-- /results -->
"""

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from common import cli, data, run
from common.errors import UserError

# 数据卡与漏斗图（把计数写成人读的文档）放在旁边的 _report.py：这里只留清洗本身
report = run.import_sibling(__file__, "_report")


@dataclass
class Args(cli.CommonArgs):
    docs: str = cli.arg(None, "原始文档文件夹（.txt/.md/.html，装了 pypdf 时还有 .pdf）；默认 data/raw/。"
                              "--data 指向文件夹时效果相同")
    min_chars: int = cli.arg(20, "短于此字符数的段落删除（标题、导航残片、'点击这里'之类）", min=0)
    max_chars: int = cli.arg(1000, "长于此字符数的段落删除（整页粘贴、不换行的流水账；也超出小模型的上下文）", min=1)
    minhash_threshold: float = cli.arg(0.5, "近重复阈值：两段字符 n-gram 集合的 Jaccard 相似度 ≥ 它就算近重复",
                                       min=0.01, max=1)
    shingle_size: int = cli.arg(3, "字符 n-gram 的 n：中文没有空格，按字符切；n 越大，改一个字损失的 n-gram 越多",
                                min=1)
    num_perm: int = cli.arg(128, "MinHash 的哈希函数个数：越多 Jaccard 估计越准（误差约 1/sqrt(num_perm)），越慢",
                            min=2)
    keep_langs: str = cli.arg("zh,en", "保留的语言（langdetect 代码，zh 包括 zh-cn/zh-tw），逗号分隔")
    val_fraction: float = cli.arg(0.1, "验证集比例", min=0.01, max=0.9)
    count_tokens: bool = cli.arg(True, "用目标模型的分词器统计对话的 token 长度（据此选训练时的 max_length）")


SMOKE = dict(count_tokens=False)   # 冒烟：流水线完全一样，只是不数 token（给了 --model 仍加载它的分词器检查）

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；两种模式跑的是同一份数据、同一条流水线，门槛相同
CLAIMS = [
    run.Claim("每条清洗规则都真删了段落：删得最少的那条规则删掉的段落数",
              "min(removed_by_rule.values())", ">=", 1, 1),
    run.Claim("漏斗对得上账：读入段落 − 各规则删除之和 − 输出记录，差几条",
              "abs(records_in - sum(removed_by_rule.values()) - records_out)", "<=", 0, 0),
    run.Claim("三类个人信息（手机号/邮箱/身份证号）都找到并遮盖：最少的那类的个数",
              "min(pii_masked.values())", ">=", 1, 1),
    run.Claim("脱敏后输出里不再有号码：写出的 train/val 里残留的号码数 / 脱敏前找到的号码数",
              "pii_left_in_output / pii_masked_total", "<=", 0, 0),
]


# ---- 清洗规则：这些正则就是本课的内容 ----
ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")   # 零宽空格/连接符、BOM、软连字符：看不见但会打断匹配
# CJK 统一汉字基本区：常用汉字都在里面；扩展区的生僻字不在，但判断"这段是不是中文"够用
HAN = "\u4e00-\u9fff"
# NFKC 会把中文全角标点"，：；！？"也变成半角；挨着汉字的，还原成全角，中文读起来才自然
CJK_PUNCT = {",": "，", ":": "：", ";": "；", "!": "！", "?": "？"}
PII = {
    # 18 位身份证：6 位地区码 + 出生日期 YYYYMMDD + 3 位顺序码 + 校验位（0-9 或 X）；前后不能紧挨字母数字
    "id_card": re.compile(r"(?<![0-9A-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                          r"\d{3}[\dXx](?![0-9A-Za-z])"),
    # 大陆手机号：1[3-9] 开头共 11 位；可带 +86 / 0086 / 86 / (+86) 前缀，可写成 138-1234-5678 或 138 1234 5678
    "phone": re.compile(r"(?<![\d+])(?:(?:\+|00)?86[-\s]?|\(\+?86\)\s?)?1[3-9]\d(?:[-\s]?\d{4}){2}(?!\d)"),
    "email": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
}
MASK = {"id_card": "<ID_CARD>", "phone": "<PHONE>", "email": "<EMAIL>"}
# 问答结构：Q:/A:、问：/答：，以及客服聊天记录里的"[10:02:11] 用户(尾号5678)：……客服小云：……"
_TS = r"(?:\[\d{1,2}:\d{2}(?::\d{2})?\]\s*)?"
# "用户(尾号5678)"的括号内容限 12 个字符以内：不设上限时，一个没闭合的括号会一路吞到后文
_ASK = r"(?:Q|问|问题|用户(?:\([^)]{0,12}\))?)"
_ANS = rf"(?:A|答|回答|客服[{HAN}]{{0,3}})"
# 标记前不能紧挨字母数字：否则 "FAQ:" 里的 Q、"DNA:" 里的 A 也被当成问答标记；
# 答案用非贪婪匹配，前瞻到下一个说话人（或结尾）为止：贪婪时第一条回答会吞掉后面整段对话
QA = re.compile(rf"(?<![A-Za-z0-9]){_TS}{_ASK}\s*[:：]\s*(?P<q>.+?)\s*{_TS}(?<![A-Za-z0-9]){_ANS}\s*[:：]\s*(?P<a>.+?)"
                rf"\s*(?=(?<![A-Za-z0-9]){_TS}(?:{_ASK}|{_ANS}|系统)\s*[:：]|$)", re.S)
SENT_END = re.compile(r"(?<=[。！？])|(?<=[.!?])\s+(?=[A-Z\"“])")   # 英文句号后接大写才断句："1. 家用" 不断
# 样板段落（C4 清洗规则的思路）：一个句末标点都没有的（导航、分页、标题、邮件头），或含典型样板词的
# 英文句号后面要接空白或结尾才算句末：版本号 3.5、网址里的点不算
HAS_SENTENCE = re.compile(r"[。！？!?]|\.(?:\s|$)")
BOILERPLATE = re.compile(r"cookie|javascript|点击这里|click here|read more|【广告】|all rights reserved|版权所有", re.I)


def id_checksum_ok(s: str) -> bool:
    """GB 11643 校验：前 17 位加权求和 mod 11 决定第 18 位。"""
    # 第 i 位的权重是 2^(17-i) mod 11；余数 0..10 依次对应校验码 1,0,X,9,8,…,2（X 代表 10）
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(c) * w for c, w in zip(s[:17], weights)) % 11] == s[17].upper()


def normalize(text: str) -> str:
    """NFKC（全角字母数字→半角，\\u3000/nbsp→空格）+ 去零宽字符 + 合并空白 + 去 Markdown 链接语法。"""
    t = ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))
    t = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", t)                # [文字](链接) → 文字
    t = re.sub(r"(?m)^\s*>\s?", "", t)                                # 邮件/Markdown 引用符号 >
    # 段内换行也压成空格：段落此前已经按空行切好，段内的换行只是排版（中文行之间的空格下面再去掉）
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(rf"(?<=[{HAN}])[,:;!?]+|[,:;!?]+(?=[{HAN}])", lambda m: "".join(CJK_PUNCT[c] for c in m.group()), t)
    wide = f"{HAN}\u3000-\u303f\uff01-\uff5e"                        # 汉字 + 中文标点
    return re.sub(rf"(?<=[{wide}]) (?=[{wide}])", "", t)             # 硬换行拼回来的中文行，中间不该有空格


def split_paragraphs(doc: data.Document) -> list[str]:
    """txt/md 按空行分段；html 的可见文本已按块级元素分行，每行一段。"""
    sep = r"\n" if doc.path.suffix.lower() in (".html", ".htm") else r"\n\s*\n"
    return [p for p in re.split(sep, doc.text) if p.strip()]


def lang_of(text: str) -> str:
    """langdetect（固定种子）+ 文字系统复核；zh-cn/zh-tw 合并为 zh。"""
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0          # langdetect 内部有随机采样：不固定种子，同一段话每次结果可能不同
    try:
        code = detect(text)
    except LangDetectException:       # 全是数字/符号，没有可判断的字符
        return "unknown"
    # langdetect 按字符 n-gram 打分，中英混排的短句会被判成 ko/vi（实测"L5 使用 8 节 AA 碱性电池……"→ ko）。
    # 有汉字、却没有假名和谚文的文本只可能是中文：用文字系统纠正
    if re.search(f"[{HAN}]", text) and not re.search("[\u3040-\u30ff\uac00-\ud7af]", text):
        return "zh"
    return "zh" if code.startswith("zh") else code


def mask_pii(text: str, counts: Counter) -> str:
    """按类型把个人信息替换成占位符并计数（counts 累加）；身份证号另记校验位是否正确。"""
    ids = PII["id_card"].findall(text)           # 先身份证：它的 18 位数字里可能嵌着像手机号的片段
    counts["id_card"] += len(ids)
    # 校验位不对的也照样遮盖：可能只是抄错一位，漏遮一个真号码的代价远大于多遮一个订单号
    counts["id_card_checksum_ok"] += sum(id_checksum_ok(s) for s in ids)
    text = PII["id_card"].sub(MASK["id_card"], text)
    for kind in ("phone", "email"):
        text, n = PII[kind].subn(MASK[kind], text)
        counts[kind] += n
    return text


def to_record(para: dict) -> dict:
    """确定性地把一段话变成一条指令记录：有问答结构就是问答（取第一问和紧随的第一答），否则"一句话概括"，
    用首句当答案（摘要里的 Lead-1 基线：首句往往就是主题句）。不需要任何模型。"""
    text, lang = para["text"], para["lang"]
    m = QA.search(text)
    if m:
        user, answer, task = m.group("q"), m.group("a"), "qa"
    else:
        first = SENT_END.split(text, maxsplit=1)[0].strip()
        # 指令跟着段落的语言走：英文段配中文指令，模型会学成问中答英、答非所问
        ask = ("请用一句话概括下面这段话的要点。" if lang == "zh"
               else "Summarize the following paragraph in one sentence.")
        user, answer, task = f"{ask}\n\n{text}", first, "summary"
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            # meta 记下来源文档与任务类型：数据卡按它统计，出了问题能追回原文档
            "meta": {"source": para["source"], "task": task, "lang": lang}}


def minhash(text: str, args: Args):
    """一段话的 MinHash 签名：字符 n-gram（去空格、小写）集合。"""
    from datasketch import MinHash

    s = text.lower().replace(" ", "")
    # 所有段用同一个 seed：seed 决定那组哈希函数，seed 不同的签名无从比较（datasketch 的 jaccard 直接报错）
    mh = MinHash(num_perm=args.num_perm, seed=args.seed)
    # max(1, …)：比 n 还短的段也至少出一个 n-gram；空集的签名彼此全等，估出的 Jaccard 是 1，会被互判为重复
    mh.update_batch(s[i:i + args.shingle_size].encode("utf-8") for i in range(max(1, len(s) - args.shingle_size + 1)))
    return mh


class Funnel:
    """按顺序过每条规则：记下每条规则删了多少段（removed）、删掉的是哪些（audit），以及每一步之后还剩多少。"""

    def __init__(self, n: int):
        self.removed: dict[str, int] = {}
        self.audit: list[dict] = []
        self.steps = [("read", n)]             # 图里用英文标签：不是每台机器都装了中文字体

    def step(self, rule: str, items: list[dict], flags: list[bool], after: str | None = None) -> list[dict]:
        """flags[i] = 第 i 段是否留下；删掉的计数并记入审计文件 removed.jsonl；after：漏斗图上这一步的名字。

        由调用方算好 flags（而不是传一个会改外部状态的回调进来）：去重要记住"见过谁"，状态留在调用方的循环里。
        """
        self.removed[rule] = flags.count(False)
        self.audit.extend({"rule": rule, **it} for it, f in zip(items, flags) if not f)
        kept = [it for it, f in zip(items, flags) if f]
        if after:
            self.steps.append((after, len(kept)))
        return kept


def exact_dedup(items: list[dict], funnel: Funnel) -> list[dict]:
    """完全重复：对归一化后的文本取哈希，一遍扫完（O(n)），不用两两比较；第一次出现的留下。"""
    seen: set[str] = set()
    flags = []
    for it in items:
        h = hashlib.md5(it["text"].encode("utf-8")).hexdigest()   # 只为判等、不为安全：md5 足够且快
        flags.append(h not in seen)
        seen.add(h)
    return funnel.step("exact_duplicate", items, flags, after="exact dedup")


def near_dedup(items: list[dict], args: Args, funnel: Funnel) -> list[dict]:
    """近重复：MinHash 估计 Jaccard 相似度，LSH 分桶只拿"可能相似"的候选来比，n 很大时也不用 O(n²)。"""
    from datasketch import MinHashLSH

    # weights 偏向少漏检：LSH 多给几个候选没关系，下面还会用 Jaccard 复核
    # （默认 0.5/0.5 时，相似度 0.56 的一对有 1/4 会漏掉）
    lsh = MinHashLSH(threshold=args.minhash_threshold, num_perm=args.num_perm, weights=(0.1, 0.9))
    sigs, flags = {}, []
    for it in items:
        mh = minhash(it["text"], args)
        # LSH 的候选可能有假阳性：再用签名估计的 Jaccard 复核一遍，减少误删
        dup = any(mh.jaccard(sigs[k]) >= args.minhash_threshold for k in lsh.query(mh))
        flags.append(not dup)
        if not dup:   # 只登记留下的段：近重复的一串里，后来者都和第一个比
            key = str(len(sigs))
            lsh.insert(key, mh)
            sigs[key] = mh
    return funnel.step("near_duplicate", items, flags, after="near dedup")


def read_paragraphs(folder) -> tuple[list, list[dict]]:
    """读文档并分段：一段 = 一条候选记录（records_in）。坏文件（非 UTF-8、读不了的 PDF）在这里报错退出，不悄悄跳过。"""
    docs = data.load_documents(folder)
    return docs, [{"source": d.id, "text": p} for d in docs for p in split_paragraphs(d)]


def normalize_all(paras: list[dict]) -> dict:
    """就地归一化每段文本，返回改了多少（写进数据卡：读者要知道原文被动过哪些地方）。"""
    norm = Counter()
    for p in paras:
        # 先数再改：归一化之后就数不出原文里有多少处被动过
        norm["nfkc_changed_paragraphs"] += unicodedata.normalize("NFKC", p["text"]) != p["text"]
        norm["zero_width_chars_removed"] += len(ZERO_WIDTH.findall(p["text"]))
        p["text"] = normalize(p["text"])
    return dict(norm)


def filter_paragraphs(items: list[dict], args: Args, funnel: Funnel) -> list[dict]:
    """按顺序过每条删除规则：便宜的先做，最贵的近重复检测只处理剩下的。"""
    items = exact_dedup(items, funnel)
    # 长度与样板：过短的多是标题、导航残片；过长的是整页粘贴，也超出小模型的上下文
    items = funnel.step("too_short", items, [len(it["text"]) >= args.min_chars for it in items])
    items = funnel.step("too_long", items, [len(it["text"]) <= args.max_chars for it in items])
    items = funnel.step("boilerplate", items, [bool(HAS_SENTENCE.search(it["text"]))
                                               and not BOILERPLATE.search(it["text"]) for it in items],
                        after="length+boilerplate")
    # 语言：只留 --keep-langs；删掉的是什么语言也记下来，写进数据卡
    keep_langs = {x.strip() for x in args.keep_langs.split(",") if x.strip()}
    for it in items:
        # 语言记在段上：下面按它过滤，to_record 按它选中/英文指令，数据卡按它统计
        it["lang"] = lang_of(it["text"])
    items = funnel.step("language", items, [it["lang"] in keep_langs for it in items], after="language")
    return near_dedup(items, args, funnel)


def write_splits(out: run.Run, records: list[dict], audit: list[dict], val_fraction: float, seed: int):
    """切 train/val 写 JSONL；被删的段落写进 removed.jsonl 供抽查。-> (train, val)"""
    train, val = data.split(records, val_fraction, seed)
    for name, part in (("train.jsonl", train), ("val.jsonl", val), ("removed.jsonl", audit)):
        # ensure_ascii=False：中文原样写出，抽查 JSONL 时直接能读，不是满屏 \uXXXX
        out.path(name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    # 自检：用训练脚本同一个读取函数读回来，格式不对就在这里失败，而不是等到训练时
    assert len(data.load_sft(out.path("train.jsonl"))) + len(data.load_sft(out.path("val.jsonl"))) == len(records)
    return train, val


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # --data 是各脚本共有的参数：这里它指向文件夹时与 --docs 等价，--docs 优先
    folder = args.docs or args.data or data.DATA_DIR / "raw"
    # 1. 读文档并分段；分词器也现在加载：数 token 在最后一步，坏的 --model 不该等整条流水线跑完才报
    docs, paras = read_paragraphs(folder)
    tok = report.tokenizer(args, out.log)
    out.log.info(f"{len(docs)} 个文档（{dict(Counter(d.path.suffix.lower() for d in docs))}）→ {len(paras)} 个段落")
    funnel = Funnel(len(paras))
    # 2. Unicode 归一化：必须在去重之前，否则全角版、带零宽字符的副本看起来"不一样"，去重就漏掉它们
    norm = normalize_all(paras)
    # 3-6. 完全重复 → 长度与样板 → 语言 → 近重复（MinHash + LSH）
    items = filter_paragraphs(paras, args, funnel)
    # 一段不剩时 data.split 只会说"不够切出验证集"：在这里就点名最可能设错的几个参数
    if not items:
        raise UserError(f"{folder}: 清洗后一个段落也没剩下；检查 --min-chars/--max-chars/--keep-langs")
    # 7. 个人信息脱敏：不删段落，把号码换成占位符（模型学到"这里有个电话"，而不是某个人的电话）
    pii = Counter()
    for it in items:
        it["text"] = mask_pii(it["text"], pii)
    # 8. 段落 → 指令记录 → chat messages，切 train/val 写 JSONL
    records = [to_record(it) for it in items]
    train, val = write_splits(out, records, funnel.audit, args.val_fraction, args.seed)
    # 用同样的正则把写出的文件再扫一遍：脱敏是否干净，要在输出上量，不能只信"替换过了"
    written = out.path("train.jsonl").read_text(encoding="utf-8") + out.path("val.jsonl").read_text(encoding="utf-8")
    # 9. 长度统计，数据卡与漏斗图
    metrics = {
        "records_in": len(paras), "records_out": len(records), "removed_by_rule": funnel.removed,
        "pii_masked": {k: pii[k] for k in MASK}, "pii_masked_total": sum(pii[k] for k in MASK),
        "pii_left_in_output": sum(len(rx.findall(written)) for rx in PII.values()),
        "id_card_checksum_ok": pii["id_card_checksum_ok"], "normalized": norm, "documents": len(docs),
        "train_records": len(train), "val_records": len(val),
        "languages": dict(Counter(it["lang"] for it in items)),
        "removed_languages": dict(Counter(a["lang"] for a in funnel.audit if a["rule"] == "language")),
        "tasks": dict(Counter(r["meta"]["task"] for r in records)),
        "lengths": report.length_stats(tok, items, records),
    }
    report.write_card(out, metrics, funnel.steps, records, folder)
    report.plot_funnel(out, funnel.steps)
    return out.finish(metrics, summary=f"{len(paras)} 段 → {len(records)} 条记录（train {len(train)} / val "
                                       f"{len(val)}），删除 {funnel.removed}，脱敏 {metrics['pii_masked']}",
                      claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
