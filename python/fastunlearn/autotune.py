"""Measure the speed settings on the user's model, shapes and device, and apply the choice.

``plan`` decides, for a session's first revision, which settings its search and train step
use: the ones the user gave (always), else a cached choice for this model, input and
device (``runtime.tuning``), else, when the job is large enough to pay for it, the fastest
candidates measured on a few real steps of this job, else the plain defaults. ``tune``
measures ahead of time (``fu.tune``, ``fastunlearn tune``) and fills the same cache.

Candidates: search precision (fp32, or bf16 with its fp32 recheck, kept only when its
labels agree with fp32's on at least MIN_LABEL_AGREEMENT of the probe), search chunk size
(CPU), train-step precision, the train step's layout (channels_last or NCHW; the search's
frozen copy keeps its own) and BatchNorm fusion. None of them changes the method, only
rounding. The plain defaults (what an untuned run does) are timed first: they size the
budget, and they stay the choice when the budget runs out before anything faster is found.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn as nn

from fastunlearn.config import UnlearnConfig
from fastunlearn.data import validate
from fastunlearn.data.pixels import as_pixels
from fastunlearn.engine.distributed import world
from fastunlearn.engine.finetune import FinetuneEngine
from fastunlearn.engine.search import CPU_SEARCH_CHUNK, run_search
from fastunlearn.nn.frozen import frozen_copy
from fastunlearn.nn.fuse import batch_norm_fusion_on, fuse_batch_norm_relu
from fastunlearn.nn.layout import default_channels_last, has_conv
from fastunlearn.runtime import tuning
from fastunlearn.runtime.precision import cpu_has_native_bf16, resolve_precision

# bf16 search must keep at least this share of the fp32 search's labels (as the recheck does).
MIN_LABEL_AGREEMENT = 0.999
# Forget samples the search is timed on, and the CPU chunk sizes tried (the first is the
# engine's own CPU default).
SEARCH_PROBE = 256
CPU_CHUNKS = (CPU_SEARCH_CHUNK, CPU_SEARCH_CHUNK // 2, CPU_SEARCH_CHUNK * 2)
# Timed searches of the probe per candidate (the fastest counts).
SEARCH_REPEATS = 2
# Train steps per candidate: untimed warm-up steps (first-use costs), then timed ones (the
# fastest counts).
TRAIN_WARMUP, TRAIN_TIMED = 2, 3


@dataclass
class Plan:
    """What a session runs with: the search's and the train step's configs, the train
    step's layout (None: the engine's default), and how the choice was made (``report``
    goes into ``res.timings["tuned"]``, ``seconds`` into ``res.timings["tune"]``)."""

    search_config: UnlearnConfig
    train_config: UnlearnConfig
    channels_last: Optional[bool]
    source: str
    seconds: float = 0.0
    settings: Optional[tuning.Settings] = None
    trials: list = field(default_factory=list)

    @property
    def report(self) -> dict:
        return {"source": self.source, "seconds": self.seconds,
                "settings": None if self.settings is None else self.settings.to_dict()}


def apply(config: UnlearnConfig, channels_last: Optional[bool], settings: Optional[tuning.Settings]):
    """(search config, train config, channels_last) with ``settings`` filling only what the
    user left to the library: precision "auto", search_batch_size None, fuse_batch_norm
    "auto", channels_last None. Explicit settings always win."""
    if settings is None:
        return config, config, channels_last
    search, train = config, config
    if config.precision == "auto":
        search = search.replace(precision=settings.search_precision)
        train = train.replace(precision=settings.train_precision)
    if config.search_batch_size is None and settings.search_chunk > 0:
        search = search.replace(search_batch_size=settings.search_chunk)
    if config.fuse_batch_norm == "auto":
        train = train.replace(fuse_batch_norm=settings.fuse_batch_norm)
    for name in ("cuda_graph", "compile"):
        if getattr(config, name) == "auto" and getattr(settings, name) is not None:
            train = train.replace(**{name: getattr(settings, name)})
    return search, train, settings.channels_last if channels_last is None else channels_last


def key_for(model: nn.Module, x: torch.Tensor, config: UnlearnConfig, device: torch.device) -> str:
    job = f"batch={config.batch_size};steps={config.steps};remain={config.remain_reg > 0}"
    return tuning.tuning_key(model, tuple(x.shape[1:]), x.dtype, device, job)


def _name(dtype: Optional[torch.dtype]) -> str:
    return "fp32" if dtype is None else "bf16"


def _precisions(config: UnlearnConfig, device: torch.device, model: Optional[nn.Module] = None,
                sample_shape: Optional[tuple] = None) -> list:
    """The precision "auto" resolves to (for ``model`` on inputs of ``sample_shape``) first,
    then the other where it may be faster: bf16 on GPUs and on CPUs with AMX or AVX512-BF16
    (an emulated bf16 is several times slower, not worth a measurement). An explicit precision
    is the only candidate."""
    default = _name(resolve_precision(config.precision, device, model, sample_shape))
    if config.precision != "auto":
        return [default]
    if device.type == "cuda" or cpu_has_native_bf16() or torch.cpu._is_avx512_bf16_supported():
        return [default] + [p for p in ("fp32", "bf16") if p != default]
    return ["fp32"]


def _by_distance(candidates: list, default: tuple, fields: tuple) -> list:
    """Candidates ordered by how many of ``fields`` differ from ``default`` (the plain
    default first; a precision change before the others at equal distance)."""
    def key(c):
        diff = [getattr(c, f) != d for f, d in zip(fields, default)]
        return sum(diff), not diff[0]
    return sorted(candidates, key=key)


def search_candidates(config: UnlearnConfig, device: torch.device, model: Optional[nn.Module] = None,
                      sample_shape: Optional[tuple] = None) -> list:
    """The plain default first (the precision "auto" gives, the engine's own chunk size)."""
    precisions = _precisions(config, device, model, sample_shape)
    chunks = CPU_CHUNKS if device.type == "cpu" and config.search_batch_size is None else (0,)
    out = [tuning.Settings(search_precision=p, search_chunk=c) for p in precisions for c in chunks]
    return _by_distance(out, (precisions[0], chunks[0]), ("search_precision", "search_chunk"))


def train_candidates(model: nn.Module, config: UnlearnConfig, channels_last: Optional[bool],
                     device: torch.device, sample_shape: Optional[tuple] = None) -> list:
    """The plain default first (the engine's own precision, fusion and layout)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fusable = batch_norm_fusion_on(device, False, config.replace(fuse_batch_norm=True))
    default_fused = batch_norm_fusion_on(device, False, config)
    fusions = [default_fused, not default_fused] if config.fuse_batch_norm == "auto" and has_bn and fusable else [
        default_fused]
    precisions = _precisions(config, device, model, sample_shape)
    out, default = [], None
    for p in precisions:
        for fused in fusions:
            default_cl = default_channels_last(model, device, resolve_precision(p, device), fused)
            layouts = [default_cl, not default_cl] if channels_last is None and has_conv(model) else [
                default_cl if channels_last is None else bool(channels_last)]
            out += [tuning.Settings(train_precision=p, channels_last=cl, fuse_batch_norm=fused) for cl in layouts]
            default = default or (p, fused, layouts[0])
    return _by_distance(out, default, ("train_precision", "fuse_batch_norm", "channels_last"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _search_measure(frozen, x, y, config, mean, std, device):
    """measure(settings) for the search part: seconds for the probe, and the label check."""
    fp32_labels = {}

    def precision(settings):
        return settings.search_precision if config.precision == "auto" else config.precision

    def labels(settings):
        cfg = config.replace(precision=precision(settings),
                             search_batch_size=settings.search_chunk or config.search_batch_size)
        return run_search(frozen, x, y, cfg, mean=mean, std=std, device=device, frozen=frozen).relabels[0]

    def measure(settings):
        warm = config.replace(precision=precision(settings))
        run_search(frozen, x[:settings.search_chunk or 8], y[:settings.search_chunk or 8], warm, mean=mean,
                   std=std, device=device, frozen=frozen)
        seconds = math.inf
        for _ in range(SEARCH_REPEATS):  # the fastest repeat: other processes only ever add time
            _sync(device)
            t0 = time.perf_counter()
            lab = labels(settings)
            _sync(device)
            seconds = min(seconds, time.perf_counter() - t0)
        if settings.search_precision == "fp32":
            fp32_labels.setdefault("y", lab)
            return seconds, True, ""
        if "y" not in fp32_labels:
            fp32_labels["y"] = labels(replace(settings, search_precision="fp32"))
        agree = float((lab == fp32_labels["y"]).float().mean())
        ok = agree >= MIN_LABEL_AGREEMENT
        return seconds, ok, f"labels agree with fp32: {agree:.4%}"

    return measure


def _train_measure(model, frozen, x, config, mean, std, device):
    """measure(settings) for the train part: seconds per step after the warm-up steps."""
    rows = min(len(x), config.batch_size)
    xf = x[:rows].to(device)
    tf = torch.zeros(rows, dtype=torch.int64, device=device)
    remain = (xf, tf) if config.remain_reg > 0 else (None, None)

    def measure(settings):
        cfg = config.replace(precision=settings.train_precision if config.precision == "auto" else config.precision,
                             fuse_batch_norm=settings.fuse_batch_norm, compile=False, cuda_graph=False)
        engine = FinetuneEngine(copy.deepcopy(model), cfg, mean=mean, std=std, device=device, teacher=frozen,
                                channels_last=settings.channels_last)
        undo = fuse_batch_norm_relu(engine.model) if engine.batch_norm_fused else (lambda: None)
        try:
            engine.model.train()
            for _ in range(TRAIN_WARMUP):
                engine.step(xf, tf, *remain)
            seconds = math.inf
            for _ in range(TRAIN_TIMED):  # the fastest step: other processes only ever add time
                _sync(device)
                t0 = time.perf_counter()
                engine.step(xf, tf, *remain)
                _sync(device)
                seconds = min(seconds, time.perf_counter() - t0)
            return seconds, True, ""
        finally:
            undo()

    return measure


@dataclass
class Job:
    """What a tuning serves: the forget samples, the search refreshes, and the config."""

    samples: int
    refreshes: int
    config: UnlearnConfig

    @property
    def search_units(self) -> float:
        return self.samples * self.refreshes * (self.config.steps + 1)

    @property
    def train_steps(self) -> int:
        return self.config.epochs * math.ceil(self.samples / self.config.batch_size)

    @property
    def units(self) -> float:
        """Sample passes of the whole job (a search step and a train sample count one each)."""
        remain = 2 if self.config.remain_reg > 0 else 1
        return self.search_units + self.train_steps * self.config.batch_size * remain


def tuning_units(job: Job, n_search: int, n_train: int) -> float:
    """Sample passes that measuring n_search search and n_train train candidates costs."""
    probe = min(job.samples, SEARCH_PROBE)
    search = n_search * (SEARCH_REPEATS * probe + min(probe, max(CPU_CHUNKS))) * (job.config.steps + 1)
    remain = 2 if job.config.remain_reg > 0 else 1
    return search + n_train * (TRAIN_WARMUP + TRAIN_TIMED) * job.config.batch_size * remain


def measure(model, frozen, x, y, config, channels_last, mean, std, device, job: Optional[Job],
            cap_s: float = tuning.BUDGET_CAP_S):
    """Time the candidates: first the plain defaults of the search and of the train step,
    which estimate the job's time and so the budget (BUDGET_FRACTION of ``job``, at most
    cap_s; no job: cap_s), then the others, nearest to the defaults first, while the budget
    lasts. Returns (Settings, trials, seconds spent)."""
    xs, ys = x[:SEARCH_PROBE], y[:SEARCH_PROBE]
    measures = {"search": _search_measure(frozen, xs, ys, config, mean, std, device),
                "train": _train_measure(model, frozen, x, config, mean, std, device)}
    shape = tuple(x.shape[1:])
    queues = {"search": search_candidates(config, device, frozen, shape),
              "train": train_candidates(model, config, channels_last, device, shape)}
    spent = tuning.Spent()
    first = tuning.run_trials([(part, q[0]) for part, q in queues.items()], lambda p, c: measures[p](c), math.inf,
                              spent)
    budget = cap_s
    if job is not None:
        search_s, train_s = (t.seconds for t in first)
        estimate = search_s * job.search_units / (len(xs) * (config.steps + 1)) + train_s * job.train_steps
        budget = min(tuning.budget_seconds(estimate), cap_s)
    rest = [(part, c, i) for part, q in queues.items() for i, c in enumerate(q[1:])]
    rest.sort(key=lambda r: r[2])  # alternate the parts, nearest to the defaults first
    trials = first + tuning.run_trials([(p, c) for p, c, _ in rest], lambda p, c: measures[p](c), budget, spent)
    best = {part: (tuning.fastest(trials, part) or first[i]).settings for i, part in enumerate(queues)}
    chosen = replace(best["train"], search_precision=best["search"].search_precision,
                     search_chunk=best["search"].search_chunk)
    return chosen, trials, spent.seconds


def plan(model: nn.Module, frozen: nn.Module, config: UnlearnConfig, channels_last: Optional[bool],
         x: torch.Tensor, y: torch.Tensor, mean, std, device: torch.device, refreshes: int) -> Plan:
    """The settings a session's revisions run with (see the module notes). model: the
    trainable copy (left untouched: candidates train copies of it); frozen: the search's."""
    if not tuning.enabled():
        return Plan(config, config, channels_last, "off (FASTUNLEARN_TUNE=0)")
    if world()[1] > 1:  # each rank would measure for itself, and might choose differently
        return Plan(config, config, channels_last, "off (several processes)")
    n_search = len(search_candidates(config, device, frozen, tuple(x.shape[1:])))
    n_train = len(train_candidates(model, config, channels_last, device, tuple(x.shape[1:])))
    if n_search * n_train <= 1:
        return Plan(config, config, channels_last, "explicit")
    key = key_for(model, x, config, device)
    cached = tuning.lookup(key)
    if cached is not None:
        return Plan(*apply(config, channels_last, cached), "cache", 0.0, cached)
    if device.type != "cpu":
        # The train step is timed eagerly, without the CUDA graph a GPU run replays, so on a
        # GPU only a choice made on purpose (fu.tune) is used.
        return Plan(config, config, channels_last, "default (measured on CPU only; fu.tune for a GPU)")
    job = Job(len(x), refreshes, config)
    if not tuning.worth_tuning(job.units, tuning_units(job, n_search, n_train)):
        return Plan(config, config, channels_last, "default (job too small to tune)")
    t0 = time.perf_counter()
    settings, trials, _ = measure(model, frozen, x, y, config, channels_last, mean, std, device, job)
    tuning.store(key, settings, trials)
    return Plan(*apply(config, channels_last, settings), "measured", time.perf_counter() - t0, settings, trials)


def tune(model: nn.Module, example, config: Optional[UnlearnConfig] = None, mean=None, std=None, device=None, *,
         channels_last: Optional[bool] = None, budget_s: float = 30.0, verbose: bool = True) -> Plan:
    """Measure the candidate settings for ``model`` on ``example`` ahead of time, cache the
    choice for later runs (in any process) with the same model structure, input shape and
    dtype, device, torch version, batch size and steps, and print the candidates' table.

    example: (x, y) or x alone, (N, C, H, W) uint8 or float in [0, 1] images like the forget
    set's (a few hundred rows are enough; labels default to the model's predictions).
    budget_s: the most the measuring may take. Returns the Plan (``trials`` holds the table).
    On a GPU the train step is timed eagerly (no CUDA graph); CUDA graph and compile are
    not among the candidates, and runs keep their own settings of both.
    """
    validate.check_model(model)
    config = UnlearnConfig() if config is None else config
    x, y = example if isinstance(example, (tuple, list)) else (example, None)
    dev = validate.check_devices(model, device, **{"example images": x})
    mean_t, std_t = validate.mean_std(mean, std, x.shape[1])
    mean_t, std_t = (None, None) if mean_t is None else (mean_t.to(dev), std_t.to(dev))
    frozen = frozen_copy(model, dev, channels_last=default_channels_last(model, dev) if channels_last is None
                         else channels_last)
    if y is None:
        with torch.no_grad():
            probe = as_pixels(x[:SEARCH_PROBE], dev)
            if mean_t is not None:
                probe = (probe - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)
            y = frozen(probe.contiguous()).argmax(1).cpu()
        x = x[:len(y)]
    trainable = copy.deepcopy(model).to(dev).requires_grad_(True)
    t0 = time.perf_counter()
    settings, trials, _ = measure(trainable, frozen, x, y, config, channels_last, mean_t, std_t, dev, None,
                                  cap_s=budget_s)
    tuning.store(key_for(trainable, x, config, dev), settings, trials)
    result = Plan(*apply(config, channels_last, settings), "measured", time.perf_counter() - t0, settings, trials)
    if verbose:
        print(f"tuned in {result.seconds:.2f}s (cache: {tuning.cache_dir()})")
        for part in ("search", "train"):
            print(tuning.format_trials([t for t in trials if t.part == part]))
    return result

