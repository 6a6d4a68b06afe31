"""What the commands share: dataset loading, the forget / remain / test split, the
configuration flags and the metrics table."""

from __future__ import annotations

import os

import torch

from fastunlearn.cli.folder import FolderImages, add_folder_args, is_folder, load_folder
from fastunlearn.cli.safety import as_flags
from fastunlearn.config import TRAIN_PRECISIONS, UnlearnConfig
from fastunlearn.data import forget as forget_sets
from fastunlearn.data import io as data
from fastunlearn.eval.report import NOT_ENOUGH
from fastunlearn.reference import LAMDA_SCHEDULES, NOISE_KINDS, RELABEL_MODES


def load_splits(name: str, data_dir=None, args=None) -> tuple[str, dict]:
    if is_folder(name):
        return load_folder(name, args)
    key = name.lower()
    if key in ("auto", "default"):
        return data.load_default(data_dir)
    if key in ("fashion", "fashion-mnist", "fashionmnist"):
        return "fashion-mnist", data.load_fashion_mnist(data_dir)
    if key == "digits":
        return "digits", data.load_digits()
    if key in ("retina", "retinamnist"):
        path = _find_file(data_dir, "retinamnist.npz")
        return "retinamnist", data.load_medmnist(path)
    if key.endswith(".npz"):
        return os.path.basename(key), data.load_medmnist(name)
    if os.path.isdir(name):
        return os.path.basename(os.path.normpath(name)), data.load_fashion_mnist(name)
    raise SystemExit(f"error: --data {name!r} is not a known dataset (auto, fashion-mnist, digits, retina), "
                     "a MedMNIST .npz file, a directory of IDX files, or folder:DIR (image files)")


def _find_file(data_dir, filename):
    for d in filter(None, [data_dir, os.environ.get("FASTUNLEARN_DATA"), "."]):
        p = os.path.join(d, filename)
        if os.path.exists(p):
            return p
    raise SystemExit(f"error: {filename} not found; pass --data-dir DIR (looked in --data-dir, $FASTUNLEARN_DATA, .)")


def add_data_args(p, forget=True):
    g = p.add_argument_group("data")
    g.add_argument("--data", default="auto", help="auto | fashion-mnist | digits | retina | FILE.npz | IDX directory "
                   "| folder:DIR (image files with a CSV manifest, see --manifest) "
                   "(default: auto = FashionMNIST if installed, else sklearn digits)")
    g.add_argument("--data-dir", help="where the dataset files are (default: $FASTUNLEARN_DATA, Debian's "
                   "/usr/share/datasets/fashion-mnist)")
    g.add_argument("--train-size", type=int, help="use a seeded subset of N training images (when not given: "
                   "the subset the model file records, else all)")
    add_folder_args(g)
    if forget:
        f = p.add_argument_group("forget set (pick one; selected from the training split)")
        f.add_argument("--forget-class", type=int, nargs="+", help="forget every sample of these classes")
        f.add_argument("--forget-fraction", type=float, help="with --forget-class: forget only this seeded fraction")
        f.add_argument("--forget-indices",
                       help="file of training-set indices to forget (one per line or comma-separated)")
        f.add_argument("--forget-rule", action="append", help='metadata rule, e.g. "device == Topcon NW400" or '
                       '"macular_thickness_um >= 300" (repeat to AND rules); needs --metadata, or --data folder:DIR '
                       'whose manifest it reads')
        f.add_argument("--metadata", help="CSV with an 'index' column (training-set row) and the rule's columns "
                       "(when not given with --data folder:DIR: the folder's manifest)")


def select_forget(args, y, x=None):
    chosen = [a for a in ("forget_class", "forget_indices", "forget_rule") if getattr(args, a)]
    if len(chosen) != 1:
        raise SystemExit("error: choose exactly one of --forget-class, --forget-indices, --forget-rule "
                         f"(got {', '.join('--' + c.replace('_', '-') for c in chosen) or 'none'})")
    if args.forget_class:
        if args.forget_fraction is not None:
            return forget_sets.fraction_of_class(y, args.forget_class, args.forget_fraction, seed=args.seed)
        return forget_sets.by_class(y, args.forget_class)
    if args.forget_indices:
        return forget_sets.by_indices(len(y), read_indices(args.forget_indices))
    if not args.metadata and isinstance(x, FolderImages):
        return forget_sets.by_metadata(x.metadata(), args.forget_rule, n=len(y))
    if not args.metadata:
        raise SystemExit("error: --forget-rule needs --metadata CSV")
    return forget_sets.by_metadata(args.metadata, args.forget_rule, n=len(y))


def read_indices(path: str) -> list[int]:
    """Training-set indices from a file: integers separated by commas, spaces or newlines;
    blank lines and lines starting with # are skipped. A bad entry names the file and line."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --forget-indices {path}: no such file")
    out = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.lstrip().startswith("#"):
                continue
            for token in line.replace(",", " ").split():
                try:
                    out.append(int(token))
                except ValueError:
                    raise SystemExit(f"error: --forget-indices {path} line {number}: {token!r} is not an integer "
                                     "index (expected integers separated by commas, spaces or newlines)") from None
    return out


def subset(pair, n, seed):
    if pair is None or n is None or n >= len(pair[1]):
        return pair
    idx = torch.randperm(len(pair[1]), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return pair[0][idx], pair[1][idx]


def train_seed(args) -> int:
    """The seed of the training subset: the one a model file recorded (see cli.provenance), else --seed."""
    recorded = getattr(args, "train_seed", None)
    return args.seed if recorded is None else recorded


def prepare_data(args):
    name, splits = load_splits(args.data, args.data_dir, args)
    train = subset(splits["train"], args.train_size, train_seed(args))
    idx = select_forget(args, train[1], train[0])
    args.forget_index = idx  # for the provenance: its SHA-256 and count
    f, r = forget_sets.split(train[0], train[1], idx)
    return name, splits, train, f, r, splits["test"]


def metrics_table(rows: dict, keys=("forget_acc", "remain_acc", "test_acc", "mia_lr", "mia_efficacy", "seconds")):
    names = {"forget_acc": "forget", "remain_acc": "remain", "test_acc": "test", "mia_lr": "MIA-LR",
             "mia_efficacy": "MIA-eff", "seconds": "time (s)", "gap": "gap"}
    keys = [k for k in keys if any(k in m for m in rows.values())]
    w = max(len(n) for n in rows) + 2
    lines = ["".ljust(w) + "".join(names.get(k, k).rjust(10) for k in keys)]
    for label, m in rows.items():
        cells = []
        for k in keys:
            v = m.get(k)
            if v is None and k == "mia_lr" and k in m:
                cells.append(f" {NOT_ENOUGH}")
            elif v is None:
                cells.append("-".rjust(10))
            elif k.endswith("_acc"):
                cells.append(f"{100 * v:9.2f}%")
            else:
                cells.append(f"{v:10.3f}")
        lines.append(label.ljust(w) + "".join(cells))
    return "\n".join(lines)


def config_from_args(args):
    fields = {k: getattr(args, k) for k in ("eps", "steps", "alpha", "gamma", "lamda", "noise", "lamda_schedule",
                                             "relabel", "topk", "refresh", "epochs", "lr", "batch_size",
                                             "remain_reg", "remain_target", "seed", "precision", "backend",
                                             "recheck_margin", "search_compile", "augment", "batchnorm")
              if getattr(args, k, None) is not None}
    if getattr(args, "fuse_batch_norm", None) is not None:
        fields["fuse_batch_norm"] = {"auto": "auto", "on": True, "off": False}[args.fuse_batch_norm]
    try:
        return UnlearnConfig(**fields)
    except ValueError as e:
        raise SystemExit(as_flags(f"error: {e}")) from None


def add_config_args(p, defaults=None):
    d = UnlearnConfig() if defaults is None else defaults
    g = p.add_argument_group("method (defaults are the authors' settings)")
    g.add_argument("--eps", type=float, default=d.eps, help="L-inf search radius in pixel units")
    g.add_argument("--steps", type=int, default=d.steps, help="inner search steps T; 1 = FGSM")
    g.add_argument("--alpha", type=float, help="step size (default eps for T=1, 2.5*eps/T otherwise)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="noise scale")
    g.add_argument("--noise", choices=NOISE_KINDS, default=d.noise, help="noise law")
    g.add_argument("--lamda", type=float, default=d.lamda, help="pull towards the original image")
    g.add_argument("--lamda-schedule", choices=LAMDA_SCHEDULES, default=d.lamda_schedule,
                   help="how the pull --lamda changes over the search steps")
    g.add_argument("--relabel", choices=RELABEL_MODES, default=d.relabel, help="how the new label is chosen")
    g.add_argument("--topk", type=int, default=d.topk, help="k for --relabel topk")
    g.add_argument("--refresh", choices=("auto", "epoch", "once"), default=d.refresh,
                   help="when the search is redone with fresh noise (auto: once if deterministic)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="fine-tune epochs")
    g.add_argument("--lr", type=float, default=d.lr, help="fine-tune learning rate")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="fine-tune batch, over all processes under torchrun")
    g.add_argument("--augment", choices=("crop", "flip", "crop+flip"), default=d.augment,
                   help="augment the fine-tune's images on the device, afresh each epoch (the search sees them "
                        "unshifted)")
    g.add_argument("--remain-reg", type=float, default=d.remain_reg, help="weight rho of the remain-set term")
    g.add_argument("--remain-target", choices=("labels", "distill"), default=d.remain_target,
                   help="remain-set term: the true labels, or the original model's outputs (distill)")
    g.add_argument("--batchnorm", choices=("train", "frozen"), default=d.batchnorm,
                   help="fine-tune: BatchNorm with batch statistics (train) or the running ones, kept (frozen)")
    g.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default=d.precision,
                   help="arithmetic of the search and fine-tune (auto: bf16 where the hardware has it, else fp32)")
    g.add_argument("--backend", choices=("auto", "torch", "cpu", "cuda", "triton"), default=d.backend,
                   help="backend of the fused ops (see `fastunlearn backends`)")
    g.add_argument("--fuse-batch-norm", choices=("auto", "on", "off"),
                   default={True: "on", False: "off"}.get(d.fuse_batch_norm, "auto"),
                   help="train step: BatchNorm2d + the ReLU after it as one native op (auto: on CPU only; "
                        "on: also on CUDA; off: PyTorch's modules)")
    g.add_argument("--recheck-margin", type=float, default=d.recheck_margin,
                   help="bf16/fp16 search: redo in fp32 the samples whose decisions lay within this many times "
                        "their rounding noise; 0 = off")
    g.add_argument("--search-compile", action="store_true", default=d.search_compile,
                   help="torch.compile the search's frozen model: a one-off compile (seconds to tens of seconds), "
                        "then faster search steps; worth it for large forget sets")


def add_train_precision(p, what):
    p.add_argument("--train-precision", default="auto", choices=TRAIN_PRECISIONS,
                   help=f"arithmetic of {what}: auto = bf16 autocast on GPUs and on CPUs with native bf16 "
                   "(as the unlearning's), else fp32")


def add_common(p):
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (when not given: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for data subsets, noise and batch order")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def device_of(args):
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
