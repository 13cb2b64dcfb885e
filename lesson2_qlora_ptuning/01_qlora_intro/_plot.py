"""第 2 课 01 的图（由 qlora_theory.py 用 run.import_sibling 加载，不单独运行）。

nf4_levels.png：第一个 Linear 按块 absmax 归一化后的权重分布，叠上 NF4 与 int4 的码值。
"""
from __future__ import annotations


def plot_levels(out, name: str, normed, code, mse: dict) -> None:
    """归一化权重分布 + NF4 / int4 码值：一眼看出 NF4 在 0 附近更密，正是权重最多的地方。"""
    import torch

    fig, save = out.plot("nf4_levels.png")
    ax = fig.add_subplot(111)
    # density=True：纵轴是概率密度、与矩阵大小无关，换 --max-matrices 或换模型后图仍可直接对比
    ax.hist(normed, bins=120, density=True, color="#9bb", label=f"weights / block absmax ({name})")
    for i, c in enumerate(code.tolist()):
        # 图例只挂在第一条线上，否则 16 条竖线各带标签、图例把 NF4 列 16 遍；
        # NF4 实线、int4 点线：两组码值在 0 与 ±1 处完全重合，只靠颜色分不开
        ax.axvline(c, color="C3", lw=1, ls="-", label="NF4 levels" if i == 0 else None)
    for i, c in enumerate(torch.arange(-7, 8).div(7).tolist()):   # 等间距 int4：-7..7 除以 7
        ax.axvline(c, color="C0", lw=1, ls=":", label="int4 levels" if i == 0 else None)
    ax.set_xlabel("normalized weight")
    ax.set_ylabel("density")
    ax.set_title(f"NF4 MSE {mse['nf4']:.2e} vs int4 {mse['int4']:.2e} ({out.model_name})")
    ax.legend(fontsize=8)
    save()
