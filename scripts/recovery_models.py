"""Models and a synthetic task shared by scripts/bench_recovery.py and scripts/evidence.py.

``ResidualNet`` is a small ResNet-style BatchNorm network (basic blocks, projection shortcuts,
24-96 channels); :func:`make_task` a ten-class texture task generated in code (five pattern
kinds x two frequency bands under random colour, phase and noise). Nothing is downloaded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ResidualNet", "accuracy", "make_task", "pretrain"]


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + self.shortcut(x))
        return result


class ResidualNet(nn.Module):
    """Stem 24 channels, three stages (24, 48, 96; the last two strided with projection
    shortcuts), ``blocks`` basic blocks per stage, pooled linear classifier."""

    def __init__(self, num_classes: int = 10, width: int = 24, blocks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages = []
        c = width
        for k, w in enumerate((width, 2 * width, 4 * width)):
            layers = [_Block(c, w, 1 if k == 0 else 2)]
            layers += [_Block(w, w, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.pool(self.stages(self.stem(x))).flatten(1))
        return out


def make_task(n: int, seed: int, size: int = 24, noise: float = 0.8) -> tuple[Tensor, Tensor]:
    """Ten classes: pattern (horizontal, vertical, diagonal, anti-diagonal, rings) x frequency
    band (low, high); random colour, phase, offset and pixel noise. Deterministic for a seed."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    kind, band = labels % 5, labels // 5
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    low = 0.10 + 0.08 * torch.rand(n, generator=g)
    high = 0.30 + 0.10 * torch.rand(n, generator=g)
    freq = (2 * math.pi * torch.where(band == 0, low, high)).view(n, 1, 1)
    phase = (2 * math.pi * torch.rand(n, generator=g)).view(n, 1, 1)
    fields = torch.stack([yy, xx, (xx + yy) / math.sqrt(2), (xx - yy) / math.sqrt(2),
                          (xx.square() + yy.square()).sqrt()])
    pattern = torch.sin(freq * fields[kind] + phase)
    colour = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    offset = torch.randn(n, 3, 1, 1, generator=g) * 0.5
    images = pattern.unsqueeze(1) * colour + offset + noise * torch.randn(n, 3, size, size,
                                                                          generator=g)
    return images, labels


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode (mode restored)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum())
                      for xb, yb in zip(torch.split(x, 256), torch.split(y, 256), strict=True))
    model.train(was)
    return correct / len(y)


def pretrain(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch: int = 32,
             lr: float = 0.05, seed: int = 0) -> nn.Module:
    """SGD with momentum and a cosine schedule, in place; returns the model in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for k in range(0, len(x) - batch + 1, batch):
            idx = perm[k:k + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
    return model.eval()
