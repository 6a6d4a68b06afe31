"""Run manifests: where an output came from, written as JSON beside it and embedded in a
model file's header.

A manifest holds the data provenance (data set, training subset size and seed, input
shape, forget specification with the SHA-256 of its index list), the chain of parent
models, the full config, the software and device, seeds, counts, timings, the metrics when
computed, and the SHA-256 of the input model file. The JSON copy beside an output also holds
the output's own SHA-256, which the embedded copy cannot.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from typing import Optional

import torch

from fastunlearn.data.checkpoint import atomic_write_text

FORMAT = "fastunlearn-manifest-1"


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_indices(indices) -> str:
    """SHA-256 of a forget-index list: the sorted indices, one decimal per line."""
    idx = sorted(int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices))
    return hashlib.sha256("".join(f"{i}\n" for i in idx).encode()).hexdigest()


def git_commit() -> Optional[str]:
    """The commit of the source checkout this package runs from, or None (installed wheel, no git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device=None) -> dict:
    """Versions of the software the run used, and the device it ran on."""
    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    else:
        name = f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    return {"fastunlearn": version("fastunlearn"), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "triton": version("triton"), "python": platform.python_version(), "git_commit": git_commit(),
            "device": str(dev), "device_name": name, "platform": platform.platform(), "argv": list(sys.argv)}


def new(kind: str, device=None, **fields) -> dict:
    """A manifest of ``kind`` (train, unlearn, report, ...) with the environment filled in."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"format": FORMAT, "kind": kind, "created": now, "environment": environment(device), **fields}


def manifest_path(output: str) -> str:
    """Where the manifest of ``output`` lives: x.safetensors -> x.manifest.json; a folder -> folder/manifest.json."""
    if os.path.isdir(output):
        return os.path.join(output, "manifest.json")
    return os.path.splitext(output)[0] + ".manifest.json"


def record_beside(output: str, manifest: dict, sha256: Optional[str] = None) -> dict:
    """``manifest`` with the output's path and, for a file, its SHA-256 (``sha256``, or read from the file)."""
    record = dict(manifest)
    record["output"] = {"path": os.path.abspath(output)}
    if sha256 is None and os.path.isfile(output):
        sha256 = sha256_file(output)
    if sha256 is not None:
        record["output"]["sha256"] = sha256
    return record


def dumps(record: dict) -> str:
    """A manifest as the JSON text written to disk (values JSON cannot hold become strings)."""
    return json.dumps(record, indent=2, default=str) + "\n"


def write_beside(output: str, manifest: dict) -> str:
    """Write ``manifest`` (with the output's path and, for a file, its SHA-256) beside ``output``, atomically."""
    path = manifest_path(output)
    atomic_write_text(path, dumps(record_beside(output, manifest)))
    return path


def read(path: str) -> dict:
    """A manifest file, checked to be one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"manifest {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable JSON manifest ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastunlearn manifest (no '{FORMAT}' format field)")
    return record
