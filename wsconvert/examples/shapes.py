"""A small image-classification task generated in code: four texture classes under random colour,
phase, frequency and noise. Deterministic for a given seed; nothing is downloaded."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CLASSES", "make_dataset"]

CLASSES = ("horizontal", "vertical", "diagonal", "checker")


def make_dataset(n: int, seed: int, size: int = 24, noise: float = 0.6) -> tuple[Tensor, Tensor]:
    """Return ``(images [n, 3, size, size], labels [n])`` with balanced random classes."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    labels = labels[torch.randperm(n, generator=g)]
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    freq = 2 * math.pi * (0.12 + 0.18 * torch.rand(n, 1, 1, generator=g))
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    h = torch.sin(freq * yy + phase)
    v = torch.sin(freq * xx + phase)
    d = torch.sin(freq * (xx + yy) / math.sqrt(2) + phase)
    c = torch.sin(freq * xx + phase) * torch.sin(freq * yy + phase) * 2
    patterns = torch.stack([h, v, d, c], 1)[torch.arange(n), labels]
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    offset = torch.randn(n, 3, 1, 1, generator=g) * 0.5
    images = patterns.unsqueeze(1) * colour + offset
    images = images + noise * torch.randn(n, 3, size, size, generator=g)
    return images, labels
