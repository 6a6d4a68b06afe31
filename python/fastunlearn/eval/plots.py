"""PNG figures. matplotlib runs headless (Agg); every writer returns the path it wrote."""

from __future__ import annotations

import os

import numpy as np

from fastunlearn.data.checkpoint import atomic_write


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
    keys = [k for k in keys if all(m.get(k) is not None for m in rows.values())]
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
    # The legend sits under the axis labels, so it never collides with the title.
    ax.legend(fontsize=8, ncols=len(rows), loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    if title:
        ax.set_title(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save(fig, path)


def _grid_axes(n: int, per_row: int = 3, size=(3.4, 3.0)):
    plt = _plt()
    cols = max(1, min(per_row, n))
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def _finish(fig, path, title):
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _save(fig, path)


def loss_histograms(losses: dict, path: str, title: str = "", bins: int = 40) -> str:
    """One panel per model: per-sample cross-entropy of the forget set against the test set.

    losses: {model name: (forget_losses, test_losses)}, 1-D arrays or tensors. The MIA-LR
    attack separates exactly these two distributions; overlapping histograms mean it cannot.
    """
    if not losses:
        raise ValueError("loss_histograms: no models given")
    fig, axes = _grid_axes(len(losses))
    for ax, (name, (fl, tl)) in zip(axes, losses.items()):
        fl = np.log10(np.clip(np.asarray(fl, dtype=np.float64).reshape(-1), 1e-6, None))
        tl = np.log10(np.clip(np.asarray(tl, dtype=np.float64).reshape(-1), 1e-6, None))
        lo, hi = min(fl.min(), tl.min()), max(fl.max(), tl.max())
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
        ax.hist(tl, edges, alpha=0.55, density=True, label="test (non-members)", color="tab:blue")
        ax.hist(fl, edges, alpha=0.55, density=True, label="forget", color="tab:red")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("log10 cross-entropy", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return _finish(fig, path, title)


def tsne_regions(panels: dict, path: str, title: str = "", class_names=None, resolution: int = 150) -> str:
    """One panel per model: a 2-D t-SNE of its embeddings, the decision regions of its
    predictions behind them (a k-NN fit on the embedded points), points coloured by true
    class, forget samples outlined in black (the paper's figure 4).

    panels: {model name: dict(emb=(N, 2), y=(N,), pred=(N,), forget=(N,) bool)}.
    """
    from matplotlib.colors import ListedColormap
    from sklearn.neighbors import KNeighborsClassifier

    if not panels:
        raise ValueError("tsne_regions: no models given")
    plt = _plt()
    k = int(max(max(int(np.max(p["y"])), int(np.max(p["pred"]))) for p in panels.values())) + 1
    colors = plt.get_cmap("tab10" if k <= 10 else "tab20")(np.arange(k) % (10 if k <= 10 else 20))
    cmap = ListedColormap(colors)
    fig, axes = _grid_axes(len(panels), size=(3.6, 3.4))
    for ax, (name, p) in zip(axes, panels.items()):
        emb = np.asarray(p["emb"], dtype=np.float64)
        y, pred = np.asarray(p["y"]), np.asarray(p["pred"])
        forget = np.asarray(p.get("forget", np.zeros(len(y), bool)), dtype=bool)
        knn = KNeighborsClassifier(n_neighbors=min(5, len(emb))).fit(emb, pred)
        pad = 0.05 * (emb.max(0) - emb.min(0) + 1e-9)
        gx, gy = np.meshgrid(np.linspace(emb[:, 0].min() - pad[0], emb[:, 0].max() + pad[0], resolution),
                             np.linspace(emb[:, 1].min() - pad[1], emb[:, 1].max() + pad[1], resolution))
        region = knn.predict(np.c_[gx.ravel(), gy.ravel()]).reshape(gx.shape)
        ax.pcolormesh(gx, gy, region, cmap=cmap, vmin=-0.5, vmax=k - 0.5, alpha=0.25, shading="auto")
        ax.scatter(emb[~forget, 0], emb[~forget, 1], c=y[~forget], cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=7,
                   linewidths=0)
        ax.scatter(emb[forget, 0], emb[forget, 1], c=y[forget], cmap=cmap, vmin=-0.5, vmax=k - 0.5, s=14,
                   edgecolors="black", linewidths=0.6)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    handles = [plt.Line2D([], [], marker="o", ls="", color=colors[i], label=names[i]) for i in range(k)]
    handles.append(plt.Line2D([], [], marker="o", ls="", color="white", markeredgecolor="black",
                              label="forget sample"))
    fig.legend(handles=handles, fontsize=7, loc="lower center", ncols=min(len(handles), 6),
               bbox_to_anchor=(0.5, -0.06), frameon=False)
    return _finish(fig, path, title)


def tradeoff_curves(rows, path: str, title: str = "", x: str = "fraction",
                    keys=("forget_acc", "remain_acc", "test_acc", "mia_lr")) -> str:
    """One panel per metric, one line per method, against ``x`` (the share of the class
    unlearned, as in the paper's figure 2).

    rows: dicts with "method", ``x`` and the metric keys (fractions in [0, 1]).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("tradeoff_curves: no rows")
    keys = [k for k in keys if any(k in r for r in rows)]
    names = {"forget_acc": "forget acc", "remain_acc": "remain acc", "test_acc": "test acc", "mia_lr": "MIA-LR",
             "mia_efficacy": "MIA-efficacy", "gap": "gap to retrain"}
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = _grid_axes(len(keys), per_row=min(4, len(keys)), size=(3.2, 2.8))
    for ax, key in zip(axes, keys):
        for m in methods:
            pts = sorted((float(r[x]), 100 * float(r[key])) for r in rows
                         if r["method"] == m and r.get(key) is not None)
            if pts:
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", ms=3,
                        ls="--" if m == "retrain" else "-", label=m)
        ax.set_title(names.get(key, key), fontsize=9)
        ax.set_xlabel("% of the class unlearned" if x == "fraction" else x, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    return _finish(fig, path, title)


def front_plot(points, path: str, title: str = "", front=None, chosen=None) -> str:
    """Sweep points: forget accuracy against remain accuracy, the Pareto front joined.

    Diverged points (non-finite outputs) are left out: their accuracies mean nothing.
    """
    points = [p for p in points if not getattr(p, "diverged", False)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.scatter([100 * p.forget_acc for p in points], [100 * p.remain_acc for p in points], s=10, alpha=0.6,
               label="grid points")
    if front:
        ax.plot([100 * p.forget_acc for p in front], [100 * p.remain_acc for p in front], "k-", lw=1,
                marker="o", ms=3, label="Pareto front")
    if chosen is not None:
        ax.scatter([100 * chosen.forget_acc], [100 * chosen.remain_acc], s=80, marker="*", color="tab:red",
                   label="chosen", zorder=5)
    ax.set_xlabel("forget acc (%)")
    ax.set_ylabel("remain acc (%)")
    ax.legend(fontsize=7)
    return _finish(fig, path, title)
