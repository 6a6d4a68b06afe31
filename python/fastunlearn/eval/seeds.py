"""Mean +- std over seeds for fu.report(..., seeds=[...]) and fu.sweep(..., seeds=[...]).

The spread is the sample standard deviation (ddof = 1) over the seeds; with one seed it is
0. A report over seeds writes one full report per seed (out_dir/seed_<s>/) and, in out_dir,
table.csv with a ``<metric>_std`` column after each metric column, metrics.json (the means,
the stds and every seed's rows) and report.md (mean +- std).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Callable, Sequence

import numpy as np
import torch.nn as nn

from fastunlearn.data.checkpoint import atomic_write_text


def check_seeds(seeds) -> list:
    seeds = list(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds!r}")
    return seeds


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0)


def for_seed(value, seed: int, i: int, n: int):
    """The model entry for the i-th of n seeds: value(seed) for a callable, value[i] for a
    list / tuple of n entries (other than a (model, seconds) pair), else value itself."""
    if callable(value) and not isinstance(value, nn.Module):
        return value(seed)
    is_pair = isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[0], nn.Module) and (
        value[1] is None or isinstance(value[1], (int, float)))
    if isinstance(value, (tuple, list)) and not is_pair:
        if len(value) != n:
            raise ValueError(f"a list of models needs one per seed ({n}), got {len(value)}")
        return value[i]
    return value


def aggregate(rows_by_seed: list) -> dict:
    """{method: {col: mean, col_std: std}} over the numeric columns every seed has."""
    out = {}
    for method in rows_by_seed[0]:
        cols = [c for c, v in rows_by_seed[0][method].items() if isinstance(v, (int, float))
                and not isinstance(v, bool) and all(c in rows[method] for rows in rows_by_seed)]
        r = {}
        for c in cols:
            r[c], r[f"{c}_std"] = mean_std([rows[method][c] for rows in rows_by_seed])
        out[method] = r
    return out


def _csv(rows: dict, columns: list) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for name, r in rows.items():
        w.writerow({"method": name, **{c: ("" if r.get(c) is None else f"{r[c]:.6g}") for c in columns[1:]}})
    return buf.getvalue()


def _markdown(title: str, seeds: list, rows: dict, metrics: list, seed_pages: dict, out_dir: str) -> str:
    def cell(r, c):
        if c not in r or r[c] is None or (isinstance(r[c], float) and math.isnan(r[c])):
            return "-"
        scale = 1 if c in ("mia_lr", "mia_efficacy", "seconds") else 100
        return f"{scale * r[c]:.2f} +- {scale * r[f'{c}_std']:.2f}"

    lines = [f"# {title or 'Unlearning report'} (mean +- std over {len(seeds)} seeds)", "",
             f"Seeds: {seeds}. Accuracies and gap in %, MIA scores as fractions, time in s; +- is the sample "
             "standard deviation over the seeds.", "",
             "| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(r, c) for c in metrics) + " |" for name, r in rows.items()]
    lines += ["", "Each seed's report: " + ", ".join(f"[seed {s}]({os.path.relpath(p, out_dir)})"
                                                     for s, p in seed_pages.items()), ""]
    return "\n".join(lines)


def report_over_seeds(report_fn: Callable, models: dict, forget, remain, test, *, seeds, out_dir: str, **kw):
    """One report per seed (models resolved with for_seed, the report's own seed = the seed),
    then the mean +- std table. Returns a report of report_fn's own type (its rows the means
    and <metric>_std), the columns in the order of report_fn's table."""
    seeds = check_seeds(seeds)
    os.makedirs(out_dir, exist_ok=True)
    per_seed, pages = [], {}
    for i, s in enumerate(seeds):
        resolved = {name: for_seed(v, s, i, len(seeds)) for name, v in models.items()}
        rep = report_fn(resolved, forget, remain, test, out_dir=os.path.join(out_dir, f"seed_{s}"), seed=s, **kw)
        per_seed.append(rep.rows)
        pages[s] = rep.paths["markdown"]
        report_type, table_columns = type(rep), rep.columns
    rows = aggregate(per_seed)
    first = next(iter(rows.values()))
    metrics = [c for c in table_columns[1:] if c in first and not c.startswith("test_acc_c")] + sorted(
        c for c in first if c.startswith("test_acc_c") and not c.endswith("_std"))
    columns = ["method"] + [x for c in metrics for x in (c, f"{c}_std")]
    paths = {"csv": os.path.join(out_dir, "table.csv"), "json": os.path.join(out_dir, "metrics.json"),
             "markdown": os.path.join(out_dir, "report.md")}
    atomic_write_text(paths["csv"], _csv(rows, columns))
    atomic_write_text(paths["json"], json.dumps({"title": kw.get("title", ""), "seeds": seeds, "rows": rows,
                                                 "per_seed": dict(zip(seeds, per_seed, strict=True))},
                                                indent=2, default=str))
    md = _markdown(kw.get("title", ""), seeds, rows, [c for c in metrics if not c.startswith("test_acc_c")], pages,
                   out_dir)
    atomic_write_text(paths["markdown"], md)
    return report_type(rows, paths, md, columns)


def sweep_over_seeds(sweep_fn: Callable, seeds) -> object:
    """sweep_fn(seed) for each seed; the first seed's SweepResult, with ``seed_summary``:
    {"seeds", "chosen": [each seed's chosen settings], "forget_acc" / "remain_acc": the chosen
    points' (mean, std), "points": [{settings, forget_acc, forget_acc_std, remain_acc,
    remain_acc_std}] for each grid point, matched by its settings across the seeds}."""
    seeds = check_seeds(seeds)
    results = [sweep_fn(s) for s in seeds]
    by_settings = {}
    for res in results:
        for p in res.points:
            by_settings.setdefault(json.dumps(p.settings, sort_keys=True, default=str), []).append(p)
    points = []
    for pts in by_settings.values():
        row = dict(settings=pts[0].settings, seeds=len(pts))
        for key in ("forget_acc", "remain_acc"):
            row[key], row[f"{key}_std"] = mean_std([getattr(p, key) for p in pts])
        points.append(row)
    first = results[0]
    first.seed_summary = {
        "seeds": seeds, "chosen": [r.chosen.settings for r in results],
        "forget_acc": mean_std([r.chosen.forget_acc for r in results]),
        "remain_acc": mean_std([r.chosen.remain_acc for r in results]), "points": points}
    return first
