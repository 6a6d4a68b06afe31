"""The public entry points: unlearn, boundary_relabel, compose (and evaluate, from metrics)."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from . import _backends, validate
from .compose import _finetune_on_remain, _set_submodule, compose, interpolate  # noqa: F401
from .config import UnlearnConfig
from .distributed import is_main, sharded_search
from .search import SearchResult
from .source import ImageSource


@dataclass
class UnlearnResult:
    """What fu.unlearn returns. The input model is untouched; ``model`` is a new one.

    relabels, success   (N,) labels and crossing flags of the first search refresh.
    search              every refresh (SearchResult), with margins and steps taken.
    seconds             wall time of the whole call; ``timings`` splits it.
    history             one dict per fine-tune epoch (loss, and probe metrics if given).
    backend             which backend ran the fused ops.
    step_mode           how the train step ran: "eager", "cuda graph" or "compiled".
    """

    model: nn.Module
    relabels: torch.Tensor
    success: torch.Tensor
    seconds: float
    history: list
    search: SearchResult
    config: UnlearnConfig
    backend: str
    timings: dict = field(default_factory=dict)
    step_mode: str = "eager"

    def save(self, path: str, arch: Optional[dict] = None, **meta) -> None:
        """Write the model as .safetensors (atomically), with the config in its header.

        Under torch.distributed only rank 0 writes (every rank holds the same model); the
        others return at once, so wait on a barrier before another rank reads the file.
        """
        from .checkpoint import save_model

        if not is_main():
            return
        save_model(self.model, path, arch, config=self.config.to_dict(), **meta)


def _prepare(model, config, mean, std, device, **data):
    validate.check_model(model)
    if config is None:
        config = UnlearnConfig()
    if not isinstance(config, UnlearnConfig):
        raise TypeError(f"config must be an UnlearnConfig, got {type(config).__name__}")
    pairs = _check_data(config.loader_workers, validate.resolve_device(model, device), **data)
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


def _check_data(workers=None, device=None, **data):
    """(x, y) for each named set (None stays None; forget is required): tensors, or for a
    Dataset its images as streaming.DatasetRows (read in batches) and its labels."""
    return {k: validate.stream(v, k, workers=workers, device=device) if validate.is_stream(v)
            else validate.pair(v, k, allow_none=(k != "forget")) for k, v in data.items()}


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
    from .unlearner import Unlearner

    t_start = time.perf_counter()
    session = Unlearner(model, config, mean, std, device)
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


def backend_report() -> str:
    return "\n".join(f"{k:7s} {v}" for k, v in _backends.backends().items())
