"""batch_norm_relu's argument checks and output allocation, shared by the op and its fake kernels.
The C++ side of the same checks is csrc/batch_norm_relu.cpp (and csrc/cuda/batch_norm_relu_torch.cpp)."""

from __future__ import annotations

import torch

from fastunlearn.ops._dispatch import check_same_device

# The dtypes of x the native kernels take.
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def check_args(x, weight, bias, running_mean, running_var, eps):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError("batch_norm_relu: x must be an (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and (t.dim() != 1 or t.numel() != c):
            raise ValueError(f"batch_norm_relu: {name} must be a ({c},) tensor, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("batch_norm_relu: running_mean and running_var must be given together")
    if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        raise ValueError(f"batch_norm_relu: expected more than 1 value per channel when training, got input of "
                         f"shape {tuple(x.shape)}")
    if eps < 0:
        raise ValueError(f"batch_norm_relu: eps must be >= 0, got {eps}")
    check_same_device(x=x, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)


def _check_channel_vector(t, name: str, c: int):
    torch._check(t.dim() == 1 and t.shape[0] == c,
                 lambda: f"batch_norm_relu: {name} must be a ({c},) tensor, got {tuple(t.shape)}")
    torch._check(t.dtype == torch.float32, lambda: f"batch_norm_relu: {name} must be float32, got {t.dtype}")


def _check_x(x):
    torch._check(x.dim() == 4, lambda: f"batch_norm_relu: x must be (N, C, H, W), got {tuple(x.shape)}")
    torch._check(x.dtype in NATIVE_DTYPES, lambda: f"batch_norm_relu: x must be float32 or bfloat16, got {x.dtype}")


def empty_outputs(x, weight, bias, running_mean, running_var, momentum, eps, relu):
    """Checks the forward op's arguments and allocates its five outputs: y (x's shape, dtype and
    layout), mean and invstd (C,), the updated running statistics ((C,), or (0,) without them).

    The fake kernel of the native op; it runs on real and on fake tensors alike.
    """
    _check_x(x)
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None:
            _check_channel_vector(t, name, c)
    torch._check((running_mean is None) == (running_var is None),
                 lambda: "batch_norm_relu: running_mean and running_var must be given together")
    torch._check(eps >= 0, lambda: f"batch_norm_relu: eps must be >= 0, got {eps}")
    f32 = dict(dtype=torch.float32)
    stats = (c,) if running_mean is not None else (0,)
    return (torch.empty_like(x), x.new_empty(c, **f32), x.new_empty(c, **f32), x.new_empty(stats, **f32),
            x.new_empty(stats, **f32))


def empty_backward_outputs(dy, x, weight, bias, mean, invstd, relu):
    """Checks the backward op's arguments and allocates dx (x's shape, dtype and layout), dweight
    and dbias ((C,) float32). The fake kernel of the native backward op."""
    _check_x(x)
    torch._check(dy.shape == x.shape and dy.dtype == x.dtype,
                 lambda: f"batch_norm_relu_backward: dy must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(dy.shape)}, {dy.dtype}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("mean", mean), ("invstd", invstd)):
        _check_channel_vector(t, name, c)
    f32 = dict(dtype=torch.float32)
    return torch.empty_like(x), x.new_empty(c, **f32), x.new_empty(c, **f32)
