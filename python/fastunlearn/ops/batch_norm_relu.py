"""batch_norm_relu: a training-mode BatchNorm2d fused with the ReLU after it.

The train step's layer pair conv -> BatchNorm -> ReLU costs, unfused, a statistics pass, a
normalise pass and a ReLU pass forward, and a ReLU-gradient pass, a reduction pass and an
input-gradient pass backward. Fused, it is two passes each way, and the backward needs only
the BatchNorm's input (the ReLU's mask is recomputed from it).

Backends: "cpu" (csrc/batch_norm_relu.cpp), "cuda" (csrc/cuda/batch_norm_relu.cu), "torch"
(F.batch_norm then relu: the unfused layers). reference.batch_norm_relu is the float64
definition they are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastunlearn.ops._dispatch import check_same_device, resolve


def _check(x, weight, bias, running_mean, running_var, eps):
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


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, relu):
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        y, mean, invstd = torch.ops.fastunlearn.batch_norm_relu(x, weight, bias, running_mean, running_var,
                                                                momentum, eps, relu)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        dx, dw, db = torch.ops.fastunlearn.batch_norm_relu_backward(dy, x, weight, bias, mean, invstd, ctx.relu)
        return dx, dw, db, None, None, None, None, None


def batch_norm_relu(x, weight=None, bias=None, running_mean=None, running_var=None, *, momentum=0.1, eps=1e-5,
                    relu=True, backend="auto"):
    """max(BatchNorm2d(x), 0) in training mode (batch statistics), or the BatchNorm alone
    when relu=False. weight / bias (C,) default to ones / zeros; running_mean / running_var,
    when given, are updated in place (momentum, unbiased variance), as
    torch.nn.functional.batch_norm(training=True) does. Differentiable in x, weight, bias.
    x: float32 or bfloat16 for the native backends, NCHW or channels_last (y keeps x's layout).
    """
    _check(x, weight, bias, running_mean, running_var, eps)
    name = resolve("batch_norm_relu", x.device, backend)
    native_dtype = x.dtype in (torch.float32, torch.bfloat16)
    if name != "torch" and not native_dtype and backend == "auto":
        name = "torch"
    if name == "torch":
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        return torch.relu(y) if relu else y
    if not native_dtype:
        raise TypeError(f"batch_norm_relu ({name}): x must be float32 or bfloat16, got {x.dtype}")
    c = x.shape[1]
    f32 = dict(dtype=torch.float32, device=x.device)
    w = weight if weight is not None else torch.ones(c, **f32)
    b = bias if bias is not None else torch.zeros(c, **f32)
    return _BatchNormReLU.apply(x, w.float(), b.float(), running_mean, running_var, float(momentum), float(eps),
                                bool(relu))
