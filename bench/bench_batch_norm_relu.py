"""batch_norm_relu (a training-mode BatchNorm2d and the ReLU after it, forward + backward):
the native op of the device (cpu or cuda) against PyTorch's modules (F.batch_norm, then
relu), in the same process, on the activation shapes of a batch-64 train step.

For each shape, dtype and layout: ms p50 of one forward + backward (the gradient flows to the
input, the weight and the bias, and the running statistics are updated), the ratio, and the
largest error of each against reference.batch_norm_relu in float64 (relative to the largest
reference value; where the ReLU's input is 0 up to float32 rounding either side is right, so
those values are left out of the input-gradient error).

The default shapes are those of AllCNN (widths 0.25 and 1) on 28 x 28 images at batch 64.
With --step-widths, a second table times the whole train step (FinetuneEngine.step, batch 64,
AllCNN at each width, 1 x 28 x 28 inputs; on CUDA replayed from a CUDA graph) as PyTorch's
modules in NCHW and in channels_last, and fused in channels_last (the CPU default).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, apply_run_args, device_name, report, timeit  # noqa: E402

from fastunlearn import reference  # noqa: E402
from fastunlearn.ops import batch_norm_relu  # noqa: E402
from fastunlearn.runtime import backends as _backends

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="64x24x28x28,64x48x14x14,64x96x28x28,64x192x14x14",
                   help="N x C x H x W, comma-separated")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    p.add_argument("--layouts", default="cl,nchw", help="comma-separated: cl (channels_last), nchw")
    p.add_argument("--step-widths", default="", help="AllCNN widths whose train step to time, e.g. 0.125,0.25,0.5 "
                   "(default: none)")
    p.add_argument("--step-precision", default="bf16", help="the train step's precision: bf16 | fp32")
    add_run_args(p)
    return p.parse_args(argv)


def one_pass(backend, x, w, b, rm, rv, dy):
    """A forward + backward as a train step runs it; returns (y, dx, dw, db)."""
    xx, ww, bb = (t.detach().requires_grad_(True) for t in (x, w, b))  # fresh leaves: no accumulation
    y = batch_norm_relu(xx, ww, bb, rm, rv, backend=backend)
    y.backward(dy)
    return y, xx.grad, ww.grad, bb.grad


def errors(out, x, w, b, dy):
    """Largest relative error of y, dx and (dw, db) against the float64 reference."""
    out = [t.cpu() for t in out]
    x, w, b, dy = (t.cpu() for t in (x, w, b, dy))
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y, mean, invstd = reference.batch_norm_relu(xr, wr, br)
    y.backward(dy.double())
    ch = (1, -1, 1, 1)
    z = ((xr - mean.reshape(ch)) * invstd.reshape(ch) * wr.reshape(ch) + br.reshape(ch)).detach()
    sure = z.abs() > 1e-5 * z.abs().max()

    def rel(a, ref):
        return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))

    return {"err_y": rel(out[0], y.detach()), "err_dx": rel(out[1][sure], xr.grad[sure]),
            "err_dwb": max(rel(out[2], wr.grad), rel(out[3], br.grad))}


def step_rows(args, dev):
    """ms p50 of one batch-64 train step per AllCNN width: unfused NCHW, unfused channels_last,
    fused channels_last."""
    import fastunlearn as fu
    from fastunlearn.engine.finetune import FinetuneEngine
    from fastunlearn.nn.fuse import fuse_batch_norm_relu
    from fastunlearn.nn.models import create_model

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=gen).to(dev)
    y = torch.randint(0, 10, (64,), generator=gen).to(dev)
    cfg = fu.UnlearnConfig(precision=args.step_precision)
    rows = []
    for width in [float(w) for w in args.step_widths.split(",") if w]:
        row = {"bench": "batch_norm_relu step", "width": width, "precision": args.step_precision}
        variants = (("nchw_ms", False, False), ("cl_ms", True, False), ("cl_fused_ms", True, True))
        for name, channels_last, fuse in variants:
            torch.manual_seed(0)
            model = create_model(name="allcnn", in_channels=1, num_classes=10, width=width)
            engine = FinetuneEngine(model, cfg, mean=[0.286], std=[0.353], device=dev, channels_last=channels_last)
            engine.model.train()
            undo = fuse_batch_norm_relu(engine.model) if fuse else None
            row[name] = timeit(lambda: engine.step(x, y), dev, reps=args.reps)[1]
            if undo:
                undo()
        row["fused_vs_nchw"] = row["nchw_ms"] / row["cl_fused_ms"]
        row["fused_vs_cl"] = row["cl_ms"] / row["cl_fused_ms"]
        rows.append(row)
    return rows


def main(argv=None):
    args = parse(argv)
    dev = apply_run_args(args)
    native = dev.type
    if native not in ("cpu", "cuda") or not getattr(_backends, f"has_{native}_op")("batch_norm_relu"):
        raise SystemExit(f"batch_norm_relu has no native kernel for --device {dev} in this build "
                         f"(fastunlearn.backends(): {_backends.backends()})")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.lower().split("x"))
        if len(shape) != 4:
            raise SystemExit(f"--shapes: expected N x C x H x W, got {spec!r}")
        c = shape[1]
        for dname in args.dtypes.split(","):
            for layout in args.layouts.split(","):
                fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
                x = torch.randn(shape, generator=gen).to(dev, DTYPES[dname]).contiguous(memory_format=fmt)
                dy = torch.randn(shape, generator=gen).to(dev, DTYPES[dname]).contiguous(memory_format=fmt)
                w = (torch.rand(c, generator=gen) + 0.5).to(dev)
                b = (torch.randn(c, generator=gen) * 0.1).to(dev)
                rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
                row = {"bench": "batch_norm_relu", "shape": spec, "dtype": dname, "layout": layout}
                for backend, name in (("torch", "eager"), (native, "fused")):
                    row[f"{name}_ms"] = timeit(lambda: one_pass(backend, x, w, b, rm, rv, dy), dev,
                                               reps=args.reps)[1]
                    row.update({f"{name}_{k}": v for k, v in
                                errors(one_pass(backend, x, w, b, rm, rv, dy), x, w, b, dy).items()})
                row["speedup"] = row["eager_ms"] / row["fused_ms"]
                rows.append(row)
    report(rows, f"batch_norm_relu forward + backward, {device_name(dev)}; ms p50; errors vs float64",
           ["shape", "dtype", "layout", "eager_ms", "fused_ms", "speedup", "fused_err_y", "fused_err_dx",
            "fused_err_dwb", "eager_err_dx", "eager_err_dwb"], args, dev)
    steps = step_rows(args, dev)
    if steps:
        report(steps, f"train step, AllCNN, batch 64, {args.step_precision}, {device_name(dev)}; ms p50",
               ["width", "nchw_ms", "cl_ms", "cl_fused_ms", "fused_vs_nchw", "fused_vs_cl"], args, dev)
    return rows + steps


if __name__ == "__main__":
    main()
