"""fu.report: one table, the plots and a markdown page for an unlearning experiment.

    rep = fu.report({"original": m0, "retrain": (m_rt, 41.2), "ours": res}, forget, remain, test,
                    out_dir="runs/exp1", mean=mean, std=std)
    rep.rows["ours"]["gap"], rep.paths["markdown"]

Every model is scored on the same forget / remain / test sets: forget, remain and test
accuracy, test accuracy per class, MIA-LR, MIA-efficacy, wall time when known, and the gap
to the retrained model (mean |difference| over forget / remain / test accuracy and MIA-LR,
metrics.gap). Files written to out_dir:

    table.csv      one row per model (columns: TABLE_COLUMNS, then test_acc_c<k> per class)
    metrics.json   the same numbers, plus the settings passed in ``notes``
    mia_hist.png   forget vs test loss histograms per model (what MIA-LR separates)
    tsne.png       t-SNE of each model's embeddings with its decision regions
    report.md      the table and the figures on one page
    manifest.json  where the numbers came from (eval.report_manifest), for fastunlearn verify
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from fastunlearn.data.checkpoint import atomic_write_text
from fastunlearn.eval import plots
from fastunlearn.eval.attack_report import attack_section
from fastunlearn.eval.metrics import (
    MIA_MIN_SAMPLES,
    accuracy,
    evaluation_set,
    gap,
    inference_copy,
    mia_efficacy_from_confidence,
    mia_lr,
    per_class_accuracy,
    per_sample_loss,
    predict_logits,
    true_class_confidence,
)
from fastunlearn.eval.report_manifest import load_files, model_files, write_report_manifest
from fastunlearn.eval.representation import features
from fastunlearn.eval.seeds import report_over_seeds
from fastunlearn.runtime.progress import progress_bar

# How a table shows a membership score that too few samples could not give (JSON: null).
NOT_ENOUGH = f"n/a (needs >= {MIA_MIN_SAMPLES})"
TABLE_COLUMNS = ("method", "forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "gap", "seconds",
                 "x_retrain")


@dataclass
class Report:
    rows: dict
    paths: dict
    markdown: str
    columns: list = field(default_factory=list)


def _model_and_seconds(v):
    """A model, a (model, seconds) pair, or anything with .model and .seconds (UnlearnResult, Baseline)."""
    if isinstance(v, nn.Module):
        return v, None
    if isinstance(v, (tuple, list)) and len(v) == 2 and isinstance(v[0], nn.Module):
        return v[0], (None if v[1] is None else float(v[1]))
    if hasattr(v, "model") and isinstance(v.model, nn.Module):
        return v.model, getattr(v, "seconds", None)
    raise TypeError(f"report: each model must be an nn.Module, a (model, seconds) pair or a result with .model, "
                    f"got {type(v).__name__}")


def _embed(model, x, mean, std, device, batch_size=512):
    """(embeddings, logits): the input of the classifier head (eval.representation.features)."""
    emb, logits = features(model, x, mean=mean, std=std, device=device, batch_size=batch_size, return_logits=True)
    return emb.numpy(), logits


def _fmt(k, v):
    if v is None:
        return NOT_ENOUGH if k == "mia_lr" else "-"
    if k == "seconds":
        return f"{v:.2f}"
    if k == "x_retrain":
        return f"{v:.2f}x"
    if k in ("mia_lr", "mia_efficacy"):
        return f"{v:.3f}"
    return f"{100 * v:.2f}"


def markdown_table(rows: dict, columns=TABLE_COLUMNS[1:]) -> str:
    """The rows as a markdown table: accuracies and gap in %, MIA scores as fractions."""
    head = {"forget_acc": "forget %", "remain_acc": "remain %", "test_acc": "test %", "mia_lr": "MIA-LR",
            "mia_efficacy": "MIA-eff", "gap": "gap to retrain (pts)", "seconds": "time (s)",
            "x_retrain": "x retrain"}
    cols = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| method | " + " | ".join(head.get(c, c.replace("test_acc_c", "test % c")) for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def _tsne_sample(sets: dict, tsne_points: int, seed: int):
    """The t-SNE points: every class of the test set plus forget samples, the same rows for
    every model. (x, y as numpy, is-forget mask)."""
    rng = np.random.RandomState(seed)
    tx, ty = sets["test"]
    fx, fy = sets["forget"]
    n_f = min(len(fy), tsne_points // 3)
    n_t = min(len(ty), tsne_points - n_f)
    t_idx = torch.from_numpy(np.sort(rng.choice(len(ty), n_t, replace=False)))
    f_idx = torch.from_numpy(np.sort(rng.choice(len(fy), n_f, replace=False)))
    emb_x = torch.cat([tx[t_idx], fx[f_idx]])
    emb_y = torch.cat([ty[t_idx], fy[f_idx]]).numpy()
    return emb_x, emb_y, np.r_[np.zeros(n_t, bool), np.ones(n_f, bool)]


def _score(model, seconds, sets: dict, mean, std, device, seed: int, max_shadow: int):
    """(row of metrics, (forget losses, test losses) as numpy, number of classes) of one model."""
    net = inference_copy(model, device)
    logits = {k: predict_logits(net, x, mean, std, device=device) for k, (x, y) in sets.items()}
    k_classes = logits["test"].shape[1]
    fy, ty = sets["forget"][1], sets["test"][1]
    r = {"forget_acc": accuracy(logits["forget"], fy), "remain_acc": accuracy(logits["remain"], sets["remain"][1]),
         "test_acc": accuracy(logits["test"], ty)}
    fl = per_sample_loss(logits["forget"], fy)
    tl = per_sample_loss(logits["test"], ty)
    r["mia_lr"] = mia_lr(fl, tl, seed=seed) if min(len(fl), len(tl)) >= MIA_MIN_SAMPLES else None
    conf = {k: true_class_confidence(logits[k], sets[k][1]) for k in sets}
    r["mia_efficacy"] = mia_efficacy_from_confidence(conf["remain"], conf["test"], conf["forget"], seed=seed,
                                                     max_shadow=max_shadow)
    if seconds is not None:
        r["seconds"] = seconds
    pc = per_class_accuracy(logits["test"], ty)
    for c in range(k_classes):
        if c in pc:
            r[f"test_acc_c{c}"] = pc[c]
    return r, (fl.numpy(), tl.numpy()), k_classes


def _write_table(path: str, rows: dict, columns: list) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for name, r in rows.items():
        w.writerow({"method": name, **{c: ("" if r.get(c) is None else f"{r[c]:.6g}") for c in columns[1:]}})
    atomic_write_text(path, buf.getvalue())


def report(models: dict, forget, remain, test, *, out_dir: str, retrain: Optional[str] = "retrain", mean=None,
           std=None, device=None, title: str = "", notes: Optional[dict] = None, tsne: bool = True,
           tsne_points: int = 300, tradeoff: Optional[list] = None, class_names=None, seed: int = 0,
           max_shadow: int = 2000, extra_figures: Optional[dict] = None, attacks: Optional[str] = None,
           attack_kw: Optional[dict] = None, seeds: Optional[list] = None, progress: bool = False,
           provenance: Optional[dict] = None) -> Report:
    """Score ``models`` ({name: model | (model, seconds) | result | model file path}) and write
    the report files, with manifest.json (eval.report_manifest; ``provenance`` adds to it).

    retrain: the key of the retrained reference among ``models`` (None: no gap column).
    tradeoff: rows for a trade-off figure (dicts with method, fraction and metric keys), drawn
    as tradeoff.png. extra_figures: {caption: png path} to link from the page as well.
    attacks: "all", "suite" or "representation" adds the membership attacks and / or the
    representation checks (eval.attack_report: attacks.csv, roc.png, per_example.png, a
    section of the page, "evidence" in metrics.json); attack_kw goes to attack_section
    (original=, reference_models=, train_references_k=, layer=, ...).
    seeds: one report per seed in out_dir/seed_<s>/ and mean +- std in out_dir (eval.seeds);
    each model is then a callable seed -> model, a list with one model per seed, or one model
    for every seed.
    progress: a bar on stderr that advances per model scored (and once more for the t-SNE).
    """
    if seeds is not None:
        return report_over_seeds(report, models, forget, remain, test, seeds=seeds, out_dir=out_dir, retrain=retrain,
                                 mean=mean, std=std, device=device, title=title, notes=notes, tsne=tsne,
                                 tsne_points=tsne_points, tradeoff=tradeoff, class_names=class_names,
                                 max_shadow=max_shadow, extra_figures=extra_figures, attacks=attacks,
                                 attack_kw=attack_kw, progress=progress)
    if not models:
        raise ValueError("report: no models given")
    if retrain is not None and retrain not in models:
        raise ValueError(f"report: retrain={retrain!r} is not among the models {list(models)}; pass retrain=None "
                         "to leave the gap out")
    files = model_files(models)
    models, mean, std = load_files(models, mean, std, device)
    sets = {k: evaluation_set(v, k) for k, v in (("forget", forget), ("remain", remain), ("test", test))}
    os.makedirs(out_dir, exist_ok=True)
    k_classes = None
    rows, losses, panels = {}, {}, {}
    emb_x, emb_y, emb_forget = _tsne_sample(sets, tsne_points, seed)
    bar = progress_bar(len(models) + int(tsne), progress, "report")
    for name, v in models.items():
        model, seconds = _model_and_seconds(v)
        rows[name], losses[name], k_classes = _score(model, seconds, sets, mean, std, device, seed, max_shadow)
        if tsne:
            emb, lg = _embed(model, emb_x, mean, std, device)
            panels[name] = dict(emb=emb, y=emb_y, pred=lg.argmax(1).numpy(), forget=emb_forget)
        bar.update()
    if retrain is not None:
        # Cost against the retrain: seconds / the retrain's seconds, when both were timed.
        t_retrain = rows[retrain].get("seconds")
        for r in rows.values():
            r["gap"] = gap(r, rows[retrain])
            if t_retrain and r.get("seconds") is not None:
                r["x_retrain"] = r["seconds"] / t_retrain

    columns = list(TABLE_COLUMNS) + [f"test_acc_c{c}" for c in range(k_classes)]
    paths = {"csv": os.path.join(out_dir, "table.csv")}
    _write_table(paths["csv"], rows, columns)
    section = None
    if attacks is not None:
        section = attack_section({n: _model_and_seconds(v)[0] for n, v in models.items()}, sets["forget"],
                                 sets["remain"], sets["test"], out_dir, what=attacks, retrain=retrain, mean=mean,
                                 std=std, device=device, seed=seed, **(attack_kw or {}))
        paths.update(section.paths)
    paths["json"] = os.path.join(out_dir, "metrics.json")
    atomic_write_text(paths["json"], json.dumps({"title": title, "rows": rows, "notes": notes or {},
                                                 "sizes": {k: int(len(v[1])) for k, v in sets.items()},
                                                 **({"evidence": section.evidence} if section else {})},
                                                indent=2, default=str))
    paths["mia_hist"] = plots.loss_histograms(losses, os.path.join(out_dir, "mia_hist.png"),
                                              title="per-sample loss: forget vs test")
    if tsne:
        paths["tsne"] = plots.tsne_regions(_tsne(panels, seed), os.path.join(out_dir, "tsne.png"),
                                           title="t-SNE of embeddings, decision regions of each model",
                                           class_names=class_names)
        bar.update()
    bar.close()
    if tradeoff:
        paths["tradeoff"] = plots.tradeoff_curves(tradeoff, os.path.join(out_dir, "tradeoff.png"),
                                                  title="unlearning a growing share of one class")
    md = _markdown(title, rows, columns, paths, notes, {k: len(v[1]) for k, v in sets.items()}, retrain,
                   extra_figures or {}, out_dir)
    if section is not None:
        md += "\n" + section.markdown
    paths["markdown"] = os.path.join(out_dir, "report.md")
    atomic_write_text(paths["markdown"], md)
    paths["manifest"] = write_report_manifest(out_dir, files, rows, paths, {k: len(v[1]) for k, v in sets.items()},
                                              device=device, seed=seed, max_shadow=max_shadow, retrain=retrain,
                                              mean=mean, std=std, provenance=provenance)
    return Report(rows, paths, md, columns)


def _tsne(panels: dict, seed: int) -> dict:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    out = {}
    # One thread: on a few hundred points OpenMP's spin-waiting costs more than it saves,
    # badly so on a shared machine.
    with threadpool_limits(1):
        for name, p in panels.items():
            emb = p["emb"]
            perplexity = float(max(2, min(30, (len(emb) - 1) // 3)))
            e2 = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(emb)
            out[name] = dict(p, emb=e2)
    return out


def _markdown(title, rows, columns, paths, notes, sizes, retrain, extra, out_dir) -> str:
    lines = [f"# {title or 'Unlearning report'}", ""]
    lines.append(f"Sets: forget {sizes['forget']}, remain {sizes['remain']}, test {sizes['test']} images. "
                 "Accuracies in %; MIA-LR is the held-out accuracy of a logistic regression telling forget from "
                 "test samples by their loss (0.5: indistinguishable); MIA-eff is the share of forget samples a "
                 "confidence SVC (trained remain vs test) calls non-members."
                 + (f" Gap: mean |difference| to `{retrain}` over forget / remain / test accuracy and MIA-LR, in "
                    "points." if retrain else ""))
    lines += ["", markdown_table(rows, [c for c in columns[1:] if not c.startswith("test_acc_c")]), ""]
    pcs = [c for c in columns if c.startswith("test_acc_c")]
    if pcs:
        lines += ["Test accuracy per class (%):", "", markdown_table(rows, pcs), ""]
    figs = [("Loss histograms (MIA)", paths.get("mia_hist")), ("t-SNE with decision regions", paths.get("tsne")),
            ("Trade-off over the share of the class unlearned", paths.get("tradeoff"))]
    figs += list(extra.items())
    for cap, p in figs:
        if p:
            lines += [f"## {cap}", "", f"![{cap}]({os.path.relpath(p, out_dir)})", ""]
    if notes:
        lines += ["## Settings", "", "```", json.dumps(notes, indent=2, default=str), "```", ""]
    return "\n".join(lines)
