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
had (``_Doubt.unsure``) the sample is searched again in fp32 and its results replaced. The
noise is keyed by sample index, so a redone sample gets the fp32 search's results.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import reference
from ._phases import phase
from .config import UnlearnConfig
from .heap import reuse_freed_memory
from .ops import boundary_step, relabel_check
from .source import ImageSource
from .validate import resolve_device


@dataclass
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


def frozen_copy(model: nn.Module, device: torch.device, channels_last: Optional[bool] = None,
                fold: bool = True) -> nn.Module:
    """A copy of the model for the search: eval mode, no weight gradients. The input is untouched.

    channels_last (default: on) measured 1.2-1.4x faster for the search's convolutions on
    CPU at chunks of 64-128; on GPUs it is the layout the bf16 convolution kernels want.
    fold: BatchNorm layers that follow a convolution are folded into it (see
    fold_batchnorm); the copy computes the same function with fewer passes over memory.
    """
    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    if fold:
        fold_batchnorm(frozen)
    if channels_last is None:
        channels_last = any(m.weight.dim() == 4 for m in frozen.modules() if isinstance(m, nn.Conv2d))
    if channels_last:
        frozen = frozen.to(memory_format=torch.channels_last)
    return frozen


_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _own_forward(m: nn.Module) -> bool:
    """The module runs its class's forward: no forward set on the instance (as
    finetune.fuse_batch_norm_relu does for a run, where a BatchNorm may also apply the ReLU
    after it)."""
    return "forward" not in m.__dict__


def _foldable_conv(m: nn.Module) -> bool:
    return (any(type(m).forward is c.forward and isinstance(m, c) for c, _ in _CONV_BN)
            and _own_forward(m) and not _has_hooks(m) and not torch.nn.utils.parametrize.is_parametrized(m)
            and not torch.nn.parameter.is_lazy(m.weight) and m.weight.is_floating_point())


def _foldable_bn(m: nn.Module, conv: nn.Module) -> bool:
    """An eval-mode BatchNorm of conv's dimensionality, using its running statistics: an
    affine map per channel, which the convolution before it can absorb."""
    bn_type = next(b for c, b in _CONV_BN if isinstance(conv, c))
    return (isinstance(m, bn_type) and type(m).forward is bn_type.forward and _own_forward(m) and not m.training
            and m.track_running_stats and m.running_mean is not None and m.num_features == conv.out_channels
            and not _has_hooks(m))


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or m._state_dict_hooks)


def _conv_bn_pairs(model: nn.Module, mods: dict) -> list:
    """(conv name, BatchNorm name) pairs where the BatchNorm takes the convolution's output
    and nothing else does. Plain nn.Sequential runs give them without tracing; other
    models are traced with torch.fx (a model it cannot trace keeps its other BatchNorms).
    mods: dict(model.named_modules())."""
    # A module reachable by two paths, or a weight shared with another module, would carry
    # the fold into places that have no BatchNorm after them.
    seen_mods: dict = {}
    for _, m in model.named_modules(remove_duplicate=False):
        seen_mods[id(m)] = seen_mods.get(id(m), 0) + 1
    seen_params: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen_params[id(p)] = seen_params.get(id(p), 0) + 1

    def single(*ms):
        return all(seen_mods[id(m)] == 1 and all(seen_params[id(p)] == 1 for p in m.parameters(recurse=False))
                   for m in ms)

    pairs, taken = [], set()
    for name, seq in mods.items():
        if type(seq).forward is not nn.Sequential.forward or not isinstance(seq, nn.Sequential):
            continue  # a Sequential subclass with its own forward may use its children otherwise
        kids = list(seq.named_children())
        for (a_name, a), (b_name, b) in zip(kids, kids[1:]):
            if _foldable_conv(a) and _foldable_bn(b, a) and single(a, b):
                pair = (f"{name}.{a_name}" if name else a_name, f"{name}.{b_name}" if name else b_name)
                pairs.append(pair)
                taken.update(pair)
    left = [n for n, m in mods.items() if n not in taken and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not left:
        return pairs
    try:
        import torch.fx

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow and the like: keep the pairs found
        return pairs
    calls: dict = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or node.target in taken or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not (isinstance(prev, torch.fx.Node) and prev.op == "call_module" and prev.target not in taken):
            continue
        conv, bn = mods.get(prev.target), mods.get(node.target)
        # Each called once, the convolution's output read by the BatchNorm only: then the
        # fold changes nothing else the model computes.
        if (conv is not None and bn is not None and calls[prev.target] == 1 and calls[node.target] == 1
                and len(prev.users) == 1 and _foldable_conv(conv) and _foldable_bn(bn, conv) and single(conv, bn)):
            pairs.append((prev.target, node.target))
            taken.update((prev.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each eval-mode BatchNorm that directly follows a convolution into its weights and
    bias, in place, and put an Identity where the BatchNorm was. Returns the number folded.

    For a frozen model (eval mode, running statistics) BN(conv(x)) = conv'(x) with
    W' = W * s, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps) per output channel,
    computed in float64. The search then skips a read and a write of every such activation
    in the forward and again in the input backward: on 2 CPU cores the search of a narrow
    AllCNN ran 1.5x (fp32) and 1.7x (bf16) faster (bench/RESULTS.md). Only pairs where
    nothing else reads the convolution's output are folded; modules reachable twice, shared
    weights, hooks and parametrizations are left alone.
    """
    mods = dict(model.named_modules())
    pairs = _conv_bn_pairs(model, mods)
    for conv_name, bn_name in pairs:
        conv, bn = mods[conv_name], mods[bn_name]
        w = conv.weight
        var, mean = bn.running_var.double(), bn.running_mean.double()
        gamma = bn.weight.double() if bn.affine else torch.ones_like(var)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
        s = gamma / torch.sqrt(var + bn.eps)
        b0 = conv.bias.double() if conv.bias is not None else torch.zeros_like(var)
        w.copy_(w.double() * s.reshape((-1,) + (1,) * (w.dim() - 1)))  # copy_ keeps the weight's layout
        bias = ((b0 - mean) * s + beta).to(device=w.device, dtype=w.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias, requires_grad=False)
        else:
            conv.bias.copy_(bias)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(mods[parent_name] if parent_name else model, attr, nn.Identity())
    return len(pairs)


def compiled(frozen: nn.Module) -> nn.Module:
    """torch.compile of a frozen copy, made once per copy and kept with it, so every later
    search on the same copy (an Unlearner's, a sweep's) reuses the compiled code. The chunk
    sizes vary (the last chunk, the active set under early exit), so shapes are left for
    Dynamo to mark dynamic after the first recompile rather than pinned."""
    if isinstance(frozen, torch._dynamo.eval_frame.OptimizedModule):
        return frozen
    fn = frozen.__dict__.get("_fastunlearn_compiled")
    if fn is None:
        fn = torch.compile(frozen)
        # Past nn.Module.__setattr__, which would register the wrapper as a submodule of the
        # module it wraps.
        object.__setattr__(frozen, "_fastunlearn_compiled", fn)
    return fn


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16 units: oneDNN then runs bf16 convolutions natively (a batch-64
    AllCNN train step 1.7x faster than fp32 on 2 Xeon cores with AMX). Without them CPU
    bf16 is emulated, 7-15x slower than fp32. FASTUNLEARN_CPU_BF16=0 or 1 overrides the
    detection (for precision="auto" only)."""
    forced = os.environ.get("FASTUNLEARN_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    if not torch.backends.mkldnn.is_available():
        return False
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported",
                                                                      "_is_avx512_bf16_supported"))


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for fp32. auto: bf16 on CUDA, and on CPUs with native bf16."""
    if precision == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


# Under precision="auto" on a GPU, a search over fewer samples (times refreshes) than this
# runs in full fp32. It is bound by kernel launches, not arithmetic, so bf16 saves nothing
# there, while its fp32 recheck would launch a second search for the unsure samples.
SMALL_SEARCH_FP32 = 1024


def small_search_in_fp32(precision: str, device: torch.device, samples: int) -> bool:
    """Whether a search of ``samples`` (all refreshes together) runs in fp32 although
    precision resolves to bf16 / fp16: "auto" on CUDA below SMALL_SEARCH_FP32."""
    return precision == "auto" and device.type == "cuda" and samples < SMALL_SEARCH_FP32


def _chunk_size(frozen: nn.Module, norm, sample: torch.Tensor, device: torch.device, requested: Optional[int],
                autocast: Optional[torch.dtype] = None) -> int:
    """Samples per search chunk. sample: a few rows of the forget set as they arrive (uint8
    or float pixels), converted only when the measuring pass runs."""
    if requested:
        return requested
    if device.type != "cuda":
        # Past ~128 samples the activations fall out of cache: measured slower at 512.
        return 128
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

        u = _as_pixels(sample[:1].expand(rows, *sample.shape[1:]), device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits, _ = _forward(frozen, norm, u, autocast, need_grad=True)
        return sum(seen.values()) + logits.numel() * logits.element_size(), biggest

    (small, _), (big, largest) = saved_bytes(3), saved_bytes(7)
    return max(1, (big - small) // 4 + 2 * largest // 7)


class _Normalizer:
    def __init__(self, mean, std, channels, device):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(-1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1)
        if self.mean is None and self.std is not None:
            self.mean = torch.zeros(channels, device=device)
        if self.std is None and self.mean is not None:
            self.std = torch.ones(channels, device=device)

    def __call__(self, u):
        if self.mean is None:
            return u
        shape = (1, -1) + (1,) * (u.dim() - 2)
        return (u - self.mean.reshape(shape)) / self.std.reshape(shape)


def _as_pixels(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.to(torch.float32).div_(255.0) if x.dtype == torch.uint8 else x.to(torch.float32)


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
    if config.search_compile:
        frozen = compiled(frozen)
    src = x if isinstance(x, ImageSource) else ImageSource(x, y)
    n = len(src)
    first_chunk = src.rows(0, min(n, 8))[0]
    channels = first_chunk.shape[1]
    per_sample = first_chunk[0].numel()
    norm = _Normalizer(mean, std, channels, device)
    autocast = resolve_precision(config.precision, device)
    exact = contextlib.nullcontext()
    if small_search_in_fp32(config.precision, device, refreshes * (n_total or n)):
        autocast, exact = None, strict_fp32(device)
    with phase("search/chunk size"):
        chunk = _chunk_size(frozen, norm, first_chunk, device, config.search_batch_size, autocast)
    alpha = config.step_size
    steps = config.steps

    out_lab = torch.empty(refreshes, n, dtype=torch.int64)
    out_ok = torch.empty(refreshes, n, dtype=torch.bool)
    out_margin = torch.empty(refreshes, n, dtype=torch.float32)
    out_steps = torch.empty(refreshes, n, dtype=torch.int16)
    out_targets = None
    recheck = autocast is not None and config.recheck_margin > 0
    out_rechecked = torch.zeros(refreshes, n, dtype=torch.bool) if recheck else None

    bar = _progress(refreshes * math.ceil(n / chunk), progress, "search")
    with exact:
        for r in range(refreshes):
            start = 0
            while start < n:
                stop = min(n, start + chunk)
                xc, yc = src.rows(start, stop)
                try:
                    lab, ok, margin, targets, took, unsure = _search_rows(
                        frozen, norm, xc, yc, config, alpha, steps, r, n_total or n, index_base + start, per_sample,
                        autocast, recheck, device)
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


def _search_rows(frozen, norm, xc, yc, config, alpha, steps, refresh, n_total, first, per_sample, autocast,
                 recheck, device):
    """One chunk: the search, then (low precision with recheck) its unsure rows redone in fp32.
    Returns (relabels, success, margin, targets, steps taken, unsure rows or None)."""
    u0 = _as_pixels(xc, device)
    yc = yc.to(device)
    lab, ok, margin, targets, took, doubt = _search_chunk(frozen, norm, u0, yc, config, alpha, steps, refresh,
                                                          n_total, first, per_sample, autocast, track_doubt=recheck)
    unsure = None
    if recheck:
        with phase("search/recheck"):
            unsure = doubt.unsure(config.recheck_margin, torch.finfo(autocast).eps, per_sample)
            _redo_in_fp32(torch.nonzero(unsure).flatten(), (lab, ok, margin, targets, took), frozen, norm, u0, yc,
                          config, alpha, steps, refresh, n_total, first, per_sample)
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


def _is_channels_last(model: nn.Module) -> bool:
    for p in model.parameters():
        # A weight with one input channel (or a 1x1 kernel) is contiguous in both layouts
        # and says nothing: the first one that can tell decides.
        if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def channels_last_input(u: torch.Tensor) -> torch.Tensor:
    """u (N, C, H, W) in channels_last, with strides that say so even when C == 1.

    With one channel both layouts hold the same bytes and u.contiguous(channels_last) keeps
    the NCHW strides, so PyTorch takes u for NCHW (suggest_memory_format). A convolution's
    backward then converts its output gradient to NCHW to match its input (cuDNN backward:
    grad_output.to(input.suggest_memory_format())): in every batch-64 step of a 1-channel
    AllCNN on an H200, a 32 us copy and cuDNN's own layout conversions around the first
    layer's weight gradient, and in the search a copy of the first activation's gradient.
    """
    if u.dim() != 4:
        return u
    u = u.contiguous(memory_format=torch.channels_last)
    if u.shape[1] == 1 and u.stride(1) != 1:
        u = u.as_strided(u.shape, (u.shape[2] * u.shape[3], 1, u.shape[3], 1))
    return u


def _forward(frozen, norm, u, autocast, need_grad):
    """Logits of the frozen model at u, and the normalised input they were taken at."""
    nu = norm(u).detach()
    if nu.dim() == 4 and _is_channels_last(frozen):
        nu = channels_last_input(nu)
    if need_grad:
        nu.requires_grad_(True)
    with torch.set_grad_enabled(need_grad), torch.autocast(u.device.type, dtype=autocast or torch.float32,
                                                           enabled=autocast is not None):
        logits = frozen(nu)
    return logits, nu


def _search_chunk(frozen, norm, u0, y, cfg: UnlearnConfig, alpha, steps, refresh, n_total, first, per_sample,
                  autocast, track_doubt=False):
    m = u0.shape[0]
    dev = u0.device
    u = u0.clone()
    if cfg.random_start:
        start = reference.noise_offset(refresh, steps, steps, n_total, first, per_sample)
        u = reference.random_start_point(u0, cfg.eps, cfg.quantize, cfg.seed, start)
    lab = torch.empty(m, dtype=torch.int64, device=dev)
    ok = torch.empty(m, dtype=torch.bool, device=dev)
    margin = torch.empty(m, dtype=torch.float32, device=dev)
    took = torch.full((m,), steps, dtype=torch.int32, device=dev)
    targets = None
    active = torch.arange(m, device=dev)
    mean_std = dict(mean=norm.mean, std=norm.std) if norm.mean is not None else {}
    doubt = _Doubt(m, dev) if track_doubt else None

    def record(rows, rc, t):
        nonlocal targets
        lab[rows] = rc.relabel
        ok[rows] = rc.success
        margin[rows] = rc.margin
        took[rows] = t
        if rc.targets is not None:
            if targets is None:
                targets = torch.zeros(m, rc.targets.shape[1], dtype=torch.float32, device=dev)
            targets[rows] = rc.targets

    for t in range(steps + 1):
        last = t == steps
        logits, nu = _forward(frozen, norm, u[active], autocast, need_grad=not last)
        rc = relabel_check(logits.detach(), y[active], mode=cfg.relabel, topk=cfg.topk, want_grad=not last,
                           backend=cfg.backend)
        if doubt is not None:
            doubt.step(active, logits.detach(), t)
        if last:
            record(active, rc, t)
            if doubt is not None:
                doubt.final(active, logits.detach(), y[active], rc.margin, cfg.relabel, cfg.topk)
            break
        dlogits = rc.dlogits
        if cfg.early_exit and steps > 1 and t > 0:
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
        if logits is not None:
            (g,) = torch.autograd.grad(logits, nu, grad_outputs=dlogits.to(logits.dtype))
        lam = reference.lamda_at(cfg.lamda, cfg.lamda_schedule, t if steps > 1 else refresh, steps)
        offset = reference.noise_offset(refresh, t, steps, n_total, first, per_sample)
        step_kw = dict(eps=cfg.eps, alpha=alpha, lamda=lam, gamma=cfg.gamma, noise=cfg.noise,
                       quantize=cfg.quantize, seed=cfg.seed, offset=offset, backend=cfg.backend, **mean_std)
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
    return lab, ok, margin, targets, took, doubt


class _Doubt:
    """Per row: the closest call among the decisions the search made, and the logit path length."""

    def __init__(self, m, dev):
        self.gap = torch.full((m,), math.inf, device=dev)
        self.path = torch.zeros(m, device=dev)
        self.zmax = torch.zeros(m, device=dev)
        self.prev = None

    def step(self, rows, logits, t):
        if self.prev is None:
            # In the logits' own dtype: exact, and half the memory of fp32 for bf16.
            self.prev = logits.new_zeros(self.gap.shape[0], logits.shape[1])
        if t > 0:
            dz = logits.float() - self.prev[rows].float()
            # Centred: a shift common to all classes changes no decision.
            self.path[rows] += (dz - dz.mean(1, keepdim=True)).norm(dim=1)
        self.prev[rows] = logits

    def exit_check(self, rows, logits, y, rc, done, mode, topk):
        self.gap[rows] = torch.minimum(self.gap[rows], rc.margin.abs())
        # A row that stops here is relabelled from these logits.
        self.final(rows[done], logits[done], y[done], rc.margin[done], mode, topk)

    def final(self, rows, logits, y, margin, mode, topk):
        z = logits.float()
        self.zmax[rows] = z.abs().amax(1)
        self.gap[rows] = torch.minimum(self.gap[rows], decision_gap(z, y, margin, mode, topk))

    def unsure(self, recheck_margin: float, resolution: float, per_sample: int) -> torch.Tensor:
        """Rows whose closest decision lay within the rounding noise of the search.

        resolution * zmax is the rounding unit of the last logits. The flipped gradient signs
        are the components below the gradient's rounding error, a fraction ~resolution of the
        per_sample inputs; stepping the wrong way, they move the logits by ~sqrt(that count)
        / per_sample of the path the whole step moved them, hence sqrt(resolution / per_sample)
        * path. Both are orders of magnitude; recheck_margin carries the constant, measured
        on 8x8 digits and 28x28 FashionMNIST (the sqrt(1 / per_sample) is what lets one
        margin serve both).
        """
        noise = resolution * self.zmax + math.sqrt(resolution / per_sample) * self.path
        # Written as "not >=" so that a NaN from an overflowed logit counts as unsure.
        return ~(self.gap >= recheck_margin * noise)


def _redo_in_fp32(rows, outs, frozen, norm, u0, y, cfg, alpha, steps, refresh, n_total, first, per_sample):
    """Search ``rows`` of a chunk again in fp32 and overwrite their results in ``outs``.

    The noise of a row is keyed by its index in the whole forget set, so a redo over a run
    of consecutive rows, placed at that run's index, draws exactly the noise the fp32
    engine would: the redone rows get the fp32 engine's results. A deterministic search
    (no noise, no random start) draws nothing, so all its rows go in one batch.
    """
    if rows.numel() == 0:
        return
    if cfg.deterministic_search:
        runs = [rows]
    else:
        breaks = torch.nonzero(rows[1:] != rows[:-1] + 1).flatten() + 1
        runs = torch.tensor_split(rows, breaks.cpu())
    lab, ok, margin, targets, took = outs
    with strict_fp32(u0.device, enabled=RECHECK_FP32 == "ieee"):
        for run in runs:
            r_lab, r_ok, r_margin, r_targets, r_took, _ = _search_chunk(
                frozen, norm, u0[run], y[run], cfg, alpha, steps, refresh, n_total, first + int(run[0]), per_sample,
                None)
            lab[run], ok[run], margin[run], took[run] = r_lab, r_ok, r_margin, r_took
            if targets is not None:
                targets[run] = r_targets


# The process-wide fp32 modes a strict fp32 search sets, as (backend, op) of torch's
# fp32_precision API. From torch 2.9 a read of the legacy allow_tf32 flags raises once the
# legacy and the new API disagree (Inductor reads them), so strict_fp32 writes through the
# API the process can still read, and puts back what both APIs read before.
_FP32_PRECISION_FLAGS = (("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul"))
# The fp32 mode of the recheck of a bf16 / fp16 search's unsure samples: "ieee" (full fp32
# convolutions and matmuls) or "tf32" (the process's own fp32 settings, which on GPUs
# default to TF32 convolutions). bench/bench_search.py measures both.
RECHECK_FP32 = "ieee"


def _legacy_tf32():
    """(cuDNN, cuBLAS) allow_tf32 as the legacy API reads them, or None where it refuses."""
    try:
        return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:
        return None


def _set_legacy_tf32(flags):
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


@contextlib.contextmanager
def strict_fp32(device: torch.device, enabled: bool = True):
    """IEEE fp32 convolutions and matmuls inside (cuDNN convolutions default to TF32, a
    10-bit mantissa); after, the precision flags read as they did before, through both APIs."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if not enabled or device.type != "cuda" or getter is None:
        yield
        return
    setter = torch._C._set_fp32_precision_setter
    before = [(backend, op, getter(backend, op)) for backend, op in _FP32_PRECISION_FLAGS]
    legacy = _legacy_tf32()
    if legacy is not None:
        _set_legacy_tf32((False, False))  # keeps the two APIs in agreement
    else:
        for backend, op, _ in before:
            setter(backend, op, "ieee")
    try:
        yield
    finally:
        if legacy is not None:
            _set_legacy_tf32(legacy)
        for backend, op, value in before:
            if getter(backend, op) != value:
                setter(backend, op, value)


def decision_gap(z, y, margin, mode, topk):
    """How far the logits are from changing a decision of the relabel check.

    argmax, soft: top-1 minus top-2 (this also bounds |margin|, so it covers success);
    nearest_incorrect: the best other class minus the next one, and |margin|; topk also
    the k-th minus the (k+1)-th, which decides the set of classes kept.
    """
    k = z.shape[1]
    if k < 2:
        return torch.full_like(margin, math.inf)
    if mode == "nearest_incorrect":
        gap = margin.abs()
        if k > 2:
            others = z.scatter(1, y.unsqueeze(1), -math.inf).topk(2, dim=1).values
            gap = torch.minimum(gap, others[:, 0] - others[:, 1])
        return gap
    kk = min(k, int(topk) + 1) if mode == "topk" else 2
    top = z.topk(max(2, kk), dim=1).values
    gap = top[:, 0] - top[:, 1]
    if mode == "topk" and int(topk) < k:
        gap = torch.minimum(gap, top[:, int(topk) - 1] - top[:, int(topk)])
    return gap


def _select(rc: reference.RelabelResult, rows) -> reference.RelabelResult:
    return reference.RelabelResult(*(None if v is None else v[rows] for v in rc))


class _NoBar:
    total = n = 0

    def update(self, k=1):
        pass

    def close(self):
        pass


def _progress(total, enabled, desc):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
