"""Deterministic runs: UnlearnConfig(deterministic=True) makes two runs give bitwise-equal weights.

Within ``deterministic_mode``:
- torch.use_deterministic_algorithms(True): an op without a deterministic kernel raises
  instead of running a racy one;
- cuDNN picks deterministic algorithms and does not benchmark (its choice could vary);
- on CUDA, CUBLAS_WORKSPACE_CONFIG=":4096:8" unless already set (cuBLAS reads it when a
  handle is created, so set it in the environment before the process first uses CUDA for a
  guarantee; the CUDA run prints nothing when it was too late, cuBLAS just keeps its setting).
Every setting is put back as it was on exit, exceptions included.

DataLoader workers: ``worker_seeding(seed)`` gives the DataLoader keywords that seed every
worker's torch, numpy and random from one seeded generator.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random

import numpy as np
import torch

CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True, device=None):
    """Deterministic algorithms for the block (a no-op when not ``enabled``)."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    uses_cuda = device is not None and torch.device(device).type == "cuda"
    if uses_cuda and env_before is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]
        if uses_cuda and env_before is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def deterministic_run(method):
    """Decorates a method of an object with ``.config`` (an UnlearnConfig) and ``.device``:
    the call runs in deterministic_mode when config.deterministic is set."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with deterministic_mode(bool(getattr(self.config, "deterministic", False)), self.device):
            return method(self, *args, **kwargs)

    return wrapper


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: numpy and random from the worker's torch seed (which the DataLoader
    derives from its generator and the worker id)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def worker_seeding(seed: int) -> dict:
    """DataLoader keywords for reproducible workers: a seeded generator and seed_worker."""
    return {"worker_init_fn": seed_worker, "generator": torch.Generator().manual_seed(int(seed))}
