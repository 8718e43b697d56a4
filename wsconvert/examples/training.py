"""The demo's training loop and metric: plain SGD fine-tuning and top-1 accuracy."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["accuracy", "fine_tune"]


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, *, batch: int, lr: float, epochs: int,
              seed: int) -> nn.Module:
    """SGD (momentum 0.9, weight decay 1e-4) over shuffled mini-batches, in place."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.split(torch.randperm(len(x), generator=order), batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    with torch.no_grad():
        correct = 0
        for xb, yb in zip(torch.split(x, 256), torch.split(y, 256), strict=True):
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)
