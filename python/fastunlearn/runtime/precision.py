"""Precision policy: which autocast dtype a run uses, and strict fp32 where it must be exact."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 units: oneDNN then runs bf16 convolutions natively, faster than
    fp32. Without them CPU bf16 is emulated, several times slower than fp32 (bench/RESULTS.md
    has the figures). FASTUNLEARN_CPU_BF16=0 or 1 overrides the detection (for
    precision="auto" only)."""
    forced = os.environ.get("FASTUNLEARN_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if not torch.backends.mkldnn.is_available():
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported",
                                                                      "_is_avx512_bf16_supported"))


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. auto: bf16 on CUDA, and on CPUs with native bf16."""
    if precision == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Under precision="auto" on a GPU, a search over fewer samples (times refreshes) than this
# runs in full fp32. It is bound by kernel launches, not arithmetic, so bf16 saves nothing
# there, while its fp32 recheck would launch a second search for the unsure samples.
SMALL_SEARCH_FP32 = 1024


def small_search_in_fp32(precision: str, device: torch.device, samples: int) -> bool:
    """Whether a search of ``samples`` (all refreshes together) runs in fp32 although
    precision resolves to bf16 / fp16: "auto" on CUDA below SMALL_SEARCH_FP32."""
    return precision == "auto" and device.type == "cuda" and samples < SMALL_SEARCH_FP32


# The process-wide fp32 modes a strict fp32 search sets, as (backend, op) of torch's
# fp32_precision API. From torch 2.9 a read of the legacy allow_tf32 flags raises once the
# legacy and the new API disagree (Inductor reads them), so strict_fp32 writes through the
# API the process can still read, and puts back what both APIs read before.
_FP32_PRECISION_FLAGS = (("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul"))


def _legacy_tf32():
    """(cuDNN, cuBLAS) allow_tf32 as the legacy API reads them, or None where it refuses."""
    try:
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return None


def _set_legacy_tf32(flags):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextlib.contextmanager
def strict_fp32(device: torch.device, enabled: bool = True):
    """IEEE fp32 convolutions and matmuls inside (cuDNN convolutions default to TF32, a
    10-bit mantissa); after, the precision flags read as they did before, through both APIs."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if not enabled or device.type != "cuda" or getter is None:
        yield
        return
    setter = torch._C._set_fp32_precision_setter
    before = [(backend, op, getter(backend, op)) for backend, op in _FP32_PRECISION_FLAGS]
    legacy = _legacy_tf32()
    if legacy is not None:
        _set_legacy_tf32((False, False))  # keeps the two APIs in agreement
    else:
        for backend, op, _ in before:
            setter(backend, op, "ieee")
    try:
        yield
    finally:
        if legacy is not None:
            _set_legacy_tf32(legacy)
        for backend, op, value in before:
            if getter(backend, op) != value:
                setter(backend, op, value)
