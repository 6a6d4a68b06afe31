"""The public entry points: unlearn, boundary_relabel, compose (and evaluate, from metrics)."""

from __future__ import annotations

import copy
import time
from typing import Optional

import torch.nn as nn

from fastunlearn.compose import compose, interpolate  # noqa: F401  (the public home of both)
from fastunlearn.config import UnlearnConfig
from fastunlearn.data import validate
from fastunlearn.data.source import ImageSource
from fastunlearn.engine.distributed import sharded_search
from fastunlearn.result import UnlearnResult  # noqa: F401  (the public home of UnlearnResult)
from fastunlearn.unlearner import Unlearner


def _prepare(model, config, mean, std, device, **data):
    validate.check_model(model)
    if config is None:
        config = UnlearnConfig()
    if not isinstance(config, UnlearnConfig):
        raise TypeError(f"config must be an UnlearnConfig, got {type(config).__name__}")
    pairs = validate.pairs(config.loader_workers, validate.resolve_device(model, device), **data)
    fx = pairs["forget"][0]
    dev = validate.check_devices(model, device, **{f"{k} images": p[0] for k, p in pairs.items() if p is not None})
    mean_t, std_t = validate.mean_std(mean, std, fx.shape[1])
    for k, p in pairs.items():
        if p is not None and p[0].shape[1:] != fx.shape[1:]:
            raise ValueError(f"{k} images must have the forget images' shape {tuple(fx.shape[1:])} per sample, "
                             f"got {tuple(p[0].shape[1:])}")
    probe_model = copy.deepcopy(model).to(dev)
    classes = validate.num_classes(probe_model, fx, mean_t, std_t, dev)
    for k, p in pairs.items():
        if p is not None:
            validate.check_labels(p[1], classes, k)
    return config, pairs, dev, mean_t, std_t


def unlearn(model: nn.Module, forget, remain=None, config: Optional[UnlearnConfig] = None, mean=None, std=None,
            device=None, *, progress: bool = True, probe=None, checkpoint_dir: Optional[str] = None,
            checkpoint_every: int = 0, resume: Optional[str] = None, on_step=None, max_steps: Optional[int] = None,
            output: Optional[str] = None) -> UnlearnResult:
    """Make a copy of ``model`` forget ``forget`` while keeping ``remain``.

    forget / remain: (x, y) with x (N, C, H, W) float in [0, 1] or uint8 and y int64, or a
    Dataset of such pairs; remain is not read when config.remain_reg == 0. mean / std:
    per-channel normalisation the model expects, applied inside (never bake it into x).
    probe: (forget_probe, remain_probe) pairs or a callable model -> dict, recorded after
    each epoch. checkpoint_dir / checkpoint_every / resume: resumable checkpoints (see
    fastunlearn.Unlearner.revise). output: write the result as .safetensors.

    One revision of a fresh fastunlearn.Unlearner; keep an Unlearner to revise the same
    model again without paying the set-up (and compile) cost.
    """
    t_start = time.perf_counter()
    session = Unlearner(model, config, mean, std, device)
    session._last_revision = True
    res = session.revise(forget, remain, progress=progress, probe=probe, checkpoint_dir=checkpoint_dir,
                         checkpoint_every=checkpoint_every, resume=resume, on_step=on_step, max_steps=max_steps,
                         output=output)
    res.seconds = time.perf_counter() - t_start
    res.timings["total"] = res.seconds
    return res


def boundary_relabel(model: nn.Module, x, y=None, config: Optional[UnlearnConfig] = None, mean=None, std=None,
                     device=None, *, progress: bool = False):
    """The inner search alone: new labels for (x, y) and whether each sample crossed.

    Returns (relabels, success), both (N,). ``x`` may also be an (x, y) pair or a Dataset
    with y omitted.
    """
    data = x if y is None else (x, y)
    config, pairs, dev, mean_t, std_t = _prepare(model, config, mean, std, device, forget=data)
    fx, fy = pairs["forget"]
    res = sharded_search(model, ImageSource(fx, fy), config, mean=mean_t, std=std_t, device=dev, refreshes=1,
                         progress=progress)
    return res.relabels[0], res.success[0]
