"""The suite's random inputs are replayable: FASTUNLEARN_TEST_SEED fixes every draw a test makes."""

import torch
from conftest import fresh_seed


def test_a_given_seed_is_used_and_the_global_generator_left_alone(monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_TEST_SEED", "1234")
    state = torch.get_rng_state()
    assert fresh_seed() == 1234
    assert torch.equal(torch.get_rng_state(), state)


def test_fresh_seeds_vary_and_leave_the_global_generator_alone(monkeypatch):
    monkeypatch.delenv("FASTUNLEARN_TEST_SEED", raising=False)
    state = torch.get_rng_state()
    seeds = [fresh_seed() for _ in range(8)]
    assert len(set(seeds)) > 1 and all(0 <= s < 2**31 for s in seeds)
    assert torch.equal(torch.get_rng_state(), state)


def test_gen_also_seeds_the_global_generator(gen):
    # A test that draws from both replays both: they start from the one printed seed.
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5))
