"""Precision policy: which autocast dtype a run uses, and strict fp32 where it must be exact."""

from __future__ import annotations

import contextlib
import os
import weakref
from typing import Optional

import torch
import torch.nn as nn


def onednn_may_use_amx() -> bool:
    """False when ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA) caps oneDNN's
    instruction set below AMX: oneDNN then runs bf16 convolutions on the vector units even
    on a CPU that has AMX tiles."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    return cap in ("", "ALL", "DEFAULT") or "AMX" in cap


def cpu_amx_usable() -> bool:
    """The CPU has AMX tiles and oneDNN may use them."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()) and onednn_may_use_amx()


def cpu_has_native_bf16() -> bool:
    """AMX tiles that oneDNN may use: it then runs bf16 convolutions on the matrix units,
    faster than fp32. AVX512-BF16 alone does not count: it only adds bf16 dot products to
    the vector units, and there bf16 convolutions measured slower than fp32 (bench/RESULTS.md
    has the figures). FASTUNLEARN_CPU_BF16=0 or 1 overrides the detection (for
    precision="auto" only)."""
    forced = os.environ.get("FASTUNLEARN_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if not torch.backends.mkldnn.is_available():
        return False
    return cpu_amx_usable()


def resolve_precision(precision: str, device: torch.device, model: Optional[nn.Module] = None,
                      sample_shape: Optional[tuple] = None) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. auto: bf16 on CUDA, and on CPUs with native bf16
    for models whose multiply-adds are mostly in convolutions (``cpu_bf16_pays``; given
    ``model`` and the shape of one input sample, else assumed)."""
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16() and cpu_bf16_pays(model, sample_shape):
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# On a CPU, bf16 autocast pays where oneDNN runs the convolutions on the AMX tiles. Where most
# multiply-adds are in Linear layers between LayerNorms, GELUs and attention (a small ViT),
# the casts around those fp32 ops cost more than the matrix units save (bench/RESULTS.md, "the
# ViT by precision"). Below this share of convolution multiply-adds "auto" stays in fp32 on
# CPU; tuning, where a job pays for it, measures both.
CPU_BF16_MIN_CONV_SHARE = 0.5
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def cpu_bf16_pays(model: Optional[nn.Module], sample_shape: Optional[tuple]) -> bool:
    """Whether convolutions hold at least CPU_BF16_MIN_CONV_SHARE of ``model``'s multiply-adds
    on one input of ``sample_shape``; True when either is unknown or the count fails."""
    if model is None or sample_shape is None:
        return True
    shape = tuple(sample_shape)
    known = _CONV_SHARES.setdefault(model, {})
    if shape not in known:  # a session's revisions ask again for the same model
        known[shape] = conv_share(model, shape)
    share = known[shape]
    return share is None or share >= CPU_BF16_MIN_CONV_SHARE


_CONV_SHARES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def conv_share(model: nn.Module, sample_shape: tuple) -> Optional[float]:
    """The share of convolution multiply-adds among those of the model's convolution and
    Linear modules, from one forward of a zero input in eval mode without autograd (no
    random numbers drawn, no state changed; the modules' modes are put back). None when the
    forward fails (the run itself reports the model's errors) or counts nothing."""
    counts = {"conv": 0, "linear": 0}

    def count(module, _inputs, out):
        if isinstance(out, torch.Tensor):
            if isinstance(module, _CONV):
                counts["conv"] += out.numel() * module.weight[0].numel()
            else:
                counts["linear"] += out.numel() * module.in_features

    hooked = [m for m in model.modules() if isinstance(m, (*_CONV, nn.Linear))]
    if not hooked:
        return None
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(count) for m in hooked]
    param = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *sample_shape), dtype=param.dtype, device=param.device))
    except Exception:  # noqa: BLE001 - a count, not the run: the run reports the model's errors
        return None
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    total = counts["conv"] + counts["linear"]
    return counts["conv"] / total if total else None


# Under precision="auto" on a GPU, a search with less work than this runs in full fp32. It is
# bound by kernel launches, not arithmetic, so bf16 saves nothing there, while its fp32
# recheck would launch a second search for the unsure samples. Work is counted as samples
# (times refreshes) x input values per sample x model parameters, a proxy for the search's
# FLOPs; the limit is the point measured in bench/RESULTS.md: 1,024 samples of 1x28x28
# on AllCNN width 1 (1,618,282 parameters).
SMALL_SEARCH_FP32_WORK = 1024 * (28 * 28) * 1_618_282


def search_work(samples: int, values_per_sample: int, parameters: int) -> int:
    """The work proxy SMALL_SEARCH_FP32_WORK is compared with."""
    return int(samples) * int(values_per_sample) * int(parameters)


def small_search_in_fp32(precision: str, device: torch.device, samples: int, values_per_sample: int,
                         parameters: int) -> bool:
    """Whether a search of ``samples`` (all refreshes together), each of ``values_per_sample``
    input values, on a model of ``parameters`` parameters runs in fp32 although precision
    resolves to bf16 / fp16: "auto" on CUDA below SMALL_SEARCH_FP32_WORK."""
    return (precision == "auto" and device.type == "cuda"
            and search_work(samples, values_per_sample, parameters) < SMALL_SEARCH_FP32_WORK)


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
