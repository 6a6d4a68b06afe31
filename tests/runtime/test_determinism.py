import os

import pytest
import torch

import fastunlearn as fu
from fastunlearn.runtime.determinism import deterministic_mode, worker_seeding


def _flags():
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)


def test_mode_is_scoped_and_restored_on_error():
    before = _flags()
    with deterministic_mode(True, "cpu"):
        assert _flags() == (True, True, False)
    assert _flags() == before
    with pytest.raises(RuntimeError, match="boom"):
        with deterministic_mode(True, "cpu"):
            raise RuntimeError("boom")
    assert _flags() == before
    with deterministic_mode(False):
        assert _flags() == before


def test_cublas_workspace_set_for_cuda_and_put_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_mode(True, "cuda"):  # only the settings; nothing runs on the device
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic_mode(True, "cuda"):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_config_checks_the_flag():
    assert fu.UnlearnConfig(deterministic=True).to_dict()["deterministic"] is True
    with pytest.raises(ValueError, match="deterministic"):
        fu.UnlearnConfig(deterministic=1)


def test_two_deterministic_runs_give_bitwise_equal_weights(digits_model, one_thread):
    from conftest import DIGITS_MEAN, DIGITS_STD

    model, x, y = digits_model
    f = y == 3
    forget, remain = (x[f][:60], y[f][:60]), (x[~f][:300], y[~f][:300])
    # Noise in the search and a remain term: every source of randomness the run has.
    cfg = fu.UnlearnConfig(deterministic=True, gamma=0.5, steps=2, epochs=2, lr=1e-3, remain_reg=0.5, seed=5,
                           batch_size=16)
    before = _flags()
    runs = [fu.unlearn(model, forget, remain, config=cfg, mean=DIGITS_MEAN, std=DIGITS_STD, progress=False)
            for _ in range(2)]
    assert _flags() == before, "the run must put the global settings back"
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(runs[0].relabels, runs[1].relabels)
    assert any(not torch.equal(a[k], v) for k, v in model.state_dict().items())  # it did train


def test_worker_seeding_gives_the_same_worker_draws():
    ds = torch.utils.data.TensorDataset(torch.arange(8))

    def draws():
        loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True, **worker_seeding(3))
        return [b[0].tolist() for b in loader]

    assert draws() == draws()
