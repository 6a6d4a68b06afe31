"""boundary_step's argument checks and output allocation, shared by the op, its fake kernel and the
Triton backend. The C++ side of the same checks is csrc/boundary_step.cpp."""

from __future__ import annotations

import torch

from fastunlearn import reference
from fastunlearn.nn.layout import is_channels_last
from fastunlearn.ops._dispatch import check_same_device

NOISE_CODES = {name: i for i, name in enumerate(reference.NOISE_KINDS)}


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_args(u, u0, grad, eps, alpha, quantize, noise, seed, offset):
    for name, t in (("u", u), ("u0", u0), ("grad", grad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.shape != u.shape:
            raise ValueError(f"{name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
    if u.dim() < 2:
        raise ValueError(f"u must be (N, C, ...) with at least 2 dims, got shape {tuple(u.shape)}")
    check_same_device(u=u, u0=u0, grad=grad)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if int(quantize) < 0:
        raise ValueError(f"quantize must be >= 0 (0 turns rounding off), got {quantize}")
    if noise not in NOISE_CODES:
        raise ValueError(f"noise must be one of {tuple(NOISE_CODES)}, got {noise!r}")
    if not 0 <= int(seed) < 2**63 or not 0 <= int(offset) < 2**63:
        raise ValueError(f"seed and offset must be in [0, 2**63), got seed={seed}, offset={offset}")


def empty_output(u, u0, grad, eps, alpha, lamda, gamma, noise, quantize, seed, offset, mean, std):
    """Checks the op's arguments and allocates its output (u's shape, dtype and layout).

    The fake kernel of the native op and the Triton backend share it; it runs on real and
    on fake tensors alike.
    """
    torch._check(u.dim() >= 2, lambda: f"boundary_step: u must be (N, C, ...), got shape {tuple(u.shape)}")
    torch._check(u.dtype in FLOAT_DTYPES,
                 lambda: f"boundary_step: u must be float32, bfloat16 or float16, got {u.dtype}")
    for name, t in (("u0", u0), ("grad", grad)):
        torch._check(t.shape == u.shape,
                     lambda: f"boundary_step: {name} must have u's shape {tuple(u.shape)}, got {tuple(t.shape)}")
        torch._check(t.dtype == u.dtype, lambda: f"boundary_step: {name} must have u's dtype {u.dtype}, got {t.dtype}")
    torch._check(0 <= noise <= 3, lambda: f"boundary_step: noise code must be 0..3, got {noise}")
    torch._check(quantize >= 0, lambda: f"boundary_step: quantize must be >= 0, got {quantize}")
    c = u.shape[1]
    for name, v in (("mean", mean), ("std", std)):
        if v is not None:
            torch._check(v.dim() == 1 and v.shape[0] == c,
                         lambda: f"boundary_step: {name} must be a ({c},) tensor, got {tuple(v.shape)}")
    fmt = torch.channels_last if is_channels_last(u) else torch.contiguous_format
    return torch.empty_like(u, memory_format=fmt)
