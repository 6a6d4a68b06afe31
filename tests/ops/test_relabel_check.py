"""relabel_check: every backend against reference.relabel_check on fresh random inputs.

Discrete outputs (relabel, success, which classes are in the top k) must match exactly;
the logits of every input dtype are exact in float32, so ties are real ties for every
backend. Float outputs follow the tolerance rule: the op's error against a float64
computation must be at most about twice the error of plain PyTorch run at the input's
precision (with a floor of four float32 ulps of the output's scale).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import fastunlearn.ops as ops
from fastunlearn import reference
from fastunlearn.ops import _dispatch
from fastunlearn.ops.relabel_check_meta import MODE_CODES
from fastunlearn.runtime import backends as _backends

MODES = reference.RELABEL_MODES
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NS = (0, 1, 7, 129)
KS = (1, 2, 3, 10, 1000, 5000)
CUDA = torch.cuda.is_available()


def _device(backend):
    return torch.device("cuda" if backend in ("cuda", "triton") and CUDA else "cpu")


def _need(backend):
    if backend == "cuda" and not CUDA:
        pytest.skip("no CUDA device")


# ------------------------------------------------------------------ inputs
def make_inputs(n, k, dtype, gen, ties=False):
    """Logits and labels; a third of the rows have y = argmax, some rows tie y with another class."""
    if ties:
        # Few distinct values: repeated maxima and equal probabilities everywhere.
        x = torch.randint(-2, 3, (n, k), generator=gen).to(torch.float32)
    else:
        x = torch.randn(n, k, generator=gen) * 3
    x = x.to(dtype)
    y = torch.randint(0, k, (n,), generator=gen)
    if n and k > 1:
        top = x.float().argmax(1)
        y[::3] = top[::3]
        # Rows 1, 4, ...: y ties the row max with another class (y may be the lower or
        # the higher index of the pair).
        for r in range(1, n, 3):
            j = int(torch.randint(0, k, (1,), generator=gen))
            if j == int(y[r]):
                j = (j + 1) % k
            x[r, j] = x[r].max()
            x[r, y[r]] = x[r].max()
    return x, y


# ------------------------------------------------------------------ float64 truth
def truth64(logits, y, mode, topk):
    """The float outputs of reference.relabel_check, kept in float64 (same selection rules)."""
    z = logits.double()
    n, k = z.shape
    rows = torch.arange(n)
    others = z.clone()
    others[rows, y] = -math.inf
    margin = z[rows, y] - (others.max(1).values if k > 1 else torch.full((n,), -math.inf, dtype=torch.float64))
    p = torch.softmax(z, 1)
    targets = None
    if mode == "soft":
        targets = p
    elif mode == "topk":
        order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :min(topk, k)]
        sel = torch.zeros_like(p).scatter_(1, order, p.gather(1, order))
        targets = sel / sel.sum(1, keepdim=True)
    dlogits = p - F.one_hot(y, k).double()
    return margin, targets, dlogits


def plain_torch(logits, y, mode, topk):
    """What eager PyTorch gives at the input's precision (the error the op is held to)."""
    n, k = logits.shape
    rows = torch.arange(n)
    others = logits.clone()
    others[rows, y] = -math.inf
    margin = logits[rows, y] - (others.max(1).values if k > 1 else torch.full((n,), -math.inf, dtype=logits.dtype))
    p = torch.softmax(logits, 1)
    targets = None
    if mode == "soft":
        targets = p
    elif mode == "topk":
        order = torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :min(topk, k)]
        sel = torch.zeros_like(p).scatter_(1, order, p.gather(1, order))
        targets = sel / sel.sum(1, keepdim=True)
    dlogits = p - F.one_hot(y, k).to(p.dtype)
    return margin, targets, dlogits


def assert_close_2x(name, got, truth, plain):
    """|got - truth| <= 2 * max|plain - truth| (+ four float32 ulps of the scale), elementwise."""
    got = got.double().cpu()
    truth = truth.double()
    plain = plain.double()
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    fin = torch.isfinite(truth)
    bad_nonfinite = (~fin & ~(got == truth)) | (fin & ~torch.isfinite(got))
    if bad_nonfinite.any():
        idx = bad_nonfinite.nonzero()[:5].tolist()
        raise AssertionError(f"{name}: {int(bad_nonfinite.sum())} NaN/inf mismatches, first at {idx}: "
                             f"got {[got[tuple(i)].item() for i in idx]}, "
                             f"expected {[truth[tuple(i)].item() for i in idx]}")
    if not fin.any():
        return
    err_plain = (plain - truth)[fin].abs().max().item()
    scale = truth[fin].abs().max().item()
    # The floor is 4 float32 ulps of the scale: on a few elements plain PyTorch may happen
    # to round almost exactly, while a correctly rounded exp, sum and divide still differ
    # from float64 by 2-3 ulps.
    allowed = 2.0 * err_plain + 4 * torch.finfo(torch.float32).eps * max(scale, 1e-30)
    err = (got - truth).abs().where(fin, torch.zeros_like(got))
    bad = err > allowed
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {got.numel()} elements off by more than {allowed:.3g} "
            f"(2 x plain PyTorch error {err_plain:.3g}); max error {err.max().item():.3g}; first at {idx}: "
            f"got {[got[tuple(i)].item() for i in idx]}, expected {[truth[tuple(i)].item() for i in idx]}")


def check(backend, logits, y, mode, topk, want_grad):
    dev = _device(backend)
    out = ops.relabel_check(logits.to(dev), y.to(dev), mode=mode, topk=topk, want_grad=want_grad, backend=backend)
    ref = reference.relabel_check(logits, y, mode=mode, topk=topk, want_grad=want_grad)
    n, k = logits.shape
    ctx = f"[{backend} {mode} topk={topk} grad={want_grad} {logits.dtype} {tuple(logits.shape)}]"
    assert out.relabel.dtype == torch.int64 and out.success.dtype == torch.bool and out.margin.dtype == torch.float32
    for name in ("relabel", "success"):
        got, exp = getattr(out, name).cpu(), getattr(ref, name)
        if not torch.equal(got, exp):
            rows = (got != exp).nonzero().flatten()[:5].tolist()
            raise AssertionError(f"{ctx} {name}: {int((got != exp).sum())} rows differ, first {rows}: "
                                 f"got {got[rows].tolist()}, expected {exp[rows].tolist()}")
    margin64, targets64, dlogits64 = truth64(logits, y, mode, topk)
    pm, pt, pd = plain_torch(logits, y, mode, topk)
    assert_close_2x(f"{ctx} margin", out.margin, margin64, pm)
    if mode in ("soft", "topk"):
        assert out.targets is not None and out.targets.dtype == torch.float32
        if mode == "topk":
            # Selection is discrete: zero where the reference is zero, non-zero where the
            # reference is clearly so (backends may flush probabilities below ~1e-38).
            got_t = out.targets.cpu()
            wrong = ((ref.targets == 0) & (got_t != 0)) | ((ref.targets > 1e-30) & (got_t == 0))
            assert not wrong.any(), f"{ctx} top-k selection differs at {wrong.nonzero()[:5].tolist()}"
        assert_close_2x(f"{ctx} targets", out.targets, targets64, pt)
    else:
        assert out.targets is None, f"{ctx} targets should be None"
    if want_grad:
        assert out.dlogits is not None and out.dlogits.dtype == torch.float32
        assert_close_2x(f"{ctx} dlogits", out.dlogits, dlogits64, pd)
    else:
        assert out.dlogits is None, f"{ctx} dlogits should be None"


# ------------------------------------------------------------------ tests
def test_cpu_and_triton_backends_are_available():
    dev = torch.device("cpu") if not CUDA else torch.device("cuda")
    assert _dispatch._available("relabel_check", "cpu", torch.device("cpu")), _backends.backends()
    assert _dispatch._available("relabel_check", "triton", dev), _backends.backends()


# Small K covers ties and K == 1; the large K make the kernels loop over blocks. Every
# (N, K) pair runs at float32; the half-precision dtypes get a spread of them, which keeps
# the file fast under the Triton interpreter.
SHAPES = [(n, k) for n in NS for k in KS]
SHAPES_LOWP = [(0, 3), (1, 1), (1, 5000), (7, 2), (7, 1000), (129, 3), (129, 10)]
# Each call covers one mode; want_grad alternates so both settings meet every mode here
# and in test_every_mode_and_grad.
CALLS = (("argmax", False), ("nearest_incorrect", True), ("soft", True), ("topk", False))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, dtype, gen):
    _need(backend)
    shapes = SHAPES if dtype == torch.float32 else SHAPES_LOWP
    for n, k in shapes:
        x, y = make_inputs(n, k, dtype, gen)
        for mode, want_grad in CALLS:
            check(backend, x, y, mode, 3, want_grad)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_every_mode_and_grad(backend, gen):
    _need(backend)
    for dtype in DTYPES:
        x, y = make_inputs(7, 1000, dtype, gen)
        for mode in MODES:
            for want_grad in (False, True):
                check(backend, x, y, mode, 5, want_grad)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_ties_break_to_lowest_index(backend, gen):
    _need(backend)
    for n, k in ((129, 3), (129, 10), (33, 1000)):
        x, y = make_inputs(n, k, torch.float32, gen, ties=True)
        for mode in MODES:
            check(backend, x, y, mode, 4, True)
    # Explicit: y ties another class at the max, on both sides of it.
    x = torch.tensor([[1.0, 5.0, 5.0, 0.0], [5.0, 1.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    y = torch.tensor([1, 2, 0])
    out = ops.relabel_check(x.to(_device(backend)), y.to(_device(backend)), mode="nearest_incorrect",
                            backend=backend)
    assert out.relabel.tolist() == [2, 0, 1]
    assert out.success.tolist() == [False, True, False]
    assert out.margin.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_topk_larger_than_classes_and_topk_one(backend, gen):
    _need(backend)
    for k in (1, 2, 3, 10):
        x, y = make_inputs(7, k, torch.float32, gen)
        for topk in (1, k, k + 1, 50):
            check(backend, x, y, "topk", topk, True)
    x, y = make_inputs(5, 1000, torch.bfloat16, gen, ties=True)
    check(backend, x, y, "topk", 1000, False)
    check(backend, x, y, "topk", 37, False)


def test_triton_block_boundaries(monkeypatch, gen):
    """Rows wider than one block: maxima and ties that straddle block edges."""
    from fastunlearn.kernels import relabel_check as kmod

    monkeypatch.setattr(kmod, "_MAX_BLOCK_K", 8)
    for k in (9, 16, 37):
        for ties in (False, True):
            x, y = make_inputs(20, k, torch.float32, gen, ties=ties)
            for mode in MODES:
                check("triton", x, y, mode, 5, True)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_extreme_logits(backend, gen):
    """Softmax must stay finite for logits far from 0 (stable in float32)."""
    _need(backend)
    x, y = make_inputs(9, 300, torch.float32, gen)
    x = x * 40 + torch.tensor([1e4, -1e4, 0.0]).repeat(3)[:, None]
    for mode in MODES:
        check(backend, x, y, mode, 3, True)


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda", "torch"])
def test_confident_rows_keep_the_digits_of_the_true_class_gradient(backend, gen):
    """For p_y within an ulp of 1, dlogits[y] = -(sum of the other p) must keep its digits:
    the sign pattern of a confident sample's input gradient comes from them."""
    _need(backend)
    n, k = 64, 10
    x = torch.randn(n, k, generator=gen)
    y = torch.randint(0, k, (n,), generator=gen)
    x[torch.arange(n), y] += torch.empty(n).uniform_(12, 30, generator=gen)
    got = ops.relabel_check(x, y, want_grad=True, backend=backend).dlogits[torch.arange(n), y].double()
    p = torch.softmax(x.double(), dim=1)
    p[torch.arange(n), y] = 0.0
    expect = -p.sum(1)  # summed without y: a difference with 1 would cancel even in float64
    rel = ((got - expect).abs() / expect.abs()).max()
    assert rel < 1e-4, f"{backend}: worst relative error {float(rel):.3g} of dlogits[y]"


def test_python_fallback_agrees_with_cpu(gen):
    x, y = make_inputs(33, 10, torch.float32, gen)
    a = ops.relabel_check(x, y, mode="topk", want_grad=True, backend="torch")
    b = ops.relabel_check(x, y, mode="topk", want_grad=True, backend="cpu")
    assert torch.equal(a.relabel, b.relabel) and torch.equal(a.success, b.success)
    torch.testing.assert_close(b.targets, a.targets, atol=1e-6, rtol=1e-5)


def test_opcheck_native(gen):
    for dtype, mode, grad in ((torch.float32, 0, False), (torch.bfloat16, 1, True), (torch.float16, 2, True),
                              (torch.float32, 3, False)):
        x, y = make_inputs(7, 10, dtype, gen)
        torch.library.opcheck(torch.ops.fastunlearn.relabel_check.default, (x, y, mode, 3, grad))
    x, y = make_inputs(0, 10, torch.float32, gen)
    torch.library.opcheck(torch.ops.fastunlearn.relabel_check.default, (x, y, 3, 3, True))


def test_opcheck_triton(gen):
    from fastunlearn.kernels.relabel_check import relabel_check_triton  # noqa: F401  (registers the op)

    dev = _device("triton")
    for mode, grad in ((1, True), (3, False)):
        x, y = make_inputs(7, 10, torch.bfloat16, gen)
        torch.library.opcheck(torch.ops.fastunlearn.relabel_check_triton.default, (x.to(dev), y.to(dev), mode, 3, grad))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_torch_compile_fullgraph(backend, gen):
    dev = _device(backend)

    @torch.compile(fullgraph=True)
    def step(x, y):
        r = ops.relabel_check(x, y, mode="topk", topk=2, want_grad=True, backend=backend)
        return r.relabel, r.success, r.margin, r.targets, r.dlogits

    x, y = make_inputs(7, 10, torch.float32, gen)
    got = step(x.to(dev), y.to(dev))
    ref = reference.relabel_check(x, y, mode="topk", topk=2, want_grad=True)
    assert torch.equal(got[0].cpu(), ref.relabel) and torch.equal(got[1].cpu(), ref.success)
    torch.testing.assert_close(got[3].cpu(), ref.targets, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[4].cpu(), ref.dlogits, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "torch"])
def test_bad_inputs(backend):
    x = torch.randn(4, 5)
    y = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="logits must be a \\(N, classes\\)"):
        ops.relabel_check(x[0], y, backend=backend)
    with pytest.raises(ValueError, match="logits must be a \\(N, classes\\)"):
        ops.relabel_check(x[None], y, backend=backend)
    with pytest.raises(TypeError, match="integer labels"):
        ops.relabel_check(x, y.float(), backend=backend)
    with pytest.raises(ValueError, match="y must be a \\(4,\\)"):
        ops.relabel_check(x, y[:3], backend=backend)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 5\\)"):
        ops.relabel_check(x, torch.tensor([0, 1, 5, 3]), backend=backend)
    with pytest.raises(ValueError, match="labels must lie in \\[0, 5\\)"):
        ops.relabel_check(x, torch.tensor([0, -1, 2, 3]), backend=backend)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.relabel_check(x, y, mode="hard", backend=backend)
    with pytest.raises(ValueError, match="topk must be >= 1"):
        ops.relabel_check(x, y, mode="topk", topk=0, backend=backend)
    with pytest.raises(TypeError, match="floating point"):
        ops.relabel_check(x.long(), y, backend=backend)


def test_native_op_rejects_bad_labels():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        torch.ops.fastunlearn.relabel_check(x, torch.tensor([0, 4, 1]), 0, 3, False)
    with pytest.raises(RuntimeError, match="y must be int64"):
        torch.ops.fastunlearn.relabel_check(x, torch.tensor([0, 1, 1], dtype=torch.int32), 0, 3, False)


def test_mode_codes_match_schema_comment():
    assert MODE_CODES == {"argmax": 0, "nearest_incorrect": 1, "soft": 2, "topk": 3}



_COMPILE_FOR_SM90 = """
import json
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastunlearn.kernels.relabel_check import _relabel_check_kernel as kernel

ints = {"n", "k", "topk_passes", "topk_all"}
for logits, mode, want_grad, rows, block_k in json.loads(sys.argv[1]):
    pointers = {"logits_ptr": "*" + logits, "y_ptr": "*i64", "relabel_ptr": "*i64", "success_ptr": "*i1",
                "margin_ptr": "*fp32", "targets_ptr": "*fp32", "dlogits_ptr": "*fp32"}
    consts = {"MODE": mode, "WANT_GRAD": want_grad, "ROWS": rows, "BLOCK_K": block_k}
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in ints:
            sig[name] = "i32"
        else:
            raise SystemExit(f"kernel argument {name} is new to this test: give it a type")
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32))
    assert ".entry _relabel_check_kernel" in compiled.asm["ptx"], (logits, mode)
print("compiled")
"""

# (logits dtype, mode, want_grad, ROWS, BLOCK_K): every mode with the gradient on many short rows
# per program, and a bf16 top-k on one wide row that loops over blocks of classes (the two
# tilings _launch_config picks from).
SM90_VARIANTS = [("fp32", mode, True, 256, 16) for mode in range(4)] + [("bf16", 3, False, 1, 4096)]


def test_triton_kernel_compiles_for_sm90():
    """The GPU build of the Triton kernel for an sm_90 (H100 / H200) target, compiled without
    a GPU in a process without TRITON_INTERPRET (which would swap in the interpreter and never
    compile it)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90, json.dumps(SM90_VARIANTS)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
