"""Image folders on the command line: ``--data folder:DIR`` with a CSV manifest (or one folder
per class), read with data.image_folder.load_image_folder.

The commands hold their data as (x, y) pairs. For a folder, x is a FolderImages: the shape
and an index into the folder's files, which subsets and forget / remain splits index like
a tensor without decoding anything. model_input turns such a pair into a Dataset (a Subset
of the folder), which unlearn, evaluate and report stream in chunks; train, which needs
the channel statistics, reads the images into memory (as_tensors).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import torch.utils.data

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


def _load_one(root: str, args, manifest) -> tuple:
    try:
        ds = load_image_folder(root, manifest=manifest, path_column=getattr(args, "path_column", None) or "path",
                               label_column=getattr(args, "label_column", None) or "label",
                               size=_pair_size(getattr(args, "size", None), "--size"),
                               crop=_pair_size(getattr(args, "crop", None), "--crop"),
                               progress=not getattr(args, "no_progress", True))
    except (OSError, ValueError, TypeError) as e:
        raise SystemExit(f"error: --data {PREFIX}{root}: {e}".replace("\n", " ")) from None
    return FolderImages(ds), ds.targets


def load_folder(name: str, args) -> tuple:
    """(data set name, {"train": pair, "test": pair or None}) for --data folder:DIR."""
    root = name[len(PREFIX):]
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data {name}: no such folder (expected folder:DIR, a folder of images with a CSV "
                         "manifest, or one sub-folder per class)")
    manifest = getattr(args, "manifest", None) or "labels.csv"
    train = _load_one(root, args, manifest)
    test_root = getattr(args, "test_data", None)
    test = None
    if test_root:
        test_root = test_root[len(PREFIX):] if is_folder(test_root) else test_root
        test = _load_one(test_root, args, os.path.basename(manifest))
    return os.path.basename(os.path.normpath(root)), {"train": train, "test": test}


def add_folder_args(g) -> None:
    g.add_argument("--manifest", help="with --data folder:DIR: the CSV of image paths, labels and metadata "
                   "(relative to DIR unless absolute; when not given: DIR/labels.csv, else one folder per class)")
    g.add_argument("--path-column", default="path", help="the manifest's column of image file paths")
    g.add_argument("--label-column", default="label", help="the manifest's column of class labels")
    g.add_argument("--size", help="resize images: N (shorter side, aspect kept) or HxW (needed when sizes differ)")
    g.add_argument("--crop", help="centre crop after --size: N or HxW")
    g.add_argument("--test-data", help="with --data folder:DIR: a folder of test images with the same manifest name "
                   "and columns (when not given: no test set, the test metrics are left out)")
