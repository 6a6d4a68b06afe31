"""fastunlearn: fast targeted unlearning of image classifiers.

Boundary relabelling with a perturbed sign-gradient search (Nahass et al., 2025), with
fused native and Triton kernels, a batched search engine and a compiled fine-tune.

    import fastunlearn as fu
    res = fu.unlearn(model, forget=(x_f, y_f), remain=(x_r, y_r), config=fu.UnlearnConfig())
    res.model  # a new model; the input model is untouched
"""

from fastunlearn.api import UnlearnResult, boundary_relabel, compose, interpolate, unlearn
from fastunlearn.autotune import tune
from fastunlearn.config import UnlearnConfig
from fastunlearn.eval.evidence import evaluate
from fastunlearn.eval.report import report
from fastunlearn.eval.sweep import sweep
from fastunlearn.runtime.backends import backends
from fastunlearn.unlearner import Unlearner

__version__ = "0.1.0"

__all__ = ["UnlearnConfig", "UnlearnResult", "Unlearner", "backends", "boundary_relabel", "compose", "evaluate",
           "interpolate", "report", "sweep", "tune", "unlearn", "__version__"]
