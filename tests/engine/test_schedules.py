"""The lambda term only ever pulls the iterate back towards u0, for every schedule and clock."""

import itertools

import pytest
import torch

from fastunlearn import UnlearnConfig, reference
from fastunlearn.engine import search as search_mod
from fastunlearn.engine.search import run_search

SCHEDULES = reference.LAMDA_SCHEDULES


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lambda_is_never_negative_on_any_clock(schedule):
    for steps, refreshes, rate in itertools.product((1, 2, 3, 7), (1, 2, 5, 12), (0.0, 0.01, 0.7)):
        for r, t in itertools.product(range(refreshes), range(steps)):
            lam = reference.lamda_at(0.3, schedule, *reference.schedule_index(t, steps, r, refreshes), rate=rate)
            assert lam >= 0.0, f"{schedule} T={steps} R={refreshes} r={r} t={t}: lambda_t = {lam}"


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_pull_component_points_to_u0(gen, schedule):
    u0 = torch.rand(16, 1, 4, 4, generator=gen, dtype=torch.float64)
    u = (u0 + 0.05 * torch.randn(u0.shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    for r in range(6):
        lam = reference.lamda_at(0.5, schedule, *reference.schedule_index(0, 1, r, 6))
        v = reference.boundary_step(u, u0, torch.zeros_like(u), eps=0.2, alpha=0.01, lamda=lam, quantize=0)
        moved = (v - u) != 0
        if lam > 0:
            assert moved.any()
        # With no gradient and no noise, every move is the pull's: towards u0, never away.
        assert torch.all(torch.sign(v - u)[moved] == torch.sign(u0 - u)[moved]), f"refresh {r}: pushed away"


@pytest.mark.parametrize("schedule,steps,epochs", [(s, T, e) for s in SCHEDULES for T in (1, 3) for e in (1, 4)])
def test_the_engine_never_steps_with_a_negative_lambda(monkeypatch, gen, schedule, steps, epochs):
    seen = []
    real = search_mod.boundary_step

    def spy(*args, **kw):
        seen.append(kw["lamda"])
        return real(*args, **kw)

    monkeypatch.setattr(search_mod, "boundary_step", spy)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.randint(0, 256, (10, 1, 4, 4), generator=gen, dtype=torch.uint8)
    y = torch.randint(0, 3, (10,), generator=gen)
    cfg = UnlearnConfig(eps=0.1, steps=steps, lamda=0.4, lamda_schedule=schedule, random_start=True, gamma=0.01,
                        early_exit=False, epochs=epochs, refresh="epoch", precision="fp32")
    run_search(model, x, y, cfg, device="cpu", refreshes=epochs)
    assert len(seen) == steps * epochs
    assert min(seen) >= 0.0, f"lambda_t went negative: {seen}"
    if schedule == "linear" and steps * epochs > 1:
        assert max(seen) > 0.0  # the linear schedule still pulls before its horizon
