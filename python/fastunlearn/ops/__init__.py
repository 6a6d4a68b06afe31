"""The fused ops, each with a torch / cpu / cuda / triton backend."""

from fastunlearn.ops._dispatch import resolve as resolve_backend
from fastunlearn.ops.batch_norm_relu import batch_norm_relu
from fastunlearn.ops.boundary_step import boundary_step
from fastunlearn.ops.relabel_check import relabel_check

__all__ = ["batch_norm_relu", "boundary_step", "relabel_check", "resolve_backend"]
