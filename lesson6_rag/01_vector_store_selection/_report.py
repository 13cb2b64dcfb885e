"""第 6 课 01 的报告：功能对比表写成 features.md，延迟 / 召回 / 旋钮扫描画成 stores.png。"""
from __future__ import annotations


def report(out, bench, knobs: dict, hnsw_m: int) -> None:
    """out：common.run.Run；bench：选型脚本的 Bench（results 与 features）。

    图里的字用英文：CI 机器上常常没有中文字体，中文会画成方框。
    """
    import numpy as np

    # 功能表写成 markdown 而不只是打日志：选型评审时贴进文档，"实测"两个字说明这一栏不是抄宣传页

    results, cols = bench.results, ["过滤", "持久化", "更新", "删除", "服务模式"]
    # 第二行是分隔行，列数必须与表头相同（+1 是"库"那一列），否则 markdown 不把它渲染成表格
    md = ["| 库 | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    md += [f"| {name} | " + " | ".join(f[c] for c in cols) + " |" for name, f in bench.features.items()]
    out.path("features.md").write_text("# 功能对比（带“实测”的是本次运行真的调用过的）\n\n" + "\n".join(md) + "\n",
                                       encoding="utf-8")
    names, xs = list(results), np.arange(len(results))
    fig, save = out.plot("stores.png")
    fig.set_size_inches(14, 4.4)   # run.plot 的默认画布（7×4.2 英寸）是给单图的：三张子图并排要加宽
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.bar(xs - 0.2, [results[s]["p50_ms"] for s in names], 0.4, label="p50")
    ax1.bar(xs + 0.2, [results[s]["p95_ms"] for s in names], 0.4, label="p95")
    # 对数轴：FAISS 约 10 微秒、Chroma 服务约 1 毫秒，差两个数量级，线性轴上 FAISS 的柱子看不见
    ax1.set(yscale="log", ylabel="query latency, ms (log)", title="latency per query")
    # 两种召回并排：左柱是"近似索引丢了多少"（对照精确检索），右柱是"对任务有没有用"（对照问答金标）
    ax2.bar(xs - 0.2, [results[s]["recall_at_10"] for s in names], 0.4,
            label="recall@10 (vector: vs exact Flat; full-text: vs gold)")
    ax2.bar(xs + 0.2, [results[s]["recall_at_5_gold"] for s in names], 0.4, label="task recall@5 vs gold")
    ax2.set(ylim=(0, 1.15), title="recall")   # 上限留到 1.15：召回为 1 的柱子不会顶到边框、被图例压住
    for ax in (ax1, ax2):
        ax.set_xticks(xs, names, rotation=30, ha="right", fontsize=8)   # 库名长（chroma_embedded 等），横排会互相重叠
        ax.legend(fontsize=7)
    # 旋钮曲线：同一个索引只改查询参数，召回怎么随代价上升；横轴取对数，因为旋钮是按 2 的幂扫的
    ivf, hnsw = knobs["ivf_nprobe_sweep"], knobs["hnsw_ef_search_sweep"]
    ax3.plot([int(v) for v in ivf], list(ivf.values()), "o-", label=f"IVF (nlist={knobs['nlist']}): nprobe")
    ax3.plot([int(v) for v in hnsw], list(hnsw.values()), "s-", label=f"HNSW (M={hnsw_m}): efSearch")
    ax3.set(xscale="log", xlabel="knob value", ylabel="recall@10 vs exact", ylim=(0, 1.05),
            title="approximate index knobs")
    ax3.legend(fontsize=7)
    save()
