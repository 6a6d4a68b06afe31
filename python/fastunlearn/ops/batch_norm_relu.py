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

from fastunlearn.ops._dispatch import constant_under_compile, resolve
from fastunlearn.ops.batch_norm_relu_meta import NATIVE_DTYPES, check_args, empty_backward_outputs, empty_outputs
from fastunlearn.runtime import backends as _backends


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _, _, _, relu = inputs
    _, mean, invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(x, weight, bias, mean, invstd)
    ctx.relu = relu
    ctx.mark_non_differentiable(mean, invstd, new_running_mean, new_running_var)


def _backward(ctx, dy, *_):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastunlearn.batch_norm_relu_backward(dy, x, weight, bias, mean, invstd, ctx.relu)
    return dx, dw, db, None, None, None, None, None


# The schemas come from the extension, so the fake kernels and the autograd formula can only be
# attached once it loaded.
if _backends.native() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastunlearn::batch_norm_relu", "CPU"):
    torch.library.register_fake("fastunlearn::batch_norm_relu")(empty_outputs)
    torch.library.register_fake("fastunlearn::batch_norm_relu_backward")(empty_backward_outputs)
    torch.library.register_autograd("fastunlearn::batch_norm_relu", _backward, setup_context=_setup_context)


@constant_under_compile
def _backend_for(device_type: str, backend: str) -> str:
    """resolve() evaluated once at trace time: torch.compile sees a constant, not the probing."""
    return resolve("batch_norm_relu", torch.device(device_type), backend)


def batch_norm_relu(x, weight=None, bias=None, running_mean=None, running_var=None, *, momentum=0.1, eps=1e-5,
                    relu=True, backend="auto"):
    """max(BatchNorm2d(x), 0) in training mode (batch statistics), or the BatchNorm alone
    when relu=False. weight / bias (C,) default to ones / zeros; running_mean / running_var,
    when given, are updated in place (momentum, unbiased variance), as
    torch.nn.functional.batch_norm(training=True) does. Differentiable in x, weight, bias.
    x: float32 or bfloat16 for the native backends, NCHW or channels_last (y keeps x's layout).
    """
    check_args(x, weight, bias, running_mean, running_var, eps)
    name = _backend_for(x.device.type, backend)
    native_dtype = x.dtype in NATIVE_DTYPES
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
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        x = x.contiguous()
    y, _, _, new_running_mean, new_running_var = torch.ops.fastunlearn.batch_norm_relu(
        x, w.float(), b.float(), running_mean, running_var, float(momentum), float(eps), bool(relu))
    if running_mean is not None:
        running_mean.copy_(new_running_mean)
        running_var.copy_(new_running_var)
    return y
