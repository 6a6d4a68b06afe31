"""Data provenance of model files on the command line: what a command records in the files it
writes, and how it reads a file's record to choose (or refuse) the data it is given.

A model file's header carries ``provenance`` (a manifest, see runtime.manifest): its data
set, training subset (size, seed), input shape, forget specification and parents. eval,
report and unlearn take the subset from it when --train-size is not given, and refuse a
--data or --train-size that contradicts it.
"""

from __future__ import annotations

import os

from fastunlearn.runtime import manifest

# Data set names that mean the same data wherever they are loaded from. Other names (a
# folder or a .npz file name) are compared through the input shape only.
CANONICAL = ("fashion-mnist", "digits", "retinamnist")
# The arguments that rebuild the data and the forget set (recorded so that verify can).
DATA_ARGS = ("data", "data_dir", "train_size", "train_seed", "forget_class", "forget_fraction", "forget_indices",
             "forget_rule", "metadata", "seed", "manifest", "path_column", "label_column", "size", "crop", "test_data",
             "skip_unreadable")


def recorded_data(meta: dict) -> dict:
    """The data provenance a model file records: {} for a file written before it was recorded."""
    data = dict((meta.get("provenance") or {}).get("data") or {})
    if "dataset" not in data and meta.get("dataset"):
        data["dataset"] = meta["dataset"]
    return data


def apply_recorded(args, meta: dict, path: str) -> None:
    """Take the training subset from the model file at ``path`` unless --train-size is given;
    refuse a --train-size that contradicts it."""
    data = recorded_data(meta)
    size = data.get("train_size")
    if size is None:
        return
    if args.train_size is None:
        args.train_size = size
        args.train_seed = data.get("train_seed")
    elif args.train_size != size:
        raise SystemExit(f"error: --train-size {args.train_size} contradicts {path}, which was trained on a "
                         f"subset of {size} images; leave --train-size out to use the recorded one")


def check_data(meta: dict, path: str, name: str, x) -> None:
    """Refuse data whose set or image shape is not the one the model file records."""
    data = recorded_data(meta)
    recorded = data.get("dataset")
    if recorded in CANONICAL and name in CANONICAL and recorded != name:
        raise SystemExit(f"error: --data is {name}, but {path} was trained on {recorded}; pass --data {recorded}")
    shape = data.get("input_shape")
    if shape is not None and list(shape) != list(x.shape[1:]):
        raise SystemExit(f"error: --data {name} has images of shape {list(x.shape[1:])}, but {path} was trained on "
                         f"{shape} ({recorded or 'unknown data set'}); pass the data it was trained on")


def data_record(args, name: str, train) -> dict:
    """The data provenance of a model trained or unlearned on ``train`` (the subset used)."""
    seed = getattr(args, "train_seed", None)
    return {"dataset": name, "train_size": args.train_size, "train_seed": args.seed if seed is None else seed,
            "input_shape": list(train[0].shape[1:]), "train_images": int(len(train[1])),
            "classes": int(train[1].max()) + 1}


def forget_record(args) -> dict:
    """The forget specification as the user wrote it, with the SHA-256 of the index list it selected."""
    idx = args.forget_index
    return {"classes": args.forget_class, "fraction": args.forget_fraction,
            "indices_file": os.path.abspath(args.forget_indices) if args.forget_indices else None,
            "rule": args.forget_rule, "metadata": os.path.abspath(args.metadata) if args.metadata else None,
            "count": int(len(idx)), "indices_sha256": manifest.sha256_indices(idx)}


def data_args(args) -> dict:
    return {k: getattr(args, k, None) for k in DATA_ARGS}


def parent_record(path: str, meta: dict) -> list:
    """The chain of parents of a model unlearned from the file at ``path``: that file first."""
    prov = meta.get("provenance") or {}
    entry = {"path": os.path.abspath(path), "sha256": manifest.sha256_file(path), "kind": prov.get("kind"),
             "forget": prov.get("forget"), "created": prov.get("created")}
    return [entry] + list(prov.get("parents") or [])


def inherited_meta(meta: dict) -> dict:
    """What a derived model file keeps of its parent's header (the normalisation); the rest is its own."""
    return {k: meta[k] for k in ("mean", "std") if k in meta}
