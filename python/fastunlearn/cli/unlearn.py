"""`fastunlearn unlearn`: make a model file forget a set of training samples."""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from fastunlearn.api import unlearn
from fastunlearn.cli.common import (
    add_common,
    add_config_args,
    add_data_args,
    config_from_args,
    metrics_table,
    prepare_data,
)
from fastunlearn.data.checkpoint import atomic_write_text, load_model, save_model
from fastunlearn.engine.distributed import init_from_env, world
from fastunlearn.eval.metrics import evaluate


def cmd_unlearn(args):
    # Under torchrun every rank runs this command: they share the search and the fine-tune
    # (global batch --batch-size), then rank 0 alone saves, evaluates and prints.
    joined = not (dist.is_available() and dist.is_initialized())
    dev = init_from_env(args.device)
    joined = joined and world()[1] > 1
    try:
        _unlearn(args, dev, is_main=world()[0] == 0)
    finally:
        if joined:
            dist.destroy_process_group()


def _unlearn(args, dev, is_main):
    model, meta = load_model(args.model, dev)
    name, splits, _, f, r, test = prepare_data(args)
    cfg = config_from_args(args)
    if is_main:
        print(f"forgetting {len(f[1])} of {len(f[1]) + len(r[1])} training images of {name} "
              f"({cfg.refresh_mode} search, {world()[1]} process(es))")
    res = unlearn(model, f, r, config=cfg, mean=meta.get("mean"), std=meta.get("std"), device=dev,
                  progress=not args.no_progress)
    if not is_main:
        return
    meta_out = {k: v for k, v in meta.items() if k != "arch"}
    save_model(res.model, args.out, meta["arch"], **meta_out, unlearned_from=os.path.basename(args.model),
               config=cfg.to_dict())
    rows = {"original": evaluate(model, f, r, test, meta.get("mean"), meta.get("std"), dev, max_shadow=5000),
            "unlearned": dict(evaluate(res.model, f, r, test, meta.get("mean"), meta.get("std"), dev,
                                       max_shadow=5000), seconds=res.seconds)}
    print(metrics_table(rows))
    print(f"saved {args.out} (search {res.timings['search']:.2f}s, fine-tune {res.timings['finetune']:.2f}s, "
          f"backend {res.backend}; {100 * float(res.success.float().mean()):.1f}% of the forget set crossed)")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))


def add_parser(sub, fmt):
    u = sub.add_parser("unlearn", help="make a model forget a set of training samples", formatter_class=fmt,
                       description="Search each forget sample's nearest decision boundary with perturbed sign "
                       "gradients, relabel it there, fine-tune a copy of the model on the relabelled set "
                       "(optionally regularised on the remain set), save it, and print before/after metrics.")
    u.add_argument("--model", required=True, help="model file written by `fastunlearn train`")
    u.add_argument("--out", required=True, help="output model file (.safetensors), written atomically")
    u.add_argument("--json", help="also write the metrics as JSON here")
    add_data_args(u)
    add_config_args(u)
    add_common(u)
    u.set_defaults(func=cmd_unlearn)
