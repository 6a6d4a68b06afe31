"""runtime.tuning: the key, the cache (memory, disk, corrupted files), the budget, the choice."""

import json
import os

import pytest
import torch
import torch.nn as nn

from fastunlearn.runtime import tuning
from fastunlearn.runtime.tuning import Settings


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    tuning.forget_memory()
    yield tmp_path
    tuning.forget_memory()


def net(width=4, classes=3):
    return nn.Sequential(nn.Conv2d(1, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(),
                         nn.Linear(width * 36, classes))


def test_key_follows_structure_shape_dtype_and_job_not_weights():
    cpu = torch.device("cpu")
    a, b = net(), net()
    with torch.no_grad():
        b[0].weight.add_(1.0)
    key = tuning.tuning_key(a, (1, 8, 8), torch.uint8, cpu)
    assert key == tuning.tuning_key(b, (1, 8, 8), torch.uint8, cpu)  # other weights, same structure
    others = [tuning.tuning_key(net(width=5), (1, 8, 8), torch.uint8, cpu),
              tuning.tuning_key(a, (1, 9, 9), torch.uint8, cpu),
              tuning.tuning_key(a, (1, 8, 8), torch.float32, cpu),
              tuning.tuning_key(a, (1, 8, 8), torch.uint8, cpu, job="batch=32")]
    assert len({key, *others}) == 5


def test_key_sees_a_changed_forward():
    class A(nn.Sequential):
        def forward(self, x):
            return super().forward(x)

    class B(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2

    layers = [nn.Flatten(), nn.Linear(4, 2)]
    assert tuning.structure_hash(A(*layers)) != tuning.structure_hash(B(*layers))


def test_store_then_lookup_from_disk(cache):
    s = Settings(search_precision="bf16", train_precision="fp32", channels_last=False, fuse_batch_norm=False,
                 search_chunk=64)
    tuning.store("k1", s)
    assert os.path.exists(cache / "k1.json")
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]
    tuning.forget_memory()
    assert tuning.lookup("k1") == s
    assert tuning.lookup("absent") is None


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": tuning.CACHE_FORMAT, "settings": {"x": 1}}),
                                     json.dumps({"format": -1, "settings": Settings().to_dict()}), "[]",
                                     json.dumps({"format": tuning.CACHE_FORMAT,
                                                 "settings": dict(Settings().to_dict(), search_precision="fp8")})])
def test_corrupted_cache_file_is_ignored_with_a_warning(cache, content):
    (cache / "bad.json").write_text(content)
    with pytest.warns(UserWarning, match="ignoring the tuning cache file"):
        assert tuning.lookup("bad") is None


def test_tuning_off_and_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    assert not tuning.enabled()
    monkeypatch.setenv(tuning.TUNE_ENV, "1")
    assert tuning.enabled()
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "x"))
    assert tuning.cache_dir() == str(tmp_path / "x")
    monkeypatch.delenv(tuning.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_dir() == os.path.join(str(tmp_path), "fastunlearn", "tuning")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_run_trials_respects_the_budget():
    """Each candidate takes 0.1 s on a fake clock; a budget of 0.35 s runs 3 of 6 and never
    goes over it; the fastest of those run is chosen, not an unrun faster one."""
    clock = FakeClock()
    seconds = [0.5, 0.4, 0.3, 0.01, 0.02, 0.03]
    queue = [("search", Settings(search_chunk=i + 1)) for i in range(len(seconds))]
    seen = []

    def measure(part, s):
        seen.append(s)
        clock.now += 0.1
        return seconds[s.search_chunk - 1], True, ""

    spent = tuning.Spent()
    trials = tuning.run_trials(queue, measure, 0.35, spent, clock=clock)
    assert seen == [s for _, s in queue[:3]]
    assert spent.seconds <= 0.35 + 1e-12 and spent.slowest == pytest.approx(0.1)
    assert [t.seconds for t in trials] == [0.5, 0.4, 0.3, None, None, None]
    assert all(not t.ok and "budget" in t.note for t in trials[3:])
    assert tuning.fastest(trials, "search").settings == queue[2][1]


def test_run_trials_spent_carries_over():
    clock = FakeClock()

    def measure(part, s):
        clock.now += 0.1
        return 1.0, True, ""

    spent = tuning.Spent(seconds=0.85)
    trials = tuning.run_trials([("train", Settings(search_chunk=i)) for i in range(4)], measure, 1.0, spent,
                               clock=clock)
    assert [t.seconds is not None for t in trials] == [True, False, False, False]
    assert spent.seconds == pytest.approx(0.95)
    assert tuning.run_trials([("train", Settings())], measure, 1.0, spent, clock=clock)[0].seconds is None


def test_fastest_keeps_the_contract_and_the_part():
    results = {1: (0.3, True), 2: (0.1, False), 3: (0.2, True), 4: (0.05, True)}
    queue = [("search", Settings(search_chunk=i)) for i in (1, 2, 3)] + [("train", Settings(search_chunk=4))]
    trials = tuning.run_trials(queue, lambda p, s: (*results[s.search_chunk], ""), 1e9)
    assert tuning.fastest(trials, "search").settings.search_chunk == 3
    assert tuning.fastest(trials, "train").settings.search_chunk == 4
    assert tuning.fastest(trials, "other") is None
    table = tuning.format_trials(trials)
    assert len(table.splitlines()) == 5 and "0.2000 *" in table and "0.0500 *" in table and "0.1000 *" not in table


def test_worth_tuning_and_budget():
    assert tuning.worth_tuning(1000, 50) and not tuning.worth_tuning(1000, 51)
    assert tuning.budget_seconds(10.0) == pytest.approx(0.5)
    assert tuning.budget_seconds(1e6) == tuning.BUDGET_CAP_S


def test_settings_from_dict_checks_fields():
    assert Settings.from_dict(Settings(search_chunk=3).to_dict()) == Settings(search_chunk=3)
    with pytest.raises(ValueError, match="search_chunk"):
        Settings.from_dict(dict(Settings().to_dict(), search_chunk=-1))
    with pytest.raises(ValueError, match="channels_last"):
        Settings.from_dict(dict(Settings().to_dict(), channels_last="yes"))
    with pytest.raises(ValueError, match="channels_last"):
        Settings.from_dict(dict(Settings().to_dict(), channels_last=None))
    assert Settings.from_dict(dict(Settings().to_dict(), cuda_graph=True)).cuda_graph is True
