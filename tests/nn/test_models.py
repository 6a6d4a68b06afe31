import copy

import pytest
import torch
from torch import nn

from fastunlearn.data import augment
from fastunlearn.data import io as data
from fastunlearn.engine import train
from fastunlearn.eval import metrics
from fastunlearn.nn import models
from fastunlearn.runtime import backends as _backends


def _params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------------- AllCNN
@pytest.mark.parametrize("size", [8, 28, 32])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_allcnn_shapes(gen, size, in_channels):
    m = models.AllCNN(in_channels=in_channels, num_classes=7, width=0.25).eval()
    out = m(torch.rand(3, in_channels, size, size, generator=gen))
    assert out.shape == (3, 7)


def test_allcnn_architecture():
    m = models.AllCNN(in_channels=3, num_classes=10)
    # (cin, cout, k) of the eight conv layers, each with BatchNorm (2 * cout) and no conv bias
    convs = [(3, 96, 3), (96, 96, 3), (96, 192, 3), (192, 192, 3), (192, 192, 3), (192, 192, 3),
             (192, 192, 3), (192, 192, 1)]
    expect = sum(ci * co * k * k + 2 * co for ci, co, k in convs) + 192 * 10 + 10
    assert _params(m) == expect
    strides = [mod.stride[0] for mod in m.features.modules() if isinstance(mod, nn.Conv2d)]
    assert strides == [1, 1, 2, 1, 1, 2, 1, 1]
    keys = set(m.state_dict())
    # the authors' checkpoint layout: dropout slots 3 and 7, conv at .0, norm at .1
    assert {"features.0.0.weight", "features.0.1.running_mean", "features.9.0.weight",
            "classifier.0.weight", "classifier.0.bias"} <= keys
    assert not any(k.startswith(("features.3.", "features.7.")) for k in keys)
    assert isinstance(m.classifier, nn.Sequential) and isinstance(m.classifier[0], nn.Linear)
    md = models.AllCNN(dropout=True)
    assert isinstance(md.features[3], nn.Dropout) and isinstance(md.features[7], nn.Dropout)
    nb = models.AllCNN(batch_norm=False)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in nb.modules())
    assert all(c.bias is not None for c in nb.modules() if isinstance(c, nn.Conv2d))


def test_allcnn_width():
    m = models.AllCNN(width=0.5, num_classes=4)
    chans = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert chans == [48, 48] + [96] * 6 and m.classifier[0].in_features == 96
    tiny = models.AllCNN(width=0.001)
    assert all(c.out_channels == 1 for c in tiny.modules() if isinstance(c, nn.Conv2d))
    with pytest.raises(ValueError, match="width"):
        models.AllCNN(width=0)


# ---------------------------------------------------------------------- ResNet
@pytest.mark.parametrize("depth,expect", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_resnet_parameter_counts_match_torchvision(depth, expect):
    # torchvision's published ImageNet sizes (1000 classes, 7x7 stem)
    m = models.resnet(depth, num_classes=1000, in_channels=3, small_input=False)
    assert _params(m) == expect


@pytest.mark.parametrize("depth", [18, 34, 50])
@pytest.mark.parametrize("size,small", [(28, True), (32, True), (8, True), (64, False)])
def test_resnet_shapes(gen, depth, size, small):
    m = models.resnet(depth, num_classes=5, in_channels=1, small_input=small, width=4).eval()
    assert m(torch.rand(2, 1, size, size, generator=gen)).shape == (2, 5)


def test_resnet_layout():
    m = models.resnet(18, num_classes=3, width=8)
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        assert hasattr(m, name)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    big = models.resnet(50, small_input=False, width=8)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert "layer2.0.downsample.0.weight" in big.state_dict() and "layer1.0.conv3.weight" in big.state_dict()
    assert big.fc.in_features == 8 * 8 * 4
    with pytest.raises(ValueError, match="depth must be one of"):
        models.resnet(20)


def test_smallcnn_and_create_model(gen):
    for size in (8, 28, 32):
        m = models.SmallCNN(in_channels=3, num_classes=4, width=5).eval()
        assert m(torch.rand(2, 3, size, size, generator=gen)).shape == (2, 4)
    assert isinstance(models.create_model("ResNet-18", 1, 3, width=4), models.ResNet)
    assert isinstance(models.create_model("allcnn", 1, 3, width=0.1), models.AllCNN)
    assert isinstance(models.create_model("small_cnn", 1, 3), models.SmallCNN)
    with pytest.raises(ValueError, match="unknown model"):
        models.create_model("vgg16")


# ---------------------------------------------------------------------- head_of
class _WithHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


class _Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.out = nn.ModuleDict({"proj": nn.Linear(4, 3)})


def test_head_of_each_architecture():
    cases = [
        (models.AllCNN(width=0.1), "classifier"),
        (models.SmallCNN(), "classifier"),
        (models.resnet(18, width=4), "fc"),
        (models.resnet(50, width=4), "fc"),
        (_WithHead(), "head"),
        (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3)), "2"),
        (nn.Sequential(nn.Flatten(), nn.Linear(8, 3), nn.ReLU()), "1"),
        (nn.Sequential(nn.Identity(), models.resnet(18, width=4)), "1.fc"),
        (_Nested(), "out.proj"),
    ]
    for model, name in cases:
        got_name, mod = models.head_of(model)
        assert got_name == name, type(model).__name__
        assert model.get_submodule(got_name) is mod
    with pytest.raises(ValueError, match="cannot find the classifier head of Sequential"):
        models.head_of(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


# ---------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny convs gain nothing from a second thread, and OpenMP barriers stall badly when
    # another process (a parallel test worker) holds the other core.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_classifier_digits(digits):
    x, y = digits["train"]
    mean, std = data.channel_stats(x)
    model = models.SmallCNN(1, 10, width=8)
    before = copy.deepcopy(model.state_dict())
    net = train.train_classifier(model, (x, y), epochs=5, lr=0.1, batch_size=64, mean=mean, std=std,
                                 progress=False, seed=1)
    assert net is not model and not net.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the input model is untouched
    acc = metrics.accuracy(metrics.predict_logits(net, x, mean, std), y)
    assert acc > 0.85
    # a second run with the same seed is bit-identical, and the global RNG is left alone
    state = torch.get_rng_state()
    net2 = train.train_classifier(model, (x, y), epochs=5, lr=0.1, batch_size=64, mean=mean, std=std,
                                  progress=False, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    for (k, a), b in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(a, b), k


def test_train_classifier_options(digits, gen):
    x, y = digits["train"]
    x, y = x[:130], y[:130]  # 130 % 64 == 2, 130 % 129 == 1: the one-sample batch is skipped
    model = models.SmallCNN(1, 10, width=4)
    for kw in ({"augment": True, "schedule": "cosine", "batch_size": 129},
               {"augment": "crop", "schedule": "constant"}):
        net = train.train_classifier(model, torch.utils.data.TensorDataset(x, y), epochs=1, progress=False, **kw)
        assert all(torch.isfinite(p).all() for p in net.parameters())
    xa, ya = digits["train"]
    for n in range(64, 4 * 64 + 1, 64):  # 1 to 4 steps: one-cycle schedules that short still run
        net = train.train_classifier(model, (xa[:n], ya[:n]), epochs=1, batch_size=64, progress=False)
        assert all(torch.isfinite(p).all() for p in net.parameters()), n
    same = train.train_classifier(model, (x, y), epochs=0, progress=False)
    assert same is not model
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="augment must be"):
        train.train_classifier(model, (x, y), epochs=1, augment="rotate", progress=False)
    with pytest.raises(ValueError, match="epochs must be"):
        train.train_classifier(model, (x, y), epochs=-1)
    with pytest.raises(ValueError, match="train: 130 images but 3 labels"):
        train.train_classifier(model, (x, y[:3]), epochs=1)


@pytest.mark.skipif(not _backends.has_cpu_op("batch_norm_relu"), reason="native CPU op not built")
def test_train_classifier_fast_step_trains_as_plain_pytorch(digits, monkeypatch):
    """channels_last + the native BatchNorm op (the CPU default) against plain NCHW PyTorch
    modules: the same run to float32 rounding, returned in the contiguous layout.

    The net is smooth (Tanh, not ReLU): over a run, a pre-activation within rounding of a
    ReLU's kink takes either side in two float32 orders of summation and the runs part by
    a gradient's worth (the fused ReLU itself is tested in test_batch_norm_relu.py)."""
    import fastunlearn.engine.train as train_module
    import fastunlearn.nn.fuse as fuse

    x, y = digits["train"]
    x, y = x[:300], y[:300]
    mean, std = data.channel_stats(x)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.Tanh(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    kw = dict(epochs=2, lr=0.05, batch_size=64, mean=mean, std=std, progress=False, seed=2, augment=True)
    calls = []
    op = fuse.batch_norm_relu
    monkeypatch.setattr(fuse, "batch_norm_relu", lambda *a, **k: calls.append(a[0].shape) or op(*a, **k))
    fast = train.train_classifier(model, (x, y), **kw)
    assert len(calls) == 2 * 2 * 5  # both BatchNorms, every step (300 = 4 x 64 + 44)
    assert all(p.is_contiguous() for p in fast.parameters())
    assert all("forward" not in m.__dict__ for m in fast.modules())  # the fusion is undone

    monkeypatch.setattr(_backends, "has_cpu_op", lambda name: False)
    monkeypatch.setattr(train_module, "default_channels_last", lambda *a, **k: False)
    plain = train.train_classifier(model, (x, y), **kw)
    for (k, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (k, (a - b).abs().max())
        else:
            assert torch.equal(a, b), k


def test_train_classifier_precision(digits):
    x, y = digits["train"]
    x, y = x[:200], y[:200]
    mean, std = data.channel_stats(x)
    model = models.SmallCNN(1, 10, width=8)
    kw = dict(epochs=2, lr=0.1, batch_size=64, mean=mean, std=std, progress=False, seed=1)
    net = train.train_classifier(model, (x, y), precision="bf16", **kw)
    assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast: fp32 weights
    fp32 = train.train_classifier(model, (x, y), **kw)
    diff = max(float((a - b).abs().max()) for a, b in zip(net.parameters(), fp32.parameters()))
    assert 0 < diff < 0.05  # bf16 arithmetic, the same run
    with pytest.raises(ValueError, match=r"precision must be one of \('fp32', 'bf16', 'auto'\).*got 'fp16'"):
        train.train_classifier(model, (x, y), precision="fp16", **kw)


def test_random_crop_and_flip(gen):
    x = torch.rand(6, 2, 5, 7, generator=gen)
    pad = 2
    out = augment.random_crop(x, pad, torch.Generator().manual_seed(int(torch.randint(0, 99, (1,), generator=gen))))
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    for i in range(6):
        crops = [padded[i, :, a:a + 5, b:b + 7] for a in range(2 * pad + 1) for b in range(2 * pad + 1)]
        assert any(torch.equal(out[i], c) for c in crops)
    f = augment.random_flip(x, torch.Generator().manual_seed(0))
    for i in range(6):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1))
