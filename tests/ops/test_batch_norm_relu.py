"""batch_norm_relu (the train step's fused BatchNorm + ReLU) against reference.py, and the
engine's use of it (nn.fuse.fuse_batch_norm_relu)."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastunlearn as fu
from fastunlearn import reference
from fastunlearn.nn.fuse import fuse_batch_norm_relu
from fastunlearn.ops import batch_norm_relu
from fastunlearn.runtime import backends as _backends

needs_cpu_op = pytest.mark.skipif(not _backends.has_cpu_op("batch_norm_relu"),
                                  reason="native extension not built")
needs_cuda_op = pytest.mark.skipif(not _backends.has_cuda_op("batch_norm_relu"),
                                   reason="no CUDA device, or the extension was built without CUDA")
# The native kernel of each device; the CUDA cases run where there is one.
NATIVE = [pytest.param("cpu", marks=needs_cpu_op), pytest.param("cuda", marks=needs_cuda_op)]
# Odd sizes, one channel, one pixel, more channels than a vector; at least 3 values per
# channel (with 2, x - mean is +-s and the input gradient is 0 up to rounding).
SHAPES = [(64, 24, 28, 28), (3, 5, 7, 9), (3, 1, 1, 3), (5, 7, 1, 1), (7, 130, 3, 5), (1, 3, 3, 1)]
# Relative to the largest reference value: (output and input gradient, weight and bias
# gradients, running statistics). float32 sums per block, combined in double; bfloat16 is
# rounded once on output (half an ulp is 2**-8 of the value); the weight / bias gradients
# and the statistics stay float32.
TOL = {torch.float32: (2e-5, 2e-5, 2e-6), torch.bfloat16: (8e-3, 2e-5, 2e-6)}


def _inputs(shape, dtype, channels_last, gen):
    x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = torch.randn(c, generator=gen)
    b = torch.randn(c, generator=gen)
    rm = torch.randn(c, generator=gen)
    rv = torch.rand(c, generator=gen) + 0.5
    dy = torch.randn(shape, generator=gen).to(dtype)
    return x, w, b, rm, rv, dy


def _rel(a, ref, floor=1e-12):
    """Largest error relative to the largest reference value (or to floor, if larger)."""
    return float((a.double() - ref).abs().max() / ref.abs().max().clamp_min(floor))


@pytest.mark.parametrize("device", NATIVE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(device, dtype, channels_last, relu, shape, gen):
    x, w, b, rm, rv, dy = _inputs(shape, dtype, channels_last, gen)
    momentum = float(torch.rand((), generator=gen))
    rm_ref, rv_ref = rm.double(), rv.double()
    xr, wr, br = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y_ref, mean, invstd = reference.batch_norm_relu(xr, wr, br, rm_ref, rv_ref, momentum=momentum, eps=1e-3,
                                                    relu=relu)
    y_ref.backward(dy.double())
    # Where the ReLU's input is 0 up to float32 rounding, either side of the kink is right;
    # the input gradient is compared elsewhere (such a value moves the channel sums by ~1/M).
    ch = (1, -1, 1, 1)
    z = ((xr - mean.reshape(ch)) * invstd.reshape(ch) * wr.reshape(ch) + br.reshape(ch)).detach()
    sure = z.abs() > 1e-5 * z.abs().max() if relu else torch.ones_like(z, dtype=torch.bool)

    xx, ww, bb = (t.to(device).requires_grad_(True) for t in (x, w, b))
    rm, rv = rm.to(device), rv.to(device)
    y = batch_norm_relu(xx, ww, bb, rm, rv, momentum=momentum, eps=1e-3, relu=relu, backend=device)
    y.backward(dy.to(device))
    y, rm, rv = y.cpu(), rm.cpu(), rv.cpu()
    xx, ww, bb = (SimpleNamespace(grad=t.grad.cpu()) for t in (xx, ww, bb))
    tol, tol_wb, tol_stats = TOL[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _rel(y, y_ref) < tol
    assert _rel(xx.grad[sure], xr.grad[sure]) < tol
    assert _rel(ww.grad, wr.grad) < tol_wb and _rel(bb.grad, br.grad) < tol_wb
    # A running mean can nearly cancel ((1 - m) old + m new); the statistics are O(1) here.
    assert _rel(rm, rm_ref, 1.0) < tol_stats and _rel(rv, rv_ref, 1.0) < tol_stats
    if relu:
        assert float(y.min()) >= 0


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_reference_is_pytorchs_batch_norm_then_relu(channels_last, relu, shape, gen):
    """The definition, checked in float64 against PyTorch's modules (the "torch" backend):
    output, all three gradients and the running statistics."""
    x, w, b, rm, rv, dy = (t.double() for t in _inputs(shape, torch.float32, channels_last, gen))
    outs = []
    for fn in (lambda *a, **k: reference.batch_norm_relu(*a, **k)[0],
               lambda *a, **k: batch_norm_relu(*a, **k, backend="torch")):
        xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
        r1, r2 = rm.clone(), rv.clone()
        y = fn(xx, ww, bb, r1, r2, momentum=0.3, eps=1e-3, relu=relu)
        y.backward(dy)
        outs.append([y, xx.grad, ww.grad, bb.grad, r1, r2])
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@needs_cpu_op
def test_relu_mask_and_statistics_follow_the_definition(gen):
    """Values that the ReLU clips get no gradient; without running statistics nothing else
    is touched; the default weight / bias are ones / zeros."""
    x = torch.randn(4, 3, 5, 5, generator=gen, requires_grad=True)
    y = batch_norm_relu(x, backend="cpu")
    y_ref, mean, invstd = reference.batch_norm_relu(x.detach().double(), torch.ones(3), torch.zeros(3))
    assert _rel(y, y_ref) < 2e-5
    y.sum().backward()
    z = (x.detach().double() - mean.reshape(1, -1, 1, 1)) * invstd.reshape(1, -1, 1, 1)
    clipped = z <= 0
    assert clipped.any() and not clipped.all()
    # d/dx of sum(relu(bn(x))): where every output is clipped in a channel the gradient is 0;
    # the reference's autograd gives the rest.
    xr = x.detach().double().requires_grad_(True)
    reference.batch_norm_relu(xr, torch.ones(3), torch.zeros(3))[0].sum().backward()
    assert _rel(x.grad, xr.grad) < 2e-5


@needs_cuda_op
def test_cuda_results_repeat_bit_for_bit_and_replay_in_a_graph(gen):
    """Fixed-order reductions: two runs agree to the bit, and a captured forward + backward
    replays to the same numbers (no host synchronisation inside)."""
    x, w, b, rm, rv, dy = (t.cuda() for t in _inputs((16, 24, 14, 14), torch.bfloat16, True, gen))

    def run():
        xx, ww, bb = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        y = batch_norm_relu(xx, ww, bb, backend="cuda")
        y.backward(dy)
        return [y.detach(), xx.grad, ww.grad, bb.grad]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(first, captured))


@needs_cpu_op
def test_results_do_not_depend_on_the_thread_count(gen):
    x, w, b, rm, rv, dy = _inputs((16, 24, 14, 14), torch.bfloat16, True, gen)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            xx, ww, bb = (t.clone().requires_grad_(True) for t in (x, w, b))
            r1, r2 = rm.clone(), rv.clone()
            y = batch_norm_relu(xx, ww, bb, r1, r2, backend="cpu")
            y.backward(dy)
            outs.append([y, xx.grad, ww.grad, bb.grad, r1, r2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_bad_input_says_what_was_expected():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        batch_norm_relu(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"weight must be a \(3,\) tensor, got \(4,\)"):
        batch_norm_relu(x, torch.ones(4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_relu(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="given together"):
        batch_norm_relu(x, running_mean=torch.zeros(3))
    with pytest.raises(ValueError, match="backend must be one of"):
        batch_norm_relu(x, backend="gpu")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run batch_norm_relu"):
        batch_norm_relu(x, backend="triton")


@needs_cpu_op
def test_cpu_backend_names_the_dtypes_it_takes():
    with pytest.raises(TypeError, match="float32 or bfloat16, got torch.float64"):
        batch_norm_relu(torch.randn(2, 3, 4, 4, dtype=torch.float64), backend="cpu")
    # "auto" falls back to PyTorch for them.
    y = batch_norm_relu(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert y.dtype == torch.float64


# ----------------------------------------------------------------- the engine's fusion
def _net(seed=0, relu=nn.ReLU):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), relu(),
                         nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, momentum=None), relu(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


def _train_steps(model, x, y, steps=3, channels_last=True):
    model = model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


@needs_cpu_op
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_training_equals_unfused(channels_last, gen):
    x = torch.randn(16, 2, 7, 7, generator=gen)
    y = torch.randint(0, 3, (16,), generator=gen)
    plain, fused = _net(), _net()
    undo = fuse_batch_norm_relu(fused)
    assert fused[1]._fastunlearn_relu and fused[4]._fastunlearn_relu
    a = _train_steps(plain, x, y, channels_last=channels_last)
    b = _train_steps(fused, x, y, channels_last=channels_last)
    for k in a:
        if a[k].is_floating_point():
            assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
        else:
            assert torch.equal(a[k], b[k]), k  # num_batches_tracked
    undo()
    assert all("forward" not in m.__dict__ for m in fused.modules())
    # eval mode (running statistics, ReLU applied) is the plain model's while fused too
    fuse_batch_norm_relu(fused)
    plain.eval(), fused.eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), fused(x), rtol=1e-4, atol=1e-5)


@needs_cpu_op
def test_fusion_leaves_alone_what_it_cannot_fuse():
    shared = nn.ReLU()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), shared, nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                          nn.ReLU(), nn.BatchNorm2d(4), nn.ReLU(), shared)
    seen = []
    model[4].register_forward_hook(lambda m, i, o: seen.append(float(o.min())))
    undo = fuse_batch_norm_relu(model)
    assert not model[1]._fastunlearn_relu  # its ReLU is reached twice
    assert not model[4]._fastunlearn_relu  # a hook on the BatchNorm must see its own output
    assert model[6]._fastunlearn_relu
    assert "forward" not in shared.__dict__ and "forward" not in model[5].__dict__
    model.train()(torch.randn(4, 1, 9, 9))
    assert seen and seen[0] < 0
    undo()

    class MyBN(nn.BatchNorm2d):
        pass

    sub = nn.Sequential(nn.Conv2d(1, 4, 3), MyBN(4), nn.ReLU())
    fuse_batch_norm_relu(sub)
    assert "forward" not in sub[1].__dict__ and "forward" not in sub[2].__dict__


@needs_cpu_op
def test_fusion_follows_the_order_sequential_runs():
    """A module listed twice in a Sequential sits between the BatchNorm and the ReLU in the
    forward, though children() lists it once: no fusion across it."""
    pool = nn.Identity()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), pool, nn.BatchNorm2d(4), pool, nn.ReLU())
    fuse_batch_norm_relu(model)
    assert not model[2]._fastunlearn_relu and "forward" not in model[4].__dict__


@needs_cpu_op
def test_fused_plain_batch_norm_without_affine_or_running_stats(gen):
    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, affine=False, track_running_stats=False),
                             nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))

    x = torch.randn(8, 2, 7, 7, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    plain, fused = net(), net()
    fuse_batch_norm_relu(fused)
    a, b = _train_steps(plain, x, y), _train_steps(fused, x, y)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)


@needs_cpu_op
def test_a_half_precision_batch_norm_runs_its_own_forward():
    """Parameters or statistics in another dtype than float32: the module's own forward (and
    the fused ReLU after it), not the op, which takes float32 ones only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).to(torch.bfloat16).train()
    x = torch.randn(4, 1, 6, 6, dtype=torch.bfloat16)
    plain = copy.deepcopy(model)
    fuse_batch_norm_relu(model)
    assert torch.equal(model(x), plain(x))
    assert torch.equal(model[1].running_mean, plain[1].running_mean)


@needs_cpu_op
def test_a_copy_made_while_fused_trains_its_own_statistics():
    model = _net()
    fuse_batch_norm_relu(model)
    twin = copy.deepcopy(model)
    before = model[1].running_mean.clone()
    twin.train()(torch.randn(4, 2, 7, 7))
    assert torch.equal(model[1].running_mean, before)
    assert not torch.equal(twin[1].running_mean, before)


@needs_cpu_op
def test_predictions_of_a_fused_model_are_the_plain_models(gen):
    """predict_logits folds each eval-mode BatchNorm into its convolution on a copy. While
    fused, a BatchNorm may carry the ReLU after it (which passes its input through), so it
    must not be folded away: the copy's logits are still the plain model's (as the fine-tune's
    probe reads them mid-run)."""
    from fastunlearn.eval.metrics import predict_logits

    model = _net()
    model.train()(torch.randn(16, 2, 7, 7, generator=gen))  # running statistics away from 0 / 1
    x = torch.randn(9, 2, 7, 7, generator=gen)
    with torch.no_grad():
        plain = model.eval()(x)
    undo = fuse_batch_norm_relu(model)
    got = predict_logits(model, x)
    undo()
    assert torch.allclose(got, plain, rtol=1e-5, atol=1e-6), (got - plain).abs().max()


@needs_cpu_op
def test_unlearn_with_fused_batch_norm_matches_plain_pytorch(digits_model):
    """fu.unlearn on CPU fuses BatchNorm + ReLU; backend="torch" runs the plain modules. Same
    search, so same labels; the weights agree to float32 rounding over the run."""
    from conftest import DIGITS_MEAN, DIGITS_STD

    model, x, y = digits_model
    forget, remain = (x[y == 3][:100], y[y == 3][:100]), (x[y != 3][:200], y[y != 3][:200])
    cfg = fu.UnlearnConfig(epochs=2, lr=0.01, remain_reg=0.5, precision="fp32")
    kw = dict(mean=DIGITS_MEAN, std=DIGITS_STD, progress=False)
    fused = fu.unlearn(model, forget, remain, config=cfg, **kw)
    plain = fu.unlearn(model, forget, remain, config=cfg.replace(backend="torch"), **kw)
    assert torch.equal(fused.relabels, plain.relabels)
    a, b = fused.model.state_dict(), plain.model.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5), k
    # The model handed back runs its own modules' forward methods.
    assert all("forward" not in m.__dict__ for m in fused.model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_config_says_what_fuse_batch_norm_takes():
    with pytest.raises(ValueError, match=r"fuse_batch_norm must be 'auto', True or False, got 'yes'"):
        fu.UnlearnConfig(fuse_batch_norm="yes")


def test_engine_fuses_where_the_config_and_the_build_allow():
    from fastunlearn.engine.finetune import FinetuneEngine

    def engine(**kw):
        return FinetuneEngine(_net(), fu.UnlearnConfig(**kw), device="cpu")

    native = _backends.has_cpu_op("batch_norm_relu")
    assert engine().batch_norm_fused == native and engine(fuse_batch_norm=True).batch_norm_fused == native
    assert not engine(fuse_batch_norm=False).batch_norm_fused
    assert not engine(backend="torch").batch_norm_fused
    # Unfused under bf16, the model's BatchNorm keeps the step NCHW.
    assert not engine(fuse_batch_norm=False, precision="bf16").channels_last


@needs_cuda_op
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_fused_step_on_cuda_equals_unfused(cuda_graph, gen):
    """fuse_batch_norm=True on CUDA (off by default there): the same run as PyTorch's modules
    within float rounding, eager and replayed from a CUDA graph."""
    x = torch.randint(0, 256, (40, 2, 7, 7), dtype=torch.uint8, generator=gen).cuda()
    y = torch.randint(0, 3, (40,), generator=gen).cuda()
    states = []
    # TF32 convolutions differ from fp32 in the 4th digit: this is an fp32 check.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _fused_and_plain_runs(x, y, cuda_graph, states)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for k in states[0]:
        assert torch.allclose(states[0][k], states[1][k], rtol=1e-4, atol=1e-5), k


def _fused_and_plain_runs(x, y, cuda_graph, states):
    from fastunlearn.engine.finetune import FinetuneEngine

    for fuse in (False, True):
        cfg = fu.UnlearnConfig(precision="fp32", lr=0.05, cuda_graph=cuda_graph, fuse_batch_norm=fuse)
        eng = FinetuneEngine(_net(), cfg, mean=[0.5, 0.5], std=[0.25, 0.25], device="cuda")
        assert eng.batch_norm_fused == fuse
        eng.model.train()
        undo = fuse_batch_norm_relu(eng.model) if fuse else None
        for i in range(6):
            eng.step(x[i * 4:(i + 1) * 4 + 8], y[i * 4:(i + 1) * 4 + 8])
        if undo:
            undo()
        states.append({k: v.float().cpu() for k, v in eng.model.state_dict().items()})
