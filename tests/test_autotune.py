"""Settings chosen by measurement, through fu.Unlearner / fu.unlearn: the cache across
processes, explicit settings winning, the budget, and chosen settings giving the results of
the same settings given explicitly."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn import autotune
from fastunlearn.nn.fuse import batch_norm_fusion_on
from fastunlearn.nn.layout import default_channels_last
from fastunlearn.runtime import tuning
from fastunlearn.runtime.precision import resolve_precision
from fastunlearn.runtime.tuning import Settings

MEAN, STD = [0.5], [0.25]


@pytest.fixture
def tuning_on(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning.TUNE_ENV, "1")
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path))
    tuning.forget_memory()
    yield tmp_path
    tuning.forget_memory()


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4)).eval()


def data(gen, n=48):
    return (torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=gen),
            torch.randint(0, 4, (n,), generator=gen))


CONFIG = dict(epochs=2, batch_size=8, lr=0.05, eps=0.1, steps=2)
# The opposite of the CPU defaults in every tuned field.
ODD = Settings(search_precision="fp32", train_precision="fp32", channels_last=False, fuse_batch_norm=False,
               search_chunk=5)


def seed_cache(model, x, cfg, settings=ODD):
    key = autotune.key_for(model, x, cfg, torch.device("cpu"))
    tuning.store(key, settings)
    tuning.forget_memory()  # read it back from the file, as a new process would
    return key


def test_chosen_settings_equal_the_same_settings_given_explicitly(tuning_on, gen, one_thread, monkeypatch):
    model, (x, y) = small_net(), data(gen)
    cfg = fu.UnlearnConfig(**CONFIG)
    seed_cache(model, x, cfg)
    tuned = fu.unlearn(model, (x, y), config=cfg, mean=MEAN, std=STD, progress=False)
    assert tuned.timings["tuned"]["source"] == "cache"
    assert tuned.timings["tuned"]["settings"] == ODD.to_dict()
    explicit_cfg = cfg.replace(precision="fp32", fuse_batch_norm=False, search_batch_size=5)
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    session = fu.Unlearner(model, explicit_cfg, MEAN, STD, channels_last=False)
    explicit = session.revise((x, y), progress=False)
    assert explicit.timings["tuned"]["source"].startswith("off")
    assert torch.equal(tuned.relabels, explicit.relabels)
    for (name, a), b in zip(tuned.model.state_dict().items(), explicit.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_an_explicit_setting_is_never_overridden(tuning_on, gen, one_thread):
    model, (x, y) = small_net(), data(gen)
    explicit = fu.UnlearnConfig(**CONFIG, precision="bf16", fuse_batch_norm=True, search_batch_size=7)
    seed_cache(model, x, explicit)
    session = fu.Unlearner(model, explicit, MEAN, STD, channels_last=True)
    res = session.revise((x, y), progress=False)
    assert res.timings["tuned"]["source"] == "explicit"  # nothing left to tune: the cache is not read
    # Partly explicit: the cache fills only what the user left open.
    partly = fu.UnlearnConfig(**CONFIG, precision="bf16", search_batch_size=7)
    seed_cache(model, x, partly)
    session = fu.Unlearner(model, partly, MEAN, STD, channels_last=True)
    res = session.revise((x, y), progress=False)
    assert res.timings["tuned"]["source"] == "cache"
    plan = session.plan
    assert plan.search_config.precision == "bf16" and plan.train_config.precision == "bf16"
    assert plan.search_config.search_batch_size == 7
    assert plan.channels_last is True and session.engine.channels_last
    assert plan.train_config.fuse_batch_norm is False  # left "auto": the cached choice
    assert session.engine.autocast is torch.bfloat16 and not session.engine.batch_norm_fused


def test_apply_fills_only_what_was_left_open():
    cfg = fu.UnlearnConfig(precision="fp16", search_batch_size=3, fuse_batch_norm=True, cuda_graph=True)
    graphs = Settings(cuda_graph=False, compile=True)
    assert autotune.apply(cfg, False, ODD) == (cfg, cfg, False)
    assert autotune.apply(cfg, False, graphs)[1].cuda_graph is True
    s, t, cl = autotune.apply(fu.UnlearnConfig(), None, ODD)
    assert (s.precision, s.search_batch_size, t.precision, t.fuse_batch_norm, cl) == ("fp32", 5, "fp32", False, False)
    assert (t.cuda_graph, t.compile) == ("auto", "auto")  # not measured: left as they were
    t = autotune.apply(fu.UnlearnConfig(), None, graphs)[1]
    assert (t.cuda_graph, t.compile) == (False, True)


def test_tuning_off_does_not_read_the_cache(tuning_on, gen, one_thread, monkeypatch):
    model, (x, y) = small_net(), data(gen)
    cfg = fu.UnlearnConfig(**CONFIG)
    seed_cache(model, x, cfg)
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    session = fu.Unlearner(model, cfg, MEAN, STD)
    res = session.revise((x, y), progress=False)
    assert res.timings["tuned"]["source"].startswith("off") and session.plan.settings is None
    assert session.plan.search_config is cfg and session.plan.train_config is cfg


def test_a_small_job_does_not_tune_and_writes_nothing(tuning_on, gen, one_thread):
    model, (x, y) = small_net(), data(gen)
    res = fu.unlearn(model, (x, y), config=fu.UnlearnConfig(**CONFIG), mean=MEAN, std=STD, progress=False)
    assert res.timings["tuned"]["source"] == "default (job too small to tune)"
    assert res.timings["tune"] == 0.0
    assert os.listdir(tuning_on) == []


def test_a_job_worth_tuning_measures_and_caches(tuning_on, gen, one_thread, monkeypatch):
    model, (x, y) = small_net(), data(gen)
    monkeypatch.setattr(tuning, "worth_tuning", lambda job, tune: True)
    cfg = fu.UnlearnConfig(**CONFIG)
    res = fu.unlearn(model, (x, y), config=cfg, mean=MEAN, std=STD, progress=False)
    tuned = res.timings["tuned"]
    assert tuned["source"] == "measured" and res.timings["tune"] > 0
    files = os.listdir(tuning_on)
    assert len(files) == 1
    with open(tuning_on / files[0]) as f:
        saved = json.load(f)
    assert saved["settings"] == tuned["settings"]
    assert {t["part"] for t in saved["trials"]} == {"search", "train"}
    assert all(t["seconds"] is None or t["seconds"] > 0 for t in saved["trials"])
    # A second session in this process takes it from memory.
    again = fu.unlearn(model, (x, y), config=cfg, mean=MEAN, std=STD, progress=False)
    assert again.timings["tuned"]["source"] == "cache" and again.timings["tune"] == 0.0


def test_measure_stays_within_a_small_budget(gen, one_thread):
    """With a cap below one candidate's time, only the plain default of each part runs, and
    that is the choice."""
    model, (x, y) = small_net(), data(gen)
    cfg = fu.UnlearnConfig(**CONFIG)
    frozen = fu.Unlearner(model, cfg, MEAN, STD).frozen
    trainable = small_net().train().requires_grad_(True)
    cpu = torch.device("cpu")
    chosen, trials, spent = autotune.measure(trainable, frozen, x, y, cfg, None, torch.tensor(MEAN),
                                             torch.tensor(STD), cpu, None, cap_s=1e-9)
    search0 = autotune.search_candidates(cfg, cpu, frozen, tuple(x.shape[1:]))[0]
    train0 = autotune.train_candidates(trainable, cfg, None, cpu, tuple(x.shape[1:]))[0]
    assert [(t.part, t.settings) for t in trials if t.seconds is not None] == [("search", search0), ("train", train0)]
    assert len(trials) > 2  # there were candidates left out
    assert chosen == replace(train0, search_precision=search0.search_precision, search_chunk=search0.search_chunk)


def test_the_plain_default_comes_first(monkeypatch):
    """The first candidates are what an untuned run does, so a budget that runs out keeps it."""
    cpu = torch.device("cpu")
    model = small_net()
    for native in (False, True):
        monkeypatch.setenv("FASTUNLEARN_CPU_BF16", "1" if native else "0")
        cfg = fu.UnlearnConfig()
        auto = "bf16" if native else "fp32"
        s = autotune.search_candidates(cfg, cpu)
        assert (s[0].search_precision, s[0].search_chunk) == (auto, autotune.CPU_CHUNKS[0])
        t = autotune.train_candidates(model, cfg, None, cpu)
        fused = batch_norm_fusion_on(cpu, False, cfg)
        assert (t[0].train_precision, t[0].fuse_batch_norm) == (auto, fused)
        assert t[0].channels_last == default_channels_last(model, cpu, resolve_precision(auto, cpu), fused)
        assert len(set(s)) == len(s) and len(set(t)) == len(t)


def test_bf16_search_that_changes_labels_is_not_chosen(gen, one_thread, monkeypatch):
    model, (x, y) = small_net(), data(gen)
    monkeypatch.setattr(autotune, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(autotune, "MIN_LABEL_AGREEMENT", 1.01)  # no search can keep more than all labels
    monkeypatch.setattr(autotune, "CPU_CHUNKS", (16,))
    cfg = fu.UnlearnConfig(**CONFIG, precision="auto")
    frozen = fu.Unlearner(model, cfg, MEAN, STD).frozen
    measure = autotune._search_measure(frozen, x, y, cfg, torch.tensor(MEAN), torch.tensor(STD), torch.device("cpu"))
    queue = [("search", s) for s in autotune.search_candidates(cfg, torch.device("cpu"))]
    trials = tuning.run_trials(queue, lambda p, s: measure(s), 1e9)
    assert sorted(t.settings.search_precision for t in trials) == ["bf16", "fp32"]
    bf16 = next(t for t in trials if t.settings.search_precision == "bf16")
    assert not bf16.ok and "agree" in bf16.note
    assert tuning.fastest(trials, "search").settings.search_precision == "fp32"


SCRIPT = textwrap.dedent("""
    import sys, torch, torch.nn as nn
    import fastunlearn as fu
    sys.path.insert(0, {tests!r})
    from test_autotune import small_net, CONFIG, MEAN, STD
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (48,), generator=g)
    cfg = fu.UnlearnConfig(**CONFIG)
    if sys.argv[1] == "tune":
        plan = fu.tune(small_net(), (x, y), cfg, MEAN, STD, budget_s=60)
        print("SETTINGS", plan.settings.to_dict())
    else:
        res = fu.unlearn(small_net(), (x, y), config=cfg, mean=MEAN, std=STD, progress=False)
        print("SOURCE", res.timings["tuned"]["source"])
        print("SETTINGS", res.timings["tuned"]["settings"])
""")


def test_the_cache_is_hit_in_a_new_process(tmp_path):
    env = dict(os.environ, FASTUNLEARN_TUNE="1", FASTUNLEARN_TUNE_CACHE=str(tmp_path / "cache"),
               OMP_NUM_THREADS="1")
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=os.path.dirname(__file__)))

    def run(mode):
        out = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        return out.stdout

    first = run("tune")
    assert "search_precision" in first and "seconds" in first  # the table of candidates
    second = run("unlearn")
    assert "SOURCE cache" in second
    settings = [line for line in first.splitlines() if line.startswith("SETTINGS")]
    assert settings and settings[0] in second.splitlines()
