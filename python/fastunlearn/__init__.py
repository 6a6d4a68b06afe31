"""fastunlearn: fast targeted unlearning of image classifiers.

Boundary relabelling with a perturbed sign-gradient search (Nahass et al., 2025), with
fused native and Triton kernels, a batched search engine and a compiled fine-tune.
"""

from ._backends import backends
from .config import UnlearnConfig

__version__ = "0.1.0"

__all__ = ["UnlearnConfig", "backends", "__version__"]
