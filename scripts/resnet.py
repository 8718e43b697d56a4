"""ResNet-50 (He et al.), written out so measurements need no torchvision and no downloads.

``resnet50(norm="gn")`` is the paper's WS + GroupNorm backbone shape; ``norm="bn"`` the usual one.
Weights are random (seeded); the architecture, sizes and op mix are what matter for timing and
parity figures.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["resnet50"]


def _norm(kind: str, c: int) -> nn.Module:
    return nn.GroupNorm(32, c) if kind == "gn" else nn.BatchNorm2d(c)


class _Bottleneck(nn.Module):
    def __init__(self, c_in: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = _norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = _norm(norm, width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = _norm(norm, c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            _norm(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + self.downsample(x))
        return result


class ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000, norm: str = "bn") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = _norm(norm, 64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers = []
        c_in = 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_Bottleneck(c_in, width, stride if i == 0 else 1, norm))
                c_in = width * 4
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.fc(self.avgpool(x).flatten(1))
        return out


def resnet50(num_classes: int = 1000, norm: str = "bn", seed: int = 0) -> ResNet50:
    """Seeded ResNet-50; factory for ``--model resnet:resnet50`` (with scripts/ importable)."""
    import torch

    torch.manual_seed(seed)
    return ResNet50(num_classes, norm)
