"""The manifest of a report (runtime.manifest): written as manifest.json in the report's
folder by fu.report, so that ``fastunlearn verify --manifest`` can check it later.

It names every model file the report read (path and SHA-256; models passed as modules have
no file to name), every file the report wrote, the settings that decide the scores (seed,
max_shadow, retrain, normalisation), the set sizes and the scores themselves. The command
line adds the data specification (data set, training subset, forget set) through
``provenance``; with it, verify rebuilds the sets and re-scores the model files.
"""

from __future__ import annotations

import os
from typing import Optional

from fastunlearn.data.checkpoint import load_model
from fastunlearn.data.provenance import file_record
from fastunlearn.runtime import manifest


def model_files(models: dict) -> dict:
    """{name: path} of the models given as file paths."""
    return {name: os.fspath(v) for name, v in models.items() if isinstance(v, (str, os.PathLike))}


def load_files(models: dict, mean, std, device):
    """``models`` with every file path replaced by its model (fastunlearn model files); when
    neither mean nor std is given, the normalisation the first such file records."""
    out = {}
    for name, v in models.items():
        if isinstance(v, (str, os.PathLike)):
            model, meta = load_model(os.fspath(v), device or "cpu")
            out[name] = model
            if mean is None and std is None and meta.get("mean") is not None:
                mean, std = meta.get("mean"), meta.get("std")
        else:
            out[name] = v
    return out, mean, std


def write_report_manifest(out_dir: str, files: dict, rows: dict, paths: dict, sizes: dict, *, device, seed: int,
                          max_shadow: int, retrain: Optional[str], mean, std,
                          provenance: Optional[dict] = None) -> str:
    """Write out_dir/manifest.json (atomically); ``provenance`` adds entries or replaces them."""
    settings = {"seed": seed, "max_shadow": max_shadow, "retrain": retrain,
                "mean": None if mean is None else [float(v) for v in mean],
                "std": None if std is None else [float(v) for v in std]}
    record = manifest.new("report", device, seeds={"report": seed}, settings=settings,
                          counts={k: int(v) for k, v in sizes.items()},
                          models={name: file_record(p) for name, p in files.items()},
                          outputs={k: file_record(p) for k, p in paths.items() if os.path.isfile(p)}, metrics=rows)
    record.update(provenance or {})
    return manifest.write_beside(out_dir, record)
