"""第 6 课 03 的演示改动：在知识库副本上新增 2 篇、修改 2 篇、删除 1 篇，模拟"知识库天天在变"。

只动输出目录里的副本：演示跑多少遍，用户的原始文档都不会被改。
"""
from __future__ import annotations

from pathlib import Path

from common import data

# 演示"新增 2 篇"：一款知识库里还没有的新产品，中英文各一篇。
# 选一个全新的产品，是为了让"新块搜得到"可检验：改动前库里没有任何块能回答"S9 门铃录像保存几天"
NEW_DOCS = {
    "demo_new_s9_doorbell_faq_zh.md": "# 云帆 S9 智能门铃常见问题\n\n"
    "S9 门铃使用 2 节 18650 充电电池，满电可待机约 6 个月。门铃检测到有人停留超过 10 秒会推送提醒，"
    "录像保存在云端 7 天，可在 App 的「访客记录」中查看。\n\n"
    "安装时请先在 App 中添加设备，再用附带的双面胶或螺丝固定在门框旁，离地约 1.4 米效果最好。",
    "demo_new_s9_doorbell_faq_en.md": "# Yunfan S9 Smart Doorbell FAQ\n\nThe S9 doorbell runs on two "
    "rechargeable 18650 cells; a full charge lasts about 6 months on standby. When someone lingers for more than "
    "10 seconds the app sends an alert, and recordings are kept in the cloud for 7 days under Visitor History."
    "\n\nMount it about 1.4 m above the floor, next to the door frame, after adding the device in the app.",
}
# 修改时追加 / 插入的一段（按文档语言选）：内容是新的事实，旧块里不可能有，重建库与增量库的差异一比就知道
EDIT = {"zh": "更新说明：自 2026 年 12 月 1 日起，本文所述服务新增视频远程指导，可在云帆智能 App 中提交工单预约。",
        "en": "Update: from 1 December 2026 remote video guidance is available for this service; book it in the app."}


def edit_copy(work: Path, src: list) -> tuple[list, object]:
    """在副本上新增 2 篇、修改 2 篇、删除 1 篇。返回 (改过的, 删掉的)。

    修改的两篇一篇在末尾追加（只有最后几块变了）、一篇在开头插入（所有块都错位、id 不变内容全变）：
    后者是增量同步最容易做错的情形——按块 id 比对会以为"没变"，必须按整篇文档的哈希判断。
    """
    # 只改纯文本：往 PDF / HTML 里写字会破坏格式，解析出的文本就不只是"多了一段"
    editable = [d for d in src if d.path.suffix.lower() in (".md", ".txt")] or src
    # reversed 再建 dict：同一语言后写的覆盖先写的，留下的就是每种语言在原顺序里的第一篇
    first_per_lang = list({data.detect_lang(d.text): d for d in reversed(editable)}.values())   # 中英文各改一篇
    edited = (first_per_lang + [d for d in editable if d not in first_per_lang])[:2]
    removed = next(d for d in reversed(src) if d not in edited)   # 删的和改的不能是同一篇，否则两种情形混在一起
    for i, d in enumerate(edited):
        note = EDIT[data.detect_lang(d.text)]
        text = (work / d.id).read_text(encoding="utf-8")
        # 第 0 篇末尾追加（只有最后几块变）、第 1 篇开头插入（所有块错位）：两种修改各演示一次
        (work / d.id).write_text(text.rstrip() + "\n\n" + note + "\n" if i == 0 else note + "\n\n" + text,
                                 encoding="utf-8")
    (work / removed.id).unlink()
    for name, text in NEW_DOCS.items():
        (work / name).write_text(text, encoding="utf-8")
    return edited, removed
