"""The sweep's fine-tunes, stoppable and resumable at an epoch boundary, and the relabel
modes it reads off one soft-target search."""

from __future__ import annotations

import copy
import os
import time

import torch

from fastunlearn.compose import strip_frozen_batchnorm
from fastunlearn.config import UnlearnConfig
from fastunlearn.engine.finetune import DivergedError, FinetuneEngine
from fastunlearn.engine.search import SearchResult, run_search

SWEEP_RELABELS = ("argmax", "nearest_incorrect", "soft", "soft_incorrect")
# The config fields a search depends on: runs that agree on them share one search.
SEARCH_KEYS = ("eps", "steps", "alpha", "gamma", "lamda", "noise", "lamda_schedule", "quantize", "early_exit",
               "random_start", "seed", "precision", "backend", "recheck_margin", "search_compile")


def derive_targets(search: SearchResult, y: torch.Tensor, mode: str) -> SearchResult:
    """A SearchResult for relabel ``mode`` from one run with soft targets (``relabel="soft"``)."""
    if mode not in SWEEP_RELABELS:
        raise ValueError(f"relabel must be one of {SWEEP_RELABELS}, got {mode!r}")
    if search.targets is None:
        raise ValueError("derive_targets needs a search run with relabel='soft' (it has no soft targets)")
    p = search.targets
    y = y.reshape(1, -1, 1).expand(p.shape[0], -1, 1)
    if mode == "soft":
        return search
    if mode == "argmax":
        return SearchResult(search.relabels, search.success, search.margin, None, search.steps)
    others = p.scatter(2, y, 0.0)
    if mode == "nearest_incorrect":
        masked = p.scatter(2, y, -1.0)
        return SearchResult(masked.argmax(2), search.success, search.margin, None, search.steps)
    # soft_incorrect: the boundary neighbourhood's distribution over the other classes.
    norm = others.sum(2, keepdim=True)
    uniform = torch.ones_like(others).scatter(2, y, 0.0)
    uniform = uniform / uniform.sum(2, keepdim=True)
    targets = torch.where(norm > 1e-12, others / norm.clamp_min(1e-12), uniform)
    return SearchResult(search.relabels, search.success, search.margin, targets, search.steps)


class StagedRuns:
    """The grid's fine-tunes, each stoppable and resumable at an epoch boundary.

    A run is made for the grid's largest epoch count; advance(i, k) resumes it from its
    checkpoint, runs it on to epoch k (max_steps) and leaves a checkpoint there, so a run
    continued from epoch j to k is the run one call would have made for k epochs (the
    learning rate is constant).
    The searches are shared (one per distinct search setting).
    """

    def __init__(self, runs, base, model, frozen, fx, fy, remain, mean, std, dev, max_epochs, rungs, tmp,
                 progress, searches):
        self.runs, self.base, self.model, self.frozen = runs, base, model, frozen
        self.fx, self.fy, self.remain, self.mean, self.std, self.dev = fx, fy, remain, mean, std, dev
        self.max_epochs, self.tmp, self.progress, self.searches = max_epochs, tmp, progress, searches
        self.last = max(rungs)
        self.state = {}  # run index -> (checkpoint folder, epochs reached, fine-tune seconds)
        self.search_seconds = 0.0
        self.diverged = {}  # run index -> (its diverged model, seconds): every later rung of it is that model

    def config(self, o: dict) -> UnlearnConfig:
        return self.base.replace(gamma=float(o["gamma"]), relabel="soft", remain_reg=float(o["remain_reg"]),
                                 remain_target=o["remain_target"], lr=float(o["lr"]), epochs=self.max_epochs,
                                 batchnorm=o["batchnorm"])

    def search(self, cfg: UnlearnConfig) -> SearchResult:
        refreshes = 1 if cfg.refresh_mode == "once" else self.max_epochs
        key = (tuple(getattr(cfg, k) for k in SEARCH_KEYS), refreshes)
        if key not in self.searches:
            t0 = time.perf_counter()
            self.searches[key] = run_search(self.model, self.fx, self.fy, cfg, mean=self.mean, std=self.std,
                                            device=self.dev, refreshes=refreshes, progress=self.progress,
                                            frozen=self.frozen)
            self.search_seconds += time.perf_counter() - t0
        return self.searches[key]

    def advance(self, i: int, epochs: int):
        """(model at epoch ``epochs`` of run i, hook-free and in eval mode; its fine-tune seconds)."""
        if i in self.diverged:
            return self.diverged[i]
        o = self.runs[i]
        cfg = self.config(o)
        search = derive_targets(self.search(cfg), self.fy, o["relabel"])
        folder, reached, seconds = self.state.get(i, (os.path.join(self.tmp, str(i)), 0, 0.0))
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        # A fresh engine each time: only the checkpoint stays between calls, so the runs
        # waiting for the next rung hold no model or optimiser in memory.
        trainable = copy.deepcopy(self.model).to(self.dev)
        trainable.requires_grad_(True)
        engine = FinetuneEngine(trainable, cfg, mean=self.mean, std=self.std, device=self.dev, teacher=self.frozen,
                                sample_shape=tuple(self.fx.shape[1:]))
        per_epoch = -(-self.fx.shape[0] // cfg.batch_size)
        try:
            engine.run(self.fx, search, self.remain, progress=self.progress, checkpoint_dir=folder,
                       # One checkpoint, where this call stops (the first multiple of its step count
                       # past the resumed step); none after the last rung.
                       checkpoint_every=0 if epochs == self.last else per_epoch * epochs,
                       max_steps=epochs * per_epoch,
                       resume=os.path.join(folder, "checkpoint.pt") if reached else None)
        except DivergedError:  # the fine-tune stopped at a non-finite loss or weight
            self.diverged[i] = (strip_frozen_batchnorm(engine.model).eval(), seconds + time.perf_counter() - t0)
            return self.diverged[i]
        seconds += time.perf_counter() - t0
        self.state[i] = (folder, epochs, seconds)
        # The engine is this call's own and its model a copy of the original: handed out as it is.
        return strip_frozen_batchnorm(engine.model).eval(), seconds
