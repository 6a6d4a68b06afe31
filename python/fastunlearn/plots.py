"""PNG figures. matplotlib runs headless (Agg); every writer returns the path it wrote."""

from __future__ import annotations

import os

from .checkpoint import atomic_write


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    plt = _plt()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))
    plt.close(fig)
    return path


def metrics_bars(rows: dict, path: str, title: str = "",
                 keys=("forget_acc", "remain_acc", "test_acc", "mia_lr")) -> str:
    """Grouped bars: one group per metric, one bar per model (original / retrain / unlearned ...)."""
    plt = _plt()
    names = {"forget_acc": "forget acc", "remain_acc": "remain acc", "test_acc": "test acc", "mia_lr": "MIA-LR",
             "mia_efficacy": "MIA-efficacy"}
    keys = [k for k in keys if all(k in m for m in rows.values())]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(keys), 3.4))
    width = 0.8 / max(1, len(rows))
    for i, (label, m) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(keys))]
        vals = [100 * float(m[k]) for k in keys]
        bars = ax.bar(xs, vals, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_xticks(range(len(keys)), [names.get(k, k) for k in keys])
    ax.set_ylabel("%")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8, ncols=len(rows), loc="upper center", bbox_to_anchor=(0.5, 1.18), frameon=False)
    if title:
        ax.set_title(title, fontsize=9, pad=24)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save(fig, path)
