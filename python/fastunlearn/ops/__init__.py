"""The fused ops, each with a torch / cpu / cuda / triton backend."""

from .boundary_step import boundary_step
from .relabel_check import relabel_check

__all__ = ["boundary_step", "relabel_check"]
