"""How a fine-tune run ends early: stopped by its caller, or diverged."""

from __future__ import annotations

from fastunlearn.config import UnlearnConfig


class StopRun(Exception):
    """Raise from an on_step callback to stop a run; the last checkpoint stays on disk."""


class DivergedError(ValueError):
    """The fine-tune's loss or weights became non-finite: the run has no usable model."""


def diverged(config: UnlearnConfig, what: str) -> DivergedError:
    """The error for a run whose ``what`` (loss at epoch k, weights) is non-finite, naming the
    settings that most likely caused it."""
    likely = f"config.lr={config.lr!r}"
    if config.remain_reg > 0:
        likely += f" or config.remain_reg={config.remain_reg!r}"
    return DivergedError(f"the fine-tune diverged: {what} is not finite, so no model is returned or written; "
                         f"{likely} is the likely cause: lower it and run again")
