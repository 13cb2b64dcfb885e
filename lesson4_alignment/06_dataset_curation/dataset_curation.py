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
     再把精确/近似相同的 prompt 并成组（MinHash + 并查集）按组切分（同组只进一边），泄漏归零；--eval-data 给了外部评估集时，删掉训练里与之重合的 prompt。
输出：curation_report.md / .html、pairs_clean.jsonl、train.jsonl、eval.jsonl、removed.jsonl（每条带删除原因）。

运行：
  python lesson4_alignment/06_dataset_curation/dataset_curation.py            # 项目自带数据 + data/preference_raw/
  python lesson4_alignment/06_dataset_curation/dataset_curation.py --smoke    # 同样的数据，MinHash 位数减半，几秒
  python lesson4_alignment/06_dataset_curation/dataset_curation.py --data my_pairs.jsonl --extra-data "" \\
      --graded "" --eval-data my_eval.jsonl                                    # 自己的数据（不需要 GPU）

你会看到（实测）：379 -> 356 对（训练 284 / 评估 72）；删除 有害 chosen 4、标注分歧 3、无信息对 2、精确重复 10、近似重复 4，翻转 1；
长度偏置 0.46（在容差内）；随机切分时 7 个评估 prompt 泄漏，分组切分后 0。详见同目录 README.md。
"""

import hashlib
import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from common import cli, data, run
from common.errors import UserError

# 不安全规则：中英关键词（真实流水线换成审核模型/分类器；规则的好处是每次删除都能解释）
UNSAFE = [r"kill yourself", r"bypass .*(sensor|protection)", r"disable .*protection", r"make a bomb", r"炸弹",
          r"信用卡号", r"撬开", r"绕过.*(验证|保护)", r"强磁铁干扰", r"自杀"]


@dataclass
class Args(cli.CommonArgs):
    extra_data: str = cli.arg("data/preference_raw/dirty_pairs.jsonl", "第二批偏好对（可带 votes/category）；空字符串 = 不用")
    graded: str = cli.arg("data/preference_raw/graded.jsonl", "打分回答 {prompt, responses:[{text, score}]}；空 = 不用")
    eval_data: str = cli.arg(None, "外部评估集（偏好格式）：训练里与它重合的 prompt 会被删掉")
    min_score_gap: float = cli.arg(2.0, "打分回答组成偏好对所需的最小分差", min=0)
    min_agreement: float = cli.arg(0.7, "多数票占比低于它的对删掉", min=0.5, max=1)
    near_dup_threshold: float = cli.arg(0.8, "近似重复的 Jaccard 阈值（MinHash 估计）", min=0.1, max=1)
    num_perm: int = cli.arg(128, "MinHash 置换个数：越多估计越准、越慢", min=16)
    length_tolerance: float = cli.arg(0.1, "chosen 更长的比例允许偏离 0.5 多少", min=0, max=0.5)
    max_category_ratio: float = cli.arg(3.0, "每类最多是最小类的几倍", min=1)
    val_fraction: float = cli.arg(0.2, "评估集比例（按 prompt 分组切分）", min=0.01, max=0.9)


SMOKE = dict(num_perm=64)


def norm(text) -> str:
    """规范化：NFKC、小写、去掉空白和标点（"L5 门锁？" 与 "l5门锁?" 视为同一串）。"""
    text = text if isinstance(text, str) else " ".join(m["content"] for m in text)
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P"))


def load_graded(path: Path, gap: float) -> list[dict]:
    """打分回答 -> 偏好对：同一 prompt 下分数高的当 chosen，分差够大才成对。"""
    pairs = []
    for no, r in data.read_records(path):
        resp = r.get("responses")
        if not isinstance(r.get("prompt"), str) or not isinstance(resp, list) or len(resp) < 2:
            raise UserError(f"{path}:{no}: 需要 'prompt'（字符串）和至少两个 'responses'")
        for i, x in enumerate(resp):
            if not isinstance(x, dict) or not isinstance(x.get("text"), str) or not isinstance(x.get("score"), (int, float)):
                raise UserError(f"{path}:{no}: responses[{i}] 需要 'text'（字符串）与 'score'（数字）")
        for a in resp:
            for b in resp:
                if a["score"] - b["score"] >= gap:
                    pairs.append({"prompt": r["prompt"], "chosen": a["text"], "rejected": b["text"], "source": "graded"})
    return pairs


def load_pool(args: Args) -> list[dict]:
    """合并所有来源；保留 votes / category 这些额外字段（common.data 只校验三个必需字段）。"""
    pool = []
    for src in filter(None, [args.data or str(data.DATA_DIR / "preference" / "pairs.jsonl"), args.extra_data]):
        path = Path(src) if Path(src).is_absolute() or Path(src).exists() else run.REPO_ROOT / src
        extra = [r for _, r in data.read_records(path)]
        for rec, raw in zip(data.load_preference(path), extra):
            votes = raw.get("votes")
            if votes is not None and (not isinstance(votes, list) or not set(votes) <= {"chosen", "rejected"}):
                raise UserError(f"{path}: votes 应为 'chosen'/'rejected' 组成的列表，得到 {votes!r}")
            pool.append({**rec, "votes": votes, "category": raw.get("category"), "source": path.name})
    if args.graded:
        path = Path(args.graded) if Path(args.graded).exists() else run.REPO_ROOT / args.graded
        pool += [{**p, "votes": None, "category": None} for p in load_graded(path, args.min_score_gap)]
    return pool


def minhash(text: str, num_perm: int):
    """字符 3-gram 集合的 MinHash 签名（中英文都适用，不需要分词）。"""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1)
    m.update_batch([text[k:k + 3].encode() for k in range(max(1, len(text) - 2))])
    return m


def minhash_dups(items: list[tuple[int, str]], threshold: float, num_perm: int) -> set[int]:
    """近似重复：MinHash + LSH；每组只留第一条，返回要删的下标。"""
    from datasketch import MinHashLSH

    lsh, drop = MinHashLSH(threshold=threshold, num_perm=num_perm), set()
    for i, text in items:
        m = minhash(text, num_perm)
        if lsh.query(m):
            drop.add(i)
        else:
            lsh.insert(str(i), m)
    return drop


def prompt_groups(prompts: list[str], threshold: float, num_perm: int) -> list[int]:
    """把精确或近似相同的 prompt 并成一组（并查集）：切分时整组只进训练或评估一边。"""
    from datasketch import MinHashLSH

    parent = list(range(len(prompts)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, text in enumerate(prompts):
        m = minhash(text, num_perm)
        for j in lsh.query(m):
            parent[find(int(j))] = find(i)
        lsh.insert(str(i), m)
    return [find(i) for i in range(len(prompts))]


def length_bias(pairs: list[dict]) -> float:
    return sum(len(norm(p["chosen"])) > len(norm(p["rejected"])) for p in pairs) / max(len(pairs), 1)


def leaks(train: list[dict], evals: list[dict], threshold: float, num_perm: int) -> int:
    """评估集里有多少 prompt 在训练集里出现过（精确或近似）：LSH 里只放训练集，逐个查评估 prompt。"""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    exact = set()
    for i, p in enumerate(train):
        t = norm(p["prompt"])
        exact.add(t)
        lsh.insert(str(i), minhash(t, num_perm))
    return sum(1 for p in evals if norm(p["prompt"]) in exact or lsh.query(minhash(norm(p["prompt"]), num_perm)))


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    rng = random.Random(args.seed)

    # 0. 合并来源；先按 lesson 脚本的做法随机切一次，数一数泄漏
    pool = load_pool(args)
    pairs_in = len(pool)
    tr, ev = data.split(pool, args.val_fraction, args.seed)
    leaked = leaks(tr, ev, args.near_dup_threshold, args.num_perm)
    out.log.info(f"输入 {pairs_in} 对；按 pair 随机切分时评估集有 {leaked} 个 prompt 在训练集里出现过")
    removed, kept = [], []

    def drop(p, rule):
        removed.append({**p, "rule": rule})

    # 1-3. 逐条规则：无信息对、不安全、标注一致性
    unsafe = re.compile("|".join(UNSAFE), re.IGNORECASE)
    agreements, flipped = [], 0
    for p in pool:
        if norm(p["chosen"]) == norm(p["rejected"]):
            drop(p, "identical_responses")
        elif unsafe.search(norm(p["chosen"]) + " " + (p["chosen"] if isinstance(p["chosen"], str) else "")):
            drop(p, "unsafe_chosen")
        elif p["votes"]:
            share = Counter(p["votes"]).most_common(1)[0][1] / len(p["votes"])
            agreements.append(share)
            if share < args.min_agreement:
                drop(p, "low_agreement")
            elif Counter(p["votes"]).most_common(1)[0][0] == "rejected":   # 多数认为 rejected 更好：标签翻转
                flipped += 1
                kept.append({**p, "chosen": p["rejected"], "rejected": p["chosen"]})
            else:
                kept.append(p)
        else:
            kept.append(p)

    # 4. 精确去重（规范化后完全相同）与近似去重（MinHash LSH）；chosen/rejected 不分顺序，翻转的矛盾标签也算重复
    key = lambda p: norm(p["prompt"]) + "|" + "|".join(sorted([norm(p["chosen"]), norm(p["rejected"])]))  # noqa: E731
    seen, uniq = set(), []
    for p in kept:
        h = hashlib.md5(key(p).encode()).hexdigest()
        if h in seen:
            drop(p, "exact_duplicate")
        else:
            seen.add(h)
            uniq.append(p)
    near = minhash_dups(list(enumerate(key(p) for p in uniq)), args.near_dup_threshold, args.num_perm)
    for i in sorted(near):
        drop(uniq[i], "near_duplicate")
    kept = [p for i, p in enumerate(uniq) if i not in near]

    # 5. 长度偏置：下采样多的一边，直到 chosen 更长的比例回到 0.5 ± tolerance
    bias_before = length_bias(kept)
    longer = [p for p in kept if len(norm(p["chosen"])) > len(norm(p["rejected"]))]
    other = [p for p in kept if p not in longer]
    rng.shuffle(longer)
    rng.shuffle(other)
    while longer and other and abs(len(longer) / (len(longer) + len(other)) - 0.5) > args.length_tolerance:
        drop((longer if len(longer) > len(other) else other).pop(), "length_rebalance")
    kept = longer + other
    bias_after = length_bias(kept)

    # 6. 类别平衡：每类最多 max_category_ratio × 最小类
    by_cat = defaultdict(list)
    for p in kept:
        by_cat[p["category"] or data.detect_lang(p["prompt"] if isinstance(p["prompt"], str) else norm(p["prompt"]))].append(p)
    cats_before = {c: len(v) for c, v in by_cat.items()}
    cap = int(min(cats_before.values()) * args.max_category_ratio) if by_cat else 0
    kept = []
    for _, v in sorted(by_cat.items()):
        kept += v[:cap]
        for p in v[cap:]:
            drop(p, "category_cap")
    cats_after = dict(Counter(p["category"] or data.detect_lang(norm(p["prompt"])) for p in kept))

    # 7. 外部评估集去泄漏 + 按规范化 prompt 分组切分
    if args.eval_data:
        ext = {norm(p["prompt"]) for p in data.load_preference(args.eval_data)}
        for p in [p for p in kept if norm(p["prompt"]) in ext]:
            drop(p, "eval_leak")
        kept = [p for p in kept if norm(p["prompt"]) not in ext]
    if len(kept) < 2:
        raise UserError(f"清洗后只剩 {len(kept)} 对：规则太严或数据太少（看 removed.jsonl）")
    gid = prompt_groups([norm(p["prompt"]) for p in kept], args.near_dup_threshold, args.num_perm)
    _, eval_groups = data.split(sorted(set(gid)), args.val_fraction, args.seed)
    eval_groups = set(eval_groups)
    train_out = [p for p, g in zip(kept, gid) if g not in eval_groups]
    eval_out = [p for p, g in zip(kept, gid) if g in eval_groups]
    leaked_after = leaks(train_out, eval_out, args.near_dup_threshold, args.num_perm)

    # 8. 写文件与报告
    def dump(name, rows):
        with out.path(name).open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n")
    dump("pairs_clean.jsonl", kept)
    dump("train.jsonl", train_out)
    dump("eval.jsonl", eval_out)
    dump("removed.jsonl", removed)
    by_rule = dict(Counter(r["rule"] for r in removed))
    mean_agree = sum(agreements) / len(agreements) if agreements else 1.0
    md = [f"# Preference data curation report ({pairs_in} -> {len(kept)} pairs)", "",
          "| rule | removed |", "|---|---|", *[f"| {k} | {v} |" for k, v in by_rule.items()], "",
          "| check | before | after |", "|---|---|---|",
          f"| chosen-longer fraction (0.5 = no length bias) | {bias_before:.3f} | {bias_after:.3f} |",
          f"| eval prompts also in train | {leaked} (random pair split) | {leaked_after} (group split) |",
          f"| categories | {cats_before} | {cats_after} |", "",
          f"Annotator agreement: {len(agreements)} pairs with votes, mean majority share {mean_agree:.2f}, "
          f"{flipped} flipped to the majority label.", "",
          f"Pairs built from graded responses: {sum(p.get('source') == 'graded' for p in pool)}; "
          f"train {len(train_out)}, eval {len(eval_out)}."]
    out.path("curation_report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    import markdown

    out.path("curation_report.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>curation report</title>"
        + markdown.markdown("\n".join(md), extensions=["tables"]), encoding="utf-8")
    for k, v in by_rule.items():
        out.log.info(f"规则 {k}: 删除 {v}")
    return out.finish({
        "pairs_in": pairs_in, "pairs_out": len(kept), "length_bias_before": round(bias_before, 4),
        "length_bias_after": round(bias_after, 4), "leaked_prompts": leaked, "leaked_prompts_after": leaked_after,
        "removed_by_rule": by_rule, "flipped_by_votes": flipped, "mean_agreement": round(mean_agree, 4),
        "pairs_from_graded": sum(p.get("source") == "graded" for p in pool), "categories_after": cats_after,
        "train_pairs": len(train_out), "eval_pairs": len(eval_out),
    }, summary=f"{pairs_in} -> {len(kept)} 对；删除 {by_rule}；长度偏置 {bias_before:.2f} -> {bias_after:.2f}；"
               f"泄漏 {leaked} -> {leaked_after}")


if __name__ == "__main__":
    main(cli.parse(Args))
