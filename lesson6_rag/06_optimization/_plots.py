"""第 6 课 06 的三张图：recall@5 随切块大小、全部配置的热力图、test 上的 recall@k（top-k 一轴）。"""
from __future__ import annotations


def plots(out, configs: dict, grid: list, ks: list[int], by_retriever: dict, cs: int, ov: int) -> None:
    """recall@5 随切块大小（每个检索器取各重叠中最好的）、全部配置的热力图、test 上的 recall@k。

    out：common.run.Run；cs / ov：最优配置的切块与重叠。图内文字用英文：很多机器没有中文字体，中文会画成方框。
    """
    # 保持首次出现的顺序（bm25、dense、hybrid…）：三张图里检索器的顺序与颜色一致
    retrievers = list(dict.fromkeys(v["retriever"] for v in configs.values()))
    fig, save = out.plot("recall_vs_chunk_size.png")
    ax = fig.add_subplot(111)
    # 每个切块大小取各重叠里最好的一个：一条线只回答"块该多大"，重叠的影响看热力图
    for retr in retrievers:
        xs = sorted({v["chunk_size"] for v in configs.values()})
        best = [max(v["recall_at_5"] for v in configs.values() if v["retriever"] == retr and v["chunk_size"] == x)
                for x in xs]
        ax.plot(xs, best, marker="o", label=retr)
    ax.set(xlabel="chunk size (chars)", ylabel="dev recall@5", title="recall@5 vs chunk size (best overlap)")
    ax.legend()
    save()
    fig, save = out.plot("config_heatmap.png")
    ax = fig.add_subplot(111)
    cols = [f"{cs}/{ov}" for cs, ov in grid]
    # 热力图画的是 dev 分数（选配置用的那份），与日志里的选型过程一一对应；test 只在最后一张图出现
    mat = [[configs[f"{retr}_cs{cs}_ov{ov}"]["recall_at_5"] for cs, ov in grid] for retr in retrievers]
    # 色标固定在 0~1：不同运行的热力图颜色可以直接对比，不会按本次的最小最大值重新拉伸
    im = ax.imshow(mat, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for i, row in enumerate(mat):
        for j, v in enumerate(row):
            # 深色格子配白字、浅色配黑字：viridis 在 0.6 附近由深变浅
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
    ax.set(xticks=range(len(cols)), yticks=range(len(retrievers)), title="dev recall@5: retriever x size/overlap")
    # 格子多（默认 7 种切块）时横轴标签要斜放，否则挤在一起
    ax.set_xticklabels(cols, rotation=60, fontsize=7), ax.set_yticklabels(retrievers)
    fig.colorbar(im)
    save()
    # top-k 一轴：k 越大越容易命中，但提示词越长、生成越慢，这张图帮你挑"够用的最小 k"
    fig, save = out.plot("recall_at_k.png")
    ax = fig.add_subplot(111)
    for retr, m in by_retriever.items():
        ax.plot(ks, [m[f"recall_at_{k}"] for k in ks], marker="o", label=retr)
    ax.set(xlabel="top-k", ylabel="test recall@k", title=f"top-k axis (chunk {cs}/{ov}, test split)")
    ax.legend()
    save()
