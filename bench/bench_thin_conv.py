"""A thin convolution (few input channels: a grey or RGB image's first layer), the library's
channels_last call against NCHW and against an unfold + GEMM formulation.

A first layer with one input channel and a 3x3 kernel has K = C_in * kh * kw = 9 products
per output, too few for the tensor-core convolution kernels: on the H200 of bench/RESULTS.md
(run D) its forward took 1.6 ms per 6,000-sample search chunk (about 5 TFLOP/s) and its
weight gradient 95 us per batch-64 train step, on 8 thread blocks. Written as a GEMM,
[N*H*W, K] x [K, O], it is bound by the bytes of its output. For each batch size and dtype
this times the three passes the engine runs through such a layer:

  forward      y = conv(x, w) + b
  input grad   dx, from dy (the search's backward)
  weight grad  dw and db, from dy (the train step's backward)

with (a) conv2d on channels_last tensors as the engine lays them out
(nn.layout.channels_last_input), (b) conv2d on NCHW tensors, and (c) unfold + matmul (fold for
the input gradient), and checks (a) and (c) against a float64 convolution. It answers
whether the engine should route thin layers through (c).

Columns: ms p50 per pass; "gemm vs cl" = (a) / (c) (above 1: the GEMM form is faster);
max error relative to the largest float64 value.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, apply_run_args, device_name, report, timeit  # noqa: E402

from fastunlearn.nn.layout import channels_last_input  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="64,6000", help="batch sizes, comma-separated (the train step's, a "
                   "search chunk's)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=96)
    p.add_argument("--size", type=int, default=28, help="image side")
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp16, fp32")
    add_run_args(p)
    return p.parse_args(argv)


def conv_passes(x, w, b, pad):
    """(forward, input grad, weight grad) through ATen's convolution, in x's layout."""
    def backward(dy, mask):
        return torch.ops.aten.convolution_backward(dy, x, w, [w.shape[0]], [1, 1], [pad, pad], [1, 1], False,
                                                   [0, 0], 1, mask)

    return (lambda: F.conv2d(x, w, b, padding=pad),
            lambda dy: backward(dy, [True, False, False])[0],
            lambda dy: backward(dy, [False, True, True])[1:])


def gemm_passes(x, w, b, pad):
    """The same three passes as unfold + matmul: rows are output pixels (N*H*W), columns the
    K = C*kh*kw taps; a channels_last output gradient is already that [N*H*W, O] matrix."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    w2 = w.reshape(o, -1)

    def cols():
        return F.unfold(x, (kh, kw), padding=pad).transpose(1, 2).reshape(n * ho * wo, c * kh * kw)

    def forward():
        return torch.addmm(b, cols(), w2.t()).view(n, ho, wo, o).permute(0, 3, 1, 2)

    def rows(dy):
        return dy.permute(0, 2, 3, 1).reshape(n * ho * wo, o)

    def input_grad(dy):
        dcols = (rows(dy) @ w2).view(n, ho * wo, c * kh * kw).transpose(1, 2)
        return F.fold(dcols, (h, wd), (kh, kw), padding=pad)

    def weight_grad(dy):
        g = rows(dy)
        return (g.t() @ cols()).view_as(w), g.sum(0, dtype=torch.float32).to(b.dtype)

    return forward, input_grad, weight_grad


def reference(x, w, b, dy, pad):
    """float64 forward, input grad and weight grads on the CPU."""
    x64 = x.detach().double().cpu().requires_grad_(True)
    w64 = w.detach().double().cpu().requires_grad_(True)
    b64 = b.detach().double().cpu().requires_grad_(True)
    y = F.conv2d(x64, w64, b64, padding=pad)
    y.backward(dy.double().cpu())
    return y.detach(), x64.grad, (w64.grad, b64.grad)


def rel_err(out, ref):
    if isinstance(out, tuple):
        return max(rel_err(o, r) for o, r in zip(out, ref))
    ref = ref.double()
    return float((out.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def main(argv=None):
    args = parse(argv)
    dev = apply_run_args(args)
    gen = torch.Generator().manual_seed(0)
    pad = args.kernel // 2
    rows = []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for n in [int(v) for v in args.batches.split(",")]:
            shape = (n, args.in_channels, args.size, args.size)
            x = torch.rand(shape, generator=gen).to(dev, dtype)
            w = (torch.randn(args.out_channels, args.in_channels, args.kernel, args.kernel, generator=gen)
                 / args.kernel).to(dev, dtype)
            b = torch.randn(args.out_channels, generator=gen).to(dev, dtype)
            dy = torch.randn(n, args.out_channels, args.size, args.size, generator=gen).to(dev, dtype)
            x_cl, w_cl = channels_last_input(x), w.contiguous(memory_format=torch.channels_last)
            dy_cl = dy.contiguous(memory_format=torch.channels_last)
            ref = reference(x, w, b, dy, pad)
            variants = {"cl": (conv_passes(x_cl, w_cl, b, pad), dy_cl),
                        "nchw": (conv_passes(x, w, b, pad), dy),
                        "gemm": (gemm_passes(x_cl, w, b, pad), dy_cl)}
            for i, pass_name in enumerate(("forward", "input grad", "weight grad")):
                row = {"bench": "thin_conv", "batch": n, "dtype": dname, "pass": pass_name,
                       "shape": f"{args.in_channels}->{args.out_channels} {args.kernel}x{args.kernel} "
                                f"{args.size}x{args.size}"}
                for name, (passes, grad) in variants.items():
                    fn = passes[i] if i == 0 else (lambda f=passes[i], g=grad: f(g))
                    row[f"{name}_ms"] = timeit(fn, dev, reps=args.reps)[1]
                    if name != "nchw":
                        row[f"{name}_err"] = rel_err(fn(), ref[i])
                row["gemm_vs_cl"] = row["cl_ms"] / row["gemm_ms"]
                rows.append(row)
    report(rows, f"thin convolution, {device_name(dev)}; ms p50",
           ["batch", "dtype", "pass", "cl_ms", "nchw_ms", "gemm_ms", "gemm_vs_cl", "cl_err", "gemm_err"], args, dev)
    return rows


if __name__ == "__main__":
    main()
