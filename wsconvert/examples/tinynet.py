"""A tiny BatchNorm CNN in the shape of the models WS is applied to (stem, strided and depthwise
separable blocks, pooled classifier), small enough to ship and to train on two CPU cores."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TinyNet", "build"]


def _block(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class TinyNet(nn.Module):
    """~25k parameters; input ``[B, 3, 24, 24]``, ``num_classes`` logits."""

    def __init__(self, num_classes: int = 4, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w),
            _block(w, 2 * w, stride=2),
            _block(2 * w, 2 * w, groups=2 * w),  # depthwise 3x3
            _block(2 * w, 2 * w, k=1),  # pointwise
            _block(2 * w, 4 * w, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.pool(self.features(x)).flatten(1))
        return out


def build(num_classes: int = 4, width: int = 16) -> TinyNet:
    """Factory for ``--model wsconvert.examples.tinynet:build``."""
    return TinyNet(num_classes, width)
