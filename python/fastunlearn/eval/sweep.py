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
import os
import tempfile
import time
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from fastunlearn.compose import compose, finetune_on_remain, strip_frozen_batchnorm
from fastunlearn.config import UnlearnConfig
from fastunlearn.data import validate
from fastunlearn.engine.finetune import DivergedError, FinetuneEngine
from fastunlearn.engine.search import SearchResult, run_search
from fastunlearn.eval.halving import Budget, successive_halving
from fastunlearn.eval.metrics import accuracy, inference_copy, predict_logits
from fastunlearn.eval.seeds import sweep_over_seeds
from fastunlearn.eval.sweep_result import SweepPoint, SweepResult
from fastunlearn.nn.frozen import frozen_copy
from fastunlearn.nn.models import head_of

SWEEP_RELABELS = ("argmax", "nearest_incorrect", "soft", "soft_incorrect")
BATCHNORM_MODES = ("train", "frozen")
COMPOSE_MODES = (None, "backbone", "head_ft", "full_ft")
# Keys of the grid; anything else is an UnlearnConfig field held fixed at ``base``.
GRID_KEYS = ("relabel", "gamma", "remain_reg", "remain_target", "lr", "epochs", "batchnorm", "compose")
SEARCH_KEYS = ("eps", "steps", "alpha", "gamma", "lamda", "noise", "lamda_schedule", "quantize", "early_exit",
               "random_start", "seed", "precision", "backend", "recheck_margin", "search_compile")

# The neighbourhood of UnlearnConfig.recommended() that bench/study_recipe.py found worth
# searching: frozen BatchNorm won everywhere; the relabel mode and the remain target changed
# places between models; remain_reg 10 won on most models but made a weak one collapse, where 3
# did not (lr 1e-3 made more models collapse and is left out). With BatchNorm frozen the head
# re-fit (compose="head_ft") rarely helped, and its pass over the remain set costs more than a
# fine-tune epoch: it is left to grid=.
DEFAULT_GRID = {
    "relabel": ["nearest_incorrect", "soft_incorrect"],
    "gamma": [0.0],
    "remain_reg": [3.0, 10.0],
    "remain_target": ["labels", "distill"],
    "lr": [3e-4],
    "epochs": [1, 2, 4],
    "batchnorm": ["frozen"],
    "compose": [None],
}


# ----------------------------------------------------------------- selection
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


# ---------------------------------------------------------------- the sweep
def _grid(grid: Optional[dict]) -> dict:
    g = {k: list(v) for k, v in DEFAULT_GRID.items()}
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
    base: the UnlearnConfig the other fields come from (default: eps 0.1, FGSM, batch 64).
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
        b = UnlearnConfig() if base is None else base
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
    base = UnlearnConfig() if base is None else base
    if not isinstance(base, UnlearnConfig):
        raise TypeError(f"base must be an UnlearnConfig, got {type(base).__name__}")
    g = _grid(grid)
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
    frozen = frozen_copy(model, dev)

    head_name = head_of(model)[0] if any(c is not None for c in g["compose"]) else None

    hx, hy = rx, ry
    if head_ft_samples is not None and head_ft_samples < rx.shape[0]:
        pick = torch.randperm(rx.shape[0], generator=torch.Generator().manual_seed(base.seed))[:head_ft_samples]
        hx, hy = rx[pick], ry[pick]
    max_epochs = max(g["epochs"])
    searches, search_seconds = {}, 0.0
    points: list = []
    best, best_state = None, None

    def consider(p: SweepPoint, m: nn.Module):
        nonlocal best, best_state
        points.append(p)
        if log is not None:
            held = "" if p.heldout_acc is None else f", held-out {100 * p.heldout_acc:.2f}%"
            log(f"[{p.index}] {p.settings} -> forget {100 * p.forget_acc:.2f}%, remain {100 * p.remain_acc:.2f}%"
                f"{held}{' (diverged)' if p.diverged else ''} ({p.seconds:.1f}s)")
        if best is None or _key(p, max_forget_acc, target_forget_acc) > _key(best, max_forget_acc,
                                                                              target_forget_acc):
            best, best_state = p, copy.deepcopy(m).cpu()

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

    rungs = sorted(set(g["epochs"]))
    composes = [c for c in g["compose"] if c is not None]
    held = {}  # (run, epochs) -> (point, model) of the un-composed snapshots

    def composed(o, ep, m, secs):
        for mode in composes:
            t0 = time.perf_counter()
            if mode == "backbone":
                out = compose(model, m, head_name=head_name).to(dev)
            else:
                out = finetune_on_remain(copy.deepcopy(m), head_name, hx, hy, "head" if mode == "head_ft" else "full",
                                          head_ft_epochs, head_ft_lr, 128, mean_t, std_t, dev, base.seed, progress)
            fa, ra, ha, diverged = _val_scores(out, fv, rv, hv, mean_t, std_t, dev)
            consider(SweepPoint(dict(o, epochs=ep, compose=mode), fa, ra, secs + time.perf_counter() - t0,
                                len(points), ha, diverged), out)

    with tempfile.TemporaryDirectory(prefix="fastunlearn-sweep-") as tmp:
        staged = _StagedRuns(runs, base, model, frozen, fx, fy, (rx, ry), mean_t, std_t, dev, max_epochs, rungs, tmp,
                             progress, searches)

        def advance(i, ep):
            m, secs = staged.advance(i, ep)
            fa, ra, ha, diverged = _val_scores(m, fv, rv, hv, mean_t, std_t, dev)
            p = SweepPoint(dict(runs[i], epochs=ep, compose=None), fa, ra, secs, len(points), ha,
                           diverged or i in staged.diverged)
            if None in g["compose"]:
                consider(p, m)
                if composes:
                    held[(i, ep)] = (p, m)
            else:  # only the composed points are candidates: compose every snapshot
                composed(runs[i], ep, m, secs)
            return _key(p, max_forget_acc, target_forget_acc)

        halving = successive_halving(range(len(runs)), rungs, advance, keep=keep, budget=budget)
        search_seconds = staged.search_seconds
    if None in g["compose"] and composes:
        # The head re-fit only for snapshots on the front: a dominated one cannot beat them on both.
        on_front = {id(p) for p in pareto_front([p for p, _ in held.values()])}
        for (i, ep), (p, m) in held.items():
            if id(p) in on_front or p is best:
                composed(runs[i], ep, m, p.seconds)
    spent = {"fine_tune_epochs": halving.work, "runs": len(runs), "rungs": rungs, "keep": keep,
             "stopped_by_budget": halving.stopped_by_budget,
             "runs_per_rung": [sum(halving.reached(i) >= r for i in range(len(runs))) for r in rungs]}
    chosen = best
    s = chosen.settings
    cfg = base.replace(gamma=float(s["gamma"]), relabel=s["relabel"] if s["relabel"] in
                       ("argmax", "nearest_incorrect", "soft") else "soft", remain_reg=float(s["remain_reg"]),
                       remain_target=s["remain_target"], lr=float(s["lr"]), epochs=int(s["epochs"]),
                       batchnorm=s["batchnorm"])
    spent["seconds"] = time.perf_counter() - t_start
    return SweepResult(best_state.to(dev).eval(), chosen, cfg, points, pareto_front(points), search_seconds,
                       spent["seconds"], len(searches),
                       {"max_forget_acc": max_forget_acc, "target_forget_acc": target_forget_acc}, spent, grid=g)


class _StagedRuns:
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
        engine = FinetuneEngine(trainable, cfg, mean=self.mean, std=self.std, device=self.dev, teacher=self.frozen)
        per_epoch = -(-self.fx.shape[0] // cfg.batch_size)
        try:
            engine.run(self.fx, search, self.remain, progress=self.progress, checkpoint_dir=folder,
                       # One checkpoint, where this call stops (the first multiple of its step count
                       # past the resumed step); none after the last rung.
                       checkpoint_every=0 if epochs == self.last else per_epoch * epochs,
                       max_steps=epochs * per_epoch,
                       resume=os.path.join(folder, "checkpoint.pt") if reached else None)
        except DivergedError:  # the fine-tune stopped at a non-finite loss or weight
            self.diverged[i] = (strip_frozen_batchnorm(copy.deepcopy(engine.model)).eval(),
                                seconds + time.perf_counter() - t0)
            return self.diverged[i]
        seconds += time.perf_counter() - t0
        self.state[i] = (folder, epochs, seconds)
        return strip_frozen_batchnorm(copy.deepcopy(engine.model)).eval(), seconds


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
