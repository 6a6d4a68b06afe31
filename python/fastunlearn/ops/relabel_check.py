"""relabel_check: the boundary check of one iterate, fused with its logits gradient.

Backends: "cpu" (csrc/relabel_check.cpp), "cuda" (csrc/cuda/relabel_check.cu),
"triton" (kernels/relabel_check.py), "torch" (reference.relabel_check).
"""

from __future__ import annotations

import torch

from fastunlearn import reference
from fastunlearn.ops._dispatch import constant_under_compile, resolve
from fastunlearn.ops.relabel_check_meta import MODE_CODES, check_args, empty_outputs
from fastunlearn.reference import RelabelResult
from fastunlearn.runtime import backends as _backends


@constant_under_compile
def _backend_for(device_type: str, backend: str) -> str:
    """resolve() evaluated once at trace time: torch.compile sees a constant, not the probing."""
    return resolve("relabel_check", torch.device(device_type), backend)


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
        from fastunlearn.kernels.relabel_check import relabel_check_triton

        out = relabel_check_triton(*call)
    else:
        out = torch.ops.fastunlearn.relabel_check(*call)  # resolve() loaded the extension
    relabel, success, margin, targets, dlogits = out
    return RelabelResult(relabel, success, margin, _none_if_empty(targets), _none_if_empty(dlogits))
