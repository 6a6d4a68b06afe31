"""The fused ops, each with a torch / cpu / cuda / triton backend."""

from .batch_norm_relu import batch_norm_relu
from .boundary_step import boundary_step
from .relabel_check import relabel_check

__all__ = ["batch_norm_relu", "boundary_step", "relabel_check"]
