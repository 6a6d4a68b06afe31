"""Scaling of the sharded search and the data-parallel fine-tune from 1 to P processes.

For each process count P the benchmark starts P processes on this machine and runs one
job on them, as torchrun would: the search (T = --steps) over the --n forget samples,
sharded over the ranks, then --epochs fine-tune epochs under DistributedDataParallel with
--batch-size as the global batch. On CPU the processes talk over gloo with --threads
threads each; with --device cuda each process takes its own GPU and they talk over NCCL
(this needs as many CUDA devices as the largest P). The table shows the samples/s of the
whole job (all processes together) and the speed-up over one process.

The data are the first --n FashionMNIST training images (scikit-learn's digits when
FashionMNIST is not installed); the model is an AllCNN at --width, randomly initialised,
since the cost of a step does not depend on the weights. Timings are medians over --reps
runs, measured on rank 0 between barriers, so they include the collectives. The process
counts run one after another, --rounds times in turn, and the table takes the median
round; on a shared machine the CPU numbers still move with the load of the other jobs,
so the speed-up of each round is printed too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_csv, device_name, print_table, sync  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", default="1,2", help="process counts to run, comma-separated (default 1,2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu (gloo) or cuda (NCCL, one GPU per process); default: cuda when there are at least "
                   "as many CUDA devices as the largest --procs, else cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--data-dir", help="FashionMNIST directory (default: $FASTUNLEARN_DATA or Debian's path)")
    p.add_argument("--n", type=int, default=2048, help="forget samples (default 2048)")
    p.add_argument("--width", type=float, default=0.25, help="AllCNN width (1 = the paper's; default 0.25)")
    p.add_argument("--steps", type=int, default=1, help="inner search steps T (default 1, FGSM)")
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs per timed run (default 1)")
    p.add_argument("--batch-size", type=int, default=64, help="global fine-tune batch (default 64)")
    p.add_argument("--precision", default="fp32", help="fp32 | bf16 | auto (default fp32)")
    p.add_argument("--reps", type=int, default=3, help="timed runs per process count and round, median kept "
                   "(default 3)")
    p.add_argument("--rounds", type=int, default=3, help="times each process count runs, in turn with the others; "
                   "the median is reported (default 3)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one process count may take (default 600)")
    p.add_argument("--csv", default=None, help="CSV to append rows to (default bench/results.csv or "
                   "$FASTUNLEARN_BENCH_CSV)")
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    try:
        args.procs = sorted({int(v) for v in args.procs.split(",")})
    except ValueError:
        p.error(f"--procs must be comma-separated integers, got {args.procs!r}")
    if args.procs[0] < 1:
        p.error("--procs must be >= 1")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= args.procs[-1] else "cpu"
    if args.device == "cuda" and torch.cuda.device_count() < args.procs[-1]:
        p.error(f"--device cuda with {args.procs[-1]} processes needs {args.procs[-1]} CUDA devices, "
                f"this machine has {torch.cuda.device_count()}")
    for name in ("n", "epochs", "batch_size", "reps", "rounds", "threads", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def workload(args, device):
    from fastunlearn.data import io as data
    from fastunlearn.nn.models import create_model

    name, splits = data.load_default(args.data_dir)
    x, y = splits["train"]
    if args.n > len(y):
        raise SystemExit(f"error: --n {args.n} is more than the {len(y)} training images of {name}")
    mean, std = data.channel_stats(x[:4096])
    torch.manual_seed(0)  # the same weights on every rank
    model = create_model("allcnn", in_channels=int(x.shape[1]), num_classes=int(y.max()) + 1, width=args.width)
    return name, (x[:args.n], y[:args.n]), mean, std, model.to(device).eval()


def timed(fn, device, reps):
    """Median seconds of fn() on rank 0, between barriers: the slowest rank sets the time."""
    times = []
    for _ in range(reps):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        sync(device)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rank_main(rank, world, init_file, out_file, args):
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from fastunlearn import UnlearnConfig
        from fastunlearn.data.source import ImageSource
        from fastunlearn.engine.distributed import sharded_search
        from fastunlearn.engine.finetune import FinetuneEngine
        from fastunlearn.nn.frozen import frozen_copy

        name, (fx, fy), mean, std, model = workload(args, device)
        cfg = UnlearnConfig(eps=0.1, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size, lr=1e-3,
                            precision=args.precision, compile=False)
        mean_t = torch.tensor(mean, device=device)
        std_t = torch.tensor(std, device=device)
        frozen = frozen_copy(model, device)
        source = ImageSource(fx, fy)

        def search(src=source):
            return sharded_search(frozen, src, cfg, mean=mean_t, std=std_t, device=device, frozen=frozen)

        search(ImageSource(fx[:256], fy[:256]))  # warm-up: allocator, kernels, backend choice
        search_s = timed(search, device, args.reps)
        result = search()

        trainable = copy.deepcopy(model).requires_grad_(True)
        original = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
        engine = FinetuneEngine(trainable, cfg, mean=mean_t, std=std_t, device=device, teacher=frozen)
        engine.run(fx, result, progress=False, max_steps=3)  # warm-up

        def finetune():
            engine.reset(original)
            engine.run(fx, result, progress=False)

        finetune_s = timed(finetune, device, args.reps)
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump({"search_s": search_s, "finetune_s": finetune_s, "data": name,
                           "input": "x".join(str(s) for s in fx.shape[1:])}, f)
    finally:
        dist.destroy_process_group()


def run_procs(procs, args):
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        out_file = os.path.join(tmp, "rank0.json")
        ctx = mp.start_processes(_rank_main, args=(procs, os.path.join(tmp, "rdzv"), out_file, args),
                                 nprocs=procs, join=False, start_method="spawn")
        deadline = time.monotonic() + args.timeout
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise SystemExit(f"error: {procs} processes did not finish within --timeout {args.timeout} s")
        with open(out_file) as f:
            return json.load(f)


def main(argv=None):
    args = parse(argv)
    device = torch.device(args.device)
    backend = "nccl" if args.device == "cuda" else "gloo"
    # In turn rather than one count after the other, so that a change in the machine's load
    # does not fall on one process count only.
    rounds = [{p: run_procs(p, args) for p in args.procs} for _ in range(args.rounds)]
    results = {p: {key: statistics.median(r[p][key] for r in rounds) for key in ("search_s", "finetune_s")}
               for p in args.procs}
    for p in args.procs:
        results[p].update(data=rounds[0][p]["data"], input=rounds[0][p]["input"])
    base = results[args.procs[0]]
    n = args.n
    rows = []
    for p, r in results.items():
        search_rate = n / r["search_s"]
        tune_rate = n * args.epochs / r["finetune_s"]
        rows.append({"bench": "distributed", "provider": f"{backend} x{p}", "procs": p,
                     "search_samples_per_s": search_rate,
                     "search_speedup": base["search_s"] / r["search_s"],
                     "finetune_samples_per_s": tune_rate,
                     "finetune_speedup": base["finetune_s"] / r["finetune_s"]})
    if args.procs[0] != 1:
        print(f"(speed-ups are relative to {args.procs[0]} processes)")
    per_proc = (f"{args.threads} thread(s) per process" if args.device == "cpu"
                else f"one {device_name(torch.device('cuda', 0))} per process")
    print(f"\n{n} x {base['input']} {base['data']} images, allcnn width {args.width}, search T={args.steps}, "
          f"fine-tune {args.epochs} epoch(s) at global batch {args.batch_size}, {per_proc}")
    print_table(rows, ["provider", "search_samples_per_s", "search_speedup", "finetune_samples_per_s",
                       "finetune_speedup"])
    first = args.procs[0]
    for p in args.procs[1:]:
        each = ", ".join(f"{r[first]['search_s'] / r[p]['search_s']:.2f} / "
                         f"{r[first]['finetune_s'] / r[p]['finetune_s']:.2f}" for r in rounds)
        print(f"x{p} speed-up in each round (search / fine-tune): {each}")
    if args.no_csv:
        return
    dname = device_name(device) if args.device == "cuda" else device_name(device).rsplit(" x", 1)[0]
    common = {"device": f"{dname} ({per_proc})", "model": f"allcnn-w{args.width}", "input": base["input"], "n": n,
              "steps": args.steps, "batch_size": args.batch_size, "epochs": args.epochs,
              "precision": args.precision, "rounds": args.rounds}
    path = append_csv([dict(common, **r) for r in rows], args.csv)
    print(f"\nappended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
