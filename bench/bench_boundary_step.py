"""Benchmark of boundary_step: every available backend against the authors' eager chain.

The eager chain is the step written op for op in PyTorch, as the authors' code does it,
in float32, each line a separate pass over memory:

    noise = torch.randn_like(u) * gamma          (only when gamma > 0)
    d = g - lamda * (u - u0) + noise             (the lamda term only when lamda > 0)
    u = u + alpha * sign(d)
    u = min(max(u, u0 - eps), u0 + eps)
    u = clamp(u, 0, 1)
    u = round(u * 255) / 255

"torch" is reference.boundary_step (float64, the correctness definition, not a fast path).
The byte floor is the time to read u, u0, grad and write u_next once, at the copy
bandwidth measured with a clone of a tensor of the same size on the same device.

Two settings are timed: gamma = 0 (plain sign step, lamda = 0) and gamma > 0 (normal
noise, gamma = 0.1, lamda = 0.1), since the noise draw dominates the fused op's compute.

Columns: p20/p50/p80 in ms; "x eager" = eager p50 / provider p50 (above 1: faster than the
eager chain); "x floor" = provider p50 / floor (1 is the memory-bound limit).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, append_csv, apply_run_args, device_name, print_table, sync, timeit  # noqa: E402

from fastunlearn.ops import _dispatch, boundary_step  # noqa: E402

CPU_SHAPES = ((64, 3, 64, 64), (128, 3, 64, 64), (16, 3, 224, 224))  # 0.79M, 1.57M, 2.41M elements
GPU_SHAPES = ((256, 3, 224, 224),)  # 38.5M elements
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SETTINGS = {"gamma=0": dict(gamma=0.0, lamda=0.0), "gamma>0": dict(gamma=0.1, lamda=0.1)}


def eager_chain(u, u0, g, *, eps, alpha, lamda, gamma, quantize):
    d = g
    if gamma:
        noise = torch.randn_like(u) * gamma
    if lamda:
        d = d - lamda * (u - u0)
    if gamma:
        d = d + noise
    v = u + alpha * torch.sign(d)
    v = torch.minimum(torch.maximum(v, u0 - eps), u0 + eps)
    v = torch.clamp(v, 0.0, 1.0)
    return torch.round(v * quantize) / quantize


def clone_bandwidth(numel: int, device: torch.device) -> float:
    """Bytes per second (read + write) of cloning a float32 tensor of numel elements."""
    src = torch.rand(numel, device=device)
    _, p50, _ = timeit(lambda: src.clone(), device, reps=10)
    return 2 * numel * 4 / (p50 * 1e-3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                    help="dtype of u, u0, grad for the fused backends (default float32; the eager chain "
                         "always runs in float32)")
    ap.add_argument("--shapes", default=None,
                    help="N:C:H:W shapes, comma separated (default CPU: "
                         + ",".join(":".join(map(str, s)) for s in CPU_SHAPES) + "; GPU: "
                         + ",".join(":".join(map(str, s)) for s in GPU_SHAPES) + ")")
    ap.add_argument("--settings", default="gamma=0,gamma>0", help="which of gamma=0, gamma>0 to run")
    ap.add_argument("--no-reference", action="store_true", help="skip the slow float64 reference ('torch')")
    add_run_args(ap)
    args = ap.parse_args(argv)

    device = apply_run_args(args)
    dtype = DTYPES[args.dtype]
    default_shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    shapes = default_shapes if not args.shapes else [tuple(int(v) for v in s.split(":"))
                                                     for s in args.shapes.split(",")]
    settings = [s.strip() for s in args.settings.split(",")]
    for s in settings:
        if s not in SETTINGS:
            ap.error(f"--settings: expected names from {sorted(SETTINGS)}, got {s!r}")
    # The Triton interpreter is a correctness tool; timing it says nothing.
    backends = [b for b in ("cpu", "cuda", "triton")
                if _dispatch._available("boundary_step", b, device) and not (b == "triton" and device.type == "cpu")]
    if not args.no_reference:
        backends.append("torch")
    print(f"boundary_step on {device_name(device)}, {args.dtype}; backends: {', '.join(backends)}")

    rows = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    step = dict(eps=8 / 255, alpha=2 / 255, quantize=255)
    for shape in shapes:
        numel = 1
        for s in shape:
            numel *= s
        u0 = torch.randint(0, 256, shape, generator=gen).float() / 255
        u = (u0 + (torch.rand(shape, generator=gen) * 2 - 1) * step["eps"]).clamp(0, 1).to(device)
        u0 = u0.to(device)
        g = torch.randn(shape, generator=gen).to(device)
        uf, u0f, gf = (t.to(dtype) for t in (u, u0, g))
        bw = clone_bandwidth(numel, device)
        floor_ms = 4 * numel * uf.element_size() / bw * 1e3
        for setting in settings:
            kw = dict(step, **SETTINGS[setting])
            cases = {"eager": lambda kw=kw: eager_chain(u, u0, g, **kw)}
            for b in backends:
                cases[b] = (lambda b=b, kw=kw: boundary_step(uf, u0f, gf, noise="normal", seed=1, offset=0,
                                                             backend=b, **kw))
            timings = {}
            for name, fn in cases.items():
                fn()
                sync(device)
                timings[name] = timeit(fn, device, reps=args.reps if name != "torch" else max(3, args.reps // 4))
            eager_p50 = timings["eager"][1]
            for name, (p20, p50, p80) in timings.items():
                rows.append(dict(bench="boundary_step", device=device_name(device), dtype=args.dtype,
                                 shape="x".join(map(str, shape)), numel=numel, setting=setting, provider=name,
                                 p20_ms=p20, p50_ms=p50, p80_ms=p80, x_eager=eager_p50 / p50,
                                 floor_ms=floor_ms, x_floor=p50 / floor_ms, copy_GBps=bw / 1e9))
    print_table(rows, ["shape", "setting", "provider", "p20_ms", "p50_ms", "p80_ms", "x_eager", "floor_ms", "x_floor"])
    if not args.no_csv and rows:
        path = append_csv(rows, args.csv)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
