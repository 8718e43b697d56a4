"""Probe inputs for drift measurement and BatchNorm calibration, and running a model on them.

Probes are seeded random normal tensors of a given or inferred shape (batch
:data:`~wsconvert.defaults.PROBE_BATCH`, spatial size :data:`~wsconvert.defaults.PROBE_SPATIAL`
after the first conv's channels), or real samples from a file (:mod:`wsconvert.io.inputs`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wsconvert.defaults import DRIFT_BATCHES, PROBE_BATCH, PROBE_SPATIAL
from wsconvert.errors import UsageError
from wsconvert.io.inputs import infer_input_shape, parse_shapes, sample_tensors
from wsconvert.ws import WeightStandardization

__all__ = ["Batches", "ProbeSource", "check_probe_options", "relative_l2", "restore_modes"]

Batches = Sequence[tuple[Tensor, ...]] | Callable[[int], tuple[Tensor, ...]]
"""Probe batches: a sequence of positional-input tuples, or a function from batch index to one."""


def relative_l2(diff_sq: float, ref_sq: float) -> float:
    """``sqrt(diff_sq / ref_sq)``, with 0/0 = 0 and x/0 = inf."""
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf


def check_probe_options(input_shape: object, inputs: object) -> None:
    """Raises:
        UsageError: both a probe shape and a samples file are given.
    """
    if inputs is not None and input_shape is not None:
        raise UsageError("pass either `input_shape` or `inputs`, not both")


@dataclass
class ProbeSource:
    """Where probe batches come from: seeded random shapes, or real samples.

    Attributes:
        shapes: per positional input, the full shape of a random batch (batch dim first).
        samples: per positional input, real samples (first dim indexes samples).
        seed: base seed of random batches; batch ``k`` uses ``seed + k``.
        batch_size: batch size when slicing real samples.
        inferred: the shape was inferred, not given.
        origin: the samples file.
    """

    shapes: tuple[tuple[int, ...], ...] = ()
    samples: tuple[Tensor, ...] = ()
    seed: int = 0
    batch_size: int = PROBE_BATCH
    inferred: bool = False
    origin: str = ""

    @classmethod
    def for_model(cls, model: nn.Module, input_shape: str | Sequence[Sequence[int]] | None = None,
                  inputs: str | os.PathLike[str] | None = None, *,
                  seed: int = 0) -> ProbeSource:
        """Random probes of ``input_shape`` (inferred when ``None``), or the samples in ``inputs``.

        Raises:
            UsageError: both given, a malformed shape or file, or no shape can be inferred.
        """
        check_probe_options(input_shape, inputs)
        if inputs is not None:
            samples = sample_tensors(inputs)
            return cls(samples=samples, seed=seed, origin=str(inputs),
                       batch_size=min(PROBE_BATCH, int(samples[0].shape[0])))
        if input_shape is None:
            return cls(shapes=(infer_input_shape(model, PROBE_BATCH, PROBE_SPATIAL),), seed=seed,
                       inferred=True)
        shapes = (parse_shapes(input_shape) if isinstance(input_shape, str)
                  else tuple(tuple(int(d) for d in s) for s in input_shape))
        return cls(shapes=shapes, seed=seed)

    @property
    def real(self) -> bool:
        return bool(self.samples)

    def describe(self) -> str:
        if self.real:
            shape = "x".join(str(d) for d in self.samples[0].shape)
            return f"{self.samples[0].shape[0]} real sample(s) from {self.origin} ({shape})"
        shapes = "; ".join("x".join(str(d) for d in s) for s in self.shapes)
        how = "inferred" if self.inferred else "given"
        return f"seeded random normal inputs of {how} shape {shapes} (seed {self.seed})"

    def batch(self, k: int, like: Tensor | None = None) -> tuple[Tensor, ...]:
        """Probe batch number ``k`` (real samples cycle), cast to ``like``'s device and float
        dtype."""
        if self.real:
            n = int(self.samples[0].shape[0])
            idx = torch.arange(k * self.batch_size, (k + 1) * self.batch_size) % n
            out = tuple(s[idx] for s in self.samples)
        else:
            g = torch.Generator().manual_seed(self.seed + k)
            out = tuple(torch.randn(s, generator=g) for s in self.shapes)
        return out if like is None else cast_like(out, like)

    def drift_batches(self, max_batches: int = DRIFT_BATCHES) -> int:
        """How many batches the drift measurement uses: all real samples (up to 64 batches), or
        ``max_batches`` random ones."""
        if self.real:
            n = int(self.samples[0].shape[0])
            return min(64, -(-n // self.batch_size))
        return max_batches


def batch_getter(batches: Batches, n_batches: int | None, default: int
                 ) -> tuple[int, Callable[[int], tuple[Tensor, ...]]]:
    """``(count, get)`` for a sequence of batches or a function with ``n_batches`` (``default``
    when ``None``)."""
    if callable(batches):
        return (n_batches if n_batches is not None else default), batches
    seq = list(batches)
    return len(seq), seq.__getitem__


def reference_tensor(model: nn.Module) -> Tensor | None:
    """A parameter (else a buffer) of ``model``: the device and dtype its inputs need."""
    for p in model.parameters():
        return p
    for b in model.buffers():
        return b
    return None


def cast_like(inputs: tuple[Tensor, ...], like: Tensor | None) -> tuple[Tensor, ...]:
    """``inputs`` on ``like``'s device, floating ones in its dtype."""
    if like is None:
        return inputs
    return tuple(t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)
                 for t in inputs)


def forward(model: nn.Module, inputs: tuple[Tensor, ...], what: str) -> Any:
    """``model(*inputs)``; a failure is the user's inputs not fitting the model.

    Raises:
        UsageError: naming ``what`` and the input shapes.
    """
    try:
        return model(*inputs)
    except Exception as exc:  # noqa: BLE001 - user models raise anything on a bad input
        shapes = ", ".join("x".join(str(d) for d in t.shape) for t in inputs)
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UsageError(f"{what}: model forward failed on probe inputs of shape {shapes} "
                         f"({type(exc).__name__}: {msg}); pass `input_shape` or `inputs`"
                         ) from None


def float_tensors(obj: Any) -> list[Tensor]:
    """The floating-point tensors of a (nested) model output, in order."""
    return [t for t in tensors_in(obj) if t.is_floating_point()]


def tensors_in(obj: Any) -> Iterator[Tensor]:
    """Every tensor in a (nested) model output, in order."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from tensors_in(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from tensors_in(v)


def restore_modes(saved: list[tuple[nn.Module, bool]]) -> None:
    """Put each module back in its saved mode. Flags are set directly (``train()`` recurses), but
    WS layers go through their own ``train()``, which frees the evaluation cache or the training
    workspace that the other mode does not keep."""
    for m, training in saved:
        if isinstance(m, WeightStandardization):
            m.train(training)
        else:
            m.training = training


class EvalModes:
    """Put models in eval mode for the block; restore every module's mode after."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models
        self.saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for model in self.models for m in model.modules()]
        for model in self.models:
            model.eval()

    def __exit__(self, *exc: object) -> None:
        restore_modes(self.saved)
