"""Model files: safetensors weights with the architecture in the header, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Optional

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastunlearn.nn.models import create_model

FORMAT = "fastunlearn-model-1"


@contextlib.contextmanager
def staged(path: str):
    """A temporary path beside ``path``, moved into place when the block ends without an error
    and removed when it raises: no half-written files. Blocks may nest to publish several files
    together (the innermost is moved first)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file 0600; the finished file gets the mode any new file gets here.
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, write) -> None:
    """Call write(tmp_path), then move the finished file into place: no half-written files."""
    with staged(path) as tmp:
        write(tmp)


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def save_model(model: nn.Module, path: str, arch: Optional[dict] = None, **meta) -> None:
    """Save weights (+ BatchNorm buffers) as safetensors, atomically. ``arch`` = {"name": ...,
    kwargs...} lets load_model rebuild the module; ``meta`` (mean, std, dataset, ...) rides along."""
    atomic_write(path, lambda tmp: write_model(model, tmp, arch, **meta))


def write_model(model: nn.Module, path: str, arch: Optional[dict] = None, **meta) -> None:
    """save_model's file written straight to ``path`` (a temporary path from ``staged``)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": FORMAT, "arch": json.dumps(arch or {}), "meta": json.dumps(meta)}
    save_file(tensors, path, metadata=header)


def read_header(path: str) -> tuple[dict, dict]:
    """(arch, meta) of a model file; a ValueError naming the file when it is not one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for every unreadable file
        raise ValueError(f"{path} is not a safetensors model file ({_one_line(e)}); a torch .pt file, text "
                         "or a truncated copy cannot be read here") from None
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastunlearn model file (no '{FORMAT}' header); "
                         "load your own architecture and use the Python API instead")
    try:
        return json.loads(header["arch"]), json.loads(header["meta"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path} has a damaged fastunlearn header ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def load_model(path: str, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from a file written by save_model."""
    arch, meta = read_header(path)
    if not arch:
        raise ValueError(f"{path} records no architecture; it cannot be rebuilt here")
    kwargs = dict(arch)
    model = create_model(kwargs.pop("name"), **kwargs)
    try:
        model.load_state_dict(load_file(path))
    except Exception as e:  # a truncated file, or weights that do not fit the recorded architecture
        raise ValueError(f"{path}: its weights cannot be loaded ({_one_line(e)})") from None
    return model.to(device).eval(), {"arch": arch, **meta}
