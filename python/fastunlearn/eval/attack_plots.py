"""Figures of the attack suite: ROC curves on a log FPR axis, per-example score histograms."""

from __future__ import annotations

import numpy as np

from fastunlearn.eval.plots import _finish, _grid_axes

# The curves drawn by default: one per signal (threshold attacks), the combined logistic
# attack and the U-LiRA-style test when it ran.
DEFAULT_CURVES = ("loss/threshold", "confidence/threshold", "entropy/threshold", "modified_entropy/threshold",
                  "all/logistic", "u-lira")


def roc_curves(curves: dict, path: str, title: str = "", names=DEFAULT_CURVES) -> str:
    """One panel per model, one ROC curve per attack, FPR on a log axis from 1e-3 (where
    low-FPR attacks differ) with the chance diagonal dashed.

    curves: {model name: {attack: (fpr, tpr)}} (AttackSuite.curves).
    """
    if not curves:
        raise ValueError("roc_curves: no models given")
    fig, axes = _grid_axes(len(curves), size=(3.6, 3.2))
    grid = np.logspace(-3, 0, 200)
    for ax, (model_name, by_attack) in zip(axes, curves.items(), strict=True):
        floor = 1e-3
        for attack in [n for n in names if n in by_attack]:
            fpr, tpr = (np.asarray(a, dtype=np.float64) for a in by_attack[attack])
            positive = fpr > 0
            if positive.any():
                floor = min(floor, float(fpr[positive].min()))
            ax.step(np.clip(fpr, 1e-5, 1), tpr, where="post", lw=1.2 if attack == "u-lira" else 0.9,
                    ls="-" if attack != "u-lira" else "--", label=attack)
        ax.plot(grid, grid, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlim(max(floor, 1e-5), 1)
        ax.set_ylim(0, 1.01)
        ax.set_title(model_name, fontsize=9)
        ax.set_xlabel("false-positive rate (log)", fontsize=8)
        ax.set_ylabel("true-positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=6, loc="upper left")
    return _finish(fig, path, title)


def per_example_histograms(scores: dict, path: str, title: str = "", bins: int = 40) -> str:
    """One panel per model: the histogram of its per-example scores (AttackSuite.per_example),
    with z = 0 (as unseen) and z = 2 marked.

    scores: {model name: (1-D scores, kind)}.
    """
    if not scores:
        raise ValueError("per_example_histograms: no models given")
    all_scores = np.concatenate([np.asarray(s, dtype=np.float64).reshape(-1) for s, _ in scores.values()])
    lo, hi = np.percentile(all_scores, [0.5, 99.5])
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    fig, axes = _grid_axes(len(scores), size=(3.4, 2.8))
    for ax, (name, (s, kind)) in zip(axes, scores.items(), strict=True):
        ax.hist(np.clip(np.asarray(s, dtype=np.float64), lo, hi), edges, color="tab:red", alpha=0.7)
        for x0, style in ((0, "-"), (2, ":")):
            ax.axvline(x0, color="black", ls=style, lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("z vs " + ("reference models" if kind == "reference_models" else "test samples"), fontsize=8)
        ax.tick_params(labelsize=7)
    return _finish(fig, path, title)
