"""heap.reuse_freed_memory: freed buffers stay in the heap inside the block, not outside."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn.engine.finetune import FinetuneEngine
from fastunlearn.engine.search import SearchResult
from fastunlearn.runtime import heap

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


CHURN = """
import torch
import torch.nn as nn
torch.set_num_threads(1)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                    nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                    nn.Flatten(), nn.Linear(16 * 28 * 28, 10))
x = torch.rand(64, 1, 28, 28)
def churn(steps):
    # Train steps: every one frees and reallocates its activations (about 3 MiB each).
    for _ in range(steps):
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()
"""


def test_available_on_glibc(monkeypatch):
    assert heap.available() == GLIBC
    monkeypatch.setenv("FASTUNLEARN_HEAP_REUSE", "0")
    assert not heap.available()


@pytest.mark.skipif(not GLIBC, reason="mallopt tuning exists only in glibc")
def test_no_page_faults_inside_many_in_a_fresh_process():
    # glibc's own behaviour, measured in a process where nothing has tuned it yet, then the
    # same steps inside the block (also in a fresh process, for the same starting heap).
    def faults(inside: bool) -> int:
        code = CHURN + f"""
import resource
from contextlib import nullcontext
from fastunlearn.runtime import heap
with heap.reuse_freed_memory() if {inside} else nullcontext():
    churn(5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    churn(20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        return int(out.stdout.split()[-1])

    fresh, inside = faults(False), faults(True)
    # Fresh: every step faults its activations in again (20k-60k faults over 20 steps).
    # Inside: none, apart from an occasional one-off growth of the heap when a freed block
    # is too fragmented to reuse (up to about 3k faults, measured).
    assert fresh > 1000, (fresh, inside)
    assert inside < fresh // 5, (fresh, inside)


def test_nesting_ends_at_the_outermost_exit():
    with heap.reuse_freed_memory():
        with heap.reuse_freed_memory():
            pass
        assert heap.active() == GLIBC
    assert not heap.active()
    with heap.reuse_freed_memory(enabled=False):
        assert not heap.active()


def test_finetune_runs_inside_on_cpu(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
    x = torch.randint(0, 256, (10, 1, 7, 7), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 3, (10,), generator=gen)
    search = SearchResult(labels[None], torch.ones(1, 10, dtype=torch.bool), torch.zeros(1, 10), None,
                          torch.ones(1, 10, dtype=torch.int16))
    seen = []
    engine = FinetuneEngine(model, fu.UnlearnConfig(epochs=1, batch_size=4), device="cpu")
    engine.run(x, search, progress=False, on_step=lambda step, info: seen.append(heap.active()))
    assert seen == [GLIBC] * 3
    assert not heap.active()


def test_search_runs_inside_on_cpu(gen):
    class Probe(nn.Module):
        """A classifier that notes whether the heap is kept while the search calls it."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(49, 3)
            self.seen = []

        def forward(self, u):
            self.seen.append(heap.active())
            return self.fc(u.flatten(1))

    from fastunlearn.engine.search import run_search
    from fastunlearn.nn.frozen import frozen_copy

    model = Probe()
    frozen = frozen_copy(model, torch.device("cpu"))
    x = torch.randint(0, 256, (6, 1, 7, 7), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (6,), generator=gen)
    run_search(model, x, y, fu.UnlearnConfig(), device="cpu", frozen=frozen)
    assert frozen.seen and all(s == GLIBC for s in frozen.seen)
    assert not heap.active()
