"""`fastunlearn compose`: the backbone of one model with the head of another."""

from __future__ import annotations

from fastunlearn.cli.common import add_common, add_data_args, device_of, prepare_data
from fastunlearn.compose import compose
from fastunlearn.data.checkpoint import load_model, save_model


def cmd_compose(args):
    dev = device_of(args)
    a, meta = load_model(args.backbone, dev)
    b, _ = load_model(args.head, dev)
    remain = None
    if args.finetune:
        _, _, _, _, remain, _ = prepare_data(args)
    out = compose(a, b, head_name=args.head_name, remain=remain, finetune=args.finetune, epochs=args.epochs,
                  lr=args.lr, mean=meta.get("mean"), std=meta.get("std"), device=dev,
                  progress=not args.no_progress)
    meta_out = {k: v for k, v in meta.items() if k != "arch"}
    save_model(out, args.out, meta["arch"], **meta_out, composed_from=[args.backbone, args.head])
    print(f"saved {args.out}")


def add_parser(sub, fmt):
    c = sub.add_parser("compose", help="backbone of one model + head of another", formatter_class=fmt,
                       description="Take the feature extractor of --backbone (a run that kept remain accuracy) "
                       "and the classifier head of --head (a run that forgot), optionally fine-tune on the remain set.")
    c.add_argument("--backbone", required=True)
    c.add_argument("--head", required=True)
    c.add_argument("--head-name", help="attribute path of the head (default: found automatically)")
    c.add_argument("--finetune", choices=("head", "full"), help="fine-tune on the remain set (needs the data args)")
    c.add_argument("--epochs", type=int, default=1)
    c.add_argument("--lr", type=float, default=1e-3)
    c.add_argument("--out", required=True)
    add_data_args(c)
    add_common(c)
    c.set_defaults(func=cmd_compose)
