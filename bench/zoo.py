"""The benchmark zoo: models unlike the project's own AllCNN, each run against the authors'-loop
rewrite by bench_search.py, bench_e2e.py and bench_revision.py (``--zoo``).

  allcnn-w0.25, allcnn-w1  the package's AllCNN at two widths (28 px FashionMNIST)
  clinic-cnn               a CNN as a clinic writes one: conv-BN-ReLU inside Sequentials, max-pool,
                           dropout, global pooling, a head named ``diagnosis``, its own forward
  resnet18-cifar           torchvision's ResNet-18 with the CIFAR stem (3x3/1, no max-pool) at 32 px;
                           where torchvision does not import, the ResNet-18 written here (same layers)
  resnet50                 torchvision's ResNet-50 (ImageNet stem) at 224 px (512 px for the search on
                           CUDA); a smaller size on CPU, named in each entry; the one written here
                           where torchvision does not import
  vit-tiny                 a small ViT (patch 4, 4 blocks, width 96, 32 px): no BatchNorm, so neither
                           folding nor fusion helps it

Every entry is trained briefly on FashionMNIST (repeated to 3 channels and resized where the
entry says) by the bench that runs it. ``zoo_argv`` gives each entry's bench flags; ``run_zoo``
runs each entry in a fresh process, so every row includes the first call of a process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

ZOO_PREFIX = "zoo:"


# ------------------------------------------------------------------ models
class ClinicCNN(nn.Module):
    """A CNN as written outside the unlearning literature: three Sequential stages of
    conv-BN-ReLU with max-pooling and dropout, global average pooling, a head called
    ``diagnosis``."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()

        def cbr(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.stage1 = nn.Sequential(*cbr(in_channels, w), *cbr(w, w), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(*cbr(w, 2 * w), *cbr(2 * w, 2 * w), nn.MaxPool2d(2), nn.Dropout(0.25))
        self.stage3 = nn.Sequential(*cbr(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.3)
        self.diagnosis = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.diagnosis(self.dropout(torch.flatten(self.pool(x), 1)))


class _Basic(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(cin, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
            nn.Conv2d(planes, out, 1, bias=False), nn.BatchNorm2d(out))
        self.shortcut = _shortcut(cin, out, stride)

    def forward(self, x):
        return F.relu(self.body(x) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ZooResNet(nn.Module):
    """A ResNet with torchvision's layer shapes but its own module names (stem, stages, fc),
    for machines where torchvision does not import."""

    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10, cifar_stem: bool = True):
        super().__init__()
        block, layers = {18: (_Basic, (2, 2, 2, 2)), 50: (_Bottleneck, (3, 4, 6, 3))}[depth]
        if cifar_stem:
            stem = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        else:
            stem = [nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2, 1)]
        self.stem = nn.Sequential(*stem)
        stages, cin = [], 64
        for i, n in enumerate(layers):
            planes = 64 * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(a)
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small Vision Transformer: patch embedding, learned positions, pre-norm blocks,
    mean-pooled tokens, a linear ``head``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, patch: int = 4,
                 dim: int = 96, depth: int = 4, heads: int = 3, mlp_ratio: int = 2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size must be a multiple of patch ({patch}), got {image_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, dim) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


def torchvision_resnet(depth: int, in_channels: int, num_classes: int, cifar_stem: bool):
    """torchvision's ResNet-18/50 (the CIFAR stem swapped in when asked), or None where
    torchvision does not import (its wheel must match torch's build)."""
    try:
        from torchvision.models import resnet18, resnet50
    except Exception:  # ImportError, or RuntimeError from a wheel built for another torch
        return None
    model = (resnet18 if depth == 18 else resnet50)(num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


def build(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A zoo model by name (without the ``zoo:`` prefix): clinic-cnn, resnet18-cifar, resnet50, vit-tiny."""
    if name == "clinic-cnn":
        return ClinicCNN(in_channels, num_classes)
    if name in ("resnet18-cifar", "resnet50"):
        depth, cifar = (18, True) if name == "resnet18-cifar" else (50, False)
        return (torchvision_resnet(depth, in_channels, num_classes, cifar)
                or ZooResNet(depth, in_channels, num_classes, cifar_stem=cifar))
    if name == "vit-tiny":
        return TinyViT(in_channels, num_classes, image_size=image_size)
    raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(BUILT_HERE)}")


BUILT_HERE = ("clinic-cnn", "resnet18-cifar", "resnet50", "vit-tiny")


def provenance(name: str) -> str:
    """Where the model of an entry comes from on this machine (torchvision or this module)."""
    if name in ("resnet18-cifar", "resnet50"):
        tv = torchvision_resnet(18, 3, 10, True) is not None
        return "torchvision" if tv else "bench/zoo.py (torchvision does not import)"
    return "fastunlearn.nn.models" if name.startswith("allcnn") else "bench/zoo.py"


def is_zoo_arch(arch: str) -> bool:
    return arch.startswith(ZOO_PREFIX)


def create(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model of a ``zoo:<name>`` --arch."""
    return build(arch[len(ZOO_PREFIX):], in_channels, num_classes, image_size)


# ------------------------------------------------------------------ entries
NAMES = ("allcnn-w0.25", "allcnn-w1", "clinic-cnn", "resnet18-cifar", "resnet50", "vit-tiny")
# Flags of every bench for an entry; the images are FashionMNIST's, resized / repeated to 3 channels.
ENTRY_FLAGS = {
    "allcnn-w0.25": ["--arch", "allcnn", "--width", "0.25"],
    "allcnn-w1": ["--arch", "allcnn", "--width", "1"],
    "clinic-cnn": ["--arch", "zoo:clinic-cnn"],
    "resnet18-cifar": ["--arch", "zoo:resnet18-cifar", "--size", "32", "--channels", "3"],
    "resnet50": ["--arch", "zoo:resnet50", "--channels", "3"],
    "vit-tiny": ["--arch", "zoo:vit-tiny", "--size", "32", "--channels", "3"],
}
# ResNet-50's input size: 224 px (512 px for the search on CUDA); 64 px on a CPU, where 224 px
# does not fit a benchmark run.
RESNET50_SIZE = {("cuda", "search"): 512, ("cuda", "e2e"): 224, ("cuda", "revision"): 224}
RESNET50_CPU_SIZE = 64
# Entries too heavy for a CPU at the benches' defaults get fewer samples and epochs there.
HEAVY = ("allcnn-w1", "resnet18-cifar", "resnet50")
CPU_HEAVY_FLAGS = {
    "search": ["--n", "512", "--train-epochs", "1"],
    "e2e": ["--train-size", "2000", "--train-epochs", "2", "--test-size", "2000", "--warm-reps", "0"],
    "revision": ["--train-size", "2000", "--train-epochs", "2", "--sizes", "64"],
}


def zoo_argv(name: str, bench: str, device: str) -> list[str]:
    """The flags that make ``bench`` (search, e2e or revision) run entry ``name`` on ``device``
    (cpu or cuda); flags the user gives after them win."""
    if name not in ENTRY_FLAGS:
        raise ValueError(f"unknown zoo entry {name!r}; expected some of {', '.join(NAMES)}")
    argv = list(ENTRY_FLAGS[name])
    if name == "resnet50":
        argv += ["--size", str(RESNET50_SIZE.get((device, bench), RESNET50_CPU_SIZE))]
    if device == "cpu" and name in HEAVY:
        argv += CPU_HEAVY_FLAGS[bench]
    return argv


def _strip(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv without the given flags and their values (``--flag v`` and ``--flag=v``; a bare
    ``--zoo`` takes no value)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            skip = "=" not in a and nxt is not None and not nxt.startswith("--")
            continue
        out.append(a)
    return out


def selected(value: str) -> list[str]:
    names = list(NAMES) if value in ("all", "") else value.split(",")
    unknown = [n for n in names if n not in ENTRY_FLAGS]
    if unknown:
        raise SystemExit(f"--zoo: unknown entries {unknown}; choose from {', '.join(NAMES)} (or all)")
    return names


def run_zoo(script: str, bench: str, argv: list[str], value: str, device: str, csv_path: str | None,
            cols: list[str]) -> list[dict]:
    """Run ``script`` once per zoo entry, each in a fresh process (so each row includes the first
    call of a process) with a tuning cache of its own (so it includes the tuning that a first
    run pays); print one table of the rows they wrote and append those rows to ``csv_path``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import append_csv, print_table

    base = _strip(argv, ("--zoo", "--csv"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastunlearn-zoo-") as tmp:
        for name in selected(value):
            out = os.path.join(tmp, f"{name}.csv")
            env = dict(os.environ, FASTUNLEARN_TUNE_CACHE=os.path.join(tmp, f"tune-{name}"))
            cmd = [sys.executable, script, *zoo_argv(name, bench, device), *base, "--csv", out]
            print(f"\n=== zoo: {name} ({provenance(name)}): {' '.join(cmd[1:])}", flush=True)
            rc = subprocess.call(cmd, env=env)
            if rc or not os.path.exists(out):
                print(f"zoo: {name} failed (exit {rc})", flush=True)
                rows.append({"zoo": name, "status": f"failed ({rc})"})
                continue
            with open(out, newline="") as f:
                rows += [dict(r, zoo=name, source=provenance(name)) for r in csv.DictReader(f)]
    print(f"\nzoo, {bench}, {device}")
    print_table([{k: _short(v) for k, v in r.items()} for r in rows], ["zoo", *cols])
    ok = [r for r in rows if "status" not in r]
    if ok:
        print(f"appended {len(ok)} rows to {append_csv(ok, csv_path)}")
    return rows


def _short(v):
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return v
