"""Where fu.sweep's seconds go, on bench_recipe.py's cases: a breakdown of one sweep per case.

Each case is prepared as bench_recipe.py prepares it (the same splits, original model and
validation); then fu.sweep runs with its default grid while timers wrap its parts:

  search        the boundary search (shared by the runs that agree on its settings)
  fine-tune     FinetuneEngine.run, less what is listed under it:
    teacher     the frozen original's forwards on remain batches (remain_target="distill")
    ckpt write  the checkpoint written where a run stops between rungs
    ckpt read   the checkpoint a resumed run loads
  engine setup  FinetuneEngine construction (a fresh engine for each stage of a run)
  scoring       each point's forwards on the validation split (and held-out images)
  other         the rest: copies of models, bookkeeping

    flock -x /tmp/fastunlearn-cpu.lock .venv/bin/python bench/profile_sweep.py --out runs/profile
    ... --grid '{"relabel": ["nearest_incorrect", "soft_incorrect"]}'    # another grid
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_recipe import DEFAULT_CASES, prepare_case  # noqa: E402
from common import device_name  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.engine import finetune as finetune_mod  # noqa: E402
from fastunlearn.engine import loop as loop_mod  # noqa: E402
from fastunlearn.eval import staged as staged_mod  # noqa: E402
from fastunlearn.eval import sweep as sweep_mod  # noqa: E402

PARTS = ("search", "fine-tune", "teacher", "ckpt write", "ckpt read", "engine setup", "scoring", "other")


class Timers:
    """Seconds per part, and calls; a part nested in another is subtracted from it."""

    def __init__(self):
        self.seconds, self.calls, self.stack, self.names = defaultdict(float), defaultdict(int), [], []

    @contextlib.contextmanager
    def part(self, name):
        t0 = time.perf_counter()
        self.stack.append(0.0)
        self.names.append(name)
        try:
            yield
        finally:
            self.names.pop()
            inner = self.stack.pop()
            dt = time.perf_counter() - t0
            self.seconds[name] += dt - inner
            self.calls[name] += 1
            if self.stack:
                self.stack[-1] += dt

    def wrap(self, owner, attr, name):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            with self.part(name):
                return fn(*a, **k)

        setattr(owner, attr, timed)
        return lambda: setattr(owner, attr, fn)


def time_teacher(timers, frozen_copy):
    """frozen_copy whose model times its own forwards (the sweep's teacher)."""
    def made(*a, **k):
        m = frozen_copy(*a, **k)
        forward = m.forward

        def timed(*x, **kx):
            if not timers.names or timers.names[-1] != "fine-tune":  # the search's forwards are its own
                return forward(*x, **kx)
            with timers.part("teacher"):
                return forward(*x, **kx)

        m.forward = timed
        return m
    return made


def profile_case(spec, args) -> dict:
    c = prepare_case(spec, args)
    timers = Timers()
    undo = [timers.wrap(staged_mod, "run_search", "search"),
            timers.wrap(finetune_mod.FinetuneEngine, "run", "fine-tune"),
            timers.wrap(finetune_mod.FinetuneEngine, "__init__", "engine setup"),
            timers.wrap(loop_mod, "save_checkpoint", "ckpt write"),
            timers.wrap(loop_mod, "load_checkpoint", "ckpt read"),
            timers.wrap(sweep_mod._Inputs, "scores", "scoring"),
            timers.wrap(sweep_mod, "frozen_copy", "other")]
    sweep_mod.frozen_copy = time_teacher(timers, sweep_mod.frozen_copy)
    try:
        t0 = time.perf_counter()
        base = fu.UnlearnConfig.recommended(precision="fp32", seed=args.seed)  # fu.sweep's default base
        sw = fu.sweep(c["original"], c["f"], c["r"], base=base,
                      mean=c["mean"], std=c["std"], grid=json.loads(args.grid) if args.grid else None,
                      **c["sweep_kw"])
        total = time.perf_counter() - t0
    finally:
        for u in reversed(undo):
            u()
    secs = dict(timers.seconds)
    secs["other"] = total - sum(v for k, v in secs.items() if k != "other")
    return dict(case=spec, total=total, seconds={k: secs.get(k, 0.0) for k in PARTS},
                calls={k: timers.calls.get(k, 0) for k in PARTS}, spent=sw.spent, chosen=sw.chosen.settings,
                n_forget=len(c["f"][1]), n_remain=len(c["r"][1]))


def table(results) -> str:
    out = ["| case | forget / remain | total s | " + " | ".join(PARTS) + " |",
           "|---|---|---|" + "---|" * len(PARTS)]
    for r in results:
        cells = [f"{r['seconds'][k]:.2f} ({100 * r['seconds'][k] / r['total']:.0f} %)" for k in PARTS]
        out.append(f"| {r['case']} | {r['n_forget']} / {r['n_remain']} | {r['total']:.2f} | " + " | ".join(cells)
                   + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/profile")
    p.add_argument("--cases", default=DEFAULT_CASES)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--fashion-size", type=int, default=6000)
    p.add_argument("--forget-class", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="JSON grid for fu.sweep (default: its DEFAULT_GRID)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    results = [profile_case(spec, args) for spec in args.cases.split(",")]
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
