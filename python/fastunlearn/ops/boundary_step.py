"""boundary_step: one fused perturbed sign-gradient step (DESIGN.md section 2).

Backends: "cpu" (csrc/boundary_step.cpp), "cuda" (csrc/cuda/boundary_step.cu),
"triton" (kernels/boundary_step.py), "torch" (reference.boundary_step).
"""

from __future__ import annotations

import torch

from .. import _backends, reference
from ._dispatch import channel_vector, check_same_device, resolve

NOISE_CODES = {name: i for i, name in enumerate(reference.NOISE_KINDS)}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _layout_like(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t in u's memory format, so a kernel can walk all three tensors with one index."""
    if u.dim() == 4 and u.is_contiguous(memory_format=torch.channels_last) and not u.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


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


def boundary_step(u, u0, grad, *, eps, alpha, lamda=0.0, gamma=0.0, noise="normal", quantize=255,
                  seed=0, offset=0, mean=None, std=None, backend="auto"):
    """u_next = round_q(clip_[0,1](clip_ball(u + alpha * sign(g - lamda (u - u0) + gamma z)))).

    ``grad`` is d loss / d u, or d loss / d n(u) when ``std`` is given (n(u) = (u - mean)/std);
    the chain rule through std is applied inside the op. Noise z is Philox keyed by
    ``seed`` at counters ``offset + i`` for logical element i. Returns a new tensor with u's
    dtype and memory format.
    """
    check_args(u, u0, grad, eps, alpha, quantize, noise, seed, offset)
    c = u.shape[1]
    mean_t = channel_vector(mean, "mean", c, u)
    std_t = channel_vector(std, "std", c, u)
    which = resolve("boundary_step", u.device, backend)
    args = dict(eps=float(eps), alpha=float(alpha), lamda=float(lamda), gamma=float(gamma), noise=noise,
                quantize=int(quantize), seed=int(seed), offset=int(offset))
    if which == "torch":
        return reference.boundary_step(u, u0, grad, mean=mean_t, std=std_t, **args)
    u0, grad = _layout_like(u, u0), _layout_like(u, grad)
    u = _layout_like(u, u)
    call = (u, u0, grad, args["eps"], args["alpha"], args["lamda"], args["gamma"], NOISE_CODES[noise],
            args["quantize"], args["seed"], args["offset"], mean_t, std_t)
    if which == "triton":
        from ..kernels.boundary_step import boundary_step_triton

        return boundary_step_triton(*call)
    _backends.native()
    return torch.ops.fastunlearn.boundary_step(*call)
