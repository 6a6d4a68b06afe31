"""UnlearnConfig.recommended() and fu.sweep against a fair retrain: quality and cost, one table.

For each case (data:arch:what, as in study_recipe.py) a seeded 10 % of the training split is held
out as the validation split; the original model trains on the rest and the retrained one on its
remain set, with the same recipe, seed and epochs (the retrain's wall time is the reference; it
is timed --reps times, each time right before the recipes). Then, in the same process, at the
same precision (fp32) and thread count:

  recipe  fu.unlearn(original, forget, remain, config=UnlearnConfig.recommended(forget_size=...,
          remain_size=...)), timed --reps times (the model of the first run is scored); with
          --recipes '{"label": {overrides}, ...}' one such row per label, recommended(**overrides)
          ("recipe_steps": N sets epochs by config.recipe_epochs with N steps)
  sweep   fu.sweep(original, forget, remain, val=...) with its default grid and base (fp32), timed
          --sweep-reps times (the first scored),
          selecting on the validation split: for a whole class, val = (the class's val images, the
          others'); otherwise heldout = the val images of the forgotten kind (each point's own target)
  sweep (before)  with --before-grid '{...}': the same sweep with that grid, right after it (base: the
          recipe's, or with --before-base plain the plain UnlearnConfig(), without the head re-fit)

Every model is scored on the forget set, a seeded --eval-remain subset of the remain set and the
test split. Timings are only meaningful alone on the machine:

    flock -x /tmp/fastunlearn-cpu.lock .venv/bin/python bench/bench_recipe.py --out runs/recipe
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import device_name  # noqa: E402
from study_recipe import forget_mask, load, scores, timed_train  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.cli.common import subset  # noqa: E402
from fastunlearn.config import recipe_epochs  # noqa: E402
from fastunlearn.data import forget  # noqa: E402
from fastunlearn.data import io as data  # noqa: E402

DEFAULT_CASES = ("digits28:usernet:class,digits:allcnn:class,mnist:usernet:class,fashion:allcnn:class,"
                 "digits28:usernet:subgroup,retina:allcnn:subgroup")


def holdout(train, fraction: float, seed: int):
    """(rest, val) with a seeded ``fraction`` of ``train`` held out."""
    n = len(train[1])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))
    k = int(round(fraction * n))
    v, t = perm[:k].sort().values, perm[k:].sort().values
    return (train[0][t], train[1][t]), (train[0][v], train[1][v])


def prepare_case(spec: str, args) -> dict:
    """The case's splits and its original model: what the recipe, the sweep and the retrain start from."""
    name, arch, what = spec.split(":")
    full, test, classes, epochs = load(name, args)
    train, val = holdout(full, 0.1, args.seed)
    f, r = forget.split(train[0], train[1], forget_mask(name, what, train[1], classes, args))
    # The val images of the forgotten kind: the class itself, or the same rule on the val split.
    vmask = forget_mask(name, what, val[1], classes, argparse.Namespace(**{**vars(args), "seed": args.seed + 1}))
    fv, rv = forget.split(val[0], val[1], vmask)
    mean, std = data.channel_stats(train[0])
    original, _ = timed_train(arch, train, epochs, classes, mean, std, args, "original")
    # The sweep's validation: a whole class chooses on its val images and the others'; anything
    # else on each point's own accuracy on the val images of the forgotten kind.
    sweep_kw = dict(val=(fv, rv)) if what == "class" else dict(val=(f, rv), heldout=fv)
    return dict(arch=arch, what=what, test=test, classes=classes, epochs=epochs, train=train, f=f, r=r,
                mean=mean, std=std, original=original, sweep_kw=sweep_kw)


def run_case(spec: str, args) -> dict:
    c = prepare_case(spec, args)
    arch, test, classes, epochs, train = c["arch"], c["test"], c["classes"], c["epochs"], c["train"]
    f, r, mean, std, original = c["f"], c["r"], c["mean"], c["std"], c["original"]
    configs = {}
    for label, overrides in json.loads(args.recipes).items():
        overrides = dict(overrides)
        if "recipe_steps" in overrides:  # the epoch rule with another number of steps
            overrides["epochs"] = recipe_epochs(len(f[1]), overrides.get("batch_size", fu.UnlearnConfig.batch_size),
                                                overrides.pop("recipe_steps"))
        cfg = fu.UnlearnConfig.recommended(forget_size=len(f[1]), remain_size=len(r[1]), **overrides)
        configs[label] = cfg.replace(precision="fp32", seed=args.seed)
    # Each rep times the retrain and then every recipe once, so that a slow spell of the
    # machine falls on both sides of the ratio; the first rep's models are scored.
    seconds = {"retrain": [], **{label: [] for label in configs}}
    models = {}
    for _ in range(args.reps):
        retrain, secs = timed_train(arch, r, epochs, classes, mean, std, args, "retrain")
        seconds["retrain"].append(secs)
        models.setdefault("retrain", retrain)
        for label, cfg in configs.items():
            res = fu.unlearn(original, f, r, config=cfg, mean=mean, std=std, progress=False)
            seconds[label].append(res.seconds)
            models.setdefault(label, res.model)
    t_rt = statistics.median(seconds["retrain"])
    sets = {"forget": f, "remain": subset(r, args.eval_remain, args.seed), "test": test}
    rows = {k: dict(scores(m, sets, mean, std), seconds=seconds[k]) for k, m in models.items()}
    if not args.no_sweep:
        recipe_base = fu.UnlearnConfig.recommended(precision="fp32", seed=args.seed)  # fu.sweep's default base
        plain = fu.UnlearnConfig(precision="fp32", seed=args.seed)
        before_base = recipe_base if args.before_base == "recipe" else plain
        grids = [("sweep", None, recipe_base)]
        if args.before_grid:
            grids.append(("sweep (before)", json.loads(args.before_grid), before_base))
        for label, grid, base in grids:  # the default first: any warm-up helps the other grid, not it
            secs, first = [], None
            for _ in range(args.sweep_reps):
                t0 = time.perf_counter()
                sw = fu.sweep(original, f, r, base=base, mean=mean, std=std, grid=grid, **c["sweep_kw"])
                secs.append(time.perf_counter() - t0)
                first = first or sw
            rows[label] = dict(scores(first.model, sets, mean, std), seconds=secs, chosen=first.chosen.settings,
                               spent=first.spent)
    for row in rows.values():
        row["x_retrain"] = statistics.median(row["seconds"]) / t_rt
        row["gap"] = statistics.fmean(abs(row[m] - rows["retrain"][m]) for m in ("forget", "remain", "test")) * 100
    return dict(case=spec, n_train=len(train[1]), n_forget=len(f[1]), forget_share=len(f[1]) / len(train[1]),
                configs={k: c.to_dict() for k, c in configs.items()}, rows=rows)


def table(results: list) -> str:
    out = ["| case | forget share | path | forget % | remain % | test % | gap to retrain | seconds (each rep) | "
           "x retrain |", "|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for k, row in res["rows"].items():
            secs = ", ".join(f"{s:.2f}" for s in row["seconds"])
            out.append(f"| {res['case']} | {100 * res['forget_share']:.0f} % | {k} | {100 * row['forget']:.1f} | "
                       f"{100 * row['remain']:.1f} | {100 * row['test']:.1f} | {row['gap']:.2f} | {secs} | "
                       f"{row['x_retrain']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--fashion-size", type=int, default=6000)
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--eval-remain", type=int, default=1000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--sweep-reps", type=int, default=1, help="times each sweep is timed (the first is scored)")
    p.add_argument("--recipes", default='{"recipe": {}}',
                   help="JSON {row label: overrides of UnlearnConfig.recommended(...)}: the recipes to time, in order")
    p.add_argument("--before-grid", default=None,
                   help="JSON grid of a second sweep timed in the same process (e.g. a previous default)")
    p.add_argument("--before-base", choices=("recipe", "plain"), default="recipe",
                   help="base config of the --before-grid sweep: the recipe (fu.sweep's default, with its head "
                        "re-fit) or the plain UnlearnConfig() (no head re-fit)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results = []
    for spec in args.cases.split(","):
        results.append(run_case(spec, args))
        print(table(results[-1:]), flush=True)
    head = (f"device: {device_name(torch.device('cpu'))}, {args.threads} thread(s); date {datetime.date.today()}; "
            f"commit {os.environ.get('FASTUNLEARN_COMMIT', '?')}; torch {torch.__version__}\n\n")
    text = head + table(results) + "\n"
    for name, payload in (("table.md", text), ("results.json", json.dumps(results, indent=2, default=str))):
        path = os.path.join(args.out, name)
        with open(path + ".tmp", "w") as fh:
            fh.write(payload)
        os.replace(path + ".tmp", path)
    print(text)


if __name__ == "__main__":
    main()
