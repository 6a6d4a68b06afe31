"""relabel_check's argument checks and output allocation, shared by the op, its fake kernel and the
Triton backend. The C++ side of the same checks is csrc/relabel_check.cpp."""

from __future__ import annotations

import torch

from fastunlearn import reference
from fastunlearn.ops._dispatch import check_same_device

MODE_CODES = {name: i for i, name in enumerate(reference.RELABEL_MODES)}


def check_args(logits, y, mode, topk):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a (N, classes) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"y must be a ({logits.shape[0]},) tensor of labels, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"y must hold integer labels (int64), got {y.dtype}")
    check_same_device(logits=logits, y=y)
    if mode not in MODE_CODES:
        raise ValueError(f"mode must be one of {tuple(MODE_CODES)}, got {mode!r}")
    if mode == "topk" and int(topk) < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if torch.compiler.is_compiling():
        # Reading the range back would break the graph; the assert stays inside it.
        torch._assert_async(((y >= 0) & (y < logits.shape[1])).all(),
                            f"labels must lie in [0, {logits.shape[1]})")
    elif y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")


def empty_outputs(logits, y, mode, topk, want_grad):
    """Checks the op's arguments and allocates its five outputs on logits' device.

    The fake kernel of the native op and the Triton backend share it; it runs on real and
    on fake tensors alike.
    """
    torch._check(logits.dim() == 2, lambda: f"relabel_check: logits must be (N, classes), got {tuple(logits.shape)}")
    torch._check(logits.dtype in (torch.float32, torch.bfloat16, torch.float16),
                 lambda: f"relabel_check: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    torch._check(y.dim() == 1 and y.shape[0] == logits.shape[0],
                 lambda: f"relabel_check: y must be ({logits.shape[0]},), got {tuple(y.shape)}")
    torch._check(y.dtype == torch.int64, lambda: f"relabel_check: y must be int64, got {y.dtype}")
    torch._check(0 <= mode <= 3, lambda: f"relabel_check: mode must be 0..3, got {mode}")
    torch._check(mode != 3 or topk >= 1, lambda: f"relabel_check: topk must be >= 1, got {topk}")
    n, k = logits.shape
    f32 = dict(dtype=torch.float32)
    return (logits.new_empty(n, dtype=torch.int64), logits.new_empty(n, dtype=torch.bool), logits.new_empty(n, **f32),
            logits.new_empty((n, k) if mode in (2, 3) else (0,), **f32),
            logits.new_empty((n, k) if want_grad else (0,), **f32))
