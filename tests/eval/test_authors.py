"""The rewrite of the authors' loop (the benchmarks' baseline): its PIL loading path serves
the same batches as its in-memory path, so only the time differs."""

import pytest
import torch
import torch.nn as nn

import fastunlearn as fu
from fastunlearn.eval.authors import PILImages, authors_unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def model(channels, classes=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, classes))


def images(gen, n, channels, classes=4):
    return (torch.randint(0, 256, (n, channels, 7, 6), generator=gen, dtype=torch.uint8),
            torch.randint(0, classes, (n,), generator=gen))


@pytest.mark.parametrize("channels,workers", [(1, 0), (3, 0), (1, 2)])
def test_pil_loading_equals_memory(gen, channels, workers):
    forget, remain = images(gen, 21, channels), images(gen, 30, channels)
    cfg = fu.UnlearnConfig(epochs=2, batch_size=8, lr=0.05, remain_reg=0.5, gamma=0.1, seed=3)
    stats = dict(mean=[0.5] * channels, std=[0.25] * channels)
    mem, _ = authors_unlearn(model(channels), forget, remain, cfg, **stats)
    pil, _ = authors_unlearn(model(channels), forget, remain, cfg, loading="pil", workers=workers, **stats)
    for (name, a), b in zip(mem.state_dict().items(), pil.state_dict().values()):
        assert torch.equal(a, b), name
    # The comparison can fail: a different seed draws other batches and noise.
    other, _ = authors_unlearn(model(channels), forget, remain, cfg.replace(seed=4), **stats)
    assert not torch.equal(other[0].weight, mem[0].weight)


def test_pil_images_convert_like_the_tensors(gen):
    for channels in (1, 3):
        x, y = images(gen, 5, channels)
        ds = PILImages(x, y)
        for i in range(5):
            img, label = ds[i]
            assert torch.equal(img, x[i].float() / 255) and label == int(y[i])


def test_bad_loading_is_refused(gen):
    forget, remain = images(gen, 8, 1), images(gen, 8, 1)
    with pytest.raises(ValueError, match="loading must be 'memory' or 'pil'"):
        authors_unlearn(model(1), forget, remain, fu.UnlearnConfig(epochs=1), loading="disk")
    with pytest.raises(ValueError, match=r"PIL loading needs uint8 \(N, 1 or 3, H, W\) images, got torch.float32"):
        PILImages(forget[0].float(), forget[1])
