import os
import secrets

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

# Without a GPU the Triton kernels run under the interpreter; it must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# precision="auto" is bf16 on CPUs with AMX / AVX512-BF16 and fp32 elsewhere. The tests compare
# CPU runs against fp32 references, so auto means fp32 here on every machine (spawned
# processes inherit it); bf16 is tested where a test asks for it.
os.environ["FASTUNLEARN_CPU_BF16"] = "0"


def fresh_seed() -> int:
    """FASTUNLEARN_TEST_SEED when set, else a fresh seed from the OS (the global torch
    generator is left alone, so a replay draws exactly what the failing run drew)."""
    given = os.environ.get("FASTUNLEARN_TEST_SEED")
    return int(given) if given is not None else secrets.randbelow(2**31)


@pytest.fixture
def gen():
    """A fresh, randomly seeded generator: tests draw new inputs on every run.

    The seed is printed (pytest shows it with a failure) and also seeds the global torch
    generator, so FASTUNLEARN_TEST_SEED=<seed> replays the test's inputs exactly.
    """
    seed = fresh_seed()
    print(f"test seed: {seed} (replay with FASTUNLEARN_TEST_SEED={seed})")
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


DIGITS_MEAN, DIGITS_STD = [0.3], [0.35]


@pytest.fixture(scope="session")
def digits_model():
    """A small CNN trained on all 1,797 sklearn digits (CPU, eval mode), and those digits as
    uint8 (N, 1, 8, 8) images with their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16).mul(255).round().to(torch.uint8).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2,
                          padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    xf = (x.float() / 255 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    for _ in range(8):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xf[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    assert (model(xf).argmax(1) == y).float().mean() > 0.9
    return model, x, y


def reference_search(model, x, y, cfg, refresh=0, mean=DIGITS_MEAN, std=DIGITS_STD):
    """reference.boundary_relabel with the search settings of an UnlearnConfig."""
    from fastunlearn import reference

    return reference.boundary_relabel(
        model, x.float() / 255, y, eps=cfg.eps, alpha=cfg.step_size, steps=cfg.steps, mode=cfg.relabel,
        topk=cfg.topk, lamda=cfg.lamda, lamda_schedule=cfg.lamda_schedule, gamma=cfg.gamma, noise=cfg.noise,
        quantize=cfg.quantize, seed=cfg.seed, refresh=refresh, early_exit=cfg.early_exit, mean=mean, std=std)
