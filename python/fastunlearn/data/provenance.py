"""Model files with their provenance: the run manifest (runtime.manifest) embedded in the
file's header as ``provenance`` and written as JSON beside it, the two published together.

Every writer of model files goes through ``save_with_manifest``: the command line (train,
unlearn, compose) and the Python API (UnlearnResult.save, SweepResult.save), so a file has
the same record whichever way it was made.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch.nn as nn

from fastunlearn.data import checkpoint
from fastunlearn.runtime import manifest


def save_with_manifest(model: nn.Module, path: str, arch: Optional[dict], provenance: dict, **meta) -> str:
    """Write ``model`` to ``path`` (safetensors, ``provenance`` in its header) and its manifest
    beside it (with the file's SHA-256); returns the manifest's path.

    Both files are written to temporary names first and moved into place only when both are
    complete, so an error part-way leaves neither (nor a stale manifest for a new file)."""
    # What JSON cannot hold (a device, a dtype) is kept as text, the same in both copies.
    provenance = json.loads(manifest.dumps(provenance))
    target = manifest.manifest_path(path)
    with checkpoint.staged(path) as tmp_model, checkpoint.staged(target) as tmp_manifest:
        checkpoint.write_model(model, tmp_model, arch, provenance=provenance, **meta)
        record = manifest.record_beside(path, provenance, sha256=manifest.sha256_file(tmp_model))
        with open(tmp_manifest, "w") as f:
            f.write(manifest.dumps(record))
    return target


def file_record(path: str) -> dict:
    """A file as a manifest names it: absolute path and SHA-256."""
    return {"path": os.path.abspath(path), "sha256": manifest.sha256_file(path)}


def run_record(kind: str, model: nn.Module, config, *, input_model: Optional[str] = None, forget_indices=None,
               metrics: Optional[dict] = None, **fields) -> dict:
    """The manifest of a run that made ``model`` with ``config`` (an UnlearnConfig): the config,
    its seed, and when given the SHA-256 of the input model file and of the forget-index list,
    and the metrics. ``fields`` (data, forget, counts, parents, ...) add to it or replace its entries."""
    record = {"config": config.to_dict(), "seeds": {kind: config.seed}}
    if forget_indices is not None:
        record["forget"] = {"count": int(len(forget_indices)),
                            "indices_sha256": manifest.sha256_indices(forget_indices)}
    if input_model is not None:
        record["input_model"] = file_record(input_model)
    if metrics is not None:
        record["metrics"] = metrics
    param = next(iter(model.parameters()), None)
    return manifest.new(kind, None if param is None else param.device, **{**record, **fields})


def result_record(result, **kw) -> dict:
    """run_record of an UnlearnResult: with the counts (forget samples, how many crossed), the
    timings and the backend; entries in ``kw`` replace these."""
    fields = {"counts": {"forget": int(len(result.relabels)), "crossed": int(result.success.sum())},
              "timings": dict(result.timings), "backend": result.backend}
    return run_record("unlearn", result.model, result.config, **{**fields, **kw})
