"""Successive halving: run every candidate a little, keep the best fraction, run those further.

A pure scheduler, with no knowledge of models: the caller gives the candidates, the resource
of each rung (for the sweep, fine-tune epochs: rung k runs every survivor up to
``rungs[k]``), and ``advance(candidate, resource) -> score``, which brings a candidate to
``resource`` and scores it (a higher score is better; any comparable value, e.g. a tuple).
After each rung the best ``keep`` fraction (at least one) goes on to the next.

Budget: ``Budget(seconds=..., work=...)``. Work is counted in resource units actually run
(a candidate moved from resource 1 to 4 costs 3). Before each step the scheduler checks that
the step fits what is left: work exactly, seconds by the mean seconds per work unit measured
so far (so a seconds budget can be overrun by at most one step's misestimate). When the next
step does not fit, the rung stops there; the survivors are ranked on the deepest rung that
every one of them reached, and a candidate that reached a deeper rung than another wins over
it (it was kept by a rung the other never ran).

The chosen candidate equals the one a full run of every candidate to the last rung would pick
whenever the candidates' order does not change between rungs; the halving is a bet that it
changes little, and ``keep`` sets how much it hedges.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional, Sequence, Union


@dataclass(frozen=True)
class Budget:
    """Spending limits: wall seconds and / or work units (None: no limit)."""

    seconds: Optional[float] = None
    work: Optional[float] = None

    def __post_init__(self):
        for name in ("seconds", "work"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise ValueError(f"Budget.{name} must be None or a number > 0, got {v!r}")

    @classmethod
    def of(cls, budget) -> "Budget":
        """None, a number (seconds), a dict {"seconds": s, "work": w} or a Budget."""
        if budget is None:
            return cls()
        if isinstance(budget, Budget):
            return budget
        if isinstance(budget, dict):
            unknown = set(budget) - {"seconds", "work"}
            if unknown:
                raise ValueError(f"budget keys must be 'seconds' and / or 'work', got {sorted(unknown)}")
            return cls(**budget)
        if isinstance(budget, (int, float)) and not isinstance(budget, bool):
            return cls(seconds=float(budget))
        raise TypeError(f"budget must be None, seconds (a number), a dict or a Budget, got {type(budget).__name__}")


@dataclass
class HalvingResult:
    """What the scheduler did. scores[c] = {resource: score} for every rung c ran."""

    chosen: Hashable
    scores: dict
    rungs: list
    survivors: list = field(default_factory=list)
    work: float = 0.0
    seconds: float = 0.0
    stopped_by_budget: bool = False

    def reached(self, c) -> float:
        """The largest resource candidate c was run to (0 when never run)."""
        return max(self.scores.get(c, {}), default=0)


def check_rungs(rungs: Sequence[float]) -> list:
    rungs = list(rungs)
    if not rungs:
        raise ValueError("rungs must name at least one resource")
    for a in rungs:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
            raise ValueError(f"rungs must be numbers > 0, got {a!r}")
    if any(b <= a for a, b in zip(rungs, rungs[1:], strict=False)):
        raise ValueError(f"rungs must increase strictly, got {rungs}")
    return rungs


def successive_halving(candidates: Sequence[Hashable], rungs: Sequence[float],
                       advance: Callable[[Hashable, float], object], *, keep: float = 1 / 3,
                       budget: Union[None, float, dict, Budget] = None,
                       clock: Callable[[], float] = time.perf_counter) -> HalvingResult:
    """Run ``candidates`` through ``rungs`` (module docstring); returns a HalvingResult.

    keep: the fraction of a rung's candidates that go on, in (0, 1]; 1 runs every candidate
    to the end (a full sweep in the same bookkeeping). clock: the time source (for tests).
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError("successive_halving: no candidates")
    if len(set(candidates)) != len(candidates):
        raise ValueError("successive_halving: candidates must be distinct")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    rungs = check_rungs(rungs)
    limit = Budget.of(budget)
    res = HalvingResult(candidates[0], {c: {} for c in candidates}, rungs)
    t0 = clock()
    alive = candidates
    for depth, resource in enumerate(rungs):
        ran = []
        for c in alive:
            step = resource - res.reached(c)
            if not _fits(limit, res, step, clock() - t0):
                res.stopped_by_budget = True
                break
            res.scores[c][resource] = advance(c, resource)
            res.work += step
            res.seconds = clock() - t0
            ran.append(c)
        if not ran:
            break
        ran.sort(key=lambda c: res.scores[c][resource], reverse=True)  # stable: ties keep the input order
        alive = ran if depth == len(rungs) - 1 else ran[:max(1, math.floor(len(ran) * keep + 1e-9))]
        if res.stopped_by_budget:
            break
    res.survivors = alive
    res.chosen = _best(res, candidates)
    res.seconds = clock() - t0
    return res


def _fits(limit: Budget, res: HalvingResult, step: float, elapsed: float) -> bool:
    if limit.work is not None and res.work + step > limit.work + 1e-9:
        return False
    if limit.seconds is not None:
        per_unit = elapsed / res.work if res.work > 0 else 0.0
        if elapsed + per_unit * step > limit.seconds:
            return False
    return True


def _best(res: HalvingResult, order: list):
    """The candidate run deepest, best on its last rung; the first one on ties."""
    ran = [c for c in order if res.scores[c]]
    if not ran:
        raise RuntimeError("the budget did not allow a single step; give a larger budget")
    deepest = max(res.reached(c) for c in ran)
    top = [c for c in ran if res.reached(c) == deepest]
    best = top[0]
    for c in top[1:]:
        if res.scores[c][deepest] > res.scores[best][deepest]:
            best = c
    return best
