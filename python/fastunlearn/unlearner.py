"""fu.Unlearner: a warm session for repeated revisions of one model.

Building the frozen copy, laying the model out channels_last, choosing the speed settings
(fastunlearn.autotune: given, cached, measured or default), creating the optimizer and
compiling the train step are paid once; each ``revise`` then costs only the search and
the fine-tune steps. Every revision starts from the original weights (captured when the
session is built), and the user's model is never modified. fu.unlearn is one revision of
a fresh session, so the two give the same result.
"""

from __future__ import annotations

import copy
import os
import time
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from fastunlearn import autotune
from fastunlearn.config import UnlearnConfig
from fastunlearn.data import validate
from fastunlearn.data.source import ImageSource
from fastunlearn.engine.checkpoint import load_checkpoint, search_from_dict
from fastunlearn.engine.distributed import barrier, sharded_search
from fastunlearn.engine.finetune import FinetuneEngine
from fastunlearn.head_refit import config_refit_
from fastunlearn.nn.frozen import frozen_copy, set_requires_grad
from fastunlearn.nn.layout import default_channels_last
from fastunlearn.ops import resolve_backend
from fastunlearn.result import UnlearnResult
from fastunlearn.runtime.determinism import deterministic_run
from fastunlearn.runtime.phases import phase


def _tensor_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor)


def refreshes_for(config: UnlearnConfig) -> int:
    """How many search refreshes the fine-tune uses: one when a single search serves every epoch."""
    return 1 if config.refresh_mode == "once" else max(1, config.epochs)


def contiguous_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are contiguous (NCHW) clones.

    One pass: the clones go into deepcopy's memo, so deepcopy reuses them instead of copying
    each tensor in its own layout and then converting it a second time."""
    memo: dict = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) not in memo:
                memo[id(p)] = nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format), p.requires_grad)
        for b in module._buffers.values():
            if b is not None and id(b) not in memo:
                memo[id(b)] = b.clone(memory_format=torch.contiguous_format)
    return copy.deepcopy(model, memo)


class Unlearner:
    """A warm unlearning session for ``model``.

        session = fu.Unlearner(model, fu.UnlearnConfig(), mean=mean, std=std)
        res = session.revise(forget=(x_f, y_f), remain=(x_r, y_r))   # an UnlearnResult
        res2 = session.revise(forget=other)                           # no set-up cost again

    channels_last: None picks a layout for the search and for the train step (see
    finetune.default_channels_last); True / False sets both. compile_mode: torch.compile mode of the
    train step when config.compile resolves to on (default "reduce-overhead" on CUDA).
    """

    def __init__(self, model: nn.Module, config: Optional[UnlearnConfig] = None, mean=None, std=None, device=None,
                 *, channels_last: Optional[bool] = None, compile_mode: Optional[str] = None):
        validate.check_model(model)
        if config is None:
            config = UnlearnConfig()
        if not isinstance(config, UnlearnConfig):
            raise TypeError(f"config must be an UnlearnConfig, got {type(config).__name__}")
        self.config = config
        self.device = validate.check_devices(model, device)
        self._device_given = device is not None
        if (mean is None) != (std is None):
            validate.mean_std(mean, std, 0)  # raises the both-or-neither error
        self._mean_std_raw = (mean, std)
        self.mean = self.std = None
        self._channels: Optional[int] = None
        self._classes: Optional[int] = None
        t0 = time.perf_counter()
        # The search's copy and the train step each pick their layout unless one is given
        # (see finetune.default_channels_last).
        cl = default_channels_last(model, self.device) if channels_last is None else channels_last
        self.frozen = frozen_copy(model, self.device, channels_last=cl)
        trainable = copy.deepcopy(model).to(self.device)
        set_requires_grad(trainable, True)
        # The original weights, on the device: each revision starts by copying them back in.
        self._original = {k: v.detach().clone() for k, v in trainable.state_dict().items()}
        self._trainable, self._cl, self._compile_mode = trainable, channels_last, compile_mode
        self.engine: Optional[FinetuneEngine] = None  # built once the data has passed its checks
        # The settings the revisions run with (explicit, cached, measured or default), chosen
        # at the first revision from its data (see fastunlearn.autotune).
        self.plan: Optional[autotune.Plan] = None
        self.setup_seconds = time.perf_counter() - t0
        self.revisions = 0
        # Set by fu.unlearn: the next revision is the session's last, so its result may be the
        # engine's own model instead of a copy.
        self._last_revision = False

    @property
    def model(self) -> nn.Module:
        """The session's trainable model (the last revision's weights until the next one)."""
        return self.engine.model if self.engine is not None else self._trainable

    def _ensure_engine(self, sample_shape: tuple):
        if self.engine is None:
            if not any(True for _ in self._trainable.parameters()):
                raise ValueError("the model has no parameters to fine-tune")
            t0 = time.perf_counter()
            self.engine = FinetuneEngine(self._trainable, self.plan.train_config, mean=self.mean, std=self.std,
                                         device=self.device, teacher=self.frozen, channels_last=self.plan.channels_last,
                                         compile_mode=self._compile_mode, sample_shape=sample_shape)
            self.setup_seconds += time.perf_counter() - t0
        return self.engine

    def _check(self, forget, remain):
        pairs = validate.pairs(self.config.loader_workers, self.device, forget=forget, remain=remain)
        fx = pairs["forget"][0]
        # Before anything runs the model on the data: a mismatch is the user's to fix, named as such.
        validate.check_devices(self._trainable, self.device if self._device_given else None,
                               **{f"{k} images": p[0] for k, p in pairs.items() if p is not None})
        if self._channels is None:
            self._channels = fx.shape[1]
            mean, std = validate.mean_std(*self._mean_std_raw, fx.shape[1])
            self.mean = None if mean is None else mean.to(self.device)
            self.std = None if std is None else std.to(self.device)
            self._classes = validate.num_classes(self.frozen, fx, self.mean, self.std, self.device)
        elif fx.shape[1] != self._channels:
            raise ValueError(f"forget images must have {self._channels} channels like this session's first "
                             f"revision, got {fx.shape[1]}")
        for k, p in pairs.items():
            if p is None:
                continue
            if p[0].shape[1:] != fx.shape[1:]:
                raise ValueError(f"{k} images must have the forget images' shape {tuple(fx.shape[1:])} per sample, "
                                 f"got {tuple(p[0].shape[1:])}")
            validate.check_labels(p[1], self._classes, k)
        return pairs

    @deterministic_run
    def revise(self, forget, remain=None, *, progress: bool = True, probe=None,
               checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
               resume: Optional[Union[str, dict]] = None, on_step: Optional[Callable] = None,
               max_steps: Optional[int] = None, output: Optional[str] = None):
        """Unlearn ``forget`` from the original model, keeping ``remain``. Returns an UnlearnResult.

        forget / remain: (x, y) with x (N, C, H, W) uint8 or float in [0, 1], or a Dataset.
        remain is not read at all when config.remain_reg == 0 (compat="authors": its batches are
        drawn, unused, as the published loop does). probe: (forget_probe, remain_probe) pairs
        or a callable model -> dict, evaluated after each epoch.
        checkpoint_dir / checkpoint_every: a resumable checkpoint every N steps; resume: a
        checkpoint file to continue from (the search is taken from it). output: a
        .safetensors path for the result (also written into checkpoint_dir when given).

        Under torch.distributed (torchrun), call it on every rank with the same model, data
        and config: the search is sharded, the fine-tune is data-parallel with
        config.batch_size as the global batch, every rank returns the same model, and only
        rank 0 writes files.
        """

        t_start = time.perf_counter()
        if self._trainable is None:
            raise RuntimeError("this Unlearner handed its model over as fu.unlearn's result; make a new one")
        with phase("check"):
            pairs, engine = self._prepare(forget, remain)
        fx, fy = pairs["forget"]
        cfg = self.config
        state = None
        t0 = time.perf_counter()
        with phase("search"):
            if resume is not None:
                state = load_checkpoint(resume) if isinstance(resume, str) else resume
                search = search_from_dict(state["search"])
                if search.relabels.shape[1] != fx.shape[0]:
                    raise ValueError(f"resume: the checkpoint's search covers {search.relabels.shape[1]} samples, "
                                     f"the forget set has {fx.shape[0]}")
            else:
                search = sharded_search(self.frozen, ImageSource(fx, fy), self.plan.search_config, mean=self.mean,
                                        std=self.std, device=self.device, refreshes=refreshes_for(cfg),
                                        progress=progress, frozen=self.frozen)
        t_search = time.perf_counter() - t0
        with phase("reset"):
            engine.reset(self._original)
        compile_before = engine.compile_seconds
        t0 = time.perf_counter()
        with phase("finetune"):
            history = engine.run(fx, search, pairs["remain"], progress=progress, probe=probe,
                                 checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, resume=state,
                                 on_step=on_step, max_steps=max_steps)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        t_tune = time.perf_counter() - t0
        t_compile = engine.compile_seconds - compile_before
        with phase("result"):
            if self._last_revision and engine.world == 1:
                # fu.unlearn's session ends here: the engine's model itself, put back in NCHW.
                model = engine.model.to(memory_format=torch.contiguous_format).eval()
                self.engine = self._trainable = None
            else:
                model = contiguous_copy(engine.model).eval()
        t0, t_head = time.perf_counter(), 0.0
        if cfg.head_refit_epochs:
            with phase("head_refit"):
                model = config_refit_(model, cfg, (fx, fy), search, pairs["remain"], mean=self.mean, std=self.std,
                                      device=self.device, progress=progress)
            t_head = time.perf_counter() - t0
        self.revisions += 1
        seconds = time.perf_counter() - t_start
        timings = {"search": t_search, "finetune": t_tune, "head_refit": t_head, "compile": t_compile, "total": seconds,
                   "setup": self.setup_seconds if self.revisions == 1 else 0.0,
                   "tune": self.plan.seconds if self.revisions == 1 else 0.0, "tuned": self.plan.report}
        res = UnlearnResult(model, search.relabels[0], search.success[0], seconds, history, search, cfg,
                            resolve_backend("boundary_step", self.device, cfg.backend), timings, engine.step_mode)
        paths = list(filter(None, [output, checkpoint_dir and os.path.join(checkpoint_dir, "model.safetensors")]))
        for path in paths:
            res.save(path)  # rank 0 only
        if paths:
            # Every rank returns once the files are complete, so any rank may read them next.
            barrier(self.device)
        return res

    def _prepare(self, forget, remain):
        """The checked (x, y) pairs ({"forget": ..., "remain": ... or None}) and the engine."""
        cfg = self.config
        validate.check_distinct(forget, remain)
        if cfg.remain_reg == 0 and (cfg.compat is None or remain is None) and not cfg.head_refit_epochs:
            # Never read: the authors' loop loads a remain batch it does not use (compat="authors"
            # draws it too, to take their batches). Passing the forget images as the remain set
            # is still an error worth reporting.
            if _tensor_pair(forget) and _tensor_pair(remain):
                validate.check_same_data(forget[0], remain[0])
            remain = None
        elif remain is None:
            raise ValueError(f"config.remain_reg={cfg.remain_reg} (head_refit_epochs={cfg.head_refit_epochs}) "
                             "needs a remain set: pass remain=(x, y)")
        pairs = self._check(forget, remain)
        if pairs["remain"] is not None:
            validate.check_same_data(pairs["forget"][0], pairs["remain"][0])
        if self.plan is None:
            with phase("tune"):
                self.plan = autotune.plan(self._trainable, self.frozen, cfg, self._cl, *pairs["forget"], self.mean,
                                          self.std, self.device, refreshes_for(cfg))
        return pairs, self._ensure_engine(tuple(pairs["forget"][0].shape[1:]))
