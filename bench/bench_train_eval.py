"""Training an original (or a retrain) and predicting with it, as the library runs them, against
plain eager PyTorch in the same process.

  train    one epoch of train_classifier (SGD, batch --batch, constant lr, no augmentation)
           at precision fp32 and bf16, against the same loop written plainly: NCHW, fp32,
           PyTorch's own BatchNorm and ReLU.
  predict  metrics.predict_logits (a copy with the BatchNorms folded, channels_last) against
           model.eval() called on each batch; with the largest difference of the logits.

AllCNN at --width on 1 x 28 x 28 inputs (random uint8 pixels: the timings do not depend on
them). The retrain that `fastunlearn demo` compares the unlearning with, and every metric of
`evaluate`, run through these two paths.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, apply_run_args, device_name, report, timeit  # noqa: E402

from fastunlearn.engine.train import train_classifier  # noqa: E402
from fastunlearn.eval.metrics import predict_logits, prepare  # noqa: E402
from fastunlearn.nn.models import create_model  # noqa: E402

MEAN, STD = [0.286], [0.353]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=float, default=0.25, help="AllCNN width multiplier (1 = 96/192 filters)")
    p.add_argument("--train-size", type=int, default=1280, help="images in the timed training epoch")
    p.add_argument("--batch", type=int, default=128, help="training batch size")
    p.add_argument("--eval-size", type=int, default=4000, help="images predicted")
    add_run_args(p)
    p.set_defaults(reps=5)
    return p.parse_args(argv)


def plain_epoch(model, x, y, batch, dev):
    """The training loop of train_classifier, written plainly (fp32, NCHW, eager modules)."""
    net = copy.deepcopy(model).to(dev).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for s in range(0, x.shape[0], batch):
        xb = prepare(x[s:s + batch].to(dev), MEAN, STD)
        loss = F.cross_entropy(net(xb).float(), y[s:s + batch].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net


@torch.no_grad()
def plain_predict(model, x, dev, batch=512):
    model = model.eval()
    return torch.cat([model(prepare(x[i:i + batch].to(dev), MEAN, STD)).float().cpu()
                      for i in range(0, x.shape[0], batch)])


def main(argv=None):
    args = parse(argv)
    dev = apply_run_args(args)
    g = torch.Generator().manual_seed(0)
    n = max(args.train_size, args.eval_size)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    torch.manual_seed(0)
    model = create_model(name="allcnn", in_channels=1, num_classes=10, width=args.width)
    xt, yt = x[:args.train_size], y[:args.train_size]
    steps = -(-args.train_size // args.batch)

    def ours(precision):
        return lambda: train_classifier(model, (xt, yt), epochs=1, lr=0.05, batch_size=args.batch, mean=MEAN,
                                        std=STD, device=dev, schedule="constant", progress=False,
                                        precision=precision)

    rows = []
    base = timeit(lambda: plain_epoch(model, xt, yt, args.batch, dev), dev, warmup=1, reps=args.reps)[1]
    for name, fn in (("plain PyTorch, fp32", None), ("train_classifier, fp32", ours("fp32")),
                     ("train_classifier, bf16", ours("bf16"))):
        ms = base if fn is None else timeit(fn, dev, warmup=1, reps=args.reps)[1]
        rows.append(dict(bench="train", width=args.width, case=name, ms=ms, ms_per_step=ms / steps,
                         speedup=base / ms))

    trained = plain_epoch(model, xt, yt, args.batch, dev)  # running statistics away from 0 / 1
    xe = x[:args.eval_size]
    ref = plain_predict(trained, xe, dev)
    got = predict_logits(trained, xe, MEAN, STD, device=dev)
    err = float((got - ref).abs().max())
    base = timeit(lambda: plain_predict(trained, xe, dev), dev, warmup=1, reps=args.reps)[1]
    ms = timeit(lambda: predict_logits(trained, xe, MEAN, STD, device=dev), dev, warmup=1, reps=args.reps)[1]
    rows += [dict(bench="predict", width=args.width, case="model.eval(), fp32", ms=base, speedup=1.0),
             dict(bench="predict", width=args.width, case="predict_logits, fp32", ms=ms, speedup=base / ms,
                  max_abs_diff=err)]
    report(rows, f"train (1 epoch of {args.train_size}, batch {args.batch}) and predict ({args.eval_size} images), "
           f"AllCNN width {args.width}, {device_name(dev)}; ms p50",
           ["bench", "case", "ms", "ms_per_step", "speedup", "max_abs_diff"], args, dev)
    return rows


if __name__ == "__main__":
    main()
