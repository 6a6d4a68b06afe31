"""The boundary search engine: Algorithm 1 on a frozen copy, in big chunks, one forward per step.

Per chunk of the forget set, each step t does one forward of the frozen model on the
samples still searching. ``relabel_check`` on its logits gives both the boundary check of
iterate t (early exit) and dlogits = softmax - onehot(y), which seeds the input-only
backward for step t. ``boundary_step`` then moves the iterate. A last forward checks
u_T. So T steps cost T forward+backward passes plus one forward, on the active samples
only, and no weight gradient is ever computed.

The noise of sample i at (refresh r, step t) comes from a fixed block of Philox counters
(``reference.noise_offset``), so labels do not depend on the chunk size, on the order in
which chunks run, or on which other samples have already stopped.

In bf16 (or fp16) a sample can end with another label than in fp32, for two reasons. The
logits of a check carry a rounding error of a few units of the dtype's resolution times the
largest logit, which flips near-ties. More often, the rounding error of the input gradient
(cancellation in the backward, and softmax - onehot taken from rounded logits) flips the
sign of its small components: on 28x28 FashionMNIST about 20 of the 784 pixels of every
sample step the other way, which moves the iterate and with it the last logits. Counting
near-zero gradient components cannot single out the samples this matters for, since every
sample has some; how close the search's decisions came to going the other way can. So
each sample keeps the smallest gap of any decision it went through (the relabel, its
success flag, every early-exit check; see ``decision_gap``) and the length of its logit
path, and when the gap is within recheck_margin times the rounding noise those decisions
had (``Doubt.unsure``) the sample is searched again in fp32 and its results replaced. The
noise is keyed by sample index, so a redone sample gets the fp32 search's results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn import reference
from fastunlearn.config import UnlearnConfig
from fastunlearn.data.pixels import Normalizer, as_pixels
from fastunlearn.data.source import ImageSource
from fastunlearn.data.validate import resolve_device
from fastunlearn.engine import compat
from fastunlearn.engine.recheck import Doubt
from fastunlearn.nn.frozen import compiled, frozen_copy
from fastunlearn.nn.layout import channels_last_input, model_is_channels_last
from fastunlearn.ops import boundary_step, relabel_check
from fastunlearn.runtime.heap import reuse_freed_memory
from fastunlearn.runtime.phases import phase
from fastunlearn.runtime.precision import resolve_precision, small_search_in_fp32, strict_fp32
from fastunlearn.runtime.progress import progress_bar


@dataclasses.dataclass
class SearchResult:
    """O(N) outputs of a search (rows follow the forget set's order).

    relabels   (R, N) int64 new labels, one row per refresh.
    success    (R, N) bool, the iterate crossed the boundary (argmax != y).
    margin     (R, N) float32, logit[y] - best other logit at the final iterate.
    targets    (R, N, K) float32 soft / top-k targets, or None for hard relabel modes.
    steps      (R, N) int16, the inner steps each sample took before it stopped.
    rechecked  (R, N) bool, the samples a bf16 / fp16 search redid in fp32; None when the
               search ran in fp32 or with recheck_margin = 0.
    """

    relabels: torch.Tensor
    success: torch.Tensor
    margin: torch.Tensor
    targets: Optional[torch.Tensor]
    steps: torch.Tensor
    rechecked: Optional[torch.Tensor] = None

    @property
    def refreshes(self) -> int:
        return self.relabels.shape[0]

    def train_targets(self, refresh: int) -> torch.Tensor:
        """What the fine-tune fits for one refresh: soft targets when the mode has them."""
        return self.targets[refresh] if self.targets is not None else self.relabels[refresh]


# Samples per CPU search chunk: past ~128 the activations fall out of cache (measured slower
# at 512); fastunlearn.autotune also times half and twice this on the user's model.
CPU_SEARCH_CHUNK = 128


def _chunk_size(frozen: nn.Module, norm, sample: torch.Tensor, device: torch.device, requested: Optional[int],
                autocast: Optional[torch.dtype] = None) -> int:
    """Samples per search chunk. sample: a few rows of the forget set as they arrive (uint8
    or float pixels), converted only when the measuring pass runs."""
    if requested:
        return requested
    if device.type != "cuda":
        return CPU_SEARCH_CHUNK
    free, _ = torch.cuda.mem_get_info(device)
    # Measured once per frozen copy, sample shape and precision (kept with the copy: a warm
    # session's revisions and a sweep's searches skip the measuring pass), scaled to half
    # the free memory; a chunk that still runs out of memory is halved (see _run_search).
    measured = frozen.__dict__.setdefault("_fastunlearn_bytes_per_sample", {})
    key = (tuple(sample.shape[1:]), autocast)
    per_sample = measured.get(key)
    if per_sample is None:
        per_sample = measured[key] = bytes_per_sample(frozen, norm, sample, device, autocast)
    # No floor above 1: a large model at a large size may fit only a few samples.
    return int(max(1, min(65536, 0.5 * free // per_sample)))


def bytes_per_sample(frozen: nn.Module, norm, sample: torch.Tensor, device: torch.device,
                     autocast: Optional[torch.dtype]) -> int:
    """Device bytes one more sample adds to a search step at its peak.

    The forward runs as the search runs it (its precision and layout) on 3 and on 7 samples,
    counting the bytes autograd keeps for the input backward; the difference over the 4
    extra samples leaves out what does not grow with the chunk (weights and their casts).
    The backward's peak holds those tensors plus the gradients in flight, about two of the
    largest activation. Nothing is read from the allocator's statistics, so the user's
    peak-memory figures are left alone.
    """
    def saved_bytes(rows: int):
        seen, biggest = {}, 0

        def pack(t):
            nonlocal biggest
            if t.device == device and not isinstance(t, nn.Parameter):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
                if t.dim() and t.shape[0] == rows:  # an activation (weights do not carry the batch)
                    biggest = max(biggest, st.nbytes())
            return t

        u = as_pixels(sample[:1].expand(rows, *sample.shape[1:]), device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = _forward(frozen, norm, u, autocast, need_grad=True)
        return sum(seen.values()) + logits.numel() * logits.element_size(), biggest

    (small, _), (big, largest) = saved_bytes(3), saved_bytes(7)
    return max(1, (big - small) // 4 + 2 * largest // 7)


def run_search(model: nn.Module, x, y: Optional[torch.Tensor], config: UnlearnConfig, *, mean=None, std=None,
               device=None, refreshes: int = 1, progress: bool = False, frozen: Optional[nn.Module] = None,
               index_base: int = 0, n_total: Optional[int] = None) -> SearchResult:
    """Search every forget sample ``refreshes`` times (fresh noise each time).

    x: (N, C, H, W) uint8 or float in [0, 1], on any device, or a Dataset of (image, label)
    whose images are such tensors (y may then be None), or an ImageSource. Chunks are moved
    to ``device`` one at a time, so the forget set may be larger than the device memory.
    index_base / n_total: where these rows sit in a larger forget set (a shard of it), so
    each sample draws the noise it would draw in a search over the whole set.
    """
    device = resolve_device(model, device)
    with reuse_freed_memory(device.type == "cpu"):
        return _run_search(model, x, y, config, mean=mean, std=std, device=device, refreshes=refreshes,
                           progress=progress, frozen=frozen, index_base=index_base, n_total=n_total)


def _run_search(model, x, y, config, *, mean, std, device, refreshes, progress, frozen, index_base, n_total):
    frozen = frozen if frozen is not None else frozen_copy(model, device)
    src = x if isinstance(x, ImageSource) else ImageSource(x, y)
    n = len(src)
    first_chunk = src.rows(0, min(n, 8))[0]
    autocast = resolve_precision(config.precision, device, frozen, first_chunk.shape[1:])
    if config.search_compile:
        frozen = compiled(frozen)
    channels = first_chunk.shape[1]
    per_sample = first_chunk[0].numel()
    norm = Normalizer(mean, std, channels, device)
    if config.compat == "authors":
        # Searched in their attack space, normalised with their constants, in fp32.
        norm = compat.attack_normalizer(channels, device), norm
    exact = contextlib.nullcontext()
    small = small_search_in_fp32(config.precision, device, refreshes * (n_total or n), per_sample,
                                 sum(p.numel() for p in frozen.parameters()))
    if config.compat == "authors" or small:
        autocast, exact = None, strict_fp32(device)
    with phase("search/chunk size"):
        chunk = _chunk_size(frozen, norm[0] if isinstance(norm, tuple) else norm, first_chunk, device,
                            config.search_batch_size, autocast)
    alpha = config.step_size
    steps = config.steps

    out_lab = torch.empty(refreshes, n, dtype=torch.int64)
    out_ok = torch.empty(refreshes, n, dtype=torch.bool)
    out_margin = torch.empty(refreshes, n, dtype=torch.float32)
    out_steps = torch.empty(refreshes, n, dtype=torch.int16)
    out_targets = None
    recheck = autocast is not None and config.recheck_margin > 0
    out_rechecked = torch.zeros(refreshes, n, dtype=torch.bool) if recheck else None

    bar = progress_bar(refreshes * math.ceil(n / chunk), progress, "search")
    with exact:
        for r in range(refreshes):
            start = 0
            while start < n:
                stop = min(n, start + chunk)
                xc, yc = src.rows(start, stop)
                try:
                    p = _ChunkParams(frozen=frozen, norm=norm, cfg=config, alpha=alpha, steps=steps, refresh=r,
                                     refreshes=refreshes, n_total=n_total or n, per_sample=per_sample)
                    lab, ok, margin, targets, took, unsure = _search_rows(p, xc, yc, index_base + start, autocast,
                                                                          recheck, device)
                except torch.OutOfMemoryError:
                    if stop - start == 1:
                        raise
                    # The labels do not depend on the chunk size: halve it and go on.
                    chunk = max(1, (stop - start) // 2)
                    _remember_smaller_chunk(frozen, first_chunk, autocast, chunk, device)
                    bar.total = bar.n + math.ceil((n - start) / chunk) + (refreshes - r - 1) * math.ceil(n / chunk)
                    continue
                out_lab[r, start:stop] = lab.cpu()
                out_ok[r, start:stop] = ok.cpu()
                out_margin[r, start:stop] = margin.cpu()
                out_steps[r, start:stop] = took.cpu().to(torch.int16)
                if unsure is not None:
                    out_rechecked[r, start:stop] = unsure.cpu()
                if targets is not None:
                    if out_targets is None:
                        out_targets = torch.empty(refreshes, n, targets.shape[1], dtype=torch.float32)
                    out_targets[r, start:stop] = targets.cpu()
                bar.update(1)
                start = stop
    bar.close()
    return SearchResult(out_lab, out_ok, out_margin, out_targets, out_steps, out_rechecked)


@dataclasses.dataclass(frozen=True)
class _ChunkParams:
    """What every chunk of one search pass (one refresh) shares."""
    frozen: nn.Module
    norm: object  # a Normalizer; with compat="authors", (attack normaliser, data normaliser) until split
    cfg: UnlearnConfig
    alpha: float
    steps: int
    refresh: int
    refreshes: int
    n_total: int  # samples in the whole forget set: the noise of a sample is keyed by its index there
    per_sample: int


def _search_rows(p: _ChunkParams, xc, yc, first, autocast, recheck, device):
    """One chunk (rows first.. of the forget set): the search, then (low precision with recheck)
    its unsure rows redone in fp32. Returns (relabels, success, margin, targets, steps taken,
    unsure rows or None)."""
    u0 = as_pixels(xc, device)
    x_loader = None
    if isinstance(p.norm, tuple):  # compat="authors": (attack normaliser, data normaliser)
        norm, data_norm = p.norm
        x_loader = data_norm(u0)  # their first input: the loader's image, not a round trip
        u0 = compat.to_attack_space(u0, data_norm, norm)
        p = dataclasses.replace(p, norm=norm)
    yc = yc.to(device)
    lab, ok, margin, targets, took, doubt = _search_chunk(p, u0, yc, first, autocast, track_doubt=recheck,
                                                          first_input=x_loader)
    unsure = None
    if recheck:
        with phase("search/recheck"):
            unsure = doubt.unsure(p.cfg.recheck_margin, torch.finfo(autocast).eps, p.per_sample)
            _redo_in_fp32(p, torch.nonzero(unsure).flatten(), (lab, ok, margin, targets, took), u0, yc, first)
    return lab, ok, margin, targets, took, unsure


def _remember_smaller_chunk(frozen, sample, autocast, chunk, device):
    """After an out-of-memory error: free the failed chunk's blocks and make later chunk
    sizes for this copy, shape and precision no larger than ``chunk``."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(device)
        measured = frozen.__dict__.setdefault("_fastunlearn_bytes_per_sample", {})
        key = (tuple(sample.shape[1:]), autocast)
        measured[key] = max(measured.get(key, 1), int(0.5 * free // max(1, chunk)) + 1)


def _forward(frozen, norm, u, autocast, need_grad, nu=None):
    """Logits of the frozen model at u, and the normalised input they were taken at (``nu``
    when given: the normalised u the caller already has)."""
    nu = (norm(u) if nu is None else nu).detach()
    if nu.dim() == 4 and model_is_channels_last(frozen):
        nu = channels_last_input(nu)
    if need_grad:
        nu.requires_grad_(True)
    with torch.set_grad_enabled(need_grad), torch.autocast(u.device.type, dtype=autocast or torch.float32,
                                                           enabled=autocast is not None):
        logits = frozen(nu)
    return logits, nu


class _ChunkOut:
    """A chunk's results, filled in as rows stop searching."""

    def __init__(self, m: int, steps: int, dev: torch.device):
        self.m, self.dev = m, dev
        self.lab = torch.empty(m, dtype=torch.int64, device=dev)
        self.ok = torch.empty(m, dtype=torch.bool, device=dev)
        self.margin = torch.empty(m, dtype=torch.float32, device=dev)
        self.took = torch.full((m,), steps, dtype=torch.int32, device=dev)
        self.targets = None

    def record(self, rows, rc: reference.RelabelResult, t: int) -> None:
        """Rows ``rows`` stopped at step t with the relabel check rc."""
        self.lab[rows] = rc.relabel
        self.ok[rows] = rc.success
        self.margin[rows] = rc.margin
        self.took[rows] = t
        if rc.targets is not None:
            if self.targets is None:
                self.targets = torch.zeros(self.m, rc.targets.shape[1], dtype=torch.float32, device=self.dev)
            self.targets[rows] = rc.targets


def _search_chunk(p: _ChunkParams, u0, y, first, autocast, track_doubt=False, first_input=None):
    """The search of the rows u0 (rows first.. of the forget set, labels y). Returns (relabels,
    success, margin, targets, steps taken, Doubt or None)."""
    frozen, norm, cfg, steps, refresh, n_total, per_sample = (p.frozen, p.norm, p.cfg, p.steps, p.refresh,
                                                              p.n_total, p.per_sample)
    m = u0.shape[0]
    dev = u0.device
    u = u0.clone()
    if cfg.random_start:
        start = reference.noise_offset(refresh, steps, steps, n_total, first, per_sample)
        u = reference.random_start_point(u0, cfg.eps, cfg.quantize, cfg.seed, start)
    out = _ChunkOut(m, steps, dev)
    record = out.record
    active = torch.arange(m, device=dev)
    mean_std = dict(mean=norm.mean, std=norm.std) if norm.mean is not None else {}
    doubt = Doubt(m, dev) if track_doubt else None

    for t in range(steps + 1):
        last = t == steps
        given = first_input if t == 0 and first_input is not None else None
        logits, nu = _forward(frozen, norm, u[active], autocast, need_grad=not last, nu=given)
        rc = relabel_check(logits.detach(), y[active], mode=cfg.relabel, topk=cfg.topk, want_grad=not last,
                           backend=cfg.backend)
        if doubt is not None:
            doubt.step(active, logits.detach(), t)
        if last:
            if cfg.compat == "authors":
                rc = compat.with_published_targets(rc, logits.detach(), cfg)
            record(active, rc, t)
            if doubt is not None:
                doubt.final(active, logits.detach(), y[active], rc.margin, cfg.relabel, cfg.topk)
            break
        dlogits = rc.dlogits
        if cfg.early_exit and cfg.compat is None and steps > 1 and t > 0:
            done = rc.success
            if doubt is not None:
                doubt.exit_check(active, logits.detach(), y[active], rc, done, cfg.relabel, cfg.topk)
            if bool(done.any()):
                record(active[done], _select(rc, done), t)
                keep = ~done
                active = active[keep]
                if active.numel() == 0:
                    break
                if float(done.float().mean()) > 1 / 3:
                    # A fresh forward on the survivors (1 pass) beats a backward through the
                    # rows that stopped (2 passes each) once a third of them stopped.
                    logits, nu = _forward(frozen, norm, u[active], autocast, need_grad=True)
                    dlogits = dlogits[keep]
                else:
                    dlogits = dlogits * keep.unsqueeze(1)
                    (g_all,) = torch.autograd.grad(logits, nu, grad_outputs=dlogits.to(logits.dtype))
                    logits = None
                    g = g_all[keep]
        if cfg.compat == "authors":
            rows = torch.arange(first, first + m, device=dev)
            g = compat.batch_mean_grad(logits, y[active], nu, rows, n_total, cfg.batch_size)
            lam = compat.iteration_lamdas(cfg, refresh, p.refreshes, rows, n_total) if cfg.lamda > 0 else 0.0
        else:
            if logits is not None:
                (g,) = torch.autograd.grad(logits, nu, grad_outputs=dlogits.to(logits.dtype))
            lam = reference.lamda_at(cfg.lamda, cfg.lamda_schedule,
                                     *reference.schedule_index(t, steps, refresh, p.refreshes), rate=cfg.lamda_rate)
        offset = reference.noise_offset(refresh, t, steps, n_total, first, per_sample)
        step_kw = dict(eps=cfg.eps, alpha=p.alpha, lamda=lam, gamma=cfg.gamma, noise=cfg.noise,
                       quantize=cfg.quantize, seed=cfg.seed, offset=offset, backend=cfg.backend, **mean_std)
        if cfg.compat == "authors":
            step_kw.update(compat=cfg.compat, nu=nu.detach())
        if active.numel() == m:
            u = boundary_step(u, u0, g.to(u.dtype), **step_kw)
        elif cfg.gamma == 0:
            u[active] = boundary_step(u[active], u0[active], g.to(u.dtype), **step_kw)
        else:
            # The noise of a row is fixed by its position in the chunk, so step the whole
            # chunk and keep only the rows still searching.
            full = torch.zeros_like(u)
            full[active] = g.to(u.dtype)
            stepped = boundary_step(u, u0, full, **step_kw)
            u[active] = stepped[active]
    return out.lab, out.ok, out.margin, out.targets, out.took, doubt


def _redo_in_fp32(p: _ChunkParams, rows, outs, u0, y, first):
    """Search ``rows`` of a chunk again in fp32 and overwrite their results in ``outs``.

    The noise of a row is keyed by its index in the whole forget set, so a redo over a run
    of consecutive rows, placed at that run's index, draws exactly the noise the fp32
    engine would: the redone rows get the fp32 engine's results. A deterministic search
    (no noise, no random start) draws nothing, so all its rows go in one batch.
    """
    if rows.numel() == 0:
        return
    if p.cfg.deterministic_search:
        runs = [rows]
    else:
        breaks = torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1
        runs = torch.tensor_split(rows, breaks.cpu())
    lab, ok, margin, targets, took = outs
    with strict_fp32(u0.device, enabled=RECHECK_FP32 == "ieee"):
        for run in runs:
            r_lab, r_ok, r_margin, r_targets, r_took, _ = _search_chunk(p, u0[run], y[run], first + int(run[0]), None)
            lab[run], ok[run], margin[run], took[run] = r_lab, r_ok, r_margin, r_took
            if targets is not None:
                targets[run] = r_targets


# The fp32 mode of the recheck of a bf16 / fp16 search's unsure samples: "ieee" (full fp32
# convolutions and matmuls) or "tf32" (the process's own fp32 settings, which on GPUs
# default to TF32 convolutions). bench/bench_search.py measures both.
RECHECK_FP32 = "ieee"


def _select(rc: reference.RelabelResult, rows) -> reference.RelabelResult:
    return reference.RelabelResult(*(None if v is None else v[rows] for v in rc))


