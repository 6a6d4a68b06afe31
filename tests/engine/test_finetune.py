"""The fine-tune engine: losses against reference.py, resume, compile, remain handling."""

import copy

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn import reference
from fastunlearn.engine.checkpoint import load_checkpoint
from fastunlearn.engine.finetune import FinetuneEngine, StopRun, finetune
from fastunlearn.engine.search import SearchResult

pytestmark = pytest.mark.usefixtures("one_thread")


def model_with_dropout(classes=4, channels=2, seed=0, p=0.3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(channels, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.Conv2d(5, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(p), nn.Linear(6 * 4 * 4, classes))


def data(gen, n, classes=4, channels=2, size=7):
    # An odd image size on purpose: 7x7 -> 4x4 after the stride-2 conv.
    x = torch.randint(0, 256, (n, channels, size, size), generator=gen, dtype=torch.uint8)
    return x, torch.randint(0, classes, (n,), generator=gen)


def search_of(labels=None, targets=None):
    ref = labels if labels is not None else targets.argmax(1)
    n = ref.shape[0]
    return SearchResult(ref.unsqueeze(0), torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n),
                        None if targets is None else targets.unsqueeze(0), torch.ones(1, n, dtype=torch.int16))


def pixels(x, mean, std):
    return reference.normalize(x.float() / 255, mean, std).float()


def params_close(a: nn.Module, b: nn.Module, rtol=1e-5, atol=1e-6):
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        if pa.is_floating_point():
            torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------ one step vs reference
@pytest.mark.parametrize("kind", ["hard", "soft", "distill", "joint"])
def test_one_step_matches_reference_losses(gen, kind):
    """One SGD step of the engine equals one computed by hand with reference.forget_loss /
    remain_loss: hard and soft targets, distillation, and the joint batch."""
    k, n_f, n_r = 4, 13, 11
    fx, fy = data(gen, n_f, k)
    rx, ry = data(gen, n_r, k)
    mean, std = torch.tensor([0.4, 0.6]), torch.tensor([0.3, 0.2])
    if kind == "hard":
        search = search_of(labels=torch.randint(0, k, (n_f,), generator=gen))
    else:
        search = search_of(targets=torch.softmax(3 * torch.randn(n_f, k, generator=gen), 1))
    rho = 0.0 if kind == "hard" else 0.7
    cfg = fu.UnlearnConfig(epochs=1, batch_size=64, lr=0.05, momentum=0.9, remain_reg=rho,
                           remain_target="distill" if kind == "distill" else "labels", joint_batch=kind == "joint")
    original = model_with_dropout(k, p=0.0).eval()  # no dropout: the hand step draws no random mask
    teacher = copy.deepcopy(original).eval().requires_grad_(False)

    # By hand.
    hand = copy.deepcopy(original).train()
    opt = torch.optim.SGD(hand.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    tgt = search.train_targets(0)
    uf, ur = pixels(fx, mean, std), pixels(rx, mean, std)
    if rho == 0:
        loss = reference.forget_loss(hand(uf), tgt)
    elif kind == "joint":
        logits = hand(torch.cat([uf, ur]))
        loss = reference.forget_loss(logits[:n_f], tgt) + rho * reference.remain_loss(logits[n_f:], ry, None,
                                                                                        "labels")
    else:
        with torch.no_grad():
            t_logits = teacher(ur)
        lr_ = reference.remain_loss(hand(ur), ry, t_logits, cfg.remain_target)
        loss = reference.forget_loss(hand(uf), tgt) + rho * lr_
    opt.zero_grad()
    loss.backward()
    opt.step()

    ours = copy.deepcopy(original)
    ours, history = finetune(ours, fx, search, cfg, remain=(rx, ry) if rho else None, teacher=teacher, mean=mean,
                             std=std, progress=False)
    assert len(history) == 1
    assert history[0]["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    params_close(ours, hand)
    # The step moved the weights: the comparison is not between two untouched copies.
    assert not torch.allclose(hand[0].weight, original[0].weight)


def test_bf16_step_on_cpu_tracks_the_fp32_reference(gen):
    """precision="bf16" on CPU (native where the CPU has AMX / AVX512-BF16, emulated
    elsewhere): losses and updates within bf16 rounding of the fp32 hand step."""
    k, n_f = 4, 29
    fx, _ = data(gen, n_f, k)
    mean, std = torch.tensor([0.4, 0.6]), torch.tensor([0.3, 0.2])
    search = search_of(labels=torch.randint(0, k, (n_f,), generator=gen))
    cfg = fu.UnlearnConfig(epochs=1, batch_size=64, lr=0.5, momentum=0.9)
    original = model_with_dropout(k, p=0.0)
    runs = {}
    for precision in ("fp32", "bf16"):
        model, history = finetune(copy.deepcopy(original), fx, search, cfg.replace(precision=precision), mean=mean,
                                  std=std, progress=False)
        runs[precision] = (model, history[0]["loss"])
    (m32, l32), (m16, l16) = runs["fp32"], runs["bf16"]
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert l16 != l32  # bf16 did run: its rounding shows in the loss
    for (name, p32), p16, p0 in zip(m32.named_parameters(), m16.parameters(), original.parameters()):
        if p0.dim() < 2:
            continue  # a conv bias before BatchNorm gets a zero gradient up to rounding
        step32, step16 = p32 - p0, p16 - p0
        # The update direction survives bf16: the update is mostly the same numbers.
        cos = torch.nn.functional.cosine_similarity(step32.flatten(), step16.flatten(), dim=0)
        assert cos > 0.98, f"{name}: cosine {cos:.4f} between the fp32 and bf16 updates"
        # ... and its size: a direction check alone passes an update scaled by any factor.
        ratio = float(step16.norm() / step32.norm())
        assert abs(ratio - 1) < 0.05, f"{name}: the bf16 update is {ratio:.4f} x the fp32 one"


def test_auto_precision_follows_native_bf16(monkeypatch):
    from fastunlearn.runtime.precision import resolve_precision

    monkeypatch.setenv("FASTUNLEARN_CPU_BF16", "1")
    assert resolve_precision("auto", torch.device("cpu")) is torch.bfloat16
    monkeypatch.setenv("FASTUNLEARN_CPU_BF16", "0")
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_precision("fp32", torch.device("cuda")) is None


def test_native_bf16_needs_amx(monkeypatch):
    """AVX512-BF16 without AMX is not native bf16 (bf16 convolutions run slower than fp32
    there); AMX is, with or without AVX512-BF16."""
    from fastunlearn.runtime import precision

    monkeypatch.delenv("FASTUNLEARN_CPU_BF16", raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    for amx, avx512_bf16 in ((False, True), (True, False), (True, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b, raising=False)
        assert precision.cpu_has_native_bf16() is amx, (amx, avx512_bf16)
        want = torch.bfloat16 if amx else None
        assert precision.resolve_precision("auto", torch.device("cpu")) is want


# ------------------------------------------------------------------ resume
def run_case(gen):
    fx, fy = data(gen, 37)
    rx, ry = data(gen, 29)
    relabels = torch.randint(0, 4, (3, 37), generator=gen)
    search = SearchResult(relabels, torch.ones(3, 37, dtype=torch.bool), torch.zeros(3, 37), None,
                          torch.ones(3, 37, dtype=torch.int16))
    cfg = fu.UnlearnConfig(epochs=3, batch_size=8, lr=0.05, remain_reg=0.5, refresh="epoch", seed=int(
        torch.randint(0, 1000, (1,), generator=gen)))
    return fx, (rx, ry), search, cfg


def train(fx, remain, search, cfg, **kw):
    engine = FinetuneEngine(model_with_dropout(), cfg, mean=[0.5, 0.5], std=[0.25, 0.25])
    history = engine.run(fx, search, remain, progress=False, **kw)
    return engine.model, history


@pytest.mark.parametrize("stop_at,every,augment", [(11, 4, None), (10, 5, None), (5, 5, None), (11, 4, "crop+flip")])
def test_resume_after_interrupt_is_bitwise_identical(gen, tmp_path, stop_at, every, augment):
    """Stop after `stop_at` steps (mid-epoch, on an epoch boundary: 37 / 8 -> 5 steps an
    epoch), resume from the last checkpoint: same weights, buffers and history, bit for bit."""
    fx, remain, search, cfg = run_case(gen)
    cfg = cfg.replace(augment=augment)
    full, full_hist = train(fx, remain, search, cfg)

    def interrupt(step, info):
        if step == stop_at:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train(fx, remain, search, cfg, checkpoint_dir=str(tmp_path), checkpoint_every=every, on_step=interrupt)
    ckpt = str(tmp_path / "checkpoint.pt")
    assert load_checkpoint(ckpt)["step"] == (stop_at // every) * every
    resumed, hist = train(fx, remain, search, cfg, resume=ckpt)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in hist] == \
           [{k: v for k, v in r.items() if k != "seconds"} for r in full_hist]
    # A run that did not resume differs: the comparison can fail.
    other = model_with_dropout(seed=1)
    assert not torch.equal(other[0].weight, resumed[0].weight)


def test_max_steps_then_resume_through_unlearn(gen, tmp_path):
    """The public path: stop with max_steps, resume with fu.unlearn(resume=...), compare."""
    x, y = data(gen, 30)
    rx, ry = data(gen, 20)
    model = model_with_dropout()
    cfg = fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05, remain_reg=0.3, remain_target="distill")
    kw = dict(config=cfg, mean=[0.5, 0.5], std=[0.25, 0.25], progress=False)
    full = fu.unlearn(model, (x, y), (rx, ry), **kw)
    part = fu.unlearn(model, (x, y), (rx, ry), checkpoint_dir=str(tmp_path), checkpoint_every=3, max_steps=6, **kw)
    assert not torch.equal(part.model[0].weight, full.model[0].weight)
    res = fu.unlearn(model, (x, y), (rx, ry), resume=str(tmp_path / "checkpoint.pt"),
                     output=str(tmp_path / "out.safetensors"), **kw)
    for (name, a), b in zip(full.model.state_dict().items(), res.model.state_dict().values()):
        assert torch.equal(a, b), name
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(saved["0.weight"], full.model[0].weight)


def test_resume_refuses_other_config(gen, tmp_path):
    fx, remain, search, cfg = run_case(gen)
    def interrupt(step, info):
        if step == 2:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train(fx, remain, search, cfg, checkpoint_dir=str(tmp_path), checkpoint_every=2, on_step=interrupt)
    with pytest.raises(ValueError, match=r"different config \(lr: 0.05 -> 0.1\)"):
        train(fx, remain, search, cfg.replace(lr=0.1), resume=str(tmp_path / "checkpoint.pt"))


def test_stop_run_returns_partial_history(gen):
    fx, remain, search, cfg = run_case(gen)

    def stop(step, info):
        if step == 7:
            raise StopRun

    _, hist = train(fx, remain, search, cfg, on_step=stop)
    assert len(hist) == 1  # the first epoch (5 steps) finished, the second did not


# --------------------------------------------------------------- probe / data
def test_probe_pairs_and_callable(gen):
    fx, remain, search, cfg = run_case(gen)
    cfg = cfg.replace(remain_reg=0.0)
    _, hist = train(fx, None, search, cfg, probe=((fx, search.relabels[0]), remain))
    assert [sorted(r) for r in hist] == [["epoch", "forget_loss", "loss", "probe_forget_acc",
                                          "probe_remain_acc", "seconds"]] * 3
    assert all(0 <= r["probe_forget_acc"] <= 1 for r in hist)
    seen = []
    _, hist = train(fx, None, search, cfg, probe=lambda m: seen.append(m.training) or {"n": len(seen)})
    assert [r["n"] for r in hist] == [1, 2, 3] and seen == [False] * 3  # probes see the model in eval mode


def test_float_and_uint8_pixels_agree(gen):
    fx, remain, search, cfg = run_case(gen)
    a, _ = train(fx, remain, search, cfg)
    b, _ = train(fx.float() / 255, (remain[0].float() / 255, remain[1]), search, cfg)
    params_close(a, b)


def test_compile_matches_eager(gen):
    """torch.compile of the train step agrees with eager within float tolerance."""
    fx, fy = data(gen, 24)
    search = search_of(labels=torch.randint(0, 4, (24,), generator=gen))
    cfg = fu.UnlearnConfig(epochs=1, batch_size=12, lr=0.05)
    models = {}
    for compiled in (False, True):
        # No dropout: compiled code draws its masks from a different generator.
        engine = FinetuneEngine(model_with_dropout(p=0.0), cfg.replace(compile=compiled), mean=[0.5, 0.5],
                                std=[0.25, 0.25])
        engine.run(fx, search, progress=False)
        models[compiled] = engine.model
        assert (engine.compile_seconds > 0) == compiled
    params_close(models[False], models[True], rtol=1e-4, atol=1e-5)


def test_joint_batch_is_validated():
    with pytest.raises(ValueError, match="joint_batch must be True or False"):
        fu.UnlearnConfig(joint_batch="yes")


@pytest.mark.parametrize("rechecked", [None, "mask"])
def test_checkpointed_search_keeps_every_field(gen, tmp_path, rechecked):
    from fastunlearn.engine.checkpoint import (
        CHECKPOINT_FORMAT,
        load_checkpoint,
        save_checkpoint,
        search_from_dict,
        search_to_dict,
    )
    from fastunlearn.engine.search import SearchResult

    n = 9
    res = SearchResult(torch.randint(0, 5, (2, n), generator=gen), torch.rand(2, n, generator=gen) > 0.5,
                       torch.randn(2, n, generator=gen), torch.rand(2, n, 5, generator=gen),
                       torch.randint(0, 4, (2, n), generator=gen).to(torch.int16),
                       None if rechecked is None else torch.rand(2, n, generator=gen) > 0.5)
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, {"format": CHECKPOINT_FORMAT, "search": search_to_dict(res)})
    back = search_from_dict(load_checkpoint(path)["search"])
    for name in ("relabels", "success", "margin", "targets", "steps", "rechecked"):
        a, b = getattr(res, name), getattr(back, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.mark.parametrize("augment", [None, "crop", "flip", "crop+flip"])
def test_augment_feeds_crops_and_flips_of_the_images(gen, augment):
    """What the model sees: every row is a crop / flip (as asked) of one forget or remain
    image, normalised; with augmentation some rows differ from every unshifted image."""
    from fastunlearn.data.augment import crop_at

    fx, fy = data(gen, 6, size=8)
    rx, ry = data(gen, 5, size=8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 4))
    seen = []
    model.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach().clone()))
    cfg = fu.UnlearnConfig(epochs=4, batch_size=3, lr=0.05, remain_reg=0.5, augment=augment)
    engine = FinetuneEngine(model, cfg, mean=[0.5, 0.5], std=[0.25, 0.25], channels_last=False)
    engine.run(fx, search_of(torch.randint(0, 4, (6,), generator=gen)), (rx, ry), progress=False)
    pad = 1
    crops = [(a, b) for a in range(2 * pad + 1) for b in range(2 * pad + 1)] if augment and "crop" in augment \
        else [(pad, pad)]
    flips = [False, True] if augment and "flip" in augment else [False]
    images = torch.cat([fx, rx])
    candidates = []
    for a, b in crops:
        c = crop_at(images, pad, torch.full((11,), a), torch.full((11,), b))
        candidates += [c.flip(3) if f else c for f in flips]
    candidates = pixels(torch.cat(candidates), [0.5, 0.5], [0.25, 0.25])
    plain = pixels(images, [0.5, 0.5], [0.25, 0.25])
    rows = torch.cat(seen)
    assert rows.shape[0] == 4 * (6 + 5)  # 4 epochs x (6 forget rows + remain batches of 3 and 2)
    for r in rows:
        assert (candidates - r).abs().flatten(1).amax(1).min() < 1e-6
    moved = sum(bool((plain - r).abs().flatten(1).amax(1).min() > 1e-6) for r in rows)
    assert (moved > 0) == (augment is not None)


def test_augment_is_validated():
    with pytest.raises(ValueError, match="augment"):
        fu.UnlearnConfig(augment="rotate")


def test_cuda_graph_is_validated():
    with pytest.raises(ValueError, match="cuda_graph must be 'auto', True or False"):
        fu.UnlearnConfig(cuda_graph="yes")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, one process and compile off"):
        FinetuneEngine(model_with_dropout(), fu.UnlearnConfig(cuda_graph=True), device="cpu")
    engine = FinetuneEngine(model_with_dropout(), fu.UnlearnConfig(), device="cpu")
    assert not engine.cuda_graph and not engine.compiled and engine.step_mode == "eager"


def test_layout_follows_device_and_precision():
    from fastunlearn.nn.layout import default_channels_last

    model, cpu = model_with_dropout(), torch.device("cpu")
    assert default_channels_last(model, cpu) and default_channels_last(model, torch.device("cuda"), torch.bfloat16)
    assert default_channels_last(model, cpu, torch.bfloat16)  # BatchNorm fused: channels_last is fastest
    # Unfused, PyTorch's CPU BatchNorm is slow in channels_last: a bf16 model with it runs NCHW.
    assert not default_channels_last(model, cpu, torch.bfloat16, fused_batch_norm=False)
    no_bn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 2))
    assert default_channels_last(no_bn, cpu, torch.bfloat16, fused_batch_norm=False)
    assert not default_channels_last(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), cpu)
    for precision, backend, cl in (("bf16", "auto", True), ("bf16", "torch", False), ("fp32", "auto", True)):
        engine = FinetuneEngine(model_with_dropout(), fu.UnlearnConfig(precision=precision, backend=backend),
                                device="cpu")
        assert engine.batch_norm_fused == (backend == "auto") and engine.channels_last == cl
        assert engine.model[0].weight.is_contiguous(memory_format=torch.channels_last if cl else
                                                    torch.contiguous_format)


def test_cuda_device_gets_its_index(monkeypatch):
    """Tensors carry "cuda:N"; a device kept as plain "cuda" would compare unequal to it."""
    from fastunlearn.data.validate import canonical_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert canonical_device("cuda") == torch.device("cuda", 2)
    assert canonical_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert canonical_device("cpu") == torch.device("cpu")


def test_gather_takes_the_indices_where_the_rows_are(gen):
    """Staged rows are gathered with the device's indices; rows in host memory with the
    host's, never by copying indices across (which would stall every step)."""
    from fastunlearn.engine.batches import gather as _gather

    src = torch.randint(0, 256, (10, 1, 3, 3), generator=gen, dtype=torch.uint8)
    host_idx = torch.randperm(10, generator=gen)[:4]
    # Rows in host memory, a device elsewhere: only host_idx may be used ("meta" stands in
    # for the device; indexing host rows with its indices would raise).
    out = _gather(src, host_idx.to("meta"), host_idx, torch.device("meta"))
    assert out.device.type == "meta" and out.shape == (4, 1, 3, 3)
    # Rows where the step runs: gathered with idx.
    assert torch.equal(_gather(src, host_idx, host_idx.to("meta"), torch.device("cpu")), src[host_idx])
