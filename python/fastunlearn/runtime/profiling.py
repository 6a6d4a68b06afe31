"""Profiling for the benchmarks and for users' own models: a trace and a roofline summary.

``trace`` records a torch.profiler trace (Chrome / Perfetto JSON). ``roofline`` runs the
three parts of an unlearning run on a model, the boundary search, one fine-tune step and
the fused elementwise ops, and reports for each the achieved TFLOP/s and GB/s next to the
device's measured peaks (a large matmul for compute, a large copy for bandwidth).

FLOPs come from torch.utils.flop_counter's registry, the one FlopCounterMode uses
(matmuls and convolutions, forward and backward); the counting mode here applies it per op
without FlopCounterMode's module hooks, which torch.autograd.grad (the search's
input-only backward) does not support. Bytes are the sizes of every op's tensor inputs and outputs, so
they count what each op touches once; caches can make the real DRAM traffic smaller,
and elementwise chains that a compiler fuses touch less.

``phases`` splits the wall time of an unlearning call into its named parts (the check of
the data, the search and its fp32 recheck, the reset, the fine-tune steps, the copy of the
result): the library marks those parts with ``phase``, which costs nothing unless a
``phases`` block is recording.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Callable, Optional

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from fastunlearn.config import UnlearnConfig
from fastunlearn.data.checkpoint import atomic_write_text
from fastunlearn.data.pixels import as_pixels
from fastunlearn.engine.finetune import FinetuneEngine
from fastunlearn.engine.search import run_search
from fastunlearn.nn.frozen import frozen_copy
from fastunlearn.nn.fuse import fuse_batch_norm_relu
from fastunlearn.nn.layout import default_channels_last
from fastunlearn.ops import boundary_step, relabel_check
from fastunlearn.runtime.phases import _sync, phase, phases  # noqa: F401  (the public home of phase and phases)


def _median_seconds(fn: Callable, device: torch.device, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_peaks(device, reps: int = 5) -> dict:
    """Measured peaks: matmul TFLOP/s (bf16 on CUDA, fp32 on CPU) and copy GB/s."""
    device = torch.device(device)
    if device.type == "cuda":
        n, dtype, nbytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, nbytes = 2048, torch.float32, 1 << 27
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _median_seconds(lambda: torch.mm(a, b), device, reps)
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t_cp = _median_seconds(lambda: dst.copy_(src), device, reps)
    return {"matmul_tflops": 2 * n ** 3 / t_mm / 1e12, "matmul_dtype": str(dtype).replace("torch.", ""),
            "copy_gbps": 2 * nbytes / t_cp / 1e9}


class CounterMode(TorchDispatchMode):
    """FLOPs (torch.utils.flop_counter's formulas) and bytes of every op's tensor inputs and
    outputs, each op counted on its own."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.flops += int(flop_registry[packet](*args, **kwargs, out_val=out))
        if packet not in _NO_TRAFFIC:
            for t in tree_flatten((args, kwargs, out))[0]:
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


_NO_TRAFFIC = {torch.ops.aten.view, torch.ops.aten._unsafe_view, torch.ops.aten.t, torch.ops.aten.transpose,
               torch.ops.aten.permute, torch.ops.aten.expand, torch.ops.aten.detach, torch.ops.aten.alias,
               torch.ops.aten.slice, torch.ops.aten.select, torch.ops.aten.unsqueeze, torch.ops.aten.squeeze,
               torch.ops.aten.empty, torch.ops.aten.empty_like, torch.ops.aten.empty_strided}


def measure_region(name: str, fn: Callable, device, peaks: dict, reps: int = 5) -> dict:
    """Time, FLOPs and bytes of one call of fn, against the peaks."""
    device = torch.device(device)
    with CounterMode() as bc:
        fn()
    flops = bc.flops
    seconds = _median_seconds(fn, device, reps)
    tflops = flops / seconds / 1e12
    gbps = bc.bytes / seconds / 1e9
    intensity = flops / bc.bytes if bc.bytes else float("inf")
    ridge = peaks["matmul_tflops"] * 1e12 / (peaks["copy_gbps"] * 1e9)
    return {"region": name, "ms": 1e3 * seconds, "gflop": flops / 1e9, "mbytes": bc.bytes / 1e6,
            "tflops": tflops, "gbps": gbps, "pct_peak_flops": 100 * tflops / peaks["matmul_tflops"],
            "pct_peak_bw": 100 * gbps / peaks["copy_gbps"], "flop_per_byte": intensity,
            "bound": "compute" if intensity > ridge else "memory"}


def roofline(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config=None, mean=None, std=None,
             device=None, reps: int = 5, peaks: Optional[dict] = None) -> tuple[list, dict]:
    """(rows, peaks): the search over x, one fine-tune step on a batch of x, and the fused
    elementwise ops on x's shape, each measured on ``model`` (which is not modified)."""

    cfg = config or UnlearnConfig()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    peaks = peaks or measure_peaks(device)
    cl = default_channels_last(model, device)
    frozen = frozen_copy(model, device, channels_last=cl)
    x, y = x.to(device), y.to(device)
    rows = [measure_region(f"search ({x.shape[0]} samples, T={cfg.steps})",
                           lambda: run_search(frozen, x, y, cfg, mean=mean, std=std, device=device, frozen=frozen),
                           device, peaks, reps)]
    bs = min(cfg.batch_size, x.shape[0])
    engine = FinetuneEngine(copy.deepcopy(model).requires_grad_(True), cfg, mean=mean, std=std, device=device,
                            teacher=frozen)
    xb, yb = x[:bs], y[:bs]
    engine.model.train()
    undo = fuse_batch_norm_relu(engine.model) if engine.batch_norm_fused else None  # as a run does
    if engine.compiled:
        engine.step(xb, yb)  # compile outside the measurement
    rows.append(measure_region(f"train step (batch {bs})", lambda: engine.step(xb, yb), device, peaks, reps))
    if undo is not None:
        undo()
    u0 = as_pixels(x, x.device)
    g = torch.randn_like(u0)
    logits = torch.randn(x.shape[0], 10, device=device)
    ms = {} if mean is None else {"mean": torch.as_tensor(mean, device=device),
                                  "std": torch.as_tensor(std, device=device)}
    rows.append(measure_region("boundary_step (elementwise)",
                               lambda: boundary_step(u0, u0, g, eps=cfg.eps, alpha=cfg.step_size, quantize=cfg.quantize,
                                                     backend=cfg.backend, **ms), device, peaks, reps))
    rows.append(measure_region("relabel_check (elementwise)",
                               lambda: relabel_check(logits, y % 10, mode=cfg.relabel, want_grad=True,
                                                     backend=cfg.backend), device, peaks, reps))
    return rows, peaks


def trace(fn: Callable, path: str, device) -> str:
    """Run fn under torch.profiler and write a Chrome / Perfetto trace to ``path``."""
    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t0 = time.perf_counter()
    with profile(activities=acts, record_shapes=True, with_flops=True) as prof:
        fn()
        _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0)
    prof.export_chrome_trace(path)
    write_op_table(prof, os.path.splitext(path)[0] + "_ops.txt", wall_ms, device)
    return path


def first_use(fn: Callable, device, trace_path: Optional[str] = None) -> dict:
    """What the first call of fn in this process pays that a second, identical call does not.

    Runs fn twice, each under torch.profiler and ``phases``, and returns
    {"first": run, "second": run}, each run {"wall_s", "phases": {name: seconds},
    "ops": {name: (host_self_ms, device_self_ms, calls)}}. A cold call's extra time sits in
    a few places: the host time inside convolution ops (cuDNN / oneDNN building plans or
    primitives for shapes they have not met), CUDA runtime calls (kernel modules loaded on
    first launch, allocations, graph instantiation) and the library's phases (captures,
    the search's chunk-size probe); ``format_first_use`` ranks them. trace_path: also write
    the first call's trace there.
    """
    device = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for label in ("first", "second"):
        _sync(device)
        with phases(device) as ph, profile(activities=acts) as prof:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            wall = time.perf_counter() - t0
        # key_averages has one entry per op name.
        ops = {e.key: (e.self_cpu_time_total / 1e3, getattr(e, "self_device_time_total", 0.0) / 1e3, e.count)
               for e in prof.key_averages()}
        out[label] = {"wall_s": wall, "phases": {k: v[0] for k, v in ph.items()}, "ops": ops}
        if label == "first" and trace_path:
            os.makedirs(os.path.dirname(os.path.abspath(trace_path)), exist_ok=True)
            prof.export_chrome_trace(trace_path)
    return out


def phase_order(names) -> list:
    """Phase names as ``phases`` recorded them, each phase followed by its parts. A part
    ("search/recheck") closes before its phase and so is recorded first; phases keep the
    order in which they (or their first part) appeared."""
    names = list(dict.fromkeys(names))
    tops = list(dict.fromkeys(k.split("/")[0] for k in names))
    return sorted(names, key=lambda k: (tops.index(k.split("/")[0]), "/" in k))


def format_first_use(result: dict, rows: int = 15) -> str:
    """The phases and the ops of ``first_use``'s result, ranked by what the first call paid
    more than the second (host self time for ops: a host stall there delays everything)."""
    first, second = result["first"], result["second"]
    lines = [f"first call {first['wall_s']:.3f} s, second {second['wall_s']:.3f} s: the first pays "
             f"{first['wall_s'] - second['wall_s']:+.3f} s (both under the profiler, so slower than plain runs)"]
    names = phase_order(list(first["phases"]) + list(second["phases"]))
    if names:
        lines.append(f"{'by phase (s)':<31s}{'first':>8s} {'second':>8s} {'excess':>8s}")
        for k in names:
            a, b = first["phases"].get(k, 0.0), second["phases"].get(k, 0.0)
            lines.append(f"  {k:<28.28s} {a:8.3f} {b:8.3f} {a - b:+8.3f}")
    keys = set(first["ops"]) | set(second["ops"])
    zero = (0.0, 0.0, 0)
    ranked = sorted(keys, key=lambda k: second["ops"].get(k, zero)[0] - first["ops"].get(k, zero)[0])
    lines.append("by op, host self time (ms)            first    second   excess  calls first/second"
                 "  device ms excess")
    for k in ranked[:rows]:
        a, b = first["ops"].get(k, zero), second["ops"].get(k, zero)
        if a[0] - b[0] < 0.05:  # the rest differ by less than the table shows
            break
        name = k if len(k) <= 36 else k[:33] + "..."
        lines.append(f"  {name:<36s} {a[0]:8.1f} {b[0]:8.1f} {a[0] - b[0]:+8.1f}  {a[2]:>6d}/{b[2]:<6d}"
                     f"  {a[1] - b[1]:+8.2f}")
    return "\n".join(lines)


def layout_conversions(averages) -> tuple:
    """(ms, kernels) spent in cuDNN's own NCHW <-> NHWC transposes, from profiler averages.

    cuDNN runs them when it is handed an NCHW tensor for a kernel that wants NHWC (or the
    other way): in a channels_last model that means some input, weight or gradient is laid
    out, or only strided, as NCHW, and every step pays a transpose of it."""
    ms, calls = 0.0, 0
    for e in averages:
        if "nchwToNhwc" in e.key or "nhwcToNchw" in e.key:
            ms += getattr(e, "self_device_time_total", 0.0) / 1e3
            calls += e.count
    return ms, calls


def write_op_table(prof, path: str, wall_ms: float, device: torch.device, rows: int = 30) -> str:
    """The ops that took the most time, and how busy the device was: a trace too big to
    open still answers whether a run waits on the device or on the host."""
    cuda = device.type == "cuda"
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    lines = []
    if cuda:
        busy_ms = sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e3
        lines.append(f"device busy {busy_ms:.1f} ms of {wall_ms:.1f} ms wall ({100 * busy_ms / wall_ms:.0f}%): "
                     + ("the host (launches, Python) is the bound" if busy_ms < 0.6 * wall_ms else
                        "the device is the bound"))
        conv_ms, conv_calls = layout_conversions(averages)
        if conv_calls:
            lines.append(f"cuDNN layout conversions (NCHW <-> NHWC): {conv_ms:.2f} ms in {conv_calls} kernels "
                         f"({100 * conv_ms / max(busy_ms, 1e-9):.1f}% of device time): convolutions met tensors in "
                         "another layout than their kernels use (an NCHW model under bf16, or a channels_last one "
                         "with an input PyTorch reads as NCHW: see search.channels_last_input)")
    else:
        lines.append(f"wall {wall_ms:.1f} ms; the table is host time")
    lines.append(averages.table(sort_by=key, row_limit=rows))
    text = "\n".join(lines)
    atomic_write_text(path, text + "\n")
    return text


def format_summary(rows: list, peaks: dict, device_name: str) -> str:
    head = (f"roofline on {device_name}: peak matmul {peaks['matmul_tflops']:.3g} TFLOP/s "
            f"({peaks['matmul_dtype']}), peak copy {peaks['copy_gbps']:.3g} GB/s")
    cols = ["region", "ms", "gflop", "mbytes", "tflops", "gbps", "pct_peak_flops", "pct_peak_bw", "bound"]
    table = [cols] + [[r[c] if isinstance(r[c], str) else f"{r[c]:.4g}" for c in cols] for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(cols))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)) for row in table]
    return "\n".join([head] + lines)


def write_summary(rows: list, peaks: dict, out_dir: str, device_name: str) -> str:
    """roofline.txt and roofline.json in out_dir; returns the text."""
    text = format_summary(rows, peaks, device_name)
    atomic_write_text(os.path.join(out_dir, "roofline.txt"), text + "\n")
    atomic_write_text(os.path.join(out_dir, "roofline.json"),
                      json.dumps({"device": device_name, "peaks": peaks, "regions": rows}, indent=2))
    return text
