"""relabel_check: the boundary check of one iterate, fused with its logits gradient.

Backends: "cpu" (csrc/relabel_check.cpp), "cuda" (csrc/cuda/relabel_check.cu),
"triton" (kernels/relabel_check.py), "torch" (reference.relabel_check).
"""

from __future__ import annotations

import torch

from .. import _backends, reference
from ..reference import RelabelResult
from ._dispatch import check_same_device, constant_under_compile, resolve

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


@constant_under_compile
def _backend_for(device_type: str, backend: str) -> str:
    """resolve() evaluated once at trace time: torch.compile sees a constant, not the probing."""
    return resolve("relabel_check", torch.device(device_type), backend)


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


# The schema comes from the extension, so the fake kernel can only be attached once it loaded.
if _backends.native() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fastunlearn::relabel_check", "CPU"):
    torch.library.register_fake("fastunlearn::relabel_check")(empty_outputs)


def _none_if_empty(t):
    return None if t.numel() == 0 and t.dim() == 1 else t


def relabel_check(logits, y, *, mode="argmax", topk=3, want_grad=False, backend="auto") -> RelabelResult:
    """Relabel, success (argmax != y), margin (logit[y] - best other), targets, dlogits.

    ``targets`` is the softmax (mode="soft") or the renormalised top-k probabilities
    (mode="topk"), else None. ``dlogits`` = softmax(logits) - onehot(y), the gradient of
    the per-sample cross-entropy, when ``want_grad``; else None. Ties go to the lowest
    class index, as torch.argmax does.
    """
    check_args(logits, y, mode, topk)
    y = y.to(torch.int64)
    which = _backend_for(logits.device.type, backend)
    if which == "torch":
        return reference.relabel_check(logits, y, mode=mode, topk=topk, want_grad=want_grad)
    call = (logits.contiguous(), y.contiguous(), MODE_CODES[mode], int(topk), bool(want_grad))
    if which == "triton":
        from ..kernels.relabel_check import relabel_check_triton

        out = relabel_check_triton(*call)
    else:
        out = torch.ops.fastunlearn.relabel_check(*call)  # resolve() loaded the extension
    relabel, success, margin, targets, dlogits = out
    return RelabelResult(relabel, success, margin, _none_if_empty(targets), _none_if_empty(dlogits))
