"""第 1 课 02 的报告部分：长度统计、数据卡（data_card.md）与漏斗图（funnel.png）。

清洗规则本身（归一化、去重、脱敏、记录构造）在 data_pipeline.py 里，那是这一课要读的内容；
这里只把流水线的计数写成人读的文档，所以单独放在脚本旁边（run.import_sibling 加载）。
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import models, run
from common.errors import UserError, brief

TEMPLATE = Path(__file__).resolve().parent / "data_card_template.md"   # 模板与本文件同目录：改措辞不用动代码


def stats(values: list[int]) -> dict:
    """最小 / 中位 / 均值 / p95 / 最大：选 max_length 看 p95（只看均值会截掉长尾，只看最大值会被一条离群值带跑）。"""
    # 按排好序的位置取分位数、不插值：表里每个数都是某条真实样本的长度
    v = sorted(values)
    return {"min": v[0], "p50": v[len(v) // 2], "mean": round(statistics.mean(v), 1),
            "p95": v[min(len(v) - 1, int(len(v) * 0.95))], "max": v[-1]}


def tokenizer(args, log):
    """数 token 用的分词器，流水线开始前就加载：数 token 在最后一步，坏的 --model 不该等整条流水线跑完才报。
    不数 token（冒烟、--no-count-tokens）时返回 None；但给了 --model 仍加载一次来检查：点名的目录坏了，冒烟也是错。"""
    # 冒烟且没点名 --model：既不数 token 也没有要检查的目录，连分词器都不加载，省下这几秒
    if not (args.count_tokens or args.model):
        return None
    name = args.resolved_model()
    # 先查目录：FIFO、坏 JSON、万层嵌套的 config.json 都是一行；config 读得出、分词器却建不起来的，下面再一行
    path = models.check_dir(models.resolve(name, args.source), trust_remote_code=args.trust_remote_code)
    try:
        # 传上一行解析好的本地目录 + "local"：不再按名字走一遍下载 / 构建的逻辑
        tok = models.load_tokenizer(str(path), "local", args.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers 对坏配置（NaN 尺寸、不认识的 model_type）抛的异常各不相同
        raise UserError(f"--model {name}: 加载不了分词器（{brief(e)}）") from None
    if not args.count_tokens:
        log.info(f"不数 token（冒烟或 --no-count-tokens）：--model {name} 只检查了分词器能加载，没有使用")
        return None
    return tok


def length_stats(tok, items: list[dict], records: list[dict]) -> dict:
    """字符数；有分词器（--count-tokens）时再数 token（据此选训练时的 max_length，字符数换不成 token 数）。"""
    lengths = {"input_chars": stats([len(it["text"]) for it in items]),
               "output_chars": stats([len(r["messages"][-1]["content"]) for r in records])}
    if tok is not None:
        # 数套上对话模板之后的 token：训练时模型看到的是渲染后的序列，角色标记、特殊 token 也占 max_length
        lengths["chat_tokens"] = stats([len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)
                                            ["input_ids"]) for r in records])
    return lengths


def write_card(out: run.Run, m: dict, funnel: list, records: list[dict], folder) -> None:
    """数据卡：数据从哪来、每条规则删了多少、语言与长度分布、两条样例（模板见同目录 data_card_template.md）。

    数据卡跟着数据走：半年后有人拿这份 train.jsonl 训练，不看代码也能知道它删过什么、遮过什么。
    """
    template = TEMPLATE.read_text(encoding="utf-8")
    # 表格行在这里拼好再填进模板：str.format 只做替换，模板里写不了循环
    length = "\n".join(f"| {k} | " + " | ".join(str(v[s]) for s in ("min", "p50", "mean", "p95", "max")) + " |"
                       for k, v in m["lengths"].items())
    # 模板里每个 {名字} 都要在这里有值，缺一个 format 就 KeyError；多给的键 format 会忽略
    fields = {**{k: m[k] for k in ("documents", "records_in", "records_out", "train_records", "val_records", "tasks",
                                   "normalized", "id_card_checksum_ok", "languages", "removed_languages")},
              "folder": folder, "length": length,
              "rows": "\n".join(f"| {k} | {v} |" for k, v in m["removed_by_rule"].items()),
              "steps": "\n".join(f"| {n} | {c} |" for n, c in funnel),
              "pii": "\n".join(f"| {k} | {v} |" for k, v in m["pii_masked"].items()),
              # 样例截到 800 字符：数据卡是给人扫一眼的，整段长文会把表格挤出屏幕
              "examples": "\n\n".join("```json\n" + json.dumps(r, ensure_ascii=False, indent=1)[:800] + "\n```"
                                      for r in records[:2])}
    # 模板开头的 HTML 注释是写给维护者的说明，不进数据卡
    out.path("data_card.md").write_text(template.split("-->\n", 1)[1].format(**fields), encoding="utf-8")


def plot_funnel(out: run.Run, steps: list[tuple[str, int]]) -> None:
    """漏斗图：每一步之后还剩多少段。哪一步删得最多一眼可见，阈值设错（比如 --min-chars 太大）也一眼可见。"""
    fig, save = out.plot("funnel.png")
    ax = fig.add_subplot(111)
    ax.bar([n for n, _ in steps], [c for _, c in steps], color="#4c72b0")
    for x, (_, c) in enumerate(steps):
        # 柱顶标上数字：相邻两步只差一两段时，光看柱高分不出来
        ax.text(x, c, str(c), ha="center", va="bottom")
    # 英文标签：不是每台机器都装了中文字体（与 data_pipeline.Funnel 的步骤名一致）
    ax.set(ylabel="paragraphs left", title="cleaning funnel: paragraphs left after each step")
    save()
