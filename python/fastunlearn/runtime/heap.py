"""Keep freed buffers in the process heap while a CPU run is in progress (glibc).

A CPU train step or search step frees and reallocates the same activation buffers every
time: a few hundred KB to tens of MB each. glibc gives freed memory back to the kernel:
blocks above its mmap threshold (128 KiB at start, raised on the fly up to 32 MiB) are
unmapped, and the top of the heap is trimmed once more than its trim threshold is free. So
every step pays page faults and the kernel's zeroing of each new page again, all of it
system time (bench/RESULTS.md measures the share). Inside ``reuse_freed_memory()`` blocks up to 32 MiB come
from the heap and freed memory stays there, so the next step reuses it without a fault.

On exit the unused heap is given back (malloc_trim) and the thresholds are left where glibc's
own adjustment settles in any process that has freed a 32 MiB block (mmap threshold 32 MiB,
trim threshold twice that), not put back to its start values: once a threshold is set,
glibc stops adjusting it, and its start values would make every later block above 128 KiB
a fresh mapping, slower than before the run.

Elsewhere than glibc (macOS, Windows, musl) this does nothing. FASTUNLEARN_HEAP_REUSE=0
turns it off, e.g. to measure what it brings.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from typing import Optional

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest accepted mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_KEEP_ALL = 2**31 - 1

_lock = threading.Lock()
_depth = 0
_libc: Optional[ctypes.CDLL] = None
_probed = False


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc, _probed
    if not _probed:
        _probed = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _ = libc.gnu_get_libc_version  # only glibc has it; musl has mallopt as a no-op stub
            libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
            libc.malloc_trim.argtypes = (ctypes.c_size_t,)
            _libc = libc
        except (OSError, AttributeError):
            _libc = None
    return _libc


def available() -> bool:
    """True where reuse_freed_memory() has an effect (glibc, not turned off)."""
    return os.environ.get("FASTUNLEARN_HEAP_REUSE", "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Within this block, serve blocks up to 32 MiB from the heap and keep freed memory.

    Nested and concurrent uses are counted: the outermost exit trims the heap.
    """
    global _depth
    libc = _glibc() if enabled and available() else None
    if libc is None:
        yield
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
                libc.malloc_trim(0)


def active() -> bool:
    """True inside reuse_freed_memory() where it has an effect."""
    return _depth > 0
