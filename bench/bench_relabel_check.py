"""Benchmark of relabel_check: every available backend against eager PyTorch and the byte floor.

The relabel check runs once per search step on the logits the step already computed.
The authors' code pays a second forward of the model for it; that cost depends on the
model, so here the op is compared with what eager PyTorch does on the same logits:
argmax, softmax, the one-hot subtraction for the logits gradient and a gather for the
margin, each a separate pass over memory. The byte floor is the time to read the logits
once and write dlogits once at the copy bandwidth measured on the same device.

Columns: p20/p50/p80 in ms; "x eager" = eager p50 / backend p50 (above 1: faster than
eager); "x floor" = backend p50 / floor (1 is the memory-bound limit).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, append_csv, apply_run_args, device_name, print_table, sync, timeit  # noqa: E402

import fastunlearn.ops as ops  # noqa: E402
from fastunlearn.ops import _dispatch  # noqa: E402
from fastunlearn.ops.relabel_check_meta import MODE_CODES  # noqa: E402

SHAPES = ((4096, 10), (16384, 10), (65536, 10), (1024, 1000), (256, 32000))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager(logits, y, mode, topk, want_grad):
    """The unfused PyTorch way: one kernel (and one pass over memory) per quantity."""
    k = logits.shape[1]
    top = logits.argmax(1)
    others = logits.scatter(1, y[:, None], -math.inf)
    best_other = others.argmax(1)
    margin = (logits.gather(1, y[:, None])[:, 0] - others.gather(1, best_other[:, None])[:, 0]).float()
    relabel = best_other if mode == "nearest_incorrect" else top
    p = torch.softmax(logits.float(), 1)
    targets = None
    if mode == "soft":
        targets = p
    elif mode == "topk":
        v, i = p.topk(min(topk, k), 1)
        targets = torch.zeros_like(p).scatter_(1, i, v / v.sum(1, keepdim=True))
    dlogits = p - F.one_hot(y, k).float() if want_grad else None
    return relabel, top != y, margin, targets, dlogits


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    numel = (256 if device.type == "cuda" else 64) * 2**20 // 4
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    _, p50, _ = timeit(lambda: dst.copy_(src), device, reps=10)
    return 2 * src.numel() * 4 / (p50 * 1e-3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="logits dtype (default float32)")
    ap.add_argument("--mode", default="argmax", choices=list(MODE_CODES),
                    help="relabel mode (default argmax, what the search uses)")
    ap.add_argument("--topk", type=int, default=3, help="k for --mode topk")
    ap.add_argument("--no-grad", action="store_true", help="do not ask for dlogits (default: ask, as the search does)")
    ap.add_argument("--shapes", default=None,
                    help="N:K pairs, comma separated (default: " + ",".join(f"{n}:{k}" for n, k in SHAPES) + ")")
    add_run_args(ap)
    args = ap.parse_args(argv)

    device = apply_run_args(args)
    dtype = DTYPES[args.dtype]
    want_grad = not args.no_grad
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    # The Triton interpreter is a correctness tool; timing it says nothing.
    backends = [b for b in ("cpu", "cuda", "triton")
                if _dispatch._available("relabel_check", b, device)
                and not (b == "triton" and device.type == "cpu")]
    bw = copy_bandwidth(device)
    print(f"relabel_check on {device_name(device)}, {args.dtype}, mode={args.mode}, want_grad={want_grad}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s; backends: {', '.join(backends) or 'none'}")

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n, k in shapes:
        x = (torch.randn(n, k, generator=gen) * 3).to(dtype).to(device)
        y = torch.randint(0, k, (n,), generator=gen).to(device)
        nbytes = n * k * x.element_size() + (n * k * 4 if want_grad else 0) + (n * k * 4 if args.mode in
                                                                                ("soft", "topk") else 0)
        floor_ms = nbytes / bw * 1e3
        cases = {"eager": lambda: eager(x, y, args.mode, args.topk, want_grad)}
        for b in backends:
            cases[b] = (lambda b=b: ops.relabel_check(x, y, mode=args.mode, topk=args.topk, want_grad=want_grad,
                                                      backend=b))
        timings = {}
        for name, fn in cases.items():
            fn()
            sync(device)
            timings[name] = timeit(fn, device, reps=args.reps)
        eager_p50 = timings["eager"][1]
        for name, (p20, p50, p80) in timings.items():
            rows.append(dict(bench="relabel_check", device=device_name(device), dtype=args.dtype, mode=args.mode,
                             want_grad=want_grad, N=n, K=k, provider=name, p20_ms=p20, p50_ms=p50, p80_ms=p80,
                             x_eager=eager_p50 / p50, floor_ms=floor_ms, x_floor=p50 / floor_ms))
    print_table(rows, ["N", "K", "provider", "p20_ms", "p50_ms", "p80_ms", "x_eager", "floor_ms", "x_floor"])
    if not args.no_csv and rows:
        path = append_csv(rows, args.csv)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
