"""boundary_step: one fused perturbed sign-gradient step of the boundary search (reference.boundary_step).

Backends: "cpu" (csrc/boundary_step.cpp), "cuda" (csrc/cuda/boundary_step.cu),
"triton" (kernels/boundary_step.py), "torch" (reference.boundary_step).
"""

from __future__ import annotations

import torch

from fastunlearn import reference
from fastunlearn.ops._dispatch import channel_vector, constant_under_compile, resolve
from fastunlearn.ops.boundary_step_meta import NOISE_CODES, check_args, empty_output
from fastunlearn.runtime import backends as _backends


def _layout_like(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t in u's memory format, so a kernel can walk all three tensors with one index."""
    if u.dim() == 4 and u.is_contiguous(memory_format=torch.channels_last) and not u.is_contiguous():
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


# The schema comes from the extension, so the fake kernel can only be attached once it loaded.
if _backends.native() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastunlearn::boundary_step", "CPU"):
    torch.library.register_fake("fastunlearn::boundary_step")(empty_output)


@constant_under_compile
def _backend_for(device_type: str, backend: str) -> str:
    """resolve() evaluated once at trace time: torch.compile sees a constant, not the probing."""
    return resolve("boundary_step", torch.device(device_type), backend)


def _channel_vector(v, name: str, channels: int, like: torch.Tensor):
    if not torch.compiler.is_compiling():
        return channel_vector(v, name, channels, like)
    # Traced: the positivity check of std becomes an assert inside the graph instead of a
    # read-back that would break it.
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape(-1)
    # A plain raise, not torch._check: Dynamo in torch 2.11 refuses a message closure over
    # locals. The length is static (a list, or a tensor of fixed shape), so no guard is lost.
    if t.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {t.numel()}")
    if name == "std":
        torch._assert_async((t > 0).all(), "std must be positive")
    return t.contiguous()


def authors_step(u, u0, grad, *, eps, alpha, lamda=0.0, gamma=0.0, noise="normal", quantize=255, seed=0, offset=0,
                 mean=None, std=None, nu=None):
    """The published step, in float32 and in their order of operations (compat="authors").

    ``grad`` is their batch-mean gradient w.r.t. the normalised input n(u) = (u - mean) / std,
    used as it is (no chain rule); the lambda term is + lamda (n(u) - u0), the normalised
    iterate minus the original in u-space, as published; ``lamda`` may be a float or one
    value per row; ``nu``: the normalised iterate the gradient was taken at, when the caller
    has it (else computed from u). The step is clamped to the ball, then to [0, 1], then rounded half to even
    on the 1/quantize grid, so it can leave the ball by half a grid step.
    """
    u, u0, g = u.float(), u0.float(), grad.float()
    d = g
    if isinstance(lamda, torch.Tensor) or lamda > 0:
        lam = lamda.float().reshape((-1,) + (1,) * (u.dim() - 1)) if isinstance(lamda, torch.Tensor) else lamda
        shape = (1, -1) + (1,) * (u.dim() - 2)
        if nu is None:
            nu = u if mean is None else (u - mean.reshape(shape)) / std.reshape(shape)
        d = d + lam * (nu.float() - u0)
    if gamma:
        z = reference.philox_noise(u.numel(), noise, seed, offset, device=u.device).reshape(u.shape)
        d = d + gamma * z.float()
    v = u + torch.sign(d) * alpha
    v = u0 + torch.clamp(v - u0, -eps, eps)
    v = torch.clamp(v, 0.0, 1.0)
    if quantize:
        v = torch.round(v * quantize) / quantize
    return v


def boundary_step(u, u0, grad, *, eps, alpha, lamda=0.0, gamma=0.0, noise="normal", quantize=255,
                  seed=0, offset=0, mean=None, std=None, backend="auto", compat=None, nu=None):
    """u_next = round_q(clip_[0,1](clip_ball(u + alpha * sign(g - lamda (u - u0) + gamma z)))).

    ``grad`` is d loss / d u, or d loss / d n(u) when ``std`` is given (n(u) = (u - mean)/std);
    the chain rule through std is applied inside the op. Noise z is Philox keyed by
    ``seed`` at counters ``offset + i`` for logical element i. Returns a new tensor with u's
    dtype and memory format. compat="authors" takes the published step instead (authors_step),
    as vectorised torch ops on any device: the native kernels implement only the default.
    """
    check_args(u, u0, grad, eps, alpha, quantize, noise, seed, offset)
    c = u.shape[1]
    mean_t = _channel_vector(mean, "mean", c, u)
    std_t = _channel_vector(std, "std", c, u)
    if compat == "authors":
        return authors_step(u, u0, grad, eps=float(eps), alpha=float(alpha), lamda=lamda, gamma=float(gamma),
                            noise=noise, quantize=int(quantize), seed=int(seed), offset=int(offset), mean=mean_t,
                            std=std_t, nu=nu).to(u.dtype)
    which = _backend_for(u.device.type, backend)
    args = dict(eps=float(eps), alpha=float(alpha), lamda=float(lamda), gamma=float(gamma), noise=noise,
                quantize=int(quantize), seed=int(seed), offset=int(offset))
    if which == "torch":
        return reference.boundary_step(u, u0, grad, mean=mean_t, std=std_t, **args)
    out_dtype = u.dtype
    if not (u0.dtype == grad.dtype == u.dtype):
        # The kernels take one storage dtype. Widening to float32 is exact and they compute
        # in float32 anyway, so this matches a mixed-dtype call to the reference.
        u, u0, grad = u.float(), u0.float(), grad.float()
    u0, grad = _layout_like(u, u0), _layout_like(u, grad)
    u = _layout_like(u, u)
    call = (u, u0, grad, args["eps"], args["alpha"], args["lamda"], args["gamma"], NOISE_CODES[noise],
            args["quantize"], args["seed"], args["offset"], mean_t, std_t)
    if which == "triton":
        from fastunlearn.kernels.boundary_step import boundary_step_triton

        out = boundary_step_triton(*call)
    else:
        out = torch.ops.fastunlearn.boundary_step(*call)
    return out if out.dtype == out_dtype else out.to(out_dtype)
