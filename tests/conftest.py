import os

import pytest
import torch

# Without a GPU the Triton kernels run under the interpreter; it must be set before
# triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen():
    """A fresh, randomly seeded generator: tests draw new inputs on every run.

    The seed is printed so a failure can be replayed with FASTUNLEARN_TEST_SEED.
    """
    seed = int(os.environ.get("FASTUNLEARN_TEST_SEED", torch.seed() % 2**31))
    print(f"test seed: {seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
