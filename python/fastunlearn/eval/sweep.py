"""fu.sweep: a small grid of unlearning settings scored on a validation split.

The boundary search is the expensive, model-independent part: the frozen original does
not change while the grid runs. So each distinct search (the knobs that move the iterate:
eps, steps, gamma, lamda, noise, ...) runs once, with soft targets, and every relabel mode
is read off that one result:

    argmax             argmax of the softmax at the last iterate (the authors)
    nearest_incorrect  argmax over the classes other than the true one (Chen et al.)
    soft               the softmax itself
    soft_incorrect     the softmax with the true class removed, renormalised

Epochs cost nothing extra either: each fine-tune is one run, stopped at each epoch count the
grid names, scored, and resumed from its checkpoint (the learning rate is constant, so epoch
k of a long run is the k-epoch run). Successive halving (eval.halving) decides which runs go
on: all of them reach the smallest epoch count, the best ``keep`` fraction the next, and so on.

Selection (``select``): with ``target_forget_acc`` (partial-class forgetting, where a
retrained model still recognises most of the class), the point maximising
remain_acc - |forget_acc - target|; otherwise the best remain accuracy among the points
with forget_acc <= max_forget_acc, or, when none qualifies, the lowest forget accuracy.
``target_forget_acc="heldout"`` takes each point's own accuracy on held-out images of the
forgotten kind as its target: a model that never saw the forget images scores them like
any other unseen image of their class, so the forget accuracy should match what the same
model gets on unseen ones. A fixed target (the original model's held-out accuracy) misses
that the fine-tune moves both numbers. A point whose model gives non-finite outputs (a
diverged fine-tune) is never chosen while another point exists.
"""

from __future__ import annotations

import copy
import itertools
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from fastunlearn.compose import compose, finetune_on_remain
from fastunlearn.config import UnlearnConfig, recipe_epochs
from fastunlearn.data import validate
from fastunlearn.eval.halving import Budget, successive_halving
from fastunlearn.eval.metrics import accuracy, inference_copy, predict_logits
from fastunlearn.eval.seeds import sweep_over_seeds
from fastunlearn.eval.staged import SEARCH_KEYS as SEARCH_KEYS  # re-exported: part of this module's API
from fastunlearn.eval.staged import SWEEP_RELABELS, StagedRuns
from fastunlearn.eval.staged import derive_targets as derive_targets
from fastunlearn.eval.sweep_result import SweepPoint, SweepResult
from fastunlearn.head_refit import config_refit_
from fastunlearn.nn.frozen import frozen_copy
from fastunlearn.nn.models import head_of

BATCHNORM_MODES = ("train", "frozen")
COMPOSE_MODES = (None, "backbone", "head_ft", "full_ft")
# Keys of the grid; anything else is an UnlearnConfig field held fixed at ``base``.
GRID_KEYS = ("relabel", "gamma", "remain_reg", "remain_target", "lr", "epochs", "batchnorm", "compose")

# The default grid: UnlearnConfig.recommended()'s run (nearest_incorrect relabels, BatchNorm
# frozen, the remain term on the true labels at lr 3e-4, the recipe's epochs) at two remain
# weights, each run ending, like the recipe, with the head re-fit of the default base
# (UnlearnConfig.recommended()). Without "epochs" in grid= the epochs are the recipe's
# (config.recipe_epochs of the forget set's size and base.batch_size).
# bench/bench_recipe.py measured it against the previous default (soft_incorrect, remain_reg 3 /
# 10, epochs 1 / 2 / 4 by successive halving, no head re-fit) and against grids around it
# (bench/RESULTS.md): on whole classes every point it chose forgot the class (<= 0.2 %) and kept
# the retrain's remain accuracy within 1 point, where the previous default kept 7-20 % of the
# class on one case and lost 3-5 points of remain accuracy on two; remain_reg 10 won on about
# half the cases, 3 on the rest. Both relabel modes at remain_reg 3 did about as well at about
# the same cost; a halving over half and all of the recipe's epochs cost less but twice chose the
# half-trained point (9 % of a class kept; a subgroup 6 points from the retrain). Two recipe runs
# cost about two recipes.
DEFAULT_GRID = {
    "relabel": ["nearest_incorrect"],
    "gamma": [0.0],
    "remain_reg": [3.0, 10.0],
    "remain_target": ["labels"],
    "lr": [3e-4],
    "batchnorm": ["frozen"],
    "compose": [None],
}


def _key(p: SweepPoint, max_forget_acc: float, target_forget_acc):
    if p.diverged:
        return (float("-inf"),)
    if target_forget_acc == "heldout":
        if p.heldout_acc is None:
            raise ValueError(f"point {p.index} has no heldout_acc; target_forget_acc='heldout' needs one per point")
        target_forget_acc = p.heldout_acc
    if target_forget_acc is not None:
        return (p.remain_acc - abs(p.forget_acc - target_forget_acc), -p.forget_acc)
    if p.forget_acc <= max_forget_acc + 1e-12:
        return (1, p.remain_acc, -p.forget_acc)
    return (0, -p.forget_acc, p.remain_acc)


def select(points: Sequence[SweepPoint], max_forget_acc: float = 0.03,
           target_forget_acc: Union[None, float, str] = None) -> SweepPoint:
    """The point the sweep keeps (see the module docstring); ties go to the earlier point.

    target_forget_acc: None (the max_forget_acc rule), a fraction, or "heldout" (each
    point's own ``heldout_acc``).
    """
    if not points:
        raise ValueError("select: no points")
    best = points[0]
    for p in points[1:]:
        if _key(p, max_forget_acc, target_forget_acc) > _key(best, max_forget_acc, target_forget_acc):
            best = p
    return best


def pareto_front(points: Sequence[SweepPoint]) -> list:
    """Points no other point beats on both forget accuracy (lower) and remain accuracy (higher).

    Diverged points are left out.
    """
    points = [p for p in points if not p.diverged]
    front = []
    for p in points:
        dominated = any(q.forget_acc <= p.forget_acc and q.remain_acc >= p.remain_acc
                        and (q.forget_acc < p.forget_acc or q.remain_acc > p.remain_acc) for q in points)
        if not dominated:
            front.append(p)
    front.sort(key=lambda p: (p.forget_acc, -p.remain_acc))
    return front


# -------------------------------------------------------------- relabel modes
# ---------------------------------------------------------------- the sweep
def _grid(grid: Optional[dict], default_epochs: int) -> dict:
    """DEFAULT_GRID with ``grid``'s keys replaced, checked; epochs [default_epochs] unless given."""
    g = {k: list(v) for k, v in DEFAULT_GRID.items()}
    g["epochs"] = [default_epochs]
    if grid is not None:
        unknown = set(grid) - set(GRID_KEYS)
        if unknown:
            raise ValueError(f"grid keys must be among {GRID_KEYS}, got {sorted(unknown)}")
        for k, v in grid.items():
            v = list(v) if isinstance(v, (list, tuple)) else [v]
            if not v:
                raise ValueError(f"grid[{k!r}] is empty")
            g[k] = v
    for v in g["relabel"]:
        if v not in SWEEP_RELABELS:
            raise ValueError(f"grid['relabel'] values must be in {SWEEP_RELABELS}, got {v!r}")
    for v in g["batchnorm"]:
        if v not in BATCHNORM_MODES:
            raise ValueError(f"grid['batchnorm'] values must be in {BATCHNORM_MODES}, got {v!r}")
    for v in g["compose"]:
        if v not in COMPOSE_MODES:
            raise ValueError(f"grid['compose'] values must be in {COMPOSE_MODES}, got {v!r}")
    for v in g["epochs"]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"grid['epochs'] values must be integers >= 1, got {v!r}")
    return g


def _val_scores(model, fv, rv, hv, mean, std, dev):
    """(forget acc, remain acc, held-out acc or None, diverged) of ``model``."""
    sets = (fv, rv) if hv is None else (fv, rv, hv)
    net = inference_copy(model, dev)
    logits = [predict_logits(net, d[0], mean, std, device=dev) for d in sets]
    # NaN logits argmax to an arbitrary class and can look like perfect forgetting.
    diverged = not all(bool(torch.isfinite(lg).all()) for lg in logits)
    fa, ra = accuracy(logits[0], fv[1]), accuracy(logits[1], rv[1])
    ha = accuracy(logits[2], hv[1]) if hv is not None else None
    return fa, ra, ha, diverged


def sweep(model: nn.Module, forget, remain, val=None, *, max_forget_acc: float = 0.03,
          target_forget_acc: Union[None, float, str] = None, heldout=None, grid: Optional[dict] = None,
          base: Optional[UnlearnConfig] = None, mean=None, std=None, device=None, head_ft_epochs: int = 1,
          head_ft_lr: float = 1e-2, head_ft_samples: Optional[int] = None, progress: bool = False,
          log=None, budget: Union[None, float, dict, Budget] = None, keep: float = 1 / 3,
          seeds: Optional[Sequence[int]] = None) -> SweepResult:
    """Run a grid of unlearning settings on ``model`` and keep the best on the validation split.

    forget / remain: (x, y) pairs or Datasets, as in fu.unlearn. val: (forget_val, remain_val),
    each a pair or Dataset, held out from the fine-tune; None scores on forget / remain
    themselves. max_forget_acc / target_forget_acc: the selection rule (module docstring).
    heldout: (x, y) or a Dataset of images like the forget set that the model never trained
    on (for part of a class: validation images of that class). Each point is scored on it
    (``heldout_acc``) and the rule becomes target_forget_acc="heldout", the default when
    heldout is given.
    grid: {key: [values]} overriding DEFAULT_GRID for keys in GRID_KEYS:
      relabel        argmax | nearest_incorrect | soft | soft_incorrect
      gamma, remain_reg, remain_target, lr, epochs    as in UnlearnConfig
      batchnorm      "train" (the loop's default) | "frozen" (running statistics used, kept)
      compose        None | "backbone" (original backbone + this run's head) |
                     "head_ft" (this run's model, head fine-tuned on remain, backbone frozen) |
                     "full_ft" (this run's model, all of it fine-tuned on remain with its labels)
    base: the UnlearnConfig the other fields come from (default: UnlearnConfig.recommended(), so
    eps 0.1, FGSM, batch 64, and each run ends with its head re-fit, as fu.unlearn's would;
    head_refit_epochs=0 turns that off). Without "epochs" in grid, the recipe's epochs
    (config.recipe_epochs) for the forget set's size and base.batch_size.
    head_ft_epochs / head_ft_lr / head_ft_samples: the remain fine-tune of "head_ft" and "full_ft",
    on at most head_ft_samples remain images (a seeded subset; None: all).
    log: optional callable(str) told about each point.
    budget / keep: the fine-tunes run by successive halving (eval.halving) over the grid's
    epoch counts: every run is trained to the smallest, scored, and only the best ``keep``
    fraction is continued (from where it stopped) to the next; keep=1 runs every point. budget:
    seconds (a number) or {"seconds": s, "work": w}, w counted in fine-tune epochs. The
    composition points are made only for the un-composed snapshots on the Pareto front (and the
    best one). ``res.spent`` says what ran: fine-tune epochs, runs per rung, seconds.
    seeds: run the sweep once per seed (base.seed = each); the first seed's result comes back
    with ``seed_summary`` holding mean +- std over the seeds (eval.seeds.sweep_over_seeds).
    """
    if seeds is not None:
        b = UnlearnConfig.recommended() if base is None else base
        return sweep_over_seeds(lambda s: sweep(
            model, forget, remain, val, max_forget_acc=max_forget_acc, target_forget_acc=target_forget_acc,
            heldout=heldout, grid=grid, base=b.replace(seed=s), mean=mean, std=std, device=device,
            head_ft_epochs=head_ft_epochs, head_ft_lr=head_ft_lr, head_ft_samples=head_ft_samples, progress=progress,
            log=log, budget=budget, keep=keep), seeds)
    t_start = time.perf_counter()
    validate.check_model(model)
    validate.check_distinct(forget, remain)
    if not 0 <= max_forget_acc <= 1:
        raise ValueError(f"max_forget_acc must be in [0, 1], got {max_forget_acc!r}")
    budget = Budget.of(budget)
    target_forget_acc = _selection_target(target_forget_acc, heldout)
    base = UnlearnConfig.recommended() if base is None else base
    if not isinstance(base, UnlearnConfig):
        raise TypeError(f"base must be an UnlearnConfig, got {type(base).__name__}")
    inputs = _Inputs.of(model, forget, remain, val, heldout, mean, std, device, head_ft_samples, base.seed)
    g = _grid(grid, recipe_epochs(len(inputs.fy), base.batch_size))
    run = _Sweep(model, inputs, g, base, (max_forget_acc, target_forget_acc), log, (head_ft_epochs, head_ft_lr),
                 progress)
    halving, search_seconds = run.run(keep, budget)
    return run.result(halving, search_seconds, keep, t_start)


def _selection_target(target_forget_acc, heldout):
    """target_forget_acc checked against heldout; "heldout" when heldout is given without one."""
    if heldout is not None and target_forget_acc is None:
        target_forget_acc = "heldout"
    if isinstance(target_forget_acc, str):
        if target_forget_acc != "heldout":
            raise ValueError(f"target_forget_acc must be None, a fraction or 'heldout', got {target_forget_acc!r}")
        if heldout is None:
            raise ValueError("target_forget_acc='heldout' needs heldout=(x, y): unseen images like the forget set")
    elif target_forget_acc is not None:
        if heldout is not None:
            raise ValueError("give either heldout (each point's own target) or a fixed target_forget_acc, not both")
        if isinstance(target_forget_acc, bool) or not 0 <= target_forget_acc <= 1:
            raise ValueError(f"target_forget_acc must be None, 'heldout' or in [0, 1], got {target_forget_acc!r}")
    return target_forget_acc


@dataclass(frozen=True)
class _Inputs:
    """The sweep's data, checked: the fine-tune sets, the scoring sets, the head re-fit's set."""
    fx: torch.Tensor
    fy: torch.Tensor
    rx: torch.Tensor
    ry: torch.Tensor
    fv: tuple  # scored forget set
    rv: tuple  # scored remain set
    hv: Optional[tuple]  # held-out images of the forgotten kind, or None
    hx: torch.Tensor  # the remain images the head_ft / full_ft re-fit trains on
    hy: torch.Tensor
    dev: torch.device
    mean: object
    std: object

    @classmethod
    def of(cls, model, forget, remain, val, heldout, mean, std, device, head_ft_samples, seed) -> "_Inputs":
        fx, fy = validate.pair(forget, "forget")
        rx, ry = validate.pair(remain, "remain")
        validate.check_same_data(fx, rx)
        if val is None:
            fv, rv = (fx, fy), (rx, ry)
        else:
            if not isinstance(val, (tuple, list)) or len(val) != 2:
                raise ValueError("val must be (forget_val, remain_val), each an (x, y) pair or a Dataset")
            fv, rv = validate.pair(val[0], "forget_val"), validate.pair(val[1], "remain_val")
        hv = None if heldout is None else validate.pair(heldout, "heldout")
        dev = validate.check_devices(model, device, forget=fx, remain=rx)
        mean_t, std_t = validate.mean_std(mean, std, fx.shape[1])
        hx, hy = rx, ry
        if head_ft_samples is not None and head_ft_samples < rx.shape[0]:
            pick = torch.randperm(rx.shape[0], generator=torch.Generator().manual_seed(seed))[:head_ft_samples]
            hx, hy = rx[pick], ry[pick]
        return cls(fx=fx, fy=fy, rx=rx, ry=ry, fv=fv, rv=rv, hv=hv, hx=hx, hy=hy, dev=dev, mean=mean_t, std=std_t)

    def scores(self, model):
        """(forget acc, remain acc, held-out acc or None, diverged) of ``model``."""
        return _val_scores(model, self.fv, self.rv, self.hv, self.mean, self.std, self.dev)


def _runs(g: dict) -> list:
    """The grid's distinct fine-tunes (every setting but epochs and compose)."""
    outer = [dict(zip(("gamma", "relabel", "remain_reg", "remain_target", "lr", "batchnorm"), v)) for v in
             itertools.product(g["gamma"], g["relabel"], g["remain_reg"], g["remain_target"], g["lr"], g["batchnorm"])]
    # remain_target only matters with a remain term; drop the duplicates it would create.
    seen, runs = set(), []
    for o in outer:
        if o["remain_reg"] == 0:
            o["remain_target"] = "labels"
        key = tuple(sorted(o.items()))
        if key not in seen:
            seen.add(key)
            runs.append(o)
    return runs


class _Sweep:
    """One sweep: its inputs, the runs, the points scored so far and the best of them."""

    def __init__(self, model, inputs: _Inputs, g: dict, base: UnlearnConfig, rule: tuple, log, head_ft: tuple,
                 progress: bool):
        self.model, self.inputs, self.g, self.base, self.log, self.progress = model, inputs, g, base, log, progress
        self.max_forget_acc, self.target_forget_acc = rule
        self.head_ft_epochs, self.head_ft_lr = head_ft
        self.frozen = frozen_copy(model, inputs.dev)
        self.head_name = head_of(model)[0] if any(c is not None for c in g["compose"]) else None
        self.searches: dict = {}
        self.points: list = []
        self.best, self.best_state = None, None
        self.runs = _runs(g)
        self.rungs = sorted(set(g["epochs"]))
        self.composes = [c for c in g["compose"] if c is not None]
        self.held: dict = {}  # (run, epochs) -> (point, model) of the un-composed snapshots
        self.staged: Optional[StagedRuns] = None

    def key(self, p: SweepPoint):
        return _key(p, self.max_forget_acc, self.target_forget_acc)

    def consider(self, p: SweepPoint, m: nn.Module) -> None:
        """Record a scored point; keep a copy of its model when it is the best so far."""
        self.points.append(p)
        if self.log is not None:
            held = "" if p.heldout_acc is None else f", held-out {100 * p.heldout_acc:.2f}%"
            self.log(f"[{p.index}] {p.settings} -> forget {100 * p.forget_acc:.2f}%, remain "
                     f"{100 * p.remain_acc:.2f}%{held}{' (diverged)' if p.diverged else ''} ({p.seconds:.1f}s)")
        if self.best is None or self.key(p) > self.key(self.best):
            self.best, self.best_state = p, copy.deepcopy(m).cpu()

    def composed(self, o: dict, ep: int, m: nn.Module, secs: float) -> None:
        """Score the grid's compositions of a snapshot m (run o at ep epochs)."""
        inp = self.inputs
        for mode in self.composes:
            t0 = time.perf_counter()
            if mode == "backbone":
                out = compose(self.model, m, head_name=self.head_name).to(inp.dev)
            else:
                out = finetune_on_remain(copy.deepcopy(m), self.head_name, inp.hx, inp.hy,
                                         "head" if mode == "head_ft" else "full", self.head_ft_epochs,
                                         self.head_ft_lr, 128, inp.mean, inp.std, inp.dev, self.base.seed,
                                         self.progress)
            fa, ra, ha, diverged = inp.scores(out)
            self.consider(SweepPoint(dict(o, epochs=ep, compose=mode), fa, ra, secs + time.perf_counter() - t0,
                                     len(self.points), ha, diverged), out)

    def advance(self, i: int, ep: int):
        """Run i on to ep epochs and score it (successive halving's callback): its selection key."""
        m, secs = self.staged.advance(i, ep)
        if self.base.head_refit_epochs and i not in self.staged.diverged:
            # The run ends as fu.unlearn ends it with this config: with the head re-fit.
            t0 = time.perf_counter()
            inp = self.inputs
            m = config_refit_(m, self.base, (inp.fx, inp.fy), self.staged.search(self.staged.config(self.runs[i])),
                              (inp.rx, inp.ry), mean=inp.mean, std=inp.std, device=inp.dev, progress=self.progress)
            secs += time.perf_counter() - t0
        fa, ra, ha, diverged = self.inputs.scores(m)
        p = SweepPoint(dict(self.runs[i], epochs=ep, compose=None), fa, ra, secs, len(self.points), ha,
                       diverged or i in self.staged.diverged)
        if None in self.g["compose"]:
            self.consider(p, m)
            if self.composes:
                self.held[(i, ep)] = (p, m)
        else:  # only the composed points are candidates: compose every snapshot
            self.composed(self.runs[i], ep, m, secs)
        return self.key(p)

    def run(self, keep: float, budget: Budget):
        """The fine-tunes by successive halving, then the compositions. Returns (halving, search seconds)."""
        inp = self.inputs
        with tempfile.TemporaryDirectory(prefix="fastunlearn-sweep-") as tmp:
            self.staged = StagedRuns(self.runs, self.base, self.model, self.frozen, inp.fx, inp.fy, (inp.rx, inp.ry),
                                     inp.mean, inp.std, inp.dev, max(self.g["epochs"]), self.rungs, tmp,
                                     self.progress, self.searches)
            halving = successive_halving(range(len(self.runs)), self.rungs, self.advance, keep=keep, budget=budget)
            search_seconds = self.staged.search_seconds
        if None in self.g["compose"] and self.composes:
            # The head re-fit only for snapshots on the front: a dominated one cannot beat them on both.
            on_front = {id(p) for p in pareto_front([p for p, _ in self.held.values()])}
            for (i, ep), (p, m) in self.held.items():
                if id(p) in on_front or p is self.best:
                    self.composed(self.runs[i], ep, m, p.seconds)
        return halving, search_seconds

    def result(self, halving, search_seconds: float, keep: float, t_start: float) -> SweepResult:
        runs, rungs = self.runs, self.rungs
        spent = {"fine_tune_epochs": halving.work, "runs": len(runs), "rungs": rungs, "keep": keep,
                 "stopped_by_budget": halving.stopped_by_budget,
                 "runs_per_rung": [sum(halving.reached(i) >= r for i in range(len(runs))) for r in rungs]}
        chosen = self.best
        s = chosen.settings
        cfg = self.base.replace(gamma=float(s["gamma"]), relabel=s["relabel"] if s["relabel"] in
                                ("argmax", "nearest_incorrect", "soft") else "soft",
                                remain_reg=float(s["remain_reg"]), remain_target=s["remain_target"],
                                lr=float(s["lr"]), epochs=int(s["epochs"]), batchnorm=s["batchnorm"])
        spent["seconds"] = time.perf_counter() - t_start
        return SweepResult(self.best_state.to(self.inputs.dev).eval(), chosen, cfg, self.points,
                           pareto_front(self.points), search_seconds, spent["seconds"], len(self.searches),
                           {"max_forget_acc": self.max_forget_acc, "target_forget_acc": self.target_forget_acc},
                           spent, grid=self.g)


def apply(model: nn.Module, forget, remain, settings: dict, *, base: Optional[UnlearnConfig] = None, mean=None,
          std=None, device=None, head_ft_epochs: int = 1, head_ft_lr: float = 1e-2,
          head_ft_samples: Optional[int] = None, progress: bool = False):
    """Run one sweep point's settings on (forget, remain): (model, seconds).

    The path the sweep takes for a single point, so a setting chosen on one split can be rerun
    on another. Missing keys take the plain method's values (nearest_incorrect, no remain
    term, base lr / epochs, BatchNorm as the loop leaves it, no composition). seconds: the
    search plus the fine-tune (and composition), scoring excluded.
    """
    base = UnlearnConfig() if base is None else base
    unknown = set(settings) - set(GRID_KEYS)
    if unknown:
        raise ValueError(f"settings keys must be among {GRID_KEYS}, got {sorted(unknown)}")
    one = {"relabel": "nearest_incorrect", "gamma": base.gamma, "remain_reg": base.remain_reg,
           "remain_target": base.remain_target, "lr": base.lr, "epochs": base.epochs, "batchnorm": "train",
           "compose": None}
    one.update(settings)
    res = sweep(model, forget, remain, None, max_forget_acc=1.0, grid={k: [v] for k, v in one.items()}, base=base,
                mean=mean, std=std, device=device, head_ft_epochs=head_ft_epochs, head_ft_lr=head_ft_lr,
                head_ft_samples=head_ft_samples, progress=progress, keep=1.0)
    return res.model, res.search_seconds + res.chosen.seconds
