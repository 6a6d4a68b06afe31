"""`fastunlearn train` and `fastunlearn retrain`: train a model (retrain: without a forget set)
and save it with its mean / std and provenance."""

from __future__ import annotations

import copy
import math
import sys
import time

import torch

from fastunlearn.cli.common import (
    add_common,
    add_data_args,
    add_train_precision,
    device_of,
    load_splits,
    select_forget,
    subset,
    train_seed,
)
from fastunlearn.cli.folder import as_tensors, count, model_input
from fastunlearn.cli.model_files import add_normalisation_args, normalisation
from fastunlearn.cli.provenance import data_args, data_record, forget_record
from fastunlearn.cli.safety import check_output
from fastunlearn.data import forget as forget_sets
from fastunlearn.data import io as data
from fastunlearn.data.pixels import as_pixels
from fastunlearn.data.provenance import file_record, save_with_manifest
from fastunlearn.engine.train import train_classifier
from fastunlearn.eval.metrics import evaluate
from fastunlearn.nn.external import FACTORY, is_external, load_weights
from fastunlearn.nn.models import create_model
from fastunlearn.runtime import manifest

BATCH = 128
# A CPU job estimated to take longer than this gets a warning before it starts.
WARN_SECONDS = 300


def estimate_seconds(model, x, epochs: int, device) -> float:
    """Seconds the training will take, from three timed steps on one batch (CPU only)."""
    net = copy.deepcopy(model).to(device).train()
    batch = as_pixels(x[:BATCH], device)
    labels = torch.zeros(batch.shape[0], dtype=torch.long, device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(batch), labels).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times) * math.ceil(len(x) / BATCH) * epochs


def _warn_if_long(model, x, args, dev):
    if dev.type != "cpu" or args.no_time_estimate:
        return
    seconds = estimate_seconds(model, x, args.train_epochs, dev)
    if seconds > WARN_SECONDS:
        print(f"note: this training will take about {seconds / 60:.0f} minutes on this CPU ({len(x)} images x "
              f"{args.train_epochs} epochs). To make it smaller: --train-size 6000, --width 0.25 (allcnn), "
              "--arch smallcnn, fewer --train-epochs, or a GPU (--device cuda)", file=sys.stderr, flush=True)


def _check_train_args(args) -> None:
    retrain = args.command == "retrain"
    if args.train_epochs < (1 if retrain or not args.weights else 0):
        if args.train_epochs == 0 and not retrain:
            raise SystemExit("error: --train-epochs 0 saves a trained model without training it, so it needs the "
                             "model's weights: give --weights FILE (a state_dict of the model --arch / "
                             "--model-factory builds)")
        raise SystemExit(f"error: --train-epochs must be >= 1{'' if retrain else ' (0 with --weights)'}, "
                         f"got {args.train_epochs}")
    if not (args.train_lr > 0 and math.isfinite(args.train_lr)):
        raise SystemExit(f"error: --train-lr must be a finite number > 0, got {args.train_lr}")


def _train_data(args):
    """(data set name, splits, training pair): the remain set for retrain; read into memory when
    it is trained on or its channel statistics are needed, else left as it is (a folder streams)."""
    name, splits = load_splits(args.data, args.data_dir, args)
    train = subset(splits["train"], args.train_size, train_seed(args))
    if args.command == "retrain":
        idx = select_forget(args, train[1], train[0])
        args.forget_index = idx
        _, train = forget_sets.split(train[0], train[1], idx)  # train on the remain set only
    if args.train_epochs > 0 or args.mean is None:
        train = as_tensors(train)  # the channel statistics and the training read every image
    return name, splits, train


def cmd_train(args):
    check_output(args.out, [args.weights], args.force)
    _check_train_args(args)
    dev = device_of(args)
    name, splits, train = _train_data(args)
    x, y = train
    mean, std = normalisation(args, int(x.shape[1]))
    if mean is None:
        mean, std = data.channel_stats(x)
    arch = model_arch(args, int(x.shape[1]), int(splits["train"][1].max()) + 1)
    model = create_model(**arch)
    if args.weights:
        load_weights(model, args.weights)
    t0 = time.perf_counter()
    if args.train_epochs > 0:
        _warn_if_long(model, x, args, dev)
        model = train_classifier(model, train, epochs=args.train_epochs, lr=args.train_lr, mean=mean, std=std,
                                 device=dev, seed=args.seed, progress=not args.no_progress,
                                 precision=args.train_precision)
    seconds = time.perf_counter() - t0
    m = evaluate(model, remain=model_input(train), test=model_input(splits["test"]), mean=mean, std=std, device=dev,
                 mia=False)
    record = data_record(args, name, subset(splits["train"], args.train_size, train_seed(args)))
    prov = manifest.new(args.command, dev, data=record, data_args=data_args(args),
                        forget=forget_record(args) if args.command == "retrain" else None,
                        config={"arch": arch, "train_epochs": args.train_epochs, "train_lr": args.train_lr,
                                "train_precision": args.train_precision, "batch_size": BATCH,
                                "weights": file_record(args.weights) if args.weights else None},
                        seeds={"train": args.seed}, counts={"train": len(y), "test": count(splits["test"])},
                        timings={"train": seconds},
                        metrics={"train_acc": m["remain_acc"], "test_acc": m.get("test_acc")},
                        parents=[])
    written = save_with_manifest(model, args.out, arch, prov, mean=mean, std=std, dataset=name)
    test = "" if "test_acc" not in m else f", test {100 * m['test_acc']:.2f}%"
    what = "train" if args.train_epochs > 0 else "not trained (--train-epochs 0); its accuracy on the training images"
    print(f"saved {args.out} and {written}: {what} {100 * m['remain_acc']:.2f}%{test}")


def model_arch(args, in_channels: int, classes: int) -> dict:
    """The architecture record of the model to train (the model file keeps it to rebuild it)."""
    if args.model_factory:
        if args.arch != "allcnn" and args.arch:
            raise SystemExit("error: give --arch or --model-factory, not both")
        name = FACTORY + args.model_factory
    else:
        name = args.arch
    num_classes = args.num_classes if args.num_classes is not None else classes
    if num_classes < classes:
        raise SystemExit(f"error: --num-classes {num_classes}, but the data has labels up to {classes - 1}")
    if is_external(name):
        if args.width is not None:
            raise SystemExit(f"error: --width applies to the package's models, not {name}")
        return {"name": name, "num_classes": num_classes}
    arch = {"name": name, "in_channels": in_channels, "num_classes": num_classes}
    if args.width is not None:
        arch["width"] = args.width if name == "allcnn" else int(args.width)
    return arch


def _add_train_args(t):
    t.add_argument("--arch", default="allcnn", help="allcnn | smallcnn | resnet18 | resnet34 | resnet50 | "
                   "torchvision:NAME (any torchvision.models name, e.g. torchvision:resnet50; needs torchvision)")
    t.add_argument("--model-factory", help="package.module:function returning an nn.Module, called with "
                   "num_classes=K (the module must be importable wherever the model file is loaded)")
    t.add_argument("--num-classes", type=int, help="classes of the model (when not given: the data's)")
    t.add_argument("--weights", help="initial weights: a state_dict file (.safetensors or a torch file) for the "
                   "model --arch / --model-factory builds")
    t.add_argument("--width", type=float, help="allcnn: width multiplier (1 = 96/192 filters; when not given: 1); "
                   "smallcnn: channels")
    t.add_argument("--train-epochs", type=int, default=5, help="passes over the training images; train only: 0 "
                   "with --weights saves a model trained elsewhere as a model file, untrained (bring your own)")
    t.add_argument("--train-lr", type=float, default=0.05, help="peak SGD learning rate of the one-cycle schedule")
    add_normalisation_args(t, "the model", "the training images' own")
    add_train_precision(t, "the training")
    t.add_argument("--out", required=True, help="output model file (.safetensors); its folder must exist")
    t.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    t.add_argument("--no-time-estimate", action="store_true",
                   help="skip the timed trial steps that warn before a long CPU job")
    add_common(t)
    t.set_defaults(func=cmd_train)


def add_parser(sub, fmt):
    t = sub.add_parser("train", help="train an original model on a dataset", formatter_class=fmt,
                       description="Train a classifier and save it (with its mean/std and provenance: data set, "
                       "training subset, seed) as a model file, with a manifest JSON beside it.")
    add_data_args(t, forget=False)
    _add_train_args(t)
    r = sub.add_parser("retrain", help="train a model without a forget set (the gold standard a report compares with)",
                       formatter_class=fmt, description="Train a classifier from scratch on the training images "
                       "less the forget set (chosen as `unlearn` chooses it): the model an exact unlearning would "
                       "give, for `report --retrain` and `eval --retrain`.")
    add_data_args(r, forget=True)
    _add_train_args(r)
