"""Image classifiers used in the unlearning literature, and a way to find a model's head.

Every model here takes (N, C, H, W) float input (already normalised by the caller) and
ends in a linear head, so ``compose`` can swap heads between runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastunlearn.nn import external


def _n(base: int, width: float) -> int:
    return max(1, int(base * width))


def conv_bn_relu(cin: int, cout: int, kernel_size: int = 3, stride: int = 1, batch_norm: bool = True) -> nn.Sequential:
    """Conv (same padding) + BatchNorm + ReLU, as one Sequential so state-dict keys read
    ``<i>.0.weight`` (conv) / ``<i>.1.weight`` (norm) like the published All-CNN checkpoints."""
    layers = [nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=(kernel_size - 1) // 2, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class AllCNN(nn.Module):
    """All-CNN-C (Springenberg et al., 2015) with BatchNorm, as used by the unlearning papers.

    The layer indices of ``features`` follow the authors' module (dropout slots at 3 and 7
    hold Identity when dropout is off), so their state dicts load unchanged. The final
    pool is adaptive, so any input of 8 px or more works.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: float = 1.0,
                 batch_norm: bool = True, dropout: bool = False):
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        c1, c2 = _n(96, width), _n(192, width)
        drop = (lambda: nn.Dropout(0.5)) if dropout else nn.Identity
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, c1, 3, 1, batch_norm),
            conv_bn_relu(c1, c1, 3, 1, batch_norm),
            conv_bn_relu(c1, c2, 3, 2, batch_norm),
            drop(),
            conv_bn_relu(c2, c2, 3, 1, batch_norm),
            conv_bn_relu(c2, c2, 3, 1, batch_norm),
            conv_bn_relu(c2, c2, 3, 2, batch_norm),
            drop(),
            conv_bn_relu(c2, c2, 3, 1, batch_norm),
            conv_bn_relu(c2, c2, 1, 1, batch_norm),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(c2, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A three-conv network for tests and CPU demos on 8x8 to 32x32 images."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w = int(width)
        self.features = nn.Sequential(
            conv_bn_relu(in_channels, w, 3, 1),
            conv_bn_relu(w, 2 * w, 3, 2),
            conv_bn_relu(2 * w, 2 * w, 3, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


# ----------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with torchvision's attribute names (conv1, bn1, layer1..4, avgpool, fc).

    small_input=True replaces the 7x7/2 stem and max-pool by a 3x3/1 stem, the usual
    choice for 28-32 px images; False is the ImageNet stem for 224 px and up.
    """

    def __init__(self, block, layers, num_classes: int = 10, in_channels: int = 3, small_input: bool = True,
                 width: int = 64):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.inplanes = width
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


RESNET_LAYERS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


def resnet(depth: int = 18, num_classes: int = 10, in_channels: int = 3, small_input: bool = True,
           width: int = 64) -> ResNet:
    """ResNet-18/34/50/101/152."""
    if depth not in RESNET_LAYERS:
        raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
    block, layers = RESNET_LAYERS[depth]
    return ResNet(block, layers, num_classes=num_classes, in_channels=in_channels, small_input=small_input,
                  width=width)


MODEL_NAMES = ("allcnn", "smallcnn", "resnet18", "resnet34", "resnet50")


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, **kwargs) -> nn.Module:
    """A model by name: allcnn, smallcnn, resnet18, resnet34, resnet50 (extra kwargs go to it),
    or torchvision:NAME / factory:module:function (see nn.external; in_channels is not passed)."""
    if external.is_external(name):
        return external.build(name, num_classes=num_classes, **kwargs)
    key = name.lower().replace("-", "").replace("_", "")
    if key == "allcnn":
        return AllCNN(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if key == "smallcnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if key.startswith("resnet") and key[6:].isdigit():
        return resnet(int(key[6:]), num_classes=num_classes, in_channels=in_channels, **kwargs)
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


# ------------------------------------------------------------------------- head
def _has_params(m: nn.Module) -> bool:
    return next(m.parameters(), None) is not None


def head_of(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the classifier head: ``classifier``, ``fc`` or ``head`` when the
    model has one, else the last child of a Sequential (looking inside it when it has a
    head of its own), else the last nn.Linear.

    ``name`` is the dotted path, usable with ``model.get_submodule``.
    """
    for attr in ("classifier", "fc", "head"):
        m = getattr(model, attr, None)
        if isinstance(m, nn.Module) and _has_params(m):
            return attr, m
    if isinstance(model, nn.Sequential) and len(model) and _has_params(model[-1]):
        last = model[-1]
        # A wrapped model (e.g. Sequential(normalise, net)) keeps its head inside the net.
        if any(isinstance(getattr(last, a, None), nn.Module) for a in ("classifier", "fc", "head")):
            sub, m = head_of(last)
            return f"{len(model) - 1}.{sub}", m
        return str(len(model) - 1), last
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = (name, m)
    if last is None:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}: it has no "
                         "`classifier`, `fc` or `head` attribute, is not a Sequential ending in a layer "
                         "with parameters, and holds no nn.Linear")
    return last
