"""`fastunlearn train`: train an original model and save it with its mean / std."""

from __future__ import annotations

from fastunlearn.cli.common import add_common, add_data_args, add_train_precision, device_of, load_splits, subset
from fastunlearn.data import io as data
from fastunlearn.data.checkpoint import save_model
from fastunlearn.engine.train import train_classifier
from fastunlearn.eval.metrics import evaluate
from fastunlearn.nn.models import create_model


def cmd_train(args):
    name, splits = load_splits(args.data, args.data_dir)
    train = subset(splits["train"], args.train_size, args.seed)
    x, y = train
    mean, std = data.channel_stats(x)
    arch = {"name": args.arch, "in_channels": int(x.shape[1]), "num_classes": int(y.max()) + 1}
    if args.width is not None:
        arch["width"] = args.width if args.arch == "allcnn" else int(args.width)
    model = create_model(**arch)
    model = train_classifier(model, train, epochs=args.train_epochs, lr=args.train_lr, mean=mean, std=std,
                             device=device_of(args), seed=args.seed, progress=not args.no_progress,
                             precision=args.train_precision)
    save_model(model, args.out, arch, mean=mean, std=std, dataset=name)
    m = evaluate(model, remain=train, test=splits["test"], mean=mean, std=std, device=device_of(args), mia=False)
    print(f"saved {args.out}: train {100 * m['remain_acc']:.2f}%, test {100 * m['test_acc']:.2f}%")


def add_parser(sub, fmt):
    t = sub.add_parser("train", help="train an original model on a dataset", formatter_class=fmt,
                       description="Train a classifier and save it (with its mean/std) as a model file.")
    add_data_args(t, forget=False)
    t.add_argument("--arch", default="allcnn", help="allcnn | smallcnn | resnet18 | resnet34 | resnet50")
    t.add_argument("--width", type=float, help="allcnn: width multiplier (1 = 96/192 filters); smallcnn: channels")
    t.add_argument("--train-epochs", type=int, default=5)
    t.add_argument("--train-lr", type=float, default=0.05)
    add_train_precision(t, "the training")
    t.add_argument("--out", required=True, help="output model file (.safetensors)")
    add_common(t)
    t.set_defaults(func=cmd_train)
