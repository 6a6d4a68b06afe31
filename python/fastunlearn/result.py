"""UnlearnResult: what an unlearning run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn.config import UnlearnConfig
from fastunlearn.data.provenance import result_record, save_with_manifest
from fastunlearn.engine.distributed import is_main
from fastunlearn.engine.search import SearchResult


@dataclass
class UnlearnResult:
    """What fu.unlearn returns. The input model is untouched; ``model`` is a new one.

    relabels, success   (N,) labels and crossing flags of the first search refresh.
    search              every refresh (SearchResult), with margins and steps taken.
    seconds             wall time of the whole call; ``timings`` splits it (seconds of search,
                        finetune, compile, setup, tune, total) and says in ``timings["tuned"]``
                        how the speed settings were chosen: {"source": explicit | cache | measured |
                        default (job too small to tune) | off (...), "seconds", "settings"}.
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

    def save(self, path: str, arch: Optional[dict] = None, *, input_model: Optional[str] = None,
             forget_indices=None, metrics: Optional[dict] = None, provenance: Optional[dict] = None,
             **meta) -> Optional[str]:
        """Write the model as .safetensors with its run manifest in the header and as JSON beside
        it (x.safetensors -> x.manifest.json), both atomically; returns the manifest's path.

        The manifest holds the config, seeds, counts, timings and software; input_model (the
        file the model was loaded from), forget_indices (the forget set's indices in the
        training set) and metrics add the SHA-256 of each and the scores, so that
        ``fastunlearn verify --manifest`` can check them later. provenance: further manifest
        entries (data, forget, parents, ...), replacing those of the same name.

        Under torch.distributed only rank 0 writes (every rank holds the same model); the
        others return None at once, so wait on a barrier before another rank reads the file.
        """
        if not is_main():
            return None
        record = result_record(self, input_model=input_model, forget_indices=forget_indices, metrics=metrics,
                               **(provenance or {}))
        return save_with_manifest(self.model, path, arch, record, config=self.config.to_dict(), **meta)
