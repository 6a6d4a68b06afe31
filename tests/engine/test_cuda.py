"""The engine on a CUDA device: the search against reference.py (both GPU backends), the
fine-tune against the CPU engine, the CUDA-graph train step against the eager one, and warm
revisions against fu.unlearn. The fused ops' own GPU checks are in test_boundary_step.py and
test_relabel_check.py. Without a GPU these are skipped: they test nothing the CPU has."""

import copy

import pytest
import torch
from conftest import DIGITS_MEAN, DIGITS_STD, reference_search
from test_finetune import data, model_with_dropout, params_close, search_of

import fastunlearn as fu
from fastunlearn import UnlearnConfig
from fastunlearn.engine.finetune import FinetuneEngine
from fastunlearn.engine.search import run_search

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
MEAN2, STD2 = [0.5, 0.5], [0.25, 0.25]


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 convolutions and matmuls differ from fp32 in the 4th digit: these are fp32 checks."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_noisy_search_on_cuda_matches_reference(digits_model, backend):
    """Counter-based noise: the GPU draws what reference.py draws on the CPU, so the labels
    agree up to near-ties that GPU arithmetic may break the other way."""
    model, x, y = digits_model
    x, y = x[:600], y[:600]
    cfg = UnlearnConfig(eps=0.15, steps=5, gamma=0.02, lamda=0.5, lamda_schedule="inverse", noise="normal",
                        relabel="nearest_incorrect", seed=11, precision="fp32", backend=backend)
    res = run_search(copy.deepcopy(model), x, y, cfg, mean=DIGITS_MEAN, std=DIGITS_STD, device=CUDA, refreshes=2)
    for r in range(2):
        ref = reference_search(model, x, y, cfg, refresh=r)
        agree = float((res.relabels[r].cpu() == ref.relabel).float().mean())
        assert agree >= 0.99, f"refresh {r}: {agree:.4%} of {len(y)} labels agree"
        assert float(res.success[r].cpu().float().mean()) > 0.05


def test_bf16_search_on_cuda_keeps_the_fp32_labels(digits_model):
    model, x, y = digits_model
    cfg = UnlearnConfig(eps=0.1, steps=1)
    ref = reference_search(model, x, y, cfg).relabel
    res = run_search(copy.deepcopy(model), x, y, cfg.replace(precision="bf16"), mean=DIGITS_MEAN, std=DIGITS_STD,
                     device=CUDA)
    # Up to 3 of the 1,797 may differ. The recheck leaves a flip now and then: over 16 digits
    # models (T = 1 and 3) 3 of 28,752 labels differed from fp32, 5 with BatchNorm folded
    # into the convolutions (frozen_copy's default), measured on the CPU.
    agree = float((res.relabels[0].cpu() == ref).float().mean())
    assert agree >= 0.998, f"{agree:.4%} of {len(y)} labels agree"


def test_small_auto_search_on_cuda_runs_in_fp32(digits_model):
    """precision="auto" below SMALL_SEARCH_FP32 samples: one fp32 search (IEEE, no TF32 even
    where the process allows it), so no recheck and the reference's labels."""
    from fastunlearn.runtime.precision import SMALL_SEARCH_FP32

    model, x, y = digits_model
    n = min(len(y), SMALL_SEARCH_FP32 - 1, 500)
    x, y = x[:n], y[:n]
    cfg = UnlearnConfig(eps=0.1, steps=3, precision="auto")
    torch.backends.cudnn.allow_tf32 = True  # restored by no_tf32
    res = run_search(copy.deepcopy(model), x, y, cfg, mean=DIGITS_MEAN, std=DIGITS_STD, device=CUDA)
    assert res.rechecked is None
    ref = reference_search(model, x, y, cfg).relabel
    agree = float((res.relabels[0].cpu() == ref).float().mean())
    assert agree >= 0.998, f"{agree:.4%} of {n} labels agree"


MODES = {"eager": dict(compile=False, cuda_graph=False), "graph": dict(compile=False, cuda_graph=True),
         "compiled": dict(compile=True, cuda_graph=False)}


def run_engine(gen_seed, device, mode, remain=True):
    gen = torch.Generator().manual_seed(gen_seed)
    fx, _ = data(gen, 37)  # 37 / 8: a short last batch, a second shape for the compiled step
    rx, ry = data(gen, 29)
    search = search_of(labels=torch.randint(0, 4, (37,), generator=gen))
    cfg = UnlearnConfig(epochs=3, batch_size=8, lr=0.05, remain_reg=0.5 if remain else 0.0, precision="fp32",
                        **MODES[mode])
    # No dropout: compiled code draws its masks from another generator.
    engine = FinetuneEngine(model_with_dropout(p=0.0), cfg, mean=MEAN2, std=STD2, device=device)
    history = engine.run(fx, search, (rx, ry) if remain else None, progress=False)
    return engine, history


@pytest.mark.parametrize("remain", [True, False])
def test_finetune_on_cuda_matches_cpu(gen, remain):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    cpu, h_cpu = run_engine(seed, torch.device("cpu"), "eager", remain)
    gpu, h_gpu = run_engine(seed, CUDA, "eager", remain)
    params_close(cpu.model, gpu.model.cpu(), rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in h_cpu] == pytest.approx([r["loss"] for r in h_gpu], rel=1e-4)


@pytest.mark.parametrize("mode", ["graph", "compiled"])
@pytest.mark.parametrize("remain", [True, False])
def test_replayed_step_matches_eager(gen, mode, remain):
    """Three epochs of 37 samples at batch 8: each shape (8 and the short 5) warms up,
    is captured, then replayed, and the run ends where the eager one does."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    eager, h_eager = run_engine(seed, CUDA, "eager", remain)
    fast, h_fast = run_engine(seed, CUDA, mode, remain)
    if mode == "graph":
        # Forget batches of 8 and 5, remain batches of 8 and 5 (29 = 3 x 8 + 5): every
        # (forget, remain) pair seen three times is captured, at least the two with a
        # remain batch of 8.
        assert fast.step_mode == "cuda graph" and len(fast._graphs) >= 2
    else:
        assert fast.compile_mode == "reduce-overhead" and fast.compile_seconds > 0
    params_close(eager.model, fast.model, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in h_eager] == pytest.approx([r["loss"] for r in h_fast], rel=1e-4)


@pytest.mark.parametrize("mode", ["eager", "graph", "compiled"])
def test_warm_revision_on_cuda_equals_unlearn(gen, mode):
    """The second revision replays the steps captured (or compiled) in the first."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = model_with_dropout(p=0.0)
    before = copy.deepcopy(model.state_dict())
    a, b, remain = data(gen, 21), data(gen, 19), data(gen, 30)
    cfg = UnlearnConfig(epochs=3, batch_size=8, lr=0.05, remain_reg=0.5, precision="fp32", **MODES[mode])
    kw = dict(mean=MEAN2, std=STD2, device=CUDA)
    session = fu.Unlearner(model, cfg, **kw)
    session.revise(a, remain, progress=False)
    second = session.revise(b, remain, progress=False)
    fresh = fu.unlearn(model, b, remain, config=cfg, progress=False, **kw)
    assert second.step_mode == {"eager": "eager", "graph": "cuda graph", "compiled": "compiled"}[mode]
    assert torch.equal(second.relabels.cpu(), fresh.relabels.cpu())
    params_close(second.model.cpu(), fresh.model.cpu(), rtol=1e-5, atol=1e-6)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("remain", [True, False])
def test_replayed_epochs_never_wait_for_the_device(gen, remain):
    """Once the steps are captured, the host queues a whole run without waiting: no copy of
    indices between host and device, no read of a result, across epoch boundaries too.
    The device is given as plain "cuda" (no index), as users write it."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    engine, _ = run_engine(seed, CUDA, "graph", remain)  # warms up and captures
    assert engine.step_mode == "cuda graph"
    g = torch.Generator().manual_seed(seed)
    fx, _ = data(g, 37)
    rx, ry = data(g, 29)
    search = search_of(labels=torch.randint(0, 4, (37,), generator=g))
    total = engine.config.epochs * 5
    checked = []

    def on_step(step, where):
        # From the first step on, any synchronising call raises, until the last step:
        # the history is read from the device after the loop, by design.
        torch.cuda.set_sync_debug_mode("error" if step < total else "default")
        checked.append(step)

    try:
        engine.run(fx, search, (rx, ry) if remain else None, progress=False, on_step=on_step)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert checked == list(range(1, total + 1))


@pytest.fixture(scope="module")
def resnet50_512():
    """A ResNet-50 with the ImageNet stem (seeded initialisation, BatchNorm statistics set by a
    few training-mode forwards so they are not the identity) and 12 random 3x512x512 images."""
    from fastunlearn.nn.models import create_model

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = create_model("resnet50", in_channels=3, num_classes=5, small_input=False).to(CUDA)
    x = torch.randint(0, 256, (12, 3, 512, 512), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        model.train()
        for i in range(0, 12, 4):
            model((x[i:i + 4].to(CUDA).float() / 255 - 0.5) / 0.25)
    model.eval()
    with torch.no_grad():
        y = model((x.to(CUDA).float() / 255 - 0.5) / 0.25).argmax(1).cpu()  # labels the model gives them
    return model, x, y


def _search(model, x, y, cfg):
    return run_search(model, x, y, cfg, mean=[0.5] * 3, std=[0.25] * 3, device=CUDA)


def test_resnet50_512_search_matches_the_reference_in_fp32(resnet50_512):
    """The fp32 engine (IEEE, no_tf32) against reference.py run on the CPU, a few samples."""
    from fastunlearn import reference

    model, x, y = resnet50_512
    cfg = UnlearnConfig(eps=0.1, steps=1, precision="fp32")
    res = _search(model, x[:4], y[:4], cfg)
    cpu_model = copy.deepcopy(model).cpu()
    ref = reference.boundary_relabel(cpu_model, x[:4].float() / 255, y[:4], eps=0.1, alpha=0.1, steps=1,
                                     mean=[0.5] * 3, std=[0.25] * 3)
    assert int((res.relabels[0] == ref.relabel).sum()) >= 3, (res.relabels[0], ref.relabel)


def test_resnet50_512_bf16_search_keeps_the_fp32_labels(resnet50_512):
    """bf16 with the recheck (IEEE and TF32 redo) against the IEEE fp32 engine."""
    from fastunlearn.engine import search

    model, x, y = resnet50_512
    cfg = UnlearnConfig(eps=0.1, steps=1)
    exact = _search(model, x, y, cfg.replace(precision="fp32")).relabels
    for mode in ("ieee", "tf32"):
        before = search.RECHECK_FP32
        search.RECHECK_FP32 = mode
        try:
            low = _search(model, x, y, cfg.replace(precision="bf16"))
        finally:
            search.RECHECK_FP32 = before
        assert low.rechecked is not None
        assert int((low.relabels == exact).sum()) >= len(y) - 1, mode


def test_search_out_of_memory_halves_the_chunk(resnet50_512):
    """With the allocator capped at 1.5 GiB above what is held, a chunk of 12 samples at
    512 px does not fit: the search halves it until it does, and returns the labels of a
    search in chunks of 2."""
    model, x, y = resnet50_512
    cfg = UnlearnConfig(eps=0.1, steps=1, precision="bf16", recheck_margin=0.0)
    want = _search(model, x, y, cfg.replace(search_batch_size=2))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(CUDA).total_memory
    cap = torch.cuda.memory_allocated(CUDA) + 1.5 * 2**30  # 1.5 GiB on top of what is held
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), torch.cuda.current_device())
    try:
        got = _search(model, x, y, cfg.replace(search_batch_size=12))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
    assert torch.equal(got.relabels, want.relabels)


def test_searches_leave_the_precision_flags_as_found(resnet50_512):
    """A bf16 search with its IEEE recheck, and a small auto search (strict fp32): the TF32
    flags read the same through both APIs afterwards, and the legacy read does not raise."""
    from test_search import _precision_flags

    model, x, y = resnet50_512
    torch.backends.cudnn.allow_tf32 = True  # restored by no_tf32
    before = _precision_flags()
    _search(model, x[:4], y[:4], UnlearnConfig(precision="bf16", recheck_margin=1e9))  # every sample redone
    _search(model, x[:4], y[:4], UnlearnConfig(precision="auto"))
    assert _precision_flags() == before
    assert before[1] != "refused"
