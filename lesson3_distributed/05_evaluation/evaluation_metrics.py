"""模型评估的一整套尺子：滑窗困惑度、闭式评估（给标签续写打分的零样本/少样本情感分类）、EM/F1、
ROUGE-L 与 BLEU（中文先用 jieba 分词；用维护中的 rouge-score 与 sacrebleu，不手写）、LLM 评委两两比较
（交换位置各判一次，只认两次一致的结论）和导出给人工评估的表格（CSV + HTML，答案盲化为 A/B）。

几个容易踩的坑都在这里量给你看：
- 困惑度：窗口不重叠时每个窗口开头几乎没有上文，困惑度偏高；按 stride 滑动、只对新 token 计损失才是标准做法；
- rouge-score 默认分词器只保留 [a-z0-9]，中文整句被删光，ROUGE-L = 0：中文必须先用 jieba 分词；
- LLM 评委有位置偏好：同一对答案换个顺序结论就变，位置一致率低于 1 时，"胜率"只能算一致的那部分。

运行：
  python lesson3_distributed/05_evaluation/evaluation_metrics.py           # smollm2-135m，CPU 几分钟
  python lesson3_distributed/05_evaluation/evaluation_metrics.py --smoke   # tiny-llama
  python lesson3_distributed/05_evaluation/evaluation_metrics.py --model Qwen/Qwen2.5-7B-Instruct --source hf \\
      --judge-model Qwen/Qwen2.5-7B-Instruct   # GPU：更强的评委
  --data 换成你的 SFT 文件（生成 + ROUGE/BLEU/评委），--qa 换成你的问答文件（EM/F1）

你会看到：metrics.json 里的 ppl（滑窗）与 ppl_no_overlap、sentiment_accuracy（少样本）与零样本、EM/F1、rougeL、bleu、
judge_win_rate（参考答案 vs 模型答案，不一致算平局）与 judge_position_consistency；human_eval.csv / human_eval.html。
上面的坑都会在数字里显出来：滑窗困惑度低于不重叠窗口（每个 token 都有上文）；少样本示例该让模型分类更准——但
135M 的 smollm2 在参考运行里零样本与少样本一样准（下方 ✗ 那条）：读懂示例要更大的模型，别拿小模型的"示例没用"当结论；
同一批中文参考答案与自己比，默认分词器的 ROUGE-L 远低于 jieba 分词后的（本该是 1）；小模型评委换个顺序结论常常就变，
位置一致率明显低于 1，所以胜率只算两次一致的那部分。
参考运行（默认模式，2 核 CPU）的测量值由 python course.py --readme 从 results/ 生成：
<!-- results:script -->
参考运行（smollm2-135m，2 核 CPU）：9.2 分钟，2.3 GB，结论 3/4 成立
  ✓ 滑窗让每个 token 都有上文：滑窗 / 不重叠窗口 的困惑度（同一批文档、同样窗口长度）：0.8234（≤ 0.98）
  ✗ 少样本提示里的示例帮模型分类：少样本 − 零样本 的情感分类准确率：0（≥ 0.05）
  ✓ 中文必须先分词：同一批中文参考答案与自身的 ROUGE-L，默认分词器 / jieba：0.5556（≤ 0.8）
  ✓ 交换位置揭示小模型评委的位置偏好：两种顺序下结论一致的比例：0（≤ 0.75）
<!-- /results -->
"""
from __future__ import annotations

import csv
import functools
import html
import random
from dataclasses import dataclass

from common import answers, cli, data, lm, models, run
from common.errors import UserError


@dataclass
class Args(cli.CommonArgs):
    qa: str = cli.arg(None, "问答文件（question/answer/gold_passage）算 EM/F1；默认 data/kb/qa.jsonl")
    docs: str = cli.arg(None, "算困惑度的文档目录；默认 data/domain/docs")
    classification: str = cli.arg(None, "情感分类文件（text/label）；默认 data/classification/sentiment.jsonl")
    judge_model: str = cli.arg(None, "评委模型；默认与被评模型相同（小模型当评委偏差很大，这正是要量的）")
    ppl_window: int = cli.arg(256, "困惑度窗口长度（token）", min=8)
    # 默认取窗口的一半：除第一个窗口外，每个计分的 token 前面至少有 window − stride 个上文
    ppl_stride: int = cli.arg(128, "滑动步长：< 窗口时重叠部分只当上文不计损失", min=1)
    n_sentiment: int = cli.arg(80, "情感分类评多少条", min=4)
    n_shots: int = cli.arg(4, "少样本提示里放几条示例（每类至少一条）", min=1)
    n_qa: int = cli.arg(24, "EM/F1 评多少个问题", min=1)
    n_gen: int = cli.arg(16, "ROUGE/BLEU/评委/人工表评多少条生成", min=2)
    max_new_tokens: int = cli.arg(64, "生成长度", min=1)

    smoke_model = "tiny-llama"


SMOKE = dict(ppl_window=64, ppl_stride=32, n_sentiment=24, n_qa=8, n_gen=8, max_new_tokens=24)

# 这节课教的效果，写成数据（run.finish 逐条求值，结尾打印 ✓/✗，写进 metrics.json 的 claims）：
# (一句结论, 对本次 metrics 的表达式, 方向, 冒烟门槛, 默认门槛)；基线都在同一次运行里量（同一批文档 / 样本 / 答案）。
# 少样本胜过零样本要模型读得懂示例：1M 参数的极小模型两边都接近瞎猜，只在默认模式检查
CLAIMS = [
    run.Claim("滑窗让每个 token 都有上文：滑窗 / 不重叠窗口 的困惑度（同一批文档、同样窗口长度）",
              "ppl / ppl_no_overlap", "<=", 0.995, 0.98),
    run.Claim("少样本提示里的示例帮模型分类：少样本 − 零样本 的情感分类准确率",
              "sentiment_accuracy - sentiment_accuracy_zero_shot", ">=", None, 0.05),
    run.Claim("中文必须先分词：同一批中文参考答案与自身的 ROUGE-L，默认分词器 / jieba",
              "rougeL_default_tokenizer_zh_self / rougeL_jieba_zh_self", "<=", 0.8, 0.8),
    run.Claim("交换位置揭示小模型评委的位置偏好：两种顺序下结论一致的比例",
              "judge_position_consistency", "<=", 0.5, 0.75),
]


class JiebaTokenizer:
    """给 rouge-score 用的分词器：jieba 切中文，英文按词，去掉空白与标点。"""

    def tokenize(self, text: str) -> list[str]:
        import jieba

        # 只留含字母/数字/汉字的词（汉字的 isalnum 也为真）：标点算进 LCS 的话，两段话只凭标点位置相同就能白得分；
        # 转小写与 rouge-score 默认分词器的行为一致
        return [w.lower() for w in jieba.lcut(text) if w.strip() and any(c.isalnum() for c in w)]


def sliding_windows(ids: list[int], window: int, stride: int) -> list[dict]:
    """一篇文档切成窗口（transformers 文档的滑窗做法）：每个窗口只对最后 stride 个新 token 计损失，前面的只当上文。

    stride = window 时窗口互不重叠，每个窗口开头的 token 几乎没有上文、预测得差，困惑度就偏高——这正是要对照的坑。
    """
    rows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        # 与上个窗口重叠的部分只当上文：labels 置 -100，不重复计分（stride > window 时整窗都是新 token）
        new = min(end - prev_end, end - begin)
        rows.append({"input_ids": ids[begin:end], "labels": [-100] * (end - begin - new) + ids[end - new:end]})
        prev_end = end
        # 到文末就停：否则后面的 begin 还会切出只含旧 token、labels 全是 -100 的空窗口
        if end == len(ids):
            break
    return rows


def perplexity(model, tok, texts: list[str], window: int, stride: int) -> float:
    """滑窗困惑度：所有文档的窗口按 token 加权汇总（lm.perplexity），长文档不会被短文档"平均掉"。"""
    # 整篇编码一次再按 token 切窗口：先切字符再编码，边界处会切出原文里不会出现的 token
    rows = [w for text in texts for w in sliding_windows(tok(text).input_ids, window, stride)]
    return lm.perplexity(model, rows, batch_size=8, pad_token_id=tok.pad_token_id)


def continuation_logprob(model, tok, prompt: str, cont: str) -> float:
    """log P(cont | prompt)：闭式评估不让模型自由生成，只比较候选答案的概率。

    prompt 与 cont 分开编码再拼接：一起编码时 BPE 可能把边界上的字合并成一个 token，续写就"对不齐"了。
    """
    import torch

    # 不加 BOS 等特殊 token：prompt 已是完整文本（评委的已套过对话模板），cont 前面插一个 BOS 续写就断了
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(cont, add_special_tokens=False).input_ids
    ids = torch.tensor([p + c], device=model.device)
    with torch.no_grad():
        # 第 len(p)-1 个位置的 logits 预测 cont 的第一个 token：左移一位对齐
        logits = model(ids).logits[0, len(p) - 1:-1]
    # 对 cont 的各 token 求和而不是平均：候选切成的 token 数不同时短的天然占便宜，换标签词时要留意
    return lm.token_logprobs(logits, torch.tensor(c, device=model.device)).sum().item()


def sentiment_accuracy(model, tok, rows: list[dict], labels: list[str], shots: list[dict]) -> float:
    """零样本（shots 为空）或少样本：对每个标签续写打分，取概率最大的。"""
    # 示例与待测样本同一格式（Review/Sentiment）：少样本靠格式告诉模型"下一步该续写一个标签"
    demo = "".join(f"Review: {s['text']}\nSentiment: {s['label']}\n\n" for s in shots)
    right = 0
    for r in rows:
        prompt = f"{demo}Review: {r['text']}\nSentiment:"
        # 标签前带空格：BPE 里 " positive" 与 "positive" 是不同的 token，紧跟 "Sentiment:" 的自然写法带空格
        scores = {lab: continuation_logprob(model, tok, prompt, " " + lab) for lab in labels}
        right += max(scores, key=scores.get) == r["label"]
    return right / len(rows)


def judge_pair(model, tok, question: str, a: str, b: str) -> str:
    """评委：看 "A" 与 "B" 作为下一个词的概率，哪个大选哪个。"""
    msg = [{"role": "user", "content": f"Question: {question}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
                                       "Which answer is more correct and helpful? Reply with a single letter, A or B."}]
    prompt = data.prompt_text(tok, msg)
    # 只比下一个词是 A 还是 B 的概率：不让小模型自由生成，免得答案里根本找不到一个可解析的字母
    logp_a, logp_b = (continuation_logprob(model, tok, prompt, letter) for letter in "AB")
    # 两者相等时判 A：交换位置判两次后，固定偏向 A 只会表现为"不一致"，不会被算成某一方胜
    return "A" if logp_a >= logp_b else "B"


def pairwise(judge, items: list[tuple[str, str, str]]) -> tuple[float, float]:
    """每对 (问题, x, y) 判两次：x 在 A 位、x 在 B 位。两次都选 x 记 1，都选 y 记 0，不一致记平局 0.5。
    返回 (x 的胜率, 位置一致率)。"""
    wins, consistent = 0.0, 0
    for q, x, y in items:
        first, second = judge(q, x, y) == "A", judge(q, y, x) == "B"   # 两次是否都选了 x
        if first == second:
            consistent += 1
            wins += first
        else:
            # 不一致算平局：位置偏好不该记成任何一方的胜利
            wins += 0.5
    return wins / len(items), consistent / len(items)


def export_human_sheet(out: run.Run, items: list[dict], seed: int) -> None:
    """人工评估表：两个系统的答案随机放在 A/B（盲评），答案来源另存 human_eval_key.csv。"""
    rnd = random.Random(seed)
    rows, key = [], []
    for i, it in enumerate(items):
        # 每条独立抛硬币：固定把模型答案放在 A，评审很快就会猜出规律，盲评就不盲了
        flip = rnd.random() < 0.5
        a, b = (it["model"], it["reference"]) if flip else (it["reference"], it["model"])
        rows.append({"id": i, "question": it["question"], "A": a, "B": b, "better (A/B/tie)": "", "A score 1-5": "",
                     "B score 1-5": "", "comment": ""})
        key.append({"id": i, "A": "model" if flip else "reference", "B": "reference" if flip else "model"})
    for name, recs in (("human_eval.csv", rows), ("human_eval_key.csv", key)):
        with out.path(name).open("w", newline="", encoding="utf-8-sig") as f:   # utf-8-sig：Excel 打开中文不乱码
            w = csv.DictWriter(f, fieldnames=list(recs[0]))
            w.writeheader()
            w.writerows(recs)
    # 答案是模型生成的任意文本：不转义的话里面的 < > 会被浏览器当成标签，表格错乱，甚至执行脚本
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in ("id", "question", "A", "B"))
                    + "<td><select><option></option><option>A</option><option>B</option><option>tie</option>"
                      "</select></td></tr>" for r in rows)
    out.path("human_eval.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>Human evaluation</title><style>td{border:1px solid #ccc;"
        "padding:4px;vertical-align:top}</style><p>Answers are blinded; the key is in human_eval_key.csv.</p>"
        f"<table><tr><th>id</th><th>question</th><th>A</th><th>B</th><th>better</th></tr>{cells}</table>",
        encoding="utf-8")


def load_inputs(args: Args) -> tuple[list[dict], list[str], tuple, list]:
    """(问答, 文档, 情感分类的划分, SFT 对话)：加载任何模型之前读完、查完每个输入，坏文件立刻一行报错，
    不必先等模型加载几十秒。评委模型这里先查目录（不花时间，报错点名 --judge-model），紧接着在 main 里加载。"""
    if args.judge_model:
        models.check_dir(models.resolve(args.judge_model, args.source), "--judge-model",
                         trust_remote_code=args.trust_remote_code)
    qa = data.load_qa(args.qa or data.DATA_DIR / "kb" / "qa.jsonl")[:args.n_qa]
    if not all(q.get("gold_passage") for q in qa):
        raise UserError(f"--qa {args.qa}: 算 EM/F1 需要每条都有 gold_passage（给模型的上下文）")
    docs = [d.text for d in data.load_documents(args.docs or data.DATA_DIR / "domain" / "docs")]
    convs = data.load_sft(args.data or data.DATA_DIR / "domain" / "sft.jsonl")
    return qa, docs, sentiment_split(args), convs


def sentiment_split(args: Args) -> tuple[list[dict], list[str], list[dict]]:
    """(评测集, 标签, 少样本示例)：示例每类至少一条，且不在评测集里——否则少样本就成了"偷看答案"。"""
    rows, labels = data.load_classification(args.classification
                                            or data.DATA_DIR / "classification" / "sentiment.jsonl")
    # 固定种子打乱：示例与评测集每次相同，零样本/少样本的差别里不混进抽样差异
    random.Random(args.seed).shuffle(rows)
    shots = [next(r for r in rows if r["label"] == lab) for lab in labels]
    shots += [r for r in rows if r not in shots][:max(0, args.n_shots - len(shots))]
    return [r for r in rows if r not in shots][:args.n_sentiment], labels, shots


def qa_scores(model, tok, qa: list[dict]) -> tuple[float, float]:
    """(EM, F1)：给出含答案的段落让模型抽取。EM 规范化（去标点、小写、去英文冠词）后逐词相同才算对，多说一个词
    就判错，所以总要和按词重叠的 F1 一起看。"""
    prompts = [data.prompt_text(tok, [{"role": "user", "content": f"{q['gold_passage']}\n\n{q['question']}"
                                       " Answer briefly."}]) for q in qa]
    # 抽取式答案很短，16 个 token 足够：放长了模型会接着解释，多出来的字让 EM 必错
    preds = models.generate(model, tok, prompts, max_new_tokens=16)
    em = sum(answers.exact_match(p, q["answer"]) for p, q in zip(preds, qa)) / len(qa)
    f1 = sum(answers.token_f1(p, q["answer"]) for p, q in zip(preds, qa)) / len(qa)
    return em, f1


def generation_scores(args: Args, convs: list, model, tok) -> tuple[list[tuple[str, str, str]], dict]:
    """生成 n_gen 条回答，与参考答案比 ROUGE-L / BLEU；返回 ((问题, 参考, 模型) 列表, 分数)。"""
    import sacrebleu
    from rouge_score import rouge_scorer

    # 固定种子抽 n_gen 条：换模型重跑时比的是同一批问题
    random.Random(args.seed).shuffle(convs)
    convs = convs[:args.n_gen]
    # 参考答案是对话的最后一条助手回复；data.prompt_text 渲染提示时会去掉它，模型看不到答案
    refs = [c[-1]["content"] for c in convs]
    hyps = models.generate(model, tok, [data.prompt_text(tok, c) for c in convs], args.max_new_tokens)
    zh = JiebaTokenizer()
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=zh)
    rouge_l = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)) / len(refs)
    # 对照：默认分词器把中文当非法字符删掉——中文参考答案和它自己比都拿不到 1，说明分词器用错了
    naive = rouge_scorer.RougeScorer(["rougeL"])
    # 参考答案与自身比：分词正确时 ROUGE-L 应为 1，偏离 1 的部分全是分词器造成的
    zh_pairs = [(r, r) for r in refs if data.detect_lang(r) == "zh"]
    # 没有中文参考答案（换成英文数据）时分母取 1：两项都记 0，而不是抛 ZeroDivisionError
    naive_zh_self = sum(naive.score(r, h)["rougeL"].fmeasure for r, h in zh_pairs) / max(len(zh_pairs), 1)
    jieba_zh_self = sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zh_pairs) / max(len(zh_pairs), 1)
    # BLEU 同样用 jieba 分好的词、tokenize="none"：sacrebleu 自带的 13a 分词器不切中文，整句算一个"词"
    seg = lambda s: " ".join(zh.tokenize(s))   # noqa: E731
    # corpus 级 BLEU：先汇总全部句子的 n-gram 再算；短句上的句级 BLEU 常因没有 4-gram 命中而为 0，没法比
    bleu = sacrebleu.corpus_bleu([seg(h) for h in hyps], [[seg(r) for r in refs]], tokenize="none").score
    # 倒数第二条是用户的问题：评委与人工评估表都要看到题目才能判断答案好坏
    items = [(c[-2]["content"], r, h) for c, r, h in zip(convs, refs, hyps)]
    return items, {"rougeL": rouge_l, "bleu": bleu, "rougeL_default_tokenizer_zh_self": naive_zh_self,
                   "rougeL_jieba_zh_self": jieba_zh_self}


def main(args: Args) -> dict:
    args = cli.with_smoke(args, SMOKE)
    out = run.start(__file__, args)
    qa, docs, (test, labels, shots), convs = load_inputs(args)   # 先读、先查所有输入，再加载模型
    # 评委模型也先加载：config.json 坏了（目录检查只看文件）不该等整个评估跑完才报；两个模型本来就同时在内存里
    judge = models.load_args(args, name=args.judge_model) if args.judge_model else None
    model, tok = models.load_args(args)
    model.eval()   # 关掉 dropout：同一个问题两次打分必须一样，否则评委"位置不一致"里混进了随机性

    # 1. 困惑度：滑窗 vs 不重叠窗口（同一批文档、同样的窗口长度）
    ppl = perplexity(model, tok, docs, args.ppl_window, args.ppl_stride)
    # stride 取 window：窗口互不重叠，这就是"每个窗口开头没有上文"的对照组
    ppl_flat = perplexity(model, tok, docs, args.ppl_window, args.ppl_window)
    out.log.info(f"困惑度：滑窗（stride {args.ppl_stride}）{ppl:.2f}，不重叠 {ppl_flat:.2f}")

    # 2. 闭式评估：情感分类，零样本 vs 少样本——同一批评测样本，只差提示里有没有示例
    acc0 = sentiment_accuracy(model, tok, test, labels, [])
    acc = sentiment_accuracy(model, tok, test, labels, shots)
    out.log.info(f"情感分类（{len(test)} 条，标签 {labels}）：零样本 {acc0:.2f}，{len(shots)} 样本 {acc:.2f}")

    # 3. EM / F1：给出含答案的段落，让模型抽取答案
    em, f1 = qa_scores(model, tok, qa)

    # 4. 生成任务：ROUGE-L / BLEU（jieba 分词）——参考答案 vs 模型答案
    items, gen = generation_scores(args, convs, model, tok)
    out.log.info(f"EM {em:.2f} F1 {f1:.2f}；ROUGE-L {gen['rougeL']:.3f}，BLEU {gen['bleu']:.2f}；rouge-score 默认"
                 f"分词器给中文参考答案与它自己打 ROUGE-L = {gen['rougeL_default_tokenizer_zh_self']:.2f}")

    # 5. LLM 评委：参考答案 vs 模型答案，交换位置各判一次（只判一次的话，位置偏好会被当成"质量差"）
    # 没给 --judge-model 就让被评模型自己当评委：小模型的位置偏好正是要量的（代价是它可能偏向像自己写的答案）
    judge_m, judge_t = judge or (model, tok)
    win, consistency = pairwise(functools.partial(judge_pair, judge_m, judge_t), items)
    out.log.info(f"评委（{args.judge_model or out.model_name}）：参考答案胜率 {win:.2f}，位置一致率 {consistency:.2f}")

    # 6. 人工评估表：自动指标都和人的判断有差距，最后一道尺子是人（盲评，防止偏向"自家模型"）
    export_human_sheet(out, [{"question": q, "reference": r, "model": h} for q, r, h in items], args.seed)
    # metrics.json 里只放前 120 个字符：完整答案在 human_eval.csv，metrics 保持一眼能读完
    samples = [{"question": q, "reference": r[:120], "model": h[:120]} for q, r, h in items[:3]]
    return out.finish({"ppl": round(ppl, 3), "ppl_no_overlap": round(ppl_flat, 3),
                       "sentiment_accuracy": acc, "sentiment_accuracy_zero_shot": acc0, "n_sentiment": len(test),
                       "em": em, "f1": round(f1, 4), "rougeL": round(gen["rougeL"], 4), "bleu": round(gen["bleu"], 3),
                       "rougeL_default_tokenizer_zh_self": gen["rougeL_default_tokenizer_zh_self"],
                       "rougeL_jieba_zh_self": gen["rougeL_jieba_zh_self"],
                       "judge_win_rate": win, "judge_position_consistency": consistency, "samples": samples},
                      claims=CLAIMS,
                      summary=f"ppl {ppl:.2f}（不重叠 {ppl_flat:.2f}），情感 {acc0:.2f}->{acc:.2f}（零->少样本），"
                              f"F1 {f1:.2f}，ROUGE-L {gen['rougeL']:.3f}，BLEU {gen['bleu']:.1f}，"
                              f"评委一致率 {consistency:.2f}")


if __name__ == "__main__":
    main(cli.parse(Args))
