"""fu.Unlearner: warm revisions equal fu.unlearn, start from the original, leave the user's model alone."""

import copy

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model(classes=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))


def data(gen, n, classes=5):
    x = torch.randint(0, 256, (n, 3, 9, 9), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, classes, (n,), generator=gen)


MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def assert_same_model(a: nn.Module, b: nn.Module):
    for (name, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), name


@pytest.mark.parametrize("cfg", [
    fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05),
    fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05, steps=3, gamma=0.05, relabel="soft", remain_reg=0.5,
                     remain_target="distill"),
    fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05, relabel="topk", topk=2, remain_reg=0.5, joint_batch=True),
], ids=["hard", "noisy-soft-distill", "topk-joint"])
def test_second_revision_equals_fresh_unlearn(gen, cfg):
    """A warm session's second revision equals fu.unlearn on the same request, bit for bit:
    each revision starts again from the original weights and a fresh optimizer."""
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    a, b = data(gen, 21), data(gen, 19)
    remain = data(gen, 30)
    session = fu.Unlearner(model, cfg, mean=MEAN, std=STD)
    first = session.revise(a, remain, progress=False)
    second = session.revise(b, remain, progress=False)
    fresh = fu.unlearn(model, b, remain, config=cfg, mean=MEAN, std=STD, progress=False)
    assert_same_model(second.model, fresh.model)
    assert torch.equal(second.relabels, fresh.relabels)
    if cfg.relabel in ("soft", "topk"):
        assert torch.equal(second.search.targets, fresh.search.targets)
    assert [r["loss"] for r in second.history] == [r["loss"] for r in fresh.history]
    # The two revisions differ (different forget sets), and the user's model is untouched.
    assert not torch.equal(first.model[0].weight, second.model[0].weight)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert second.timings["setup"] == 0.0 and first.timings["setup"] > 0


def test_result_model_is_independent_and_contiguous(gen):
    model = small_model()
    session = fu.Unlearner(model, fu.UnlearnConfig(epochs=1, batch_size=8, lr=0.05))
    r1 = session.revise(data(gen, 16), progress=False)
    w = r1.model[0].weight.clone()
    session.revise(data(gen, 16), progress=False)
    assert torch.equal(r1.model[0].weight, w)  # a later revision does not reach into an earlier result
    assert r1.model[0].weight.is_contiguous() and not r1.model.training


def test_unlearn_hands_over_the_sessions_own_model(gen, monkeypatch):
    """fu.unlearn's one-shot session returns its engine's model (put back in NCHW) instead of a
    copy; the result is the user's model nowhere, and the session cannot revise again."""
    import fastunlearn.api as api

    made = []

    class Recording(fu.Unlearner):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(api, "Unlearner", Recording)
    model = small_model().to(memory_format=torch.channels_last)
    res = fu.unlearn(model, data(gen, 16), config=fu.UnlearnConfig(epochs=1, batch_size=8, lr=0.05), progress=False)
    ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert all(t.data_ptr() not in ptrs for t in res.model.state_dict().values())
    assert all(t.is_contiguous() for t in res.model.state_dict().values()) and not res.model.training
    with pytest.raises(RuntimeError, match="handed its model over"):
        made[0].revise(data(gen, 16), progress=False)


class Untouchable(torch.utils.data.Dataset):
    def __len__(self):
        return 50

    def __getitem__(self, i):
        raise AssertionError("the remain set was read although remain_reg == 0")


def test_remain_reg_zero_never_reads_the_remain_set(gen):
    cfg = fu.UnlearnConfig(epochs=1, batch_size=8, lr=0.05)
    res = fu.unlearn(small_model(), data(gen, 16), Untouchable(), config=cfg, progress=False)
    assert len(res.history) == 1 and "remain_loss" not in res.history[0]
    with pytest.raises(AssertionError, match="remain set was read"):
        fu.unlearn(small_model(), data(gen, 16), Untouchable(), config=cfg.replace(remain_reg=0.5),
                   progress=False)


def test_revise_writes_safetensors_and_probe_history(gen, tmp_path):
    from fastunlearn.data.checkpoint import read_header

    f, r = data(gen, 16), data(gen, 24)
    session = fu.Unlearner(small_model(), fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05), mean=MEAN, std=STD)
    res = session.revise(f, r, progress=False, probe=(f, r), checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert (tmp_path / "checkpoint.pt").exists()
    _, meta = read_header(str(tmp_path / "model.safetensors"))
    assert meta["config"]["epochs"] == 2
    assert [r["epoch"] for r in res.history] == [1, 2]
    assert all(0 <= row["probe_forget_acc"] <= 1 and 0 <= row["probe_remain_acc"] <= 1 for row in res.history)


def test_session_checks_data_against_the_model(gen):
    session = fu.Unlearner(small_model(), fu.UnlearnConfig(epochs=1, batch_size=8))
    x, y = data(gen, 8)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        session.revise((x, y + 5), progress=False)
    session.revise((x, y), progress=False)
    with pytest.raises(ValueError, match="3 channels"):
        session.revise((x[:, :1], y), progress=False)
    with pytest.raises(TypeError, match="UnlearnConfig"):
        fu.Unlearner(small_model(), config={"epochs": 1})


def test_bf16_unlearn_on_cpu_keeps_fp32_labels(digits_model):
    """The path precision="auto" takes on CPUs with AMX / AVX512-BF16: a bf16 search whose
    labels are the fp32 search's (the recheck), and a bf16 fine-tune that trains
    channels_last with its BatchNorm fused."""
    from conftest import DIGITS_MEAN, DIGITS_STD

    model, x, y = digits_model
    forget, remain = (x[y == 3], y[y == 3]), (x[y != 3][:300], y[y != 3][:300])
    kw = dict(mean=DIGITS_MEAN, std=DIGITS_STD, progress=False)
    cfg = fu.UnlearnConfig(epochs=2, lr=0.01, relabel="nearest_incorrect", remain_reg=0.5)
    fp32 = fu.unlearn(model, forget, remain, config=cfg.replace(precision="fp32"), **kw)
    session = fu.Unlearner(model, cfg.replace(precision="bf16"), mean=DIGITS_MEAN, std=DIGITS_STD)
    bf16 = session.revise(forget, remain, progress=False)
    assert session.engine.channels_last and session.engine.batch_norm_fused
    assert session.frozen[0].weight.is_contiguous(memory_format=torch.channels_last)
    agree = float((bf16.relabels == fp32.relabels).float().mean())
    assert agree >= 0.99, f"{agree:.2%} of {len(forget[1])} relabels agree"
    assert all(r["loss"] == r["loss"] for r in bf16.history)
    assert [r["loss"] for r in bf16.history] == pytest.approx([r["loss"] for r in fp32.history], rel=0.05)


def test_history_is_the_same_with_and_without_the_progress_bar(gen):
    """Epoch rows are read from the device late (one epoch late under a progress bar, at the
    end without one); either way every epoch's row is there, in order, with the same losses."""
    cfg = fu.UnlearnConfig(epochs=3, batch_size=8, lr=0.05, remain_reg=0.5)
    f, r = data(gen, 20), data(gen, 24)
    quiet = fu.unlearn(small_model(), f, r, config=cfg, mean=MEAN, std=STD, progress=False)
    shown = fu.unlearn(small_model(), f, r, config=cfg, mean=MEAN, std=STD, progress=True)
    assert [row["epoch"] for row in quiet.history] == [1, 2, 3]
    for a, b in zip(quiet.history, shown.history):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
        assert a["seconds"] > 0 and b["seconds"] > 0


def test_phases_split_a_revision(gen):
    from fastunlearn.runtime import profiling

    session = fu.Unlearner(small_model(), fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05), mean=MEAN, std=STD)
    f = data(gen, 20)
    with profiling.phases("cpu") as times:
        res = session.revise(f, progress=False)
    assert {"check", "search", "reset", "finetune", "result"} <= set(times)
    assert all(calls == 1 for _, calls in (times[k] for k in ("check", "search", "reset", "finetune", "result")))
    top = sum(times[k][0] for k in ("check", "search", "reset", "finetune", "result"))
    assert 0 < top <= res.seconds * 1.01
    with profiling.phases("cpu") as again:
        session.revise(f, progress=False)
        with pytest.raises(RuntimeError, match="already recording"):
            with profiling.phases("cpu"):
                pass
    assert set(again) >= {"search", "finetune"}
    # Outside a phases() block nothing is recorded and phase() is a no-op.
    assert profiling.phase("search") is profiling.phase("finetune")


def test_contiguous_copy_keeps_values_ties_and_flags():
    from fastunlearn.unlearner import contiguous_copy

    model = small_model().to(memory_format=torch.channels_last)
    model.train()
    model(torch.rand(2, 3, 9, 9))  # running statistics and num_batches_tracked away from their defaults
    model.add_module("tied", nn.Linear(8, 5))
    model.tied.weight = model[8].weight  # a shared parameter stays shared in the copy
    model[0].bias.requires_grad_(False)
    out = contiguous_copy(model)
    for (name, a), b in zip(model.state_dict().items(), out.state_dict().values()):
        assert torch.equal(a, b) and a.dtype == b.dtype, name
        assert b.is_contiguous() and b.data_ptr() != a.data_ptr(), name
    assert not model[0].weight.is_contiguous()  # the source keeps its layout
    assert out.tied.weight is out[8].weight and out[8].weight is not model[8].weight
    assert not out[0].bias.requires_grad and out[0].weight.requires_grad and out.training
