"""Resumable fine-tune checkpoints: what a run saves, how it is read back, and which config
changes a resume accepts."""

from __future__ import annotations

import os

import torch

from fastunlearn.config import UnlearnConfig
from fastunlearn.data import checkpoint as files
from fastunlearn.engine.search import SearchResult

CHECKPOINT_FORMAT = "fastunlearn-finetune-1"


# Config fields that do not change the numbers a run produces beyond float rounding (compile,
# fuse_batch_norm, and backend through the BatchNorm fusion, round differently); a checkpoint
# may be resumed with different values of these.
# recheck_margin only shapes the search, which the checkpoint carries.
RESUME_FREE = ("compile", "cuda_graph", "fuse_batch_norm", "search_compile", "backend", "search_batch_size",
                "recheck_margin")


def to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def search_to_dict(search: SearchResult) -> dict:
    return {"relabels": search.relabels, "success": search.success, "margin": search.margin,
            "targets": search.targets, "steps": search.steps, "rechecked": search.rechecked}


def search_from_dict(d: dict) -> SearchResult:
    return SearchResult(d["relabels"], d["success"], d["margin"], d["targets"], d["steps"], d.get("rechecked"))


def save_checkpoint(path: str, state: dict) -> None:
    files.atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"resume: {path} is not a fine-tune checkpoint (no '{CHECKPOINT_FORMAT}' format tag)")
    return state


def check_resumable(state: dict, config: UnlearnConfig, n: int) -> None:
    saved = {k: v for k, v in state["config"].items() if k not in RESUME_FREE}
    now = {k: v for k, v in config.to_dict().items() if k not in RESUME_FREE}
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ValueError("resume: the checkpoint was written with a different config ("
                         + ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff) + ")")
    if state["n"] != n:
        raise ValueError(f"resume: the checkpoint has a forget set of {state['n']} samples, this run {n}")
