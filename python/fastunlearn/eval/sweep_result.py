"""What fu.sweep returns: every grid point with its scores, and the chosen model, which
``SweepResult.save`` writes as a model file with the sweep's manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch.nn as nn

from fastunlearn.config import UnlearnConfig
from fastunlearn.data.provenance import run_record, save_with_manifest


@dataclass
class SweepPoint:
    """One grid point: its settings and its validation scores (fractions in [0, 1])."""

    settings: dict
    forget_acc: float
    remain_acc: float
    seconds: float = 0.0
    index: int = 0
    heldout_acc: Optional[float] = None
    diverged: bool = False

    def as_row(self) -> dict:
        row = dict(self.settings, forget_acc=self.forget_acc, remain_acc=self.remain_acc, seconds=self.seconds)
        if self.heldout_acc is not None:
            row["heldout_acc"] = self.heldout_acc
        if self.diverged:
            row["diverged"] = True
        return row


@dataclass
class SweepResult:
    """model: the chosen model (a new one). chosen: its point. points: every point, in run
    order. front: the Pareto front (lower forget accuracy, higher remain accuracy), sorted by
    forget accuracy. config: the UnlearnConfig of the chosen point's fine-tune."""

    model: nn.Module
    chosen: SweepPoint
    config: UnlearnConfig
    points: list
    front: list
    search_seconds: float
    seconds: float
    searches: int = 1
    rule: dict = field(default_factory=dict)
    spent: dict = field(default_factory=dict)
    seed_summary: Optional[dict] = None  # sweep(seeds=[...]): mean +- std over seeds (eval.seeds)
    grid: dict = field(default_factory=dict)  # the grid that ran ({key: [values]})

    @property
    def configs(self) -> list:
        return [p.settings for p in self.points]

    def table(self) -> list:
        return [p.as_row() for p in self.points]

    def save(self, folder: str, arch: Optional[dict] = None, *, input_model: Optional[str] = None,
             forget_indices=None, **meta) -> str:
        """Write the chosen model as folder/model.safetensors, with the sweep's manifest in its
        header and beside it (folder/model.manifest.json), both atomically; returns the
        manifest's path.

        The manifest holds the chosen point's config and scores, the grid, every point's
        settings and scores, the Pareto front, the selection rule, what was spent and (with
        seeds) the summary over seeds. input_model / forget_indices add their SHA-256, as in
        UnlearnResult.save; meta (mean, std, dataset, ...) goes to the file's header.
        """
        os.makedirs(folder, exist_ok=True)
        record = run_record("sweep", self.model, self.config, input_model=input_model, forget_indices=forget_indices,
                            metrics=self.chosen.as_row(), grid=self.grid, points=self.table(),
                            front=[p.as_row() for p in self.front], rule=self.rule, spent=self.spent,
                            seed_summary=self.seed_summary, timings={"search": self.search_seconds,
                                                                     "total": self.seconds})
        return save_with_manifest(self.model, os.path.join(folder, "model.safetensors"), arch, record,
                                  config=self.config.to_dict(), **meta)
