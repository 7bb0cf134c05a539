"""The seed tutorial's LeNet-style CNN, in plain torch.nn and on tritonkit's fused layers.

Both take (N, 3, 32, 32) images: conv 3->6 5x5, max-pool 2, conv 6->16 5x5, max-pool 2,
fc 400->120->84->10, ReLU after every layer but the last. They share parameter names, so either
loads the other's ``state_dict``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import tritonkit.nn as tnn


class LeNet(torch.nn.Module):
    """The seed's network, exactly as the tutorial writes it (torch.nn layers, F.relu)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 5)
        self.pool = torch.nn.MaxPool2d(2, 2)
        self.conv2 = torch.nn.Conv2d(6, 16, 5)
        self.fc1 = torch.nn.Linear(16 * 5 * 5, 120)
        self.fc2 = torch.nn.Linear(120, 84)
        self.fc3 = torch.nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class TritonkitLeNet(torch.nn.Module):
    """The same network on ``tritonkit.nn``, with every ReLU fused into the layer before it."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = tnn.Conv2dReLU(3, 6, 5)
        self.pool = tnn.MaxPool2d(2, 2)
        self.conv2 = tnn.Conv2dReLU(6, 16, 5)
        self.fc1 = tnn.LinearReLU(16 * 5 * 5, 120)
        self.fc2 = tnn.LinearReLU(120, 84)
        self.fc3 = tnn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = torch.flatten(x, 1)
        return self.fc3(self.fc2(self.fc1(x)))


# ============================================================================================ ResNets
def _conv(cin: int, cout: int, k: int, stride: int = 1) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)


class BasicBlock(torch.nn.Module):
    """ResNet-18/34's block: 3x3 conv (the stride) + BN + ReLU, 3x3 conv + BN, + identity, ReLU."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: torch.nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 3, stride), torch.nn.BatchNorm2d(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv(planes, planes, 3), torch.nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(torch.nn.Module):
    """ResNet-50's block (torchvision's "v1.5": the stride on the 3x3 conv): 1x1 reduce, 3x3, 1x1
    expand to ``4 * planes``, each + BN (+ ReLU), + identity, ReLU."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: torch.nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, planes, 1), torch.nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv(planes, planes, 3, stride), torch.nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = _conv(planes, planes * 4, 1), torch.nn.BatchNorm2d(planes * 4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(torch.nn.Module):
    """torchvision's ResNet in plain torch.nn, with its module names, so ``state_dict`` keys match
    (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``,
    ``fc.weight``...) and its initialization (Kaiming-normal convs, BN weight 1 and bias 0).

    7x7/2 stem conv + BN + ReLU + 3x3/2 max-pool; four stages of ``layers[i]`` blocks with
    ``width * 2**i`` planes, stages 2-4 starting with stride 2 (a 1x1/2 conv + BN downsample on the
    identity wherever the shape changes); adaptive average pool; fc. ``width`` (torchvision: 64)
    shrinks the whole net for tests and interpreter runs.
    """

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, width: int = 64):
        super().__init__()
        self.inplanes = width
        self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.relu = torch.nn.ReLU(inplace=True)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            self._make_layer(block, width * 2**i, n, 1 if i == 0 else 2) for i, n in enumerate(layers))
        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.fc = torch.nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int) -> torch.nn.Sequential:
        cout = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != cout:
            downsample = torch.nn.Sequential(_conv(self.inplanes, cout, 1, stride), torch.nn.BatchNorm2d(cout))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = cout
        layers += [block(cout, planes) for _ in range(1, blocks)]
        return torch.nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, width: int = 64, layers: tuple[int, ...] = (2, 2, 2, 2)) -> ResNet:
    """torchvision's ``resnet18()`` (11,689,512 parameters at the defaults), untrained."""
    return ResNet(BasicBlock, list(layers), num_classes, width)


def resnet50(num_classes: int = 1000, width: int = 64, layers: tuple[int, ...] = (3, 4, 6, 3)) -> ResNet:
    """torchvision's ``resnet50()`` (25,557,032 parameters at the defaults), untrained."""
    return ResNet(Bottleneck, list(layers), num_classes, width)


def _conv_bn_relu6(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> torch.nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (no bias) + BN + ReLU6."""
    conv = torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return torch.nn.Sequential(conv, torch.nn.BatchNorm2d(cout), torch.nn.ReLU6(inplace=True))


class InvertedResidual(torch.nn.Module):
    """MobileNetV2's block: 1x1 expand to ``cin * expand`` + BN + ReLU6 (absent when ``expand`` is 1),
    3x3 depthwise (the stride) + BN + ReLU6, 1x1 project + BN, + the input when the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [_conv_bn_relu6(cin, hidden)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   torch.nn.Conv2d(hidden, cout, 1, bias=False), torch.nn.BatchNorm2d(cout)]
        self.conv = torch.nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


# torchvision's MobileNetV2 stages: (expansion t, output channels c, blocks n, first stride s)
MOBILENET_V2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                         (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(torch.nn.Module):
    """torchvision's MobileNetV2 in plain torch.nn, with its module names (``features.0.0.weight``,
    ``features.1.conv.0.0.weight``, ``classifier.1.weight``...) and initialization; ``width`` scales
    every stage's channels (torchvision's ``width_mult``, channels rounded to multiples of 8),
    ``settings`` replaces the stage table (tests and interpreter runs shrink the net with both)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, settings=MOBILENET_V2_SETTINGS,
                 last_channels: int = 1280, dropout: float = 0.2):
        super().__init__()

        def channels(c):  # torchvision's _make_divisible(c * width, 8)
            rounded = max(8, int(c * width + 4) // 8 * 8)
            return rounded + 8 if rounded < 0.9 * c * width else rounded

        cin, last = channels(32), channels(last_channels) if width > 1.0 else last_channels
        features = [_conv_bn_relu6(3, cin, 3, 2)]
        for t, c, n, s in settings:
            cout = channels(c)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(_conv_bn_relu6(cin, last))
        self.features = torch.nn.Sequential(*features)
        self.classifier = torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(m.weight)
                torch.nn.init.zeros_(m.bias)
            elif isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, 0, 0.01)
                torch.nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, settings=MOBILENET_V2_SETTINGS,
                 last_channels: int = 1280, dropout: float = 0.2) -> MobileNetV2:
    """torchvision's ``mobilenet_v2()`` (3,504,872 parameters at the defaults), untrained."""
    return MobileNetV2(num_classes, width, settings, last_channels, dropout)
