"""The search engine against reference.py on a trained model and real data (sklearn digits)."""

import os

import pytest
import torch
from conftest import DIGITS_MEAN, DIGITS_STD, reference_search

from fastunlearn import UnlearnConfig
from fastunlearn.engine.recheck import decision_gap
from fastunlearn.engine.search import run_search

MEAN, STD = DIGITS_MEAN, DIGITS_STD


@pytest.fixture(scope="module")
def trained_all(digits_model):
    return digits_model


@pytest.fixture(scope="module")
def trained(trained_all):
    model, x, y = trained_all
    return model, x[:300], y[:300]


def ref_labels(model, x, y, cfg, refresh=0):
    return reference_search(model, x, y, cfg, refresh)


def test_fgsm_matches_reference_exactly(trained):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.1, steps=1, precision="fp32")
    res = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    ref = ref_labels(model, x, y, cfg)
    assert torch.equal(res.relabels[0], ref.relabel)
    assert torch.equal(res.success[0], ref.success)
    assert torch.allclose(res.margin[0], ref.margin, atol=1e-4)
    assert 0.05 < float(res.success[0].float().mean())  # the step does move samples across


@pytest.mark.parametrize("noise", ["normal", "cauchy"])
def test_multistep_noisy_search_matches_reference(trained, noise):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.15, steps=5, gamma=0.02, lamda=0.5, lamda_schedule="inverse", noise=noise,
                        relabel="nearest_incorrect", seed=11, precision="fp32")
    res = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu", refreshes=2)
    for r in range(2):
        ref = ref_labels(model, x, y, cfg, refresh=r)
        agree = (res.relabels[r] == ref.relabel).float().mean()
        assert agree >= 0.99, f"refresh {r}: {agree:.4f}"
    assert not torch.equal(res.success[0], res.success[1]) or not torch.equal(res.margin[0], res.margin[1])


def test_result_does_not_depend_on_chunk_size(trained):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.1, steps=4, gamma=0.05, seed=5, relabel="soft", precision="fp32")
    outs = [run_search(model, x, y, cfg.replace(search_batch_size=b), mean=MEAN, std=STD, device="cpu")
            for b in (7, 64, 300)]
    for o in outs[1:]:
        assert torch.equal(o.relabels, outs[0].relabels)
        assert torch.equal(o.steps, outs[0].steps)
        assert torch.allclose(o.targets, outs[0].targets, atol=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_early_exit_keeps_samples_that_had_not_crossed(trained, gamma):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.2, steps=6, gamma=gamma, seed=3, precision="fp32")
    fast = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    slow = run_search(model, x, y, cfg.replace(early_exit=False), mean=MEAN, std=STD, device="cpu")
    never_stopped = fast.steps[0] == cfg.steps
    assert bool((fast.steps[0] < cfg.steps).any()), "no sample stopped early: the test would prove nothing"
    assert torch.equal(fast.relabels[0][never_stopped], slow.relabels[0][never_stopped])
    assert torch.equal(fast.margin[0][never_stopped], slow.margin[0][never_stopped])
    # Stopped samples had crossed when they stopped.
    assert bool(fast.success[0][~never_stopped].all())


def test_dataset_streaming_equals_tensor(trained):
    model, x, y = trained

    class Digits(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], int(y[i])

    cfg = UnlearnConfig(eps=0.1, steps=2, gamma=0.1, seed=9, search_batch_size=50, precision="fp32")
    a = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    b = run_search(model, Digits(), y, cfg, mean=MEAN, std=STD, device="cpu")
    assert torch.equal(a.relabels, b.relabels)


def test_matches_authors_style_fgsm(trained):
    from fastunlearn.eval.authors import authors_search

    model, x, y = trained
    # eps on the 1/255 grid: their round-after-clamp and our inward rounding then agree.
    cfg = UnlearnConfig(eps=20 / 255, steps=1, precision="fp32")
    ours = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu")
    test_model = __import__("copy").deepcopy(model)  # theirs computes weight grads on its copy
    theirs, ok = authors_search(test_model, x.float() / 255, y, cfg, torch.tensor(MEAN), torch.tensor(STD))
    agree = float((ours.relabels[0] == theirs).float().mean())
    # Their float32 cross-entropy backward rounds the gradient of very confident samples;
    # everything else must agree.
    assert agree >= 0.99, agree
    assert float(ok.float().mean()) > 0.05


def test_bf16_search_keeps_the_fp32_labels(trained_all, one_thread):
    """bf16 autocast (emulated on CPU) against the fp32 reference, T = 1, gamma = lambda = 0."""
    model, x, y = trained_all
    cfg = UnlearnConfig(eps=0.1, steps=1, search_batch_size=256)
    ref = ref_labels(model, x, y, cfg).relabel
    res = run_search(model, x, y, cfg.replace(precision="bf16"), mean=MEAN, std=STD, device="cpu")
    # Up to 3 of the 1,797 may differ. The recheck leaves a flip now and then: over 16 digits
    # models (T = 1 and 3) 3 of 28,752 labels differed from fp32, 5 with BatchNorm folded
    # into the convolutions (frozen_copy's default); this model has 2.
    agree = float((res.relabels[0] == ref).float().mean())
    assert agree >= 0.998, f"{agree:.4%} of {len(y)} labels agree"
    # The recheck must stay a minority of the samples (about a fifth here), or bf16 would buy little.
    assert float(res.rechecked.float().mean()) < 0.35


def test_bf16_recheck_redoes_the_unsure_samples_in_fp32(trained_all, one_thread):
    model, x, y = trained_all
    cfg = UnlearnConfig(eps=0.1, steps=1, search_batch_size=256)
    fp32 = run_search(model, x, y, cfg.replace(precision="fp32"), mean=MEAN, std=STD, device="cpu")
    plain = run_search(model, x, y, cfg.replace(precision="bf16", recheck_margin=0), mean=MEAN, std=STD, device="cpu")
    checked = run_search(model, x, y, cfg.replace(precision="bf16"), mean=MEAN, std=STD, device="cpu")
    assert plain.rechecked is None and fp32.rechecked is None
    redone = checked.rechecked[0]
    differ = plain.relabels[0] != fp32.relabels[0]
    assert bool(differ.any()), "bf16 alone kept every label: the test would prove nothing"
    assert bool(redone.any())
    # Redone samples carry the fp32 search's results, the others bf16's, untouched.
    assert torch.equal(checked.relabels[0][redone], fp32.relabels[0][redone])
    assert torch.equal(checked.steps[0][redone], fp32.steps[0][redone])
    assert torch.equal(checked.relabels[0][~redone], plain.relabels[0][~redone])
    # The samples it redid are where bf16 went wrong: most of the differing labels are fixed.
    fixed = int((differ & redone).sum())
    assert fixed >= 0.75 * int(differ.sum()), f"{fixed} of {int(differ.sum())} differing labels redone"
    # A tighter margin redoes a subset of the samples.
    tight = run_search(model, x, y, cfg.replace(precision="bf16", recheck_margin=1.0), mean=MEAN, std=STD,
                       device="cpu").rechecked[0]
    assert bool((redone & ~tight).any()) and not bool((tight & ~redone).any())


@pytest.mark.parametrize("relabel", ["nearest_incorrect", "topk"])
def test_bf16_recheck_draws_the_fp32_noise(trained, one_thread, relabel):
    """With noise and a random start, a redone sample must draw the noise of its index in the set."""
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.1, steps=3, gamma=0.05, seed=7, relabel=relabel, random_start=True,
                        search_batch_size=64)
    fp32 = run_search(model, x, y, cfg.replace(precision="fp32"), mean=MEAN, std=STD, device="cpu")
    # A shard of the set, as a distributed search runs it: the indices are global.
    shard = run_search(model, x[100:], y[100:], cfg.replace(precision="bf16"), mean=MEAN, std=STD, device="cpu",
                       index_base=100, n_total=len(y))
    redone = shard.rechecked[0]
    assert bool(redone.any())
    assert not bool(redone.all()), "every sample redone: the bf16 rows would go untested"
    full = slice(100, None)
    assert torch.equal(shard.relabels[0][redone], fp32.relabels[0][full][redone])
    assert torch.equal(shard.success[0][redone], fp32.success[0][full][redone])
    assert torch.equal(shard.steps[0][redone], fp32.steps[0][full][redone])
    assert torch.allclose(shard.margin[0][redone], fp32.margin[0][full][redone], atol=1e-4)
    if relabel == "topk":
        assert torch.allclose(shard.targets[0][redone], fp32.targets[0][full][redone], atol=1e-5)


def test_decision_gap_covers_each_mode():
    z = torch.tensor([[3.0, 2.5, 1.0, 0.9], [0.2, 4.0, 3.9, -1.0]])
    y = torch.tensor([0, 1])
    margin = torch.tensor([0.5, 0.1])
    assert torch.allclose(decision_gap(z, y, margin, "argmax", 3), torch.tensor([0.5, 0.1]))
    # Other classes of row 0: 2.5 vs 1.0; row 1: 3.9 vs 0.2, and |margin| 0.1 is closer.
    assert torch.allclose(decision_gap(z, y, margin, "nearest_incorrect", 3), torch.tensor([0.5, 0.1]))
    # k = 3: the 3rd and 4th classes decide the kept set (1.0 vs 0.9; 0.2 vs -1.0).
    assert torch.allclose(decision_gap(z, y, margin, "topk", 3), torch.tensor([0.1, 0.1]))
    assert torch.allclose(decision_gap(z, y, margin, "topk", 4), torch.tensor([0.5, 0.1]))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "3", True])
def test_recheck_margin_is_validated(bad):
    with pytest.raises(ValueError, match="recheck_margin"):
        UnlearnConfig(recheck_margin=bad)


def test_search_compile_matches_the_eager_engine(trained):
    """search_compile=True: the frozen model runs under torch.compile (inductor on CPU); its
    labels are the eager engine's except where inductor's rounding flips a near-tie, and a
    second search on the same frozen copy reuses the compiled module."""
    from fastunlearn.nn.frozen import compiled, frozen_copy

    model, x, y = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frozen = frozen_copy(model, torch.device("cpu"))
    cfg = UnlearnConfig(eps=0.1, steps=3, precision="fp32", search_batch_size=128)
    eager = run_search(model, x, y, cfg, mean=MEAN, std=STD, device="cpu", frozen=frozen)
    comp = run_search(model, x, y, cfg.replace(search_compile=True), mean=MEAN, std=STD, device="cpu", frozen=frozen)
    assert (comp.relabels == eager.relabels).float().mean() >= 0.99
    ref = ref_labels(model, x, y, cfg)
    assert (comp.relabels[0] == ref.relabel).float().mean() >= 0.99
    assert (comp.success == eager.success).float().mean() >= 0.99
    same = comp.relabels == eager.relabels
    assert torch.allclose(comp.margin[same], eager.margin[same], atol=1e-3)
    wrapper = compiled(frozen)
    assert wrapper is compiled(frozen) and compiled(wrapper) is wrapper
    assert "_fastunlearn_compiled" not in dict(frozen.named_modules())  # not registered as a submodule
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_search_compile_is_validated():
    with pytest.raises(ValueError, match="search_compile"):
        UnlearnConfig(search_compile="yes")


def test_small_auto_search_rule():
    """Which searches precision="auto" runs in fp32: small ones on CUDA only (the CUDA side of
    it is tested in test_cuda.py)."""
    from fastunlearn.runtime.precision import SMALL_SEARCH_FP32, small_search_in_fp32

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert small_search_in_fp32("auto", cuda, SMALL_SEARCH_FP32 - 1)
    assert not small_search_in_fp32("auto", cuda, SMALL_SEARCH_FP32)
    assert not small_search_in_fp32("bf16", cuda, 1)
    assert not small_search_in_fp32("auto", cpu, 1)


def _random_bn_stats(model, gen):
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.data.copy_(torch.rand(m.bias.shape, generator=gen) - 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ["allcnn", "resnet18"])
def test_fold_batchnorm_computes_the_same_function(gen, arch):
    """Sequential runs (AllCNN) and attribute-wired blocks (ResNet, found by tracing): every
    BatchNorm after a convolution folds, and the float64 logits agree to rounding."""
    import copy

    from fastunlearn.nn.fold import fold_batchnorm
    from fastunlearn.nn.models import create_model

    model = _random_bn_stats(create_model(arch, in_channels=2, num_classes=7, width=0.25) if arch == "allcnn"
                             else create_model(arch, in_channels=2, num_classes=7), gen).double()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == n_bn
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(5, 2, 19, 23, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)


class _Shared(torch.nn.Module):
    """Convolution outputs read twice, a BatchNorm called twice: neither may fold."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        h = self.bn(z) + z
        return self.bn2(self.conv2(h)) + self.bn2(h)


class _OwnForward(torch.nn.Sequential):
    def forward(self, x):
        return self[1](x.repeat(1, 4, 1, 1)) + self[0](x)


def test_fold_batchnorm_leaves_what_it_cannot_fold(gen):
    seq_hooked = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
    seq_hooked[0].register_forward_hook(lambda m, i, o: o * 2)
    no_stats = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False))
    param = torch.nn.Sequential(torch.nn.utils.parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 3)),
                                torch.nn.BatchNorm2d(4))
    tied = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3), torch.nn.ReLU(),
                               torch.nn.Conv2d(3, 3, 3, padding=1))
    tied[3].weight = tied[0].weight  # the second convolution has no BatchNorm after it
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3))
    twice = torch.nn.Sequential(block, torch.nn.ReLU(), block)
    cases = [_Shared(), _OwnForward(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4)), seq_hooked,
             no_stats, param, tied, twice]
    import copy

    from fastunlearn.nn.fold import fold_batchnorm

    for model in cases:
        model = _random_bn_stats(model, gen)
        folded = copy.deepcopy(model)
        x = torch.rand(2, 1 if isinstance(model, _OwnForward) else 3, 6, 6, generator=gen)
        assert fold_batchnorm(folded) == 0, type(model).__name__
        with torch.no_grad():
            torch.testing.assert_close(folded(x), model(x))


def test_fold_batchnorm_past_an_untraceable_forward(gen):
    """A forward torch.fx cannot trace (control flow on data) keeps its BatchNorms outside
    plain Sequentials; those inside still fold."""
    import copy

    from fastunlearn.nn.fold import fold_batchnorm

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4))
            self.conv = torch.nn.Conv2d(4, 4, 1)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            h = self.block(x)
            return self.bn(self.conv(h)) if h.sum() > 0 else h

    model = _random_bn_stats(Branchy(), gen)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == 1
    assert isinstance(folded.block[1], torch.nn.Identity) and isinstance(folded.bn, torch.nn.BatchNorm2d)
    x = torch.rand(2, 3, 5, 5, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_frozen_copy_folds_and_leaves_the_model_alone(trained):
    from fastunlearn.nn.frozen import frozen_copy

    model, _, _ = trained
    frozen = frozen_copy(model, torch.device("cpu"))
    assert isinstance(model[1], torch.nn.BatchNorm2d) and isinstance(frozen[1], torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_input_says_so_in_its_strides(gen, channels):
    """One channel: NCHW and channels_last hold the same bytes, and PyTorch reads the
    layout from the strides. The input must read as channels_last, or a convolution's
    backward converts its output gradient to NCHW (cuDNN matches the input's layout)."""
    from fastunlearn.nn.layout import channels_last_input

    transposed = torch.rand(4, channels, 7, 5, generator=gen).transpose(2, 3)
    for x in (torch.rand(4, channels, 5, 7, generator=gen), transposed):
        u = channels_last_input(x)
        assert torch.equal(u, x)
        assert u.stride(1) == 1 and u.is_contiguous(memory_format=torch.channels_last)
        # A convolution with an NCHW weight follows the input's layout on the CPU.
        w = torch.rand(6, channels, 3, 3, generator=gen)
        assert torch.nn.functional.conv2d(u, w).is_contiguous(memory_format=torch.channels_last)
        assert not torch.nn.functional.conv2d(x.contiguous(), w).is_contiguous(memory_format=torch.channels_last)


def test_a_one_channel_first_layer_does_not_hide_the_layout():
    from fastunlearn.nn.layout import model_is_channels_last as _is_channels_last
    from fastunlearn.nn.models import create_model

    model = create_model("allcnn", in_channels=1, num_classes=10, width=0.125)
    assert not _is_channels_last(model)
    assert _is_channels_last(model.to(memory_format=torch.channels_last))


class _OutOfMemoryAbove(torch.nn.Module):
    """A model that raises the allocator's out-of-memory error for batches above ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.calls = inner, limit, 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"simulated: {x.shape[0]} > {self.limit} samples")
        return self.inner(x)


def test_a_chunk_out_of_memory_is_halved_and_the_labels_stay(trained):
    model, x, y = trained
    cfg = UnlearnConfig(eps=0.15, steps=3, gamma=0.05, seed=2, precision="fp32")
    small = run_search(model, x, y, cfg.replace(search_batch_size=5), mean=MEAN, std=STD, device="cpu", refreshes=2)
    squeezed = run_search(_OutOfMemoryAbove(model, 5), x, y, cfg.replace(search_batch_size=64), mean=MEAN, std=STD,
                          device="cpu", refreshes=2)
    assert torch.equal(squeezed.relabels, small.relabels)
    assert torch.equal(squeezed.steps, small.steps)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        run_search(_OutOfMemoryAbove(model, 0), x[:3], y[:3], cfg, mean=MEAN, std=STD, device="cpu")


def test_bytes_per_sample_counts_what_autograd_keeps_per_sample():
    """One conv -> ReLU -> Linear on 3x16x16 fp32: per sample the conv keeps its input
    (3*256*4 B), the ReLU its output (8*256*4 B, which the Linear shares), the logits 5*4 B;
    the backward adds two of the largest. The weights do not grow with the chunk."""
    from fastunlearn.data.pixels import Normalizer as _Normalizer
    from fastunlearn.engine.search import bytes_per_sample

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 256, 5)).eval().requires_grad_(False)
    cpu = torch.device("cpu")
    sample = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    got = bytes_per_sample(net, _Normalizer([0.5] * 3, [0.2] * 3, 3, cpu), sample, cpu, None)
    relu_out = 8 * 256 * 4
    assert got == 3 * 256 * 4 + relu_out + 5 * 4 + 2 * relu_out


def _precision_flags():
    """The fp32 flags as both of torch's APIs read them (the legacy one may refuse)."""
    get = torch._C._get_fp32_precision_getter
    new = [get(*f) for f in (("cuda", "conv"), ("cuda", "rnn"), ("cuda", "matmul"))]
    try:
        legacy = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        legacy = "refused"
    return new, legacy


def _user_flags_legacy():
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = False


def _user_flags_new():
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.rnn.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "tf32"


@pytest.mark.parametrize("user", [None, _user_flags_legacy, _user_flags_new], ids=["defaults", "legacy", "new"])
def test_strict_fp32_sets_ieee_inside_and_leaves_the_flags_as_found(user):
    """Run in a fresh process (the flags are process-wide): a CPU build has them too, and
    strict_fp32 only names the CUDA device."""
    import subprocess
    import sys
    import textwrap

    prog = textwrap.dedent(f"""
        import torch
        from fastunlearn.runtime.precision import strict_fp32
        import test_search as t
        user = {None if user is None else 't.' + user.__name__}
        if user is not None:
            user()
        before = t._precision_flags()
        with strict_fp32(torch.device("cuda")):
            inside = t._precision_flags()
        after = t._precision_flags()
        with strict_fp32(torch.device("cuda"), enabled=False):
            untouched = t._precision_flags()
        print(repr((before, inside, after, untouched)))
    """)
    here = os.path.dirname(os.path.abspath(__file__))
    # test_search imports conftest, which lives one folder up.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, cwd=here, env=env,
                         check=True).stdout
    before, inside, after, untouched = eval(out.strip().splitlines()[-1])
    assert after == before and untouched == before
    conv, rnn, matmul = inside[0]
    # IEEE inside, whichever API expressed it; readable through the legacy API if it was before.
    assert matmul == "ieee" and conv in ("ieee", "none") and rnn in ("ieee", "none")
    if before[1] != "refused":
        assert inside[1] == (False, False)
