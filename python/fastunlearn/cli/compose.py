"""`fastunlearn compose`: the backbone of one model with the head of another."""

from __future__ import annotations

from fastunlearn.cli.common import add_common, add_data_args, device_of, prepare_data
from fastunlearn.cli.folder import model_input
from fastunlearn.cli.provenance import inherited_meta, parent_record
from fastunlearn.cli.safety import check_output
from fastunlearn.compose import compose
from fastunlearn.data.checkpoint import load_model
from fastunlearn.data.provenance import save_with_manifest


def cmd_compose(args):
    check_output(args.out, [args.backbone, args.head], args.force)
    dev = device_of(args)
    a, meta = load_model(args.backbone, dev)
    b, meta_b = load_model(args.head, dev)
    remain = None
    if args.finetune:
        remain = model_input(prepare_data(args)[4])
    out = compose(a, b, head_name=args.head_name, remain=remain, finetune=args.finetune, epochs=args.epochs,
                  lr=args.lr, mean=meta.get("mean"), std=meta.get("std"), device=dev,
                  progress=not args.no_progress)
    # The data provenance is the backbone's; the head's file is a second parent.
    prov = dict(meta.get("provenance") or {}, kind="compose",
                parents=parent_record(args.backbone, meta) + parent_record(args.head, meta_b))
    save_with_manifest(out, args.out, meta["arch"], prov, **inherited_meta(meta), dataset=meta.get("dataset"),
                       composed_from=[args.backbone, args.head])
    print(f"saved {args.out}")


def add_parser(sub, fmt):
    c = sub.add_parser("compose", help="backbone of one model + head of another", formatter_class=fmt,
                       description="Take the feature extractor of --backbone (a run that kept remain accuracy) "
                       "and the classifier head of --head (a run that forgot), optionally fine-tune on the remain set.")
    c.add_argument("--backbone", required=True, help="model file whose feature extractor is kept")
    c.add_argument("--head", required=True, help="model file whose classifier head is taken")
    c.add_argument("--head-name", help="attribute path of the head (default: found automatically)")
    c.add_argument("--finetune", choices=("head", "full"), help="fine-tune on the remain set (needs the data args)")
    c.add_argument("--epochs", type=int, default=1, help="epochs of the --finetune")
    c.add_argument("--lr", type=float, default=1e-3, help="learning rate of the --finetune")
    c.add_argument("--out", required=True, help="output model file (.safetensors); its folder must exist")
    c.add_argument("--force", action="store_true", help="allow --out to overwrite an input file")
    add_data_args(c)
    add_common(c)
    c.set_defaults(func=cmd_compose)
