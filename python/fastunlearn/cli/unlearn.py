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
from fastunlearn.cli.folder import count, model_input
from fastunlearn.cli.model_files import add_normalisation_args, check_batchnorm_mode, load_model_file
from fastunlearn.cli.provenance import (
    apply_recorded,
    check_data,
    data_args,
    data_record,
    forget_record,
    inherited_meta,
    parent_record,
)
from fastunlearn.cli.resume import add_resume_args, run_resumable
from fastunlearn.cli.safety import check_output
from fastunlearn.data.checkpoint import atomic_write_text
from fastunlearn.data.classes import describe
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
    check_output(args.out, [args.model, args.forget_indices, args.metadata], args.force)
    if args.json:
        check_output(args.json, [args.model, args.out], False, flag="--json")
    model, meta = load_model_file(args.model, dev, args)
    apply_recorded(args, meta, args.model)
    name, splits, train, f, r, test = prepare_data(args)
    check_data(meta, args.model, name, train[0])
    cfg = config_from_args(args)
    if cfg.epochs < 1:
        raise SystemExit(f"error: --epochs must be >= 1, got {cfg.epochs} (0 would only copy the model)")
    check_batchnorm_mode(model, meta, cfg.batchnorm)
    if is_main:
        classes = f" (class {', '.join(describe(name, c) for c in args.forget_class)})" if args.forget_class else ""
        print(f"forgetting {len(f[1])} of {len(f[1]) + len(r[1])} training images of {name}{classes} "
              f"({cfg.refresh_mode} search, {world()[1]} process(es))")
    mean, std = meta.get("mean"), meta.get("std")
    f, r, test = model_input(f), model_input(r), model_input(test)
    res = run_resumable(args, lambda **kw: unlearn(model, f, r, config=cfg, mean=mean, std=std, device=dev,
                                                   progress=not args.no_progress, **kw), len(f[1]), cfg)
    if not is_main:
        return
    # Compute, evaluate, then write: a failure before this point leaves no file behind.
    rows = {"original": evaluate(model, f, r, test, mean, std, dev, max_shadow=5000),
            "unlearned": dict(evaluate(res.model, f, r, test, mean, std, dev, max_shadow=5000), seconds=res.seconds)}
    written = res.save(args.out, meta["arch"], input_model=args.model, metrics=rows,
                       provenance={"data": data_record(args, name, train), "forget": forget_record(args),
                                   "data_args": data_args(args), "parents": parent_record(args.model, meta),
                                   "counts": {"forget": len(f[1]), "remain": len(r[1]), "test": count(test)}},
                       **inherited_meta(meta), dataset=name, unlearned_from=os.path.basename(args.model))
    print(metrics_table(rows))
    print(f"saved {args.out} and {written} (search {res.timings['search']:.2f}s, fine-tune "
          f"{res.timings['finetune']:.2f}s, backend {res.backend}; "
          f"{100 * float(res.success.float().mean()):.1f}% of the forget set crossed)")
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2))


def add_parser(sub, fmt):
    u = sub.add_parser("unlearn", help="make a model forget a set of training samples", formatter_class=fmt,
                       description="Search each forget sample's nearest decision boundary with perturbed sign "
                       "gradients, relabel it there, fine-tune a copy of the model on the relabelled set "
                       "(optionally regularised on the remain set), evaluate it, save it with its provenance (and a "
                       "manifest JSON beside it), and print before/after metrics.")
    u.add_argument("--model", required=True, help="model file written by `fastunlearn train`, or a program: a "
                   "TorchScript file (torch.jit.save) or a torch.export file (torch.export.save, .pt2; exported in "
                   "eval mode with a dynamic batch dimension, fine-tuned with --batchnorm frozen when it has "
                   "BatchNorm layers)")
    u.add_argument("--out", required=True, help="output model file (.safetensors), written atomically; for a "
                   "program --model, the unlearned weights with the program's path in the header: "
                   "fastunlearn.data.checkpoint.load_model loads the program from that path and these weights into "
                   "it (so the program file must stay where it is)")
    u.add_argument("--json", help="also write the metrics as JSON here")
    u.add_argument("--force", action="store_true", help="allow --out to overwrite an input file")
    add_normalisation_args(u, "a program --model", "none, the program takes [0, 1] pixels; a model file "
                           "records its own")
    add_resume_args(u)
    add_data_args(u)
    add_config_args(u)
    add_common(u)
    u.set_defaults(func=cmd_unlearn)
