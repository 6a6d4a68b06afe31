"""Settings chosen by measurement: the cache key, the cache, the budget and the choice.

The speed settings of a run (search precision and chunk size, train-step precision, layout,
BatchNorm fusion, CUDA graph) depend on the model, the input shape and the machine more
than any constant can say. The first time a key (model structure, input shape, input dtype,
device, torch version) is seen in a job large enough to pay for it, the candidates are timed
on a few real steps (the measuring itself lives with the engine's callers, see
``fastunlearn.autotune``) and the fastest one that keeps the accuracy contract is kept, in
memory and on disk, for every later run and process with the same key.

What this module owns:
- ``tuning_key``: the key;
- ``lookup`` / ``store``: the cache (in memory, then one JSON file per key under
  ``cache_dir()``; a file that cannot be read is ignored with a warning);
- ``worth_tuning`` / ``budget_seconds``: whether a job may tune and how long it may take;
- ``run_trials`` / ``fastest``: time candidates in order within a budget, and pick the
  fastest that passes.

Environment: FASTUNLEARN_TUNE=0 turns tuning off (cached choices are then not read either);
FASTUNLEARN_TUNE_CACHE moves the cache directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from fastunlearn.runtime.precision import cpu_amx_usable

TUNE_ENV = "FASTUNLEARN_TUNE"
CACHE_ENV = "FASTUNLEARN_TUNE_CACHE"
# Bumped when Settings or the measuring changes meaning: older files are then not read.
CACHE_FORMAT = 1
# Tuning may take this fraction of the job it serves ...
BUDGET_FRACTION = 0.05
# ... and never more than this many seconds.
BUDGET_CAP_S = 5.0

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Settings:
    """One candidate: the speed settings of a run, as UnlearnConfig / Unlearner spell them.

    search_chunk 0 leaves the chunk size to the search engine (sized from free memory on a
    GPU). cuda_graph / compile None: not measured, the config's own setting stays. None of
    these changes the method; bf16 search keeps its fp32 recheck.
    """

    search_precision: str = "fp32"
    train_precision: str = "fp32"
    channels_last: bool = True
    fuse_batch_norm: bool = True
    search_chunk: int = 0
    cuda_graph: Optional[bool] = None
    compile: Optional[bool] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """Raises ValueError when ``d`` is not a complete, well-typed Settings."""
        if not isinstance(d, dict) or sorted(d) != sorted(f.name for f in dataclasses.fields(cls)):
            raise ValueError(f"expected the fields {sorted(f.name for f in dataclasses.fields(cls))}, got {d!r}")
        for name in ("search_precision", "train_precision"):
            if d[name] not in PRECISIONS:
                raise ValueError(f"{name} must be one of {PRECISIONS}, got {d[name]!r}")
        for name in ("channels_last", "fuse_batch_norm", "cuda_graph", "compile"):
            if not isinstance(d[name], bool) and not (d[name] is None and name in ("cuda_graph", "compile")):
                raise ValueError(f"{name} must be a bool, got {d[name]!r}")
        if isinstance(d["search_chunk"], bool) or not isinstance(d["search_chunk"], int) or d["search_chunk"] < 0:
            raise ValueError(f"search_chunk must be an integer >= 0, got {d['search_chunk']!r}")
        return cls(**d)


@dataclass
class Trial:
    """One candidate's measurement: seconds for the probe (None: not run, the budget was
    spent), ok (it met the accuracy contract), and a note (why not ok)."""

    settings: Settings
    part: str
    seconds: Optional[float]
    ok: bool = True
    note: str = ""


def enabled() -> bool:
    """Tuning, and reading its cache, unless FASTUNLEARN_TUNE=0."""
    return os.environ.get(TUNE_ENV, "1") != "0"


def cache_dir() -> str:
    """FASTUNLEARN_TUNE_CACHE, else the user cache directory ($XDG_CACHE_HOME or ~/.cache)."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastunlearn", "tuning")


def structure_hash(model: nn.Module) -> str:
    """A hash of what decides speed, not of the weights' values: each module's class (and its
    forward's code, so a user's own forward counts), and every parameter and buffer's name,
    shape and dtype."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        cls = type(m)
        code = getattr(getattr(cls, "forward", None), "__code__", None)
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__};".encode())
        if code is not None:
            h.update(code.co_code)
    for kind, items in (("p", model.named_parameters()), ("b", model.named_buffers())):
        for name, t in items:
            h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:32]


def device_description(device: torch.device) -> str:
    """The device as timings depend on it: the GPU's name, or the CPU's model, its matrix
    and bf16 units and the threads torch uses."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    amx = cpu_amx_usable()
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return f"{device.type}:{model};amx={amx};avx512_bf16={bf16};threads={torch.get_num_threads()}"


def tuning_key(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype, device: torch.device,
               job: str = "") -> str:
    """The cache key: model structure, per-sample input shape, input dtype, device, torch
    version, and ``job``: what else the choice depends on (the batch size, the steps)."""
    fields = [CACHE_FORMAT, structure_hash(model), list(input_shape), str(dtype), device_description(device),
              torch.__version__, job]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:40]


_MEMORY: dict = {}


def _path(key: str) -> str:
    return os.path.join(cache_dir(), f"{key}.json")


def lookup(key: str) -> Optional[Settings]:
    """The cached choice for ``key``: from memory, else from its file; None when absent or
    unreadable (a corrupted file is ignored with a warning, and tuning then runs again)."""
    if key in _MEMORY:
        return _MEMORY[key]
    path = _path(key)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            raise ValueError(f"format {data.get('format') if isinstance(data, dict) else data!r}, "
                             f"expected {CACHE_FORMAT}")
        settings = Settings.from_dict(data.get("settings"))
    except (OSError, ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"fastunlearn: ignoring the tuning cache file {path}, which could not be read ({e}); "
                      "the settings will be measured again", stacklevel=2)
        return None
    _MEMORY[key] = settings
    return settings


def store(key: str, settings: Settings, trials: Sequence[Trial] = ()) -> None:
    """Keep ``settings`` for ``key`` in memory and on disk (written to a temporary file and
    renamed, so a reader never sees half a file). A cache directory that cannot be written
    only loses the disk copy, with a warning."""
    _MEMORY[key] = settings
    data = {"format": CACHE_FORMAT, "settings": settings.to_dict(), "torch": torch.__version__,
            "trials": [dict(part=t.part, settings=t.settings.to_dict(), seconds=t.seconds, ok=t.ok, note=t.note)
                       for t in trials]}
    directory = cache_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, _path(key))
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"fastunlearn: could not write the tuning cache in {directory} ({e})", stacklevel=2)


def forget_memory() -> None:
    """Drop the in-memory cache (the files stay): the next lookup reads the disk."""
    _MEMORY.clear()


def worth_tuning(job_units: float, tune_units: float) -> bool:
    """Whether a job of ``job_units`` of work can pay for measuring ``tune_units`` of it:
    at most BUDGET_FRACTION of it. Both in the same unit (sample passes)."""
    return tune_units <= BUDGET_FRACTION * job_units


def budget_seconds(job_seconds: float) -> float:
    """How long tuning may take for a job estimated at ``job_seconds``."""
    return min(BUDGET_FRACTION * max(0.0, job_seconds), BUDGET_CAP_S)


@dataclass
class Spent:
    """What measuring has used so far: seconds in all, and the longest single measurement
    (the guess for the next one)."""

    seconds: float = 0.0
    slowest: float = 0.0


def run_trials(queue: Sequence[tuple], measure: Callable[[str, Settings], tuple], budget_s: float,
               spent: Optional[Spent] = None, clock: Callable[[], float] = time.perf_counter) -> list[Trial]:
    """Measure the (part, settings) of ``queue`` in order while the time spent plus the
    longest measurement so far stays within ``budget_s``; the rest are recorded as not run.

    measure(part, settings) -> (seconds, ok, note): ``seconds`` is the candidate's own time
    (what the choice compares); the wall time of the whole measurement (warm-up, checks) is
    what counts against the budget. ``spent`` carries over between calls and is updated.
    """
    spent = Spent() if spent is None else spent
    trials = []
    for part, settings in queue:
        if spent.seconds + spent.slowest > budget_s:
            trials.append(Trial(settings, part, None, False, "not run: over the budget"))
            continue
        t0 = clock()
        seconds, ok, note = measure(part, settings)
        took = clock() - t0
        spent.seconds += took
        spent.slowest = max(spent.slowest, took)
        trials.append(Trial(settings, part, seconds, ok, note))
    return trials


def fastest(trials: Sequence[Trial], part: str) -> Optional[Trial]:
    """The fastest measured trial of ``part`` that met the contract, or None."""
    passed = [t for t in trials if t.part == part and t.seconds is not None and t.ok]
    return min(passed, key=lambda t: t.seconds) if passed else None


def format_trials(trials: Sequence[Trial]) -> str:
    """The candidates as a table, one row each, the fastest of each part that met the
    contract (the one chosen) marked with *."""
    chosen = {id(fastest(trials, t.part)) for t in trials}
    fields = [f.name for f in dataclasses.fields(Settings)]
    header = ["part"] + fields + ["seconds", "ok", "note"]
    rows = [header]
    for t in trials:
        mark = " *" if id(t) in chosen else ""
        rows.append([t.part] + [str(getattr(t.settings, f)) for f in fields]
                    + ["-" if t.seconds is None else f"{t.seconds:.4f}{mark}", str(t.ok), t.note])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
