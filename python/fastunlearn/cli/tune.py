"""`fastunlearn tune`: measure the speed settings for a model ahead of time and cache the choice."""

from __future__ import annotations

from fastunlearn.autotune import tune
from fastunlearn.cli.common import (
    add_common,
    add_config_args,
    add_data_args,
    config_from_args,
    device_of,
    load_splits,
    subset,
)
from fastunlearn.cli.folder import as_tensors
from fastunlearn.data.checkpoint import load_model
from fastunlearn.runtime import tuning


def cmd_tune(args):
    dev = device_of(args)
    model, meta = load_model(args.model, dev)
    _, splits = load_splits(args.data, args.data_dir, args)
    example = as_tensors(subset(splits["train"], args.examples, args.seed))
    cfg = config_from_args(args)
    tune(model, example, cfg, meta.get("mean"), meta.get("std"), dev, budget_s=args.budget)
    if not tuning.enabled():
        print("note: FASTUNLEARN_TUNE=0 is set, so runs in this environment will not read this choice")


def add_parser(sub, fmt):
    t = sub.add_parser("tune", help="time the speed settings on a model and cache the fastest",
                       formatter_class=fmt, description="Time the candidate speed settings (search precision and "
                       "chunk size, train-step precision, layout, BatchNorm fusion) on a few real steps of MODEL on "
                       "this device, print them, and cache the fastest that keeps the accuracy contract, for later "
                       "runs with the same model structure, image shape, device, torch version, batch size and "
                       "steps. Cache: $FASTUNLEARN_TUNE_CACHE or the user cache directory.")
    t.add_argument("--model", required=True, help="the model file whose steps are timed")
    t.add_argument("--examples", type=int, default=256, help="training images to time the steps on")
    t.add_argument("--budget", type=float, default=30.0, help="the most seconds the measuring may take")
    add_data_args(t, forget=False)
    add_config_args(t)
    add_common(t)
    t.set_defaults(func=cmd_tune)
