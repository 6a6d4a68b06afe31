"""Backend choice and input checks shared by the public ops."""

from __future__ import annotations

import torch

from fastunlearn.runtime import backends as _backends
from fastunlearn.runtime.backends import BACKENDS

# Preference for CUDA tensors when backend="auto". The CUDA ops come compiled; a Triton
# kernel is compiled on its first call in a process without a warm Triton cache, which costs
# a one-off job more than the kernel can win back (bench/RESULTS.md; gpu_check.sh measures
# both ops).
AUTO_ORDER_CUDA = ("cuda", "triton", "torch")


def constant_under_compile(fn):
    """torch.compiler.assume_constant_result(fn) without importing torch._dynamo.

    That decorator imports torch._dynamo (a large share of `import fastunlearn`, paid by
    every command, --help included) only to set this attribute, which Dynamo reads when it
    meets fn while tracing. tests/ops/test_boundary_step.py checks that the attribute is
    still all it sets.
    """
    fn._dynamo_marked_constant = True
    return fn


# Ops that only some backends implement (the others: every backend).
OP_BACKENDS = {"batch_norm_relu": ("torch", "cpu", "cuda")}


def _available(op: str, name: str, device: torch.device) -> bool:
    if name not in OP_BACKENDS.get(op, BACKENDS):
        return False
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu" and _backends.has_cpu_op(op)
    if name == "cuda":
        return device.type == "cuda" and _backends.has_cuda_op(op)
    if name == "triton":
        if not _backends.triton_usable():
            return False
        # Under TRITON_INTERPRET=1 the kernels run on CPU tensors.
        return device.type == "cuda" or (device.type == "cpu" and "interpreter" in _backends.triton_status())
    return False


def resolve(op: str, device: torch.device, backend: str) -> str:
    """The backend that will run ``op`` on ``device``; explains itself when it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if not _available(op, backend, device):
            reason = _backends.backends().get(backend, "")
            raise RuntimeError(f"backend={backend!r} cannot run {op} on {device.type} tensors ({reason})")
        return backend
    order = AUTO_ORDER_CUDA if device.type == "cuda" else ("cpu", "torch")
    return next(b for b in order if _available(op, b, device))


def check_same_device(**tensors):
    devs = {k: t.device for k, t in tensors.items() if t is not None}
    if len(set(devs.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {', '.join(f'{k} on {v}' for k, v in devs.items())}")


def channel_vector(v, name: str, channels: int, like: torch.Tensor):
    """mean/std as a float32 (C,) tensor on like's device, or None."""
    if v is None:
        return None
    t = torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape(-1)
    if t.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {t.numel()}")
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {t.tolist()}")
    return t.contiguous()
