"""Image folders on the command line: ``--data folder:DIR`` with a CSV manifest (or one folder
per class), read with data.image_folder.load_image_folder.

The commands hold their data as (x, y) pairs. For a folder, x is a FolderImages: the shape
and an index into the folder's files, which subsets and forget / remain splits index like
a tensor without decoding anything. model_input turns such a pair into a Dataset (a Subset
of the folder), which unlearn, evaluate and report stream in chunks; train, which needs
the channel statistics, reads the images into memory (as_tensors).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import warnings
from typing import Optional

import torch
import torch.utils.data

from fastunlearn.data.checkpoint import atomic_write_text
from fastunlearn.data.image_folder import load_image_folder
from fastunlearn.data.streaming import stack_images

PREFIX = "folder:"


def is_folder(name) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


class FolderImages:
    """The images of a folder data set, by index, as the commands' x (uint8, N x C x H x W)."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, dataset, index: Optional[torch.Tensor] = None, item_shape=None):
        self.dataset = dataset
        self.index = torch.arange(len(dataset)) if index is None else index
        if item_shape is None:
            item_shape = tuple(dataset[int(self.index[0])][0].shape) if len(self.index) else ()
        self.shape = torch.Size((len(self.index), *item_shape))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx):
        if isinstance(idx, int):
            idx = [idx]
        return FolderImages(self.dataset, self.index[torch.as_tensor(idx) if not isinstance(idx, slice) else idx],
                            tuple(self.shape[1:]))

    def metadata(self) -> list:
        """The manifest rows of these images, in order (for forget.by_metadata)."""
        return [self.dataset.metadata[i] for i in self.index.tolist()]

    def as_dataset(self) -> torch.utils.data.Dataset:
        return torch.utils.data.Subset(self.dataset, self.index.tolist())

    def read(self) -> torch.Tensor:
        return stack_images(self.dataset[i][0] for i in self.index.tolist())


def model_input(pair):
    """What the library is given: a Dataset for a folder's pair (streamed), else the pair."""
    if pair is not None and isinstance(pair[0], FolderImages):
        return pair[0].as_dataset()
    return pair


def as_tensors(pair):
    """A folder's pair read into memory; a tensor pair unchanged."""
    if pair is not None and isinstance(pair[0], FolderImages):
        return pair[0].read(), pair[1]
    return pair


def count(pair) -> int:
    return 0 if pair is None else len(pair[1])


def _pair_size(text: Optional[str], flag: str):
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r}: expected N or HxW (integers)") from None
    return values[0] if len(values) == 1 else tuple(values)


def _load_one(root: str, args, manifest, split: str) -> tuple:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skipped files are reported by report_skipped
            ds = load_image_folder(root, manifest=manifest, path_column=getattr(args, "path_column", None) or "path",
                                   label_column=getattr(args, "label_column", None) or "label",
                                   size=_pair_size(getattr(args, "size", None), "--size"),
                                   crop=_pair_size(getattr(args, "crop", None), "--crop"),
                                   skip_unreadable=bool(getattr(args, "skip_unreadable", False)),
                                   progress=not getattr(args, "no_progress", True))
    except (OSError, ValueError, TypeError) as e:
        message = str(e).replace("pass skip_unreadable=True", "pass --skip-unreadable")
        raise SystemExit(f"error: --data {PREFIX}{root}: {message}".replace("\n", " ")) from None
    args.skipped_files = getattr(args, "skipped_files", []) + [(split, *s) for s in ds.skipped]
    return FolderImages(ds), ds.targets


def load_folder(name: str, args) -> tuple:
    """(data set name, {"train": pair, "test": pair or None}) for --data folder:DIR."""
    root = name[len(PREFIX):]
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {name}: no such folder (expected folder:DIR, a folder of images with a CSV "
                         "manifest, or one sub-folder per class)")
    manifest = getattr(args, "manifest", None) or "labels.csv"
    args.skipped_files = []
    train = _load_one(root, args, manifest, "train")
    test_root = getattr(args, "test_data", None)
    test = None
    if test_root:
        test_root = test_root[len(PREFIX):] if is_folder(test_root) else test_root
        test = _load_one(test_root, args, os.path.basename(manifest), "test")
    report_skipped(args)
    return os.path.basename(os.path.normpath(root)), {"train": train, "test": test}


# ------------------------------------------------------------------ --skip-unreadable
SKIPPED_COLUMNS = ("split", "path", "manifest_row", "reason")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone speaks and writes


def skipped_list_path(args) -> Optional[str]:
    """Where the list of skipped files goes: beside the command's output (in it when --out is a
    folder, as report's), else beside --json; None when the command writes no file."""
    out = getattr(args, "out", None)
    if out and (getattr(args, "command", None) == "report" or os.path.isdir(out)):
        return os.path.join(out, "skipped.csv")
    target = out or getattr(args, "json", None)
    return None if not target else os.path.splitext(target)[0] + ".skipped.csv"


def _skipped_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SKIPPED_COLUMNS)
    # manifest_row counts as the error messages do: row 1 is the first line after the header.
    w.writerows((split, path, "" if row is None else row + 1, reason) for split, path, row, reason in rows)
    return buf.getvalue()


def report_skipped(args) -> None:
    """Say on stderr how many files --skip-unreadable left out and where their list will be
    (write_skipped writes it once the command has succeeded); with no output file, list them."""
    rows = getattr(args, "skipped_files", None)
    if not rows or not _is_main_process():
        return
    where = skipped_list_path(args)
    head = f"note: --skip-unreadable left out {len(rows)} image file(s) that are missing or cannot be read"
    if where:
        print(f"{head}; their list goes to {where} when the command ends", file=sys.stderr, flush=True)
    else:
        print(f"{head}:\n{_skipped_csv(rows)}", file=sys.stderr, end="", flush=True)


def write_skipped(args) -> Optional[str]:
    """Write the list of the files --skip-unreadable left out (atomically) beside the
    command's output; the path written, or None."""
    rows = getattr(args, "skipped_files", None)
    where = skipped_list_path(args)
    if not rows or not where or not _is_main_process():
        return None
    atomic_write_text(where, _skipped_csv(rows))
    print(f"wrote the list of {len(rows)} skipped image file(s) to {where}", file=sys.stderr)
    return where


def add_folder_args(g) -> None:
    g.add_argument("--manifest", help="with --data folder:DIR: the CSV of image paths, labels and metadata "
                   "(relative to DIR unless absolute; when not given: DIR/labels.csv, else one folder per class)")
    g.add_argument("--path-column", default="path", help="the manifest's column of image file paths")
    g.add_argument("--label-column", default="label", help="the manifest's column of class labels")
    g.add_argument("--size", help="resize images: N (shorter side, aspect kept) or HxW (needed when sizes differ)")
    g.add_argument("--crop", help="centre crop after --size: N or HxW")
    g.add_argument("--skip-unreadable", action="store_true",
                   help="with --data folder:DIR: leave out image files that are missing or cannot be read, instead "
                   "of stopping; their list (split, path, manifest_row, reason) is written beside the output as "
                   "NAME.skipped.csv (in a report's folder: skipped.csv), or printed when there is no output file. "
                   "--forget-indices then count the images kept")
    g.add_argument("--test-data", help="with --data folder:DIR: a folder of test images with the same manifest name "
                   "and columns (when not given: no test set, the test metrics are left out)")
