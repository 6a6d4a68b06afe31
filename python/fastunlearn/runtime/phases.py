"""Named phases of a run, timed on request (see fastunlearn.runtime.profiling.phases).

Kept apart from profiling.py so that the library can mark its phases without importing
the profiler's FLOP tables.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, Optional

import torch


def _sync(device: Optional[torch.device]):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


_recording: Optional[dict] = None  # name -> [seconds, count] while a phases() block runs
_recording_device: Optional[torch.device] = None


@contextlib.contextmanager
def phases(device) -> Iterator[dict]:
    """Record where the time of the code inside goes, by the library's named phases.

        with fastunlearn.runtime.profiling.phases("cuda") as times:
            session.revise(forget)
        # times: {"search": (seconds, calls), "search/recheck": ..., "finetune": ..., ...}

    A name with a "/" is a part of the phase before the "/". Each phase synchronises the
    device at its start and end, so the host cannot run ahead across phase boundaries: the
    total under phases() is a little higher than without it. Phases also show as ranges in
    a torch.profiler trace taken at the same time.
    """
    global _recording, _recording_device
    if _recording is not None:
        raise RuntimeError("phases() is already recording: nested blocks are not supported")
    _recording, _recording_device = {}, torch.device(device)
    out: dict = {}
    try:
        yield out
    finally:
        out.update({k: (v[0], v[1]) for k, v in _recording.items()})
        _recording, _recording_device = None, None


class _Phase:
    __slots__ = ("name", "t0", "rf")

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        _sync(_recording_device)
        self.rf = torch.profiler.record_function(self.name)
        self.rf.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if exc[0] is None:  # after an error, a sync could raise again and hide it
            _sync(_recording_device)
        dt = time.perf_counter() - self.t0
        self.rf.__exit__(*exc)
        if _recording is not None:
            slot = _recording.setdefault(self.name, [0.0, 0])
            slot[0] += dt
            slot[1] += 1
        return False


_NULL = contextlib.nullcontext()


def phase(name: str):
    """A named part of a run, timed when a ``phases`` block is recording (else a no-op)."""
    if _recording is None:
        return _NULL
    return _Phase(name)
