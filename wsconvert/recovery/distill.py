"""Pieces of recovery's distillation stage: the losses, feature taps, input mixing and
augmentation, and the batch order."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "Taps", "augment", "batch_indices", "can_augment", "loss_fn", "mix"]


LOSSES = ("auto", "kl", "mse")


def loss_fn(kind: str, temperature: float) -> Callable[[list[Tensor], list[Tensor]], Tensor]:
    if kind == "kl":
        def kl(got: list[Tensor], ref: list[Tensor]) -> Tensor:
            log_p = F.log_softmax(got[0] / temperature, dim=1)
            log_q = F.log_softmax(ref[0] / temperature, dim=1)
            return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (
                temperature ** 2)
        return kl

    def mse(got: list[Tensor], ref: list[Tensor]) -> Tensor:
        diff = sum(((a - b).square().sum() for a, b in zip(got, ref, strict=True)),
                   start=torch.zeros(()))
        norm = sum(float(b.square().sum()) for b in ref)
        return diff / max(norm, 1e-30)
    return mse


class Taps:
    """Feature matching: the outputs of named modules in both models during distillation.

    Each step runs the original first (its outputs stored), then the converted model; ``loss()``
    is the mean over the modules of ``||out - out_orig||^2 / ||out_orig||^2``.
    """

    def __init__(self, converted: nn.Module, original: nn.Module, names: Sequence[str]) -> None:
        self.pairs = [(converted.get_submodule(n), original.get_submodule(n)) for n in names]
        self.ref: dict[int, Tensor] = {}
        self.terms: list[Tensor] = []
        self.handles: list[Any] = []

    def __enter__(self) -> Taps:
        for k, (mine, theirs) in enumerate(self.pairs):
            self.handles.append(theirs.register_forward_hook(self._keep(k)))
            self.handles.append(mine.register_forward_hook(self._compare(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _keep(self, k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
            self.ref[k] = out.detach().clone()
        return hook

    def _compare(self, k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
            ref = self.ref.get(k)
            if ref is not None and ref.shape == out.shape:
                self.terms.append((out - ref).square().sum() / ref.square().sum().clamp_min(1e-30))
        return hook

    def clear(self) -> None:
        self.ref.clear()
        self.terms.clear()

    def loss(self) -> Tensor:
        if not self.terms:
            return torch.zeros(())
        return torch.stack(self.terms).mean()


def mix(chunk: tuple[Tensor, ...], gen: torch.Generator) -> tuple[Tensor, ...]:
    """Mixup of the batch with a shuffled copy of itself: ``lam * x + (1 - lam) * x[perm]``,
    ``lam`` uniform per sample (new inputs between real ones; the targets are the original
    model's outputs on them)."""
    n = chunk[0].shape[0]
    perm = torch.randperm(n, generator=gen)
    lam = torch.rand(n, generator=gen)
    out = []
    for t in chunk:
        w = lam.view(n, *([1] * (t.dim() - 1))).to(t.dtype)
        out.append(w * t + (1 - w) * t[perm])
    return tuple(out)


def batch_indices(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled batches over ``range(n)``, epoch after epoch (the last partial one dropped when a
    full batch is possible)."""
    size = min(size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for k in range(0, n - size + 1, size):
            yield perm[k:k + size]


def can_augment(samples: Sequence[Tensor]) -> bool:
    """Whether :func:`augment` applies: every input is ``[N, C, *spatial]`` with one to three
    spatial dimensions, the same for all inputs."""
    spatial = {tuple(t.shape[2:]) for t in samples}
    return len(spatial) == 1 and all(3 <= t.dim() <= 5 for t in samples)


def augment(chunk: tuple[Tensor, ...], gen: torch.Generator) -> tuple[Tensor, ...]:
    """New inputs near the real ones: each sample flipped along its last dimension with
    probability 1/2 and shifted by up to 1/8 of each spatial size (reflected at the border),
    the same flip and shift for every input tensor of a sample. The distillation targets are the
    original model's outputs on these inputs, so nothing assumes the model is invariant to them.
    """
    first = chunk[0]
    n, spatial = first.shape[0], tuple(first.shape[2:])
    flip = torch.rand(n, generator=gen) < 0.5
    pads = [size // 8 for size in spatial]
    offsets = [torch.randint(0, 2 * p + 1, (n,), generator=gen).tolist() for p in pads]
    padding = [p for p in reversed(pads) for _ in (0, 1)]
    out = []
    for t in chunk:
        x = torch.where(flip.view(n, *([1] * (t.dim() - 1))).to(t.device), t.flip(-1), t)
        if any(pads):
            x = F.pad(x, padding, mode="reflect")
            crops = []
            for i in range(n):
                window = tuple(slice(o[i], o[i] + size)
                               for o, size in zip(offsets, spatial, strict=True))
                index: tuple[int | slice, ...] = (i, slice(None), *window)
                crops.append(x[index])
            x = torch.stack(crops)
        out.append(x)
    return tuple(out)
