"""Where the time of a revision goes: a warm fu.Unlearner session, split by phase.

For each forget-set size (drawn from one FashionMNIST class) and each precision, one
session is built and revised once (set-up, first-use costs, graph captures), then
--reps times more. Each warm revision is timed twice: plainly (the p50 reported as
"total") and under fastunlearn.runtime.profiling.phases, which splits it into the check of the
data, the search (and its chunk-size measurement and fp32 recheck), the reset to the
original weights, the fine-tune (and its graph captures) and the copy of the result.
Phases synchronise the device at their edges, so their sum is a little above the plain
total. The first revision is split the same way, in a second table. --profile DIR also
writes a torch.profiler trace of one warm revision per size, with a table of the ops that
took the most host and device time.

The model and data are those of bench_e2e.py (same flags).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zoo  # noqa: E402
from bench_e2e import FLAG, add_setup_args, setup, timed  # noqa: E402
from common import append_csv, device_name, model_label, print_table  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.eval.authors import authors_unlearn  # noqa: E402
from fastunlearn.runtime import profiling  # noqa: E402

PHASES = ["check", "search", "search/chunk size", "search/recheck", "reset", "finetune", "finetune/capture", "result"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p)
    p.add_argument("--sizes", default="64,all", help="forget-set sizes, comma-separated; all = the whole class")
    p.add_argument("--precisions", default="auto", help="comma-separated: auto, fp32, bf16")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--reps", type=int, default=7, help="warm revisions timed per case")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--profile", metavar="DIR", help="write a trace of one warm revision per case to DIR")
    p.add_argument("--authors", action="store_true",
                   help="also time the authors'-loop rewrite on each size's first warm subset, before any session "
                        "(ratio: its seconds over the warm p50; ratio_first: over the first revision)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    if args.zoo:
        argv = (sys.argv[1:] if argv is None else list(argv)) + ["--authors"]
        return zoo.run_zoo(os.path.abspath(__file__), "revision", argv, args.zoo, torch.device(args.device).type,
                           args.csv, ["input", "precision", "forget", "authors_ms", "first_ms", "total_ms", "ratio",
                                      "ratio_first", "step_mode"])
    dev, name, train, forget, remain, _, mean, std, model = setup(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    order = torch.randperm(len(forget[1]), generator=g)
    sizes = [len(order) if s == "all" else min(int(s), len(order)) for s in args.sizes.split(",")]
    authors_ms = {}
    if args.authors:  # before any session, so neither side finds the other's warm caches
        cfg = fu.UnlearnConfig(epochs=args.epochs, precision="fp32", cuda_graph=False, seed=args.seed)
        for size in sizes:
            idx = order.roll(-37)[:size]
            authors_ms[size] = 1e3 * timed(lambda: authors_unlearn(model, (forget[0][idx], forget[1][idx]), remain,
                                                                   cfg, mean=mean, std=std, device=dev), dev)[0]
    dname = device_name(dev)
    rows, firsts = [], []
    for precision in args.precisions.split(","):
        cfg = fu.UnlearnConfig(epochs=args.epochs, precision=precision, cuda_graph=FLAG[args.cuda_graph],
                               seed=args.seed, search_batch_size=args.search_batch_size)
        for size in sizes:
            session = fu.Unlearner(model, cfg, mean=mean, std=std, device=dev)
            subsets = [order.roll(-37 * i)[:size] for i in range(args.reps + 1)]
            pick = [(forget[0][i], forget[1][i]) for i in subsets]
            with profiling.phases(dev) as first:
                t_first, res = timed(lambda: session.revise(pick[0], progress=False), dev)
            firsts.append({"precision": precision, "forget": size, "first_ms": 1e3 * t_first,
                           **{k: 1e3 * sec for k, (sec, _) in first.items()}})
            plain, split = [], {}
            for subset in pick[1:]:
                plain.append(timed(lambda: session.revise(subset, progress=False), dev)[0])
                with profiling.phases(dev) as times:
                    session.revise(subset, progress=False)
                for k, (sec, _) in times.items():
                    split.setdefault(k, []).append(sec)
            row = {"precision": precision, "forget": size, "first_ms": 1e3 * t_first,
                   "total_ms": 1e3 * statistics.median(plain), "step_mode": res.step_mode,
                   "rechecked": None if res.search.rechecked is None else int(res.search.rechecked.sum())}
            row.update({k: 1e3 * statistics.median(v) for k, v in split.items()})
            if size in authors_ms:
                row.update(authors_ms=authors_ms[size], ratio=authors_ms[size] / row["total_ms"],
                           ratio_first=authors_ms[size] / row["first_ms"])
            rows.append(row)
            if args.profile:
                path = os.path.join(args.profile, f"revision_{precision}_{size}.json")
                profiling.trace(lambda: session.revise(pick[1], progress=False), path, dev)
                print(f"trace of one warm revision ({precision}, {size} samples): {path}")
    print(f"\nwarm revisions of a FashionMNIST class-{args.forget_class} subset, {model_label(args.arch, args.width)}, "
          f"{args.epochs} epochs; {dname}; ms, p50 of {args.reps}")
    cols = ["precision", "forget", "first_ms", "total_ms"] + [k for k in PHASES if any(k in r for r in rows)]
    print_table(rows, cols + [c for c in ("authors_ms", "ratio", "ratio_first") if authors_ms] +
                ["step_mode", "rechecked"])
    print("\nthe first revision of each session (set-up, first-use costs, captures), ms by phase")
    print_table(firsts, ["precision", "forget", "first_ms"] + [k for k in PHASES if any(k in r for r in firsts)])
    common = {"bench": "revision", "device": dname, "model": model_label(args.arch, args.width), "dataset": name,
              "input": "x".join(str(v) for v in forget[0].shape[1:]),
              "epochs": args.epochs, "threads": torch.get_num_threads()}
    for r, f in zip(rows, firsts):
        r.update({f"first_{k}": v for k, v in f.items() if k in PHASES})
    path = append_csv([dict(common, **{k.replace("/", "_").replace(" ", "_"): v for k, v in r.items()})
                       for r in rows], args.csv)
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
