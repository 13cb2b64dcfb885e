"""偏好数据治理：对齐效果的上限是数据质量。一条条规则清洗偏好对，每条规则删了多少、为什么删，都写进报告。

流水线（顺序有讲究：先修正/删除坏标签，再去重，最后才做统计意义上的再平衡与切分）：
  0. 合并来源：--data（prompt/chosen/rejected）+ --extra-data（另一批，可能带 votes、category）+
     --graded（同一 prompt 的多个回答各有分数：分差 ≥ min_score_gap 的两两组成偏好对）；
  1. 无信息对：chosen 与 rejected 规范化后相同；
  2. 不安全内容：chosen 命中不安全规则（被错标为"更好"的有害回答；真实系统用审核模型，这里用可读的关键词规则）；
  3. 标注一致性：有多个标注（votes）时算多数票占比；低于 min_agreement 的删掉，多数认为 rejected 更好的翻转；
  4. 精确去重（规范化文本完全相同）与近似去重（MinHash LSH，字符 3-gram，Jaccard ≥ near_dup_threshold）；
  5. 长度偏置：chosen 比 rejected 长的比例（0.5 = 无偏）；偏离超过 length_tolerance 就下采样多的一边
     （否则模型/奖励模型会学到"越长越好"）；
  6. 类别平衡：类别 = category 字段，没有时按语言（zh/en）；每类最多 max_category_ratio × 最小类；
  7. 泄漏：按 pair 随机切分时，同一（或几乎相同的）prompt 会同时出现在训练和评估里——先数一遍；
     再把精确/近似相同的 prompt 并成组（MinHash + 并查集）按组切分（同组只进一边），泄漏归零；
     --eval-data 给了外部评估集时，删掉训练里与之重合的 prompt。
输出：curation_report.md / .html、pairs_clean.jsonl、train.jsonl、eval.jsonl、removed.jsonl（每条带删除原因）。

运行：
  python lesson4_alignment/06_dataset_curation/dataset_curation.py            # 项目自带数据 + data/preference_raw/
  python lesson4_alignment/06_dataset_curation/dataset_curation.py --smoke    # 同样的数据，MinHash 位数减半，几秒
  python lesson4_alignment/06_dataset_curation/dataset_curation.py --data my_pairs.jsonl --extra-data "" \\
      --graded "" --eval-data my_eval.jsonl                                    # 自己的数据（不需要 GPU）

你会看到：输入与输出的对数、训练 / 评估各多少对，每条规则删了几条（有害 chosen、标注分歧、无信息对、精确重复、
近似重复）与按多数票翻转了几条，都写进 curation_report.md。项目自带的数据里每类问题都埋了几条，每条规则都该删到东西；
长度偏置在容差内时不下采样，再平衡也不会让偏置变大；按 pair 随机切分时总有评估 prompt 在训练里出现过（同一 prompt
的几个偏好对被分到两边），按 prompt 分组切分后泄漏为 0。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：0.0 分钟，0.3 GB，结论 6/6 成立
  ✓ 清洗删掉坏对与重复：输入 − 输出 的对数：23（≥ 15）
  ✓ 埋下的每类问题都被对应规则删掉：有害 chosen / 标注分歧 / 无信息对 / 精确 / 近似重复里删得最少的一类：2（≥ 1）
  ✓ 多数票认为 rejected 更好的对被翻转：翻转条数：1（≥ 1）
  ✓ 随机切分会泄漏、按 prompt 分组切分不会：泄漏的评估 prompt 数 随机切分 − 分组切分：6（≥ 3）
  ✓ 分组切分后评估集里没有训练见过的 prompt：泄漏数：0（≤ 0）
  ✓ 长度再平衡不会让偏置变大：|chosen 更长的比例 − 0.5| 之后 − 之前：0（≤ 0）
<!-- /results -->
详见 README.md。
"""

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, run
from common.errors import UserError

# 什么算"同一条"（规范化、MinHash、分组、泄漏计数）：放在旁边的 _similar.py，所有规则共用同一个定义
similar = run.import_sibling(__file__, "_similar")
norm = similar.norm

# 不安全规则：中英关键词（真实流水线换成审核模型/分类器；规则的好处是每次删除都能解释）
# 每条是一个正则片段：`.*` 允许中间插词，“绕过人脸验证”也能命中“绕过.*验证”
UNSAFE = [r"kill yourself", r"bypass .*(sensor|protection)", r"disable .*protection", r"make a bomb", r"炸弹",
          r"信用卡号", r"撬开", r"绕过.*(验证|保护)", r"强磁铁干扰", r"自杀"]


@dataclass
class Args(cli.CommonArgs):
    extra_data: str = cli.arg("data/preference_raw/dirty_pairs.jsonl",
                              "第二批偏好对（可带 votes/category）；空字符串 = 不用")
    graded: str = cli.arg("data/preference_raw/graded.jsonl", "打分回答 {prompt, responses:[{text, score}]}；空 = 不用")
    eval_data: str = cli.arg(None, "外部评估集（偏好格式）：训练里与它重合的 prompt 会被删掉")
    min_score_gap: float = cli.arg(2.0, "打分回答组成偏好对所需的最小分差", min=0)
    min_agreement: float = cli.arg(0.7, "多数票占比低于它的对删掉", min=0.5, max=1)
    near_dup_threshold: float = cli.arg(0.8, "近似重复的 Jaccard 阈值（MinHash 估计）", min=0.1, max=1)
    num_perm: int = cli.arg(128, "MinHash 置换个数：越多估计越准、越慢", min=16)
    length_tolerance: float = cli.arg(0.1, "chosen 更长的比例允许偏离 0.5 多少", min=0, max=0.5)
    max_category_ratio: float = cli.arg(3.0, "每类最多是最小类的几倍", min=1)
    val_fraction: float = cli.arg(0.2, "评估集比例（按 prompt 分组切分）", min=0.01, max=0.9)


# 冒烟：MinHash 位数减半就够测流水线；阈值附近的近似重复判断会更粗，所以默认用 128
SMOKE = dict(num_perm=64)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线 = 同一份数据清洗前 / 按 pair 随机切分时
PLANTED = ("unsafe_chosen", "low_agreement", "identical_responses", "exact_duplicate", "near_duplicate")
CLAIMS = [
    run.Claim("清洗删掉坏对与重复：输入 − 输出 的对数", "pairs_in - pairs_out", ">=", 15, 15),
    run.Claim("埋下的每类问题都被对应规则删掉：有害 chosen / 标注分歧 / 无信息对 / 精确 / 近似重复里删得最少的一类",
              f"min(m['removed_by_rule'].get(k, 0) for k in {PLANTED})", ">=", 1, 1),
    run.Claim("多数票认为 rejected 更好的对被翻转：翻转条数", "flipped_by_votes", ">=", 1, 1),
    run.Claim("随机切分会泄漏、按 prompt 分组切分不会：泄漏的评估 prompt 数 随机切分 − 分组切分",
              "leaked_prompts - leaked_prompts_after", ">=", 3, 3),
    run.Claim("分组切分后评估集里没有训练见过的 prompt：泄漏数", "leaked_prompts_after", "<=", 0, 0),
    run.Claim("长度再平衡不会让偏置变大：|chosen 更长的比例 − 0.5| 之后 − 之前",
              "abs(length_bias_after - 0.5) - abs(length_bias_before - 0.5)", "<=", 0, 0),
]


def load_graded(path: Path, gap: float) -> list[dict]:
    """打分回答 -> 偏好对：同一 prompt 下分数高的当 chosen，分差够大才成对。

    分差小的两条（4 分对 3.5 分）谁更好，打分的人自己都拿不准；拿它们成对，教给模型的是标注噪声。
    """
    pairs, unpaired = [], 0
    for no, r in data.read_records(path):
        resp = r.get("responses")
        data.need_str(path, no, r, "prompt")
        # 少于两个回答组不成任何一对：一行报错点名行号，而不是悄悄产出 0 对
        if not isinstance(resp, list) or len(resp) < 2:
            raise UserError(f"{path}:{no}: 需要至少两个 'responses'")
        for i, x in enumerate(resp):
            if not isinstance(x, dict) or not isinstance(x.get("text"), str):
                raise UserError(f"{path}:{no}: responses[{i}] 需要 'text'（字符串）与 'score'（数字）")
            score = x.get("score")
            # NaN 和谁比都是 False：带 NaN 的回答一个对都成不了，会被悄悄丢掉；inf − inf 又是 NaN。都是坏数据，拒绝
            if isinstance(score, bool) or not isinstance(score, (int, float)) \
                    or isinstance(score, float) and not math.isfinite(score):
                raise UserError(f"{path}:{no}: responses[{i}].score = {score!r:.40} 应为有限的数"
                                "（NaN / inf 没法比高低）")
        # 两两组合：同一 prompt 的一条好回答会出现在好几对里，所以规则 7 要按 prompt 分组切分；
        # --min-score-gap 0 时回答会和自己配成一对（差 0 ≥ 0），这种 chosen == rejected 的对由规则 1 删掉
        new = [{"prompt": r["prompt"], "chosen": a["text"], "rejected": b["text"], "source": "graded"}
               for a in resp for b in resp if a["score"] - b["score"] >= gap]
        unpaired, pairs = unpaired + (not new), pairs + new
    if unpaired:   # 合法但成不了对（分差都 < gap）：可以不用，但要说出来，不能悄悄少了
        run.get_logger().info(f"{path}: {unpaired} 个 prompt 的回答分差都小于 --min-score-gap {gap}，没有组成偏好对")
    return pairs


def load_pool(args: Args) -> list[dict]:
    """合并所有来源；保留 votes / category 这些额外字段（common.data 只校验三个必需字段）。"""
    pool = []
    # filter(None, …)：--extra-data "" 表示不用这一批（见文档字符串的运行示例），空串在这里被跳过
    for src in filter(None, [args.data or str(data.DATA_DIR / "preference" / "pairs.jsonl"), args.extra_data]):
        # 先按当前目录找，找不到再按仓库根：默认值是相对仓库根的路径，脚本从任何目录运行都找得到
        path = Path(src) if Path(src).is_absolute() or Path(src).exists() else run.REPO_ROOT / src
        extra = [r for _, r in data.read_records(path)]
        # 读两遍再逐条配对：load_preference 校验并规范三个必需字段，原始记录里才有 votes / category；
        # 它不丢记录（坏记录直接报错），两边一一对应，zip 不会错位
        for rec, raw in zip(data.load_preference(path), extra):
            votes = raw.get("votes")
            # 拼错一票（如 "chose"）会被 Counter 当成第三个选项，多数票占比就算错了：一行报错
            if votes is not None and (not isinstance(votes, list) or not set(votes) <= {"chosen", "rejected"}):
                raise UserError(f"{path}: votes 应为 'chosen'/'rejected' 组成的列表，得到 {votes!r}")
            # 记下来源文件名：removed.jsonl 里能追到每条坏数据来自哪一批
            pool.append({**rec, "votes": votes, "category": raw.get("category"), "source": path.name})
    if args.graded:
        path = Path(args.graded) if Path(args.graded).exists() else run.REPO_ROOT / args.graded
        # 打分数据没有投票与类别：补上 None，后面的规则不必分情况判断键在不在
        pool += [{**p, "votes": None, "category": None} for p in load_graded(path, args.min_score_gap)]
    return pool


def length_bias(pairs: list[dict]) -> float:
    """chosen 比 rejected 长的比例：0.5 = 长度与好坏无关；0.8 = 奖励模型只看长度就能猜对八成。"""
    return sum(len(norm(p["chosen"])) > len(norm(p["rejected"])) for p in pairs) / max(len(pairs), 1)


def tag(p: dict, rule: str) -> dict:
    """被删的对带上规则名：removed.jsonl 里每一条都能回答"为什么删了它"。"""
    return {**p, "rule": rule}


def apply_rules(pool: list[dict], args: Args) -> tuple[list[dict], list[dict], list[float], int]:
    """规则 1-3：无信息对、不安全 chosen、标注一致性；返回 (留下的, 删掉的, 每条的多数票占比, 翻转条数)。

    先做这三条、再去重：一条错标的对和它的"正确"副本去重时只留一条，先去重就可能留下错的那条。
    """
    # 拼成一个正则、只编译一次：每对只扫一遍；IGNORECASE：“Make a Bomb” 也要命中
    unsafe = re.compile("|".join(UNSAFE), re.IGNORECASE)
    kept, removed, agreements, flipped = [], [], [], 0
    for p in pool:
        if norm(p["chosen"]) == norm(p["rejected"]):
            removed.append(tag(p, "identical_responses"))   # 两边一样：DPO 的梯度为 0，只占算力
        # 规范化文本 + 原文都查：去掉空格标点后 "make a bomb" 变成 "makeabomb"，英文规则要在原文上匹配
        elif unsafe.search(norm(p["chosen"]) + " " + (p["chosen"] if isinstance(p["chosen"], str) else "")):
            removed.append(tag(p, "unsafe_chosen"))
        elif p["votes"]:
            # 平票时 share = 0.5，低于默认的 --min-agreement 0.7 而被删；若设成 0.5，平票保留，
            # 方向取 most_common 的并列规则：先出现的那一票
            top, count = Counter(p["votes"]).most_common(1)[0]
            share = count / len(p["votes"])
            # 删与不删之前先记下：报告里的平均一致率反映原始标注的质量，而不只是留下来的那些
            agreements.append(share)
            if share < args.min_agreement:   # 标注者自己都说不清哪个好：这条对只是噪声
                removed.append(tag(p, "low_agreement"))
            elif top == "rejected":   # 多数认为 rejected 更好：标签翻转
                flipped += 1
                kept.append({**p, "chosen": p["rejected"], "rejected": p["chosen"]})
            else:
                kept.append(p)
        else:
            kept.append(p)
    return kept, removed, agreements, flipped


def pair_key(p: dict) -> str:
    """去重的键：prompt + 两个回答（不分顺序），所以翻转过的矛盾标签也算同一对。"""
    return norm(p["prompt"]) + "|" + "|".join(sorted([norm(p["chosen"]), norm(p["rejected"])]))


def dedupe(pairs: list[dict], args: Args) -> tuple[list[dict], list[dict]]:
    """规则 4：精确去重（规范化后完全相同）再近似去重（MinHash LSH）；返回 (留下的, 删掉的)。

    重复的对在损失里被算好几遍，等于悄悄加大了它的权重；精确的先用哈希去掉，近似的才值得花 MinHash 的钱。
    """
    seen, uniq, removed = set(), [], []
    for p in pairs:
        # md5 只当指纹（不涉安全）：集合里存定长的摘要，而不是拼起来的长文本
        h = hashlib.md5(pair_key(p).encode()).hexdigest()
        if h in seen:
            removed.append(tag(p, "exact_duplicate"))
        else:
            seen.add(h)
            uniq.append(p)
    near = similar.minhash_dups(list(enumerate(pair_key(p) for p in uniq)), args.near_dup_threshold, args.num_perm)
    # 按下标排序：removed.jsonl 里的顺序跟输入一致，两次运行能逐行比对
    removed += [tag(uniq[i], "near_duplicate") for i in sorted(near)]
    return [p for i, p in enumerate(uniq) if i not in near], removed


def rebalance_length(pairs: list[dict], tolerance: float, rng) -> tuple[list[dict], list[dict]]:
    """规则 5：下采样多的一边，直到 chosen 更长的比例回到 0.5 ± tolerance；返回 (留下的, 删掉的)。

    chosen 总是更长时，奖励模型最省事的解法就是"越长分越高"（Singhal 2023 测过 RLHF 的长度偏置）。
    """
    longer = [p for p in pairs if len(norm(p["chosen"])) > len(norm(p["rejected"]))]
    # `not in` 对 dict 按值比较、逐个扫 longer：O(n²)；去重后没有两条相同的对，所以分得准，只是数据很大时慢
    other = [p for p in pairs if p not in longer]
    rng.shuffle(longer)   # 随机删：从尾部删会系统性地删掉某个来源（数据按来源拼接）
    rng.shuffle(other)
    removed = []
    # 每次只从多的一边删一条，回到容差内就停：删得最少；任一边为空就不动（全是 chosen 更长时删多少都回不到 0.5）
    while longer and other and abs(len(longer) / (len(longer) + len(other)) - 0.5) > tolerance:
        removed.append(tag((longer if len(longer) > len(other) else other).pop(), "length_rebalance"))
    return longer + other, removed


def category_of(p: dict) -> str:
    """类别 = category 字段；没有时按语言（zh/en）：中英混合的数据里，语言就是最明显的"类"。"""
    return p["category"] or data.detect_lang(p["prompt"] if isinstance(p["prompt"], str) else norm(p["prompt"]))


def cap_categories(pairs: list[dict], ratio: float, rng) -> tuple[list[dict], list[dict], dict]:
    """规则 6：每类最多 ratio × 最小类；返回 (留下的, 删掉的, 平衡前每类条数)。大类太多，模型只学会大类的口吻。"""
    by_cat = defaultdict(list)
    for p in pairs:
        by_cat[category_of(p)].append(p)
    before = {c: len(v) for c, v in by_cat.items()}
    cap = int(min(before.values()) * ratio) if by_cat else 0   # 没有数据时 min() 对空序列会报错，所以先判断 by_cat
    kept, removed = [], []
    for _, v in sorted(by_cat.items()):   # 按类名排序：结果与输入里类别出现的先后无关
        # 随机留：上一步 rebalance_length 返回的是"chosen 更长"在前，按顺序截会先删另一边，把长度偏置又推回去
        rng.shuffle(v)
        kept += v[:cap]
        removed += [tag(p, "category_cap") for p in v[cap:]]
    return kept, removed, before


def drop_eval_leaks(pairs: list[dict], eval_data: str | None) -> tuple[list[dict], list[dict]]:
    """规则 7 前半：删掉 prompt 出现在外部评估集里的对；评估集见过的题，分数量的是记忆不是能力。"""
    if not eval_data:
        return pairs, []
    # 外部评估集只按规范化后的 prompt 精确比对：与它只是近似相同的训练 prompt 不会被删（分组切分管的只是内部两边）
    ext = {norm(p["prompt"]) for p in data.load_preference(eval_data)}
    return ([p for p in pairs if norm(p["prompt"]) not in ext],
            [tag(p, "eval_leak") for p in pairs if norm(p["prompt"]) in ext])


def group_split(pairs: list[dict], args: Args) -> tuple[list[dict], list[dict]]:
    """规则 7 后半：按 prompt 组切分（近似相同的 prompt 一组），同组只进训练或评估一边，泄漏归零。"""
    if len(pairs) < 2:
        raise UserError(f"清洗后只剩 {len(pairs)} 对：规则太严或数据太少（看 removed.jsonl）")
    # 近似判断用与去重同一个阈值和 num_perm：去重认为不同、分组却认为相同，报告里的数字就对不上（见 _similar.py）
    gid = similar.prompt_groups([norm(p["prompt"]) for p in pairs], args.near_dup_threshold, args.num_perm)
    eval_groups = set(data.split(sorted(set(gid)), args.val_fraction, args.seed)[1])   # 切的是组，不是对
    return [p for p, g in zip(pairs, gid) if g not in eval_groups], [p for p, g in zip(pairs, gid) if g in eval_groups]


def dump(out, name: str, rows: list[dict]) -> None:
    """JSONL，去掉值为 None 的字段：清洗后的文件能直接喂给 03 / 04（它们只认 prompt/chosen/rejected）。"""
    with out.path(name).open("w", encoding="utf-8") as f:
        for r in rows:
            # ensure_ascii=False：中文原样写出，打开文件能直接读，而不是满屏 \uXXXX
            f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")


def write_report(out, m: dict, cats_before: dict, n_votes: int, bias: tuple[float, float], agree: float) -> None:
    """curation_report.md / .html：每条规则删了多少、治理前后的偏置与泄漏并排，审数据的人一眼能看出改了什么。

    bias / agree 传未取整的值：metrics 里取到 4 位后再格式化成 3 位，会在 5 的边上多进一位。
    """
    md = [f"# Preference data curation report ({m['pairs_in']} -> {m['pairs_out']} pairs)", "",
          "| rule | removed |", "|---|---|", *[f"| {k} | {v} |" for k, v in m["removed_by_rule"].items()], "",
          "| check | before | after |", "|---|---|---|",
          f"| chosen-longer fraction (0.5 = no length bias) | {bias[0]:.3f} | {bias[1]:.3f} |",
          f"| eval prompts also in train | {m['leaked_prompts']} (random pair split) | "
          f"{m['leaked_prompts_after']} (group split) |",
          f"| categories | {cats_before} | {m['categories_after']} |", "",
          f"Annotator agreement: {n_votes} pairs with votes, mean majority share {agree:.2f}, "
          f"{m['flipped_by_votes']} flipped to the majority label.", "",
          f"Pairs built from graded responses: {m['pairs_from_graded']}; train {m['train_pairs']}, "
          f"eval {m['eval_pairs']}."]
    out.path("curation_report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    import markdown

    # extensions=["tables"]：Python-Markdown 默认不认 | 表格 | 语法，不开就渲染成一段纯文本
    out.path("curation_report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>curation report</title>"
        + markdown.markdown("\n".join(md), extensions=["tables"]), encoding="utf-8")


def main(args: Args) -> dict:
    # 先套冒烟参数再 run.start：config.json 记下的才是真正跑的参数
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    # 只有长度再平衡用随机数：给它一个按 --seed 建的独立 Random，别处的改动不会改变它删哪几条
    rng = random.Random(args.seed)

    # 0. 合并来源；先按 lesson 脚本的做法随机切一次，数一数泄漏（后面分组切分要和这个数比）
    pool = load_pool(args)
    tr, ev = data.split(pool, args.val_fraction, args.seed)
    leaked = similar.leaks(tr, ev, args.near_dup_threshold, args.num_perm)
    out.log.info(f"输入 {len(pool)} 对；按 pair 随机切分时评估集有 {leaked} 个 prompt 在训练集里出现过")

    # 1-3. 逐条规则：无信息对、不安全、标注一致性（先修正/删除坏标签，再去重）
    kept, removed, agreements, flipped = apply_rules(pool, args)
    # 4. 精确去重与近似去重；chosen/rejected 不分顺序，翻转的矛盾标签也算重复
    kept, dups = dedupe(kept, args)
    # 5. 长度偏置：下采样多的一边，直到 chosen 更长的比例回到 0.5 ± tolerance
    bias_before = length_bias(kept)
    kept, too_long = rebalance_length(kept, args.length_tolerance, rng)
    # 6. 类别平衡：每类最多 max_category_ratio × 最小类
    kept, capped, cats_before = cap_categories(kept, args.max_category_ratio, rng)
    cats_after = dict(Counter(p["category"] or data.detect_lang(norm(p["prompt"])) for p in kept))
    # 7. 外部评估集去泄漏 + 按规范化 prompt 分组切分
    kept, in_eval = drop_eval_leaks(kept, args.eval_data)
    # 长度偏置在所有删减之后量：后面的类别上限、去泄漏也会删对，只在第 5 步后量会漏掉它们把偏置推回去
    bias_after = length_bias(kept)
    removed += dups + too_long + capped + in_eval   # 按规则的先后：removed.jsonl 读起来就是流水线的顺序
    train_out, eval_out = group_split(kept, args)
    # 同一个 leaks()、同一阈值与 num_perm 再量一次：前后两个泄漏数才是同一把尺子量的
    leaked_after = similar.leaks(train_out, eval_out, args.near_dup_threshold, args.num_perm)

    # 8. 写文件与报告
    for name, rows in (("pairs_clean.jsonl", kept), ("train.jsonl", train_out), ("eval.jsonl", eval_out),
                       ("removed.jsonl", removed)):
        dump(out, name, rows)
    by_rule = dict(Counter(r["rule"] for r in removed))
    # 没有任何带票的对时记 1.0（无分歧可言），而不是除零
    mean_agree = sum(agreements) / len(agreements) if agreements else 1.0
    metrics = {
        "pairs_in": len(pool), "pairs_out": len(kept), "length_bias_before": round(bias_before, 4),
        "length_bias_after": round(bias_after, 4), "leaked_prompts": leaked,
        "leaked_prompts_after": leaked_after, "removed_by_rule": by_rule, "flipped_by_votes": flipped,
        "mean_agreement": round(mean_agree, 4), "pairs_from_graded": sum(p.get("source") == "graded" for p in pool),
        "categories_after": cats_after, "train_pairs": len(train_out), "eval_pairs": len(eval_out)}
    write_report(out, metrics, cats_before, len(agreements), (bias_before, bias_after), mean_agree)
    for k, v in by_rule.items():
        out.log.info(f"规则 {k}: 删除 {v}")
    return out.finish(metrics, summary=f"{len(pool)} -> {len(kept)} 对；删除 {by_rule}；长度偏置 {bias_before:.2f} -> "
                                       f"{bias_after:.2f}；泄漏 {leaked} -> {leaked_after}", claims=CLAIMS)


if __name__ == "__main__":
    main(cli.parse(Args))
