"""Which backends exist in this process, and why the missing ones are missing.

Nothing here raises: a missing extension or Triton only removes a backend, and
`fastunlearn.backends()` tells the user what happened.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

# The backends a fused op can run on; "auto" picks the fastest available for the device.
BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

_STATUS: dict[str, str] = {}


@functools.lru_cache(maxsize=None)
def native():
    """The compiled extension module, or None. Loading it registers the fastunlearn:: ops."""
    if os.environ.get("FASTUNLEARN_DISABLE_NATIVE"):
        _STATUS["native"] = "disabled by FASTUNLEARN_DISABLE_NATIVE"
        return None
    try:
        mod = importlib.import_module("fastunlearn._C")
    except ImportError as e:  # not built (FASTUNLEARN_SKIP_NATIVE=1 at install) or ABI mismatch
        _STATUS["native"] = f"extension not importable: {e}"
        return None
    _STATUS["native"] = "loaded"
    return mod


def has_cpu_op(name: str) -> bool:
    if native() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastunlearn::{name}", "CPU")


def has_cuda_op(name: str) -> bool:
    if native() is None or not torch.cuda.is_available():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastunlearn::{name}", "CUDA")


@functools.lru_cache(maxsize=None)
def triton_status() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton not installed: {e}"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not torch.cuda.is_available() and not interpret:
        return "triton installed, but no CUDA device (set TRITON_INTERPRET=1 to run kernels on CPU)"
    return "available (interpreter)" if interpret else "available"


def triton_usable() -> bool:
    return triton_status().startswith("available")


def backends() -> dict[str, str]:
    """Every backend name -> 'available' or the reason it is not."""
    native()
    out = {"torch": "available (reference.py, everywhere)"}
    nat = _STATUS.get("native", "")
    if nat == "loaded":
        out["cpu"] = "available" if has_cpu_op("boundary_step") else "extension loaded without CPU ops"
        if has_cuda_op("boundary_step"):
            out["cuda"] = "available"
        elif not torch.cuda.is_available():
            out["cuda"] = "no CUDA device"
        else:
            out["cuda"] = "extension built without CUDA (no nvcc or a CPU-only torch at build time)"
    else:
        out["cpu"] = nat
        out["cuda"] = nat
    out["triton"] = triton_status()
    return out
