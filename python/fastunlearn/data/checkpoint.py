"""Model files: safetensors weights with the architecture in the header, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Optional

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastunlearn.nn.models import create_model

FORMAT = "fastunlearn-model-1"


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then move the finished file into place: no half-written files."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save_model(model: nn.Module, path: str, arch: Optional[dict] = None, **meta) -> None:
    """Save weights (+ BatchNorm buffers) as safetensors. ``arch`` = {"name": ..., kwargs...}
    lets load_model rebuild the module; ``meta`` (mean, std, dataset, ...) rides along."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "arch": json.dumps(arch or {}), "meta": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def read_header(path: str) -> tuple[dict, dict]:
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastunlearn model file (no '{FORMAT}' header); "
                         "load your own architecture and use the Python API instead")
    return json.loads(header["arch"]), json.loads(header["meta"])


def load_model(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from a file written by save_model."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path} does not exist")
    arch, meta = read_header(path)
    if not arch:
        raise ValueError(f"{path} records no architecture; it cannot be rebuilt here")
    kwargs = dict(arch)
    model = create_model(kwargs.pop("name"), **kwargs)
    model.load_state_dict(load_file(path))
    return model.to(device).eval(), {"arch": arch, **meta}
