"""UnlearnResult: what an unlearning run returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn.config import UnlearnConfig
from fastunlearn.data.checkpoint import save_model
from fastunlearn.engine.distributed import is_main
from fastunlearn.engine.search import SearchResult


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
        if not is_main():
            return
        save_model(self.model, path, arch, config=self.config.to_dict(), **meta)
