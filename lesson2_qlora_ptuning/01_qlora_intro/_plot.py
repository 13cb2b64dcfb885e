"""第 2 课 01 的图（由 qlora_theory.py 用 run.import_sibling 加载，不单独运行）。

nf4_levels.png：第一个 Linear 按块 absmax 归一化后的权重分布，叠上 NF4 与 int4 的码值。
"""
from __future__ import annotations


def plot_levels(out, name: str, normed, code, mse: dict) -> None:
    """归一化权重分布 + NF4 / int4 码值：一眼看出 NF4 在 0 附近更密，正是权重最多的地方。"""
    import torch

    fig, save = out.plot("nf4_levels.png")
    ax = fig.add_subplot(111)
    ax.hist(normed, bins=120, density=True, color="#9bb", label=f"weights / block absmax ({name})")
    for i, c in enumerate(code.tolist()):
        ax.axvline(c, color="C3", lw=1, ls="-", label="NF4 levels" if i == 0 else None)
    for i, c in enumerate(torch.arange(-7, 8).div(7).tolist()):   # 等间距 int4：-7..7 除以 7
        ax.axvline(c, color="C0", lw=1, ls=":", label="int4 levels" if i == 0 else None)
    ax.set_xlabel("normalized weight")
    ax.set_ylabel("density")
    ax.set_title(f"NF4 MSE {mse['nf4']:.2e} vs int4 {mse['int4']:.2e} ({out.model_name})")
    ax.legend(fontsize=8)
    save()
