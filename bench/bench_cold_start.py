"""What the first fu.unlearn of a process pays that the next one does not, and where.

A command-line run or a fresh worker unlearns once: it pays, on top of the work, the
first-use costs of its process: cuDNN plans (or oneDNN primitives) for each new shape,
kernel modules loaded on first launch, the allocator's first blocks, CUDA-graph captures.
This runs fu.unlearn twice on the same model and forget set, each under torch.profiler and
fastunlearn.runtime.profiling.phases (fastunlearn.runtime.profiling.first_use), and ranks the phases and the
ops by what the first call paid more than the second. Before the first call the process
holds the model on the device and has run one forward (as a process that just loaded and
checked its model has); nothing else has warmed it.

The second call is not a warm fu.Unlearner revision (that keeps its captures and frozen copy
between revisions; bench_revision.py times it): it repeats what every fu.unlearn call pays
(a frozen copy, captures) and leaves out only what the process pays once.

The model and data are those of bench_e2e.py (same flags). --epochs defaults to 2: every
shape of the run appears in the first epoch, so more epochs add the same time to both calls.
--profile DIR writes the first call's trace (first_use_trace.json) and the table to DIR.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import FLAG, add_setup_args, setup  # noqa: E402
from common import append_csv, device_name, model_label, sync  # noqa: E402

import fastunlearn as fu  # noqa: E402
from fastunlearn.data.checkpoint import atomic_write_text  # noqa: E402
from fastunlearn.eval.metrics import predict_logits  # noqa: E402
from fastunlearn.runtime import profiling  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_args(p)
    p.add_argument("--epochs", type=int, default=2, help="unlearning epochs per call")
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    p.add_argument("--cuda-graph", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--rows", type=int, default=15, help="ops listed")
    p.add_argument("--profile", metavar="DIR", help="write the first call's trace and the table to DIR")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    dev, name, _, forget, remain, _, mean, std, model = setup(args)
    predict_logits(model, forget[0][:8], mean=mean, std=std, device=dev)  # a process that checked its model
    sync(dev)
    cfg = fu.UnlearnConfig(epochs=args.epochs, precision=args.precision, cuda_graph=FLAG[args.cuda_graph],
                           seed=args.seed, search_batch_size=args.search_batch_size)
    trace = os.path.join(args.profile, "first_use_trace.json") if args.profile else None
    result = profiling.first_use(lambda: fu.unlearn(model, forget, remain, config=cfg, mean=mean, std=std,
                                                    device=dev, progress=False), dev, trace_path=trace)
    dname = device_name(dev)
    head = (f"first use: forget class {args.forget_class} ({len(forget[1])} {name} images), {args.arch} width "
            f"{args.width}, {args.epochs} epochs, precision {args.precision}; {dname}")
    text = head + "\n" + profiling.format_first_use(result, rows=args.rows)
    print(text)
    if args.profile:
        atomic_write_text(os.path.join(args.profile, "first_use.txt"), text + "\n")
        print(f"trace of the first call: {trace}")
    first, second = result["first"], result["second"]
    phases = sorted(set(first["phases"]) | set(second["phases"]))
    row = {"bench": "cold_start", "device": dname, "model": model_label(args.arch, args.width), "dataset": name,
           "n_forget": len(forget[1]), "epochs": args.epochs, "precision": args.precision,
           "threads": torch.get_num_threads(), "first_s": first["wall_s"], "second_s": second["wall_s"],
           "excess_s": first["wall_s"] - second["wall_s"],
           "phase_excess_s": ";".join(f"{k}={first['phases'].get(k, 0.0) - second['phases'].get(k, 0.0):.4f}"
                                      for k in phases)}
    path = append_csv([row], args.csv)
    print(f"\nappended 1 row to {path}")
    return result


if __name__ == "__main__":
    main()
