"""Choosing the forget set.

Every selector returns a sorted int64 tensor of indices into the dataset, so selections can
be combined with ordinary tensor ops and passed to ``split``. An empty selection is an
error: unlearning nothing is almost always a mistaken rule.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

_OPS = ("==", "!=", ">=", "<=", ">", "<", "=")
_RULE = re.compile(r"^\s*(?P<col>.+?)\s*(?P<op>==|!=|>=|<=|=|>|<)\s*(?P<val>.*?)\s*$")


def _labels(y, name: str = "y") -> torch.Tensor:
    y = y if isinstance(y, torch.Tensor) else torch.as_tensor(np.asarray(y))
    if y.dim() != 1:
        raise ValueError(f"{name} must be a 1-D label tensor, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class labels, got {y.dtype}")
    return y.to(torch.int64).cpu()


def _classes(y: torch.Tensor, cls, num_classes: Optional[int]) -> list[int]:
    if isinstance(cls, (torch.Tensor, np.ndarray)):
        cls = cls.tolist()
    classes = [cls] if isinstance(cls, (int, np.integer)) else list(cls)
    if not classes:
        raise ValueError("cls must name at least one class")
    k = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.numel() else 0)
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"classes must be integers, got {c!r}")
        if not 0 <= c < k:
            raise ValueError(f"class {c} is out of range: labels are 0..{k - 1}")
    if len(set(int(c) for c in classes)) != len(classes):
        raise ValueError(f"cls has duplicates: {classes}")
    return [int(c) for c in classes]


def by_class(y, cls, num_classes: Optional[int] = None) -> torch.Tensor:
    """Every sample whose label is ``cls`` (an int or a list of ints)."""
    y = _labels(y)
    classes = _classes(y, cls, num_classes)
    idx = torch.nonzero(torch.isin(y, torch.tensor(classes)), as_tuple=False).flatten()
    if idx.numel() == 0:
        raise ValueError(f"no sample matches class {cls}")
    return idx


def fraction_of_class(y, cls, fraction: float, seed: int = 0, num_classes: Optional[int] = None) -> torch.Tensor:
    """A seeded random ``fraction`` of each class in ``cls``: exactly round(fraction * n_class) each."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    y = _labels(y)
    classes = _classes(y, cls, num_classes)
    g = torch.Generator().manual_seed(int(seed))
    picked = []
    for c in classes:
        members = torch.nonzero(y == c, as_tuple=False).flatten()
        k = round(fraction * members.numel())
        if k == 0:
            raise ValueError(f"no sample matches class {c} with fraction {fraction}: the class has "
                             f"{members.numel()} samples and round({fraction} * {members.numel()}) = 0")
        picked.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    return torch.sort(torch.cat(picked)).values


def by_indices(n: int, indices) -> torch.Tensor:
    """Validated explicit indices into a dataset of ``n`` samples (no negatives, no duplicates)."""
    idx = indices if isinstance(indices, torch.Tensor) else torch.as_tensor(np.asarray(indices))
    idx = idx.flatten()
    if idx.numel() == 0:
        raise ValueError("no sample matches: indices is empty")
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise TypeError(f"indices must be integers, got {idx.dtype}")
    idx = idx.to(torch.int64).cpu()
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"indices must be in [0, {n - 1}] for a dataset of {n} samples, got [{lo}, {hi}]")
    s = torch.sort(idx).values
    dup = s[1:][s[1:] == s[:-1]]
    if dup.numel():
        raise ValueError(f"indices has duplicates, e.g. {dup[:5].tolist()}")
    return s


# ------------------------------------------------------------------ metadata
def _parse_rule(rule: str):
    m = _RULE.match(rule)
    if not m or not m.group("col") or m.group("val") == "":
        raise ValueError(f"cannot parse rule {rule!r}; expected 'column OP value' with OP one of "
                         f"{', '.join(_OPS[:6])}, e.g. 'device == Topcon NW400' or 'thickness >= 12'")
    col, op, val = m.group("col").strip(), m.group("op"), m.group("val").strip()
    stray = len(col) - len(col.rstrip("~!<>=^*%&|"))
    if stray:
        # "device ~= A" parses as column "device ~" and "=": the operator is what is wrong.
        written = col[-stray:] + op
        raise ValueError(f"rule {rule!r}: {written!r} is not an operator; use one of {', '.join(_OPS[:6])}")
    if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
        val = val[1:-1]
        number = None  # quoted values compare as text
    else:
        number = _number(val)
    if col and len(col) >= 2 and col[0] == col[-1] and col[0] in "'\"":
        col = col[1:-1]
    if op == "=":
        op = "=="
    if op not in ("==", "!=") and number is None:
        raise ValueError(f"rule {rule!r}: {op} needs a numeric value, got {val!r}")
    return col, op, val, number


def _number(s: str) -> Optional[float]:
    try:
        v = float(s)
    except ValueError:
        return None
    return None if math.isnan(v) else v


def _compare(a, op: str, b) -> bool:
    if op == "==":
        return a == b
    if op == "!=":
        return a != b
    if op == ">=":
        return a >= b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a < b


def read_table(source) -> list[dict]:
    """Rows of a csv given as a path, an open text/binary file, already as a list of dicts,
    or a dataset with a ``metadata`` list (image_folder's: one row per item, in item order)."""
    if not isinstance(source, (list, tuple, str, os.PathLike)) and isinstance(getattr(source, "metadata", None), list):
        source = source.metadata
    if isinstance(source, (list, tuple)):
        if not all(isinstance(r, dict) for r in source):
            raise TypeError("a metadata table given as a list must hold dicts (one per row)")
        return [{str(k): ("" if v is None else str(v)) for k, v in r.items()} for r in source]
    if hasattr(source, "read"):
        text = source.read()
        if isinstance(text, bytes):
            text = text.decode("utf-8")
    elif isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if not p.is_file():
            raise FileNotFoundError(f"metadata file not found: {p}")
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    else:
        raise TypeError(f"metadata must be a csv path, a file object or a list of dicts, got "
                        f"{type(source).__name__}")
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError("the metadata table has no rows")
    return [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in rows]


def by_metadata(source, rule: Union[str, Sequence[str]], n: Optional[int] = None,
                index_column: str = "index") -> torch.Tensor:
    """Samples whose metadata row satisfies ``rule`` ("column OP value"; a list means all hold).

    OP is one of ==, !=, >=, <=, >, < (a single = means ==). When the value parses as a
    number the column is compared as numbers (an empty cell is NaN: it matches only !=);
    otherwise ==/!= compare the text exactly. Quote a value to force a text comparison.

    Rows map to samples through ``index_column`` when the table has it, else by row order
    (which then must cover all ``n`` samples when ``n`` is given). ``n`` also bounds the
    indices.
    """
    rows = read_table(source)
    columns = list(rows[0].keys())
    rules = [rule] if isinstance(rule, str) else list(rule)
    if not rules:
        raise ValueError("rule must be a string or a non-empty list of strings")
    parsed = [_parse_rule(r) for r in rules]
    for col, *_ in parsed:
        if col not in columns:
            raise ValueError(f"unknown column {col!r} in rule; the metadata columns are {columns}")

    if index_column in columns:
        try:
            index = [int(r[index_column]) for r in rows]
        except ValueError:
            bad = next(r[index_column] for r in rows if not _is_int(r[index_column]))
            raise ValueError(f"index column {index_column!r} must hold integers, found {bad!r}") from None
        if len(set(index)) != len(index):
            raise ValueError(f"index column {index_column!r} has duplicate values")
        if n is not None and (min(index) < 0 or max(index) >= n):
            raise ValueError(f"index column {index_column!r} must be in [0, {n - 1}] for a dataset of {n} "
                             f"samples, got [{min(index)}, {max(index)}]")
    else:
        if n is not None and len(rows) != n:
            raise ValueError(f"the metadata has no {index_column!r} column, so rows map to samples in order, "
                             f"but it has {len(rows)} rows for {n} samples")
        index = list(range(len(rows)))

    keep = np.ones(len(rows), dtype=bool)
    for col, op, val, number in parsed:
        if number is None:
            keep &= np.array([_compare(r[col], op, val) for r in rows])
            continue
        cells = np.empty(len(rows))
        for i, r in enumerate(rows):
            c = r[col]
            if c == "":
                cells[i] = np.nan
                continue
            v = _number(c)
            if v is None:
                raise ValueError(f"column {col!r} row {i} holds {c!r}, not a number, but the rule "
                                 f"'{col} {op} {val}' compares numbers")
            cells[i] = v
        with np.errstate(invalid="ignore"):
            keep &= _compare(cells, op, number)
    if not keep.any():
        raise ValueError(f"no sample matches {' and '.join(repr(r) for r in rules)} "
                         f"({len(rows)} metadata rows)")
    idx = torch.tensor([index[i] for i in np.nonzero(keep)[0]], dtype=torch.int64)
    return torch.sort(idx).values


def _is_int(s: str) -> bool:
    try:
        int(s)
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------- split
def split(x, y, forget_idx):
    """((x_forget, y_forget), (x_remain, y_remain)) for a selection of indices into (x, y)."""
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    idx = by_indices(n, forget_idx)
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    keep = torch.nonzero(mask, as_tuple=False).flatten()
    dev_idx, dev_keep = idx.to(x.device), keep.to(x.device)
    return (x[dev_idx], y[idx.to(y.device)]), (x[dev_keep], y[keep.to(y.device)])
