"""BatchNorm re-calibration after a conversion.

:func:`calibrate_bn` re-estimates BatchNorm running statistics: reset, momentum ``None`` (a
cumulative average over the batches), forward in ``no_grad`` with only the BatchNorms in train
mode, then every module back to its previous mode.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from wsconvert.errors import ConversionError, UsageError
from wsconvert.probes import Batches, EvalModes, batch_getter, cast_like, forward, reference_tensor

__all__ = ["CalibrationReport", "calibrate_bn", "check_calibrate"]


def check_calibrate(calibrate: int) -> None:
    """Raises:
        UsageError: a negative number of calibration batches.
    """
    if calibrate < 0:
        raise UsageError(f"`calibrate` must be >= 0, got {calibrate}")


@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate_bn`.

    Attributes:
        layers: dotted names of the BatchNorms re-estimated.
        batches: number of batches run.
        samples: number of samples seen.
        source: description of the inputs.
        mean_shift: per layer, ``||new_mean - old_mean|| / sqrt(C)`` (RMS change of the running
            mean).
        var_ratio: per layer, ``mean(new_var) / mean(old_var)``.
    """

    layers: list[str]
    batches: int
    samples: int
    source: str = ""
    mean_shift: dict[str, float] = field(default_factory=dict)
    var_ratio: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_bn(model: nn.Module, batches: Batches, n_batches: int | None = None, *,
                 source: str = "") -> CalibrationReport:
    """Re-estimate every BatchNorm's running statistics in place from probe batches.

    Running statistics are reset and momentum set to ``None`` (a cumulative average, so every
    batch weighs the same); the forward passes run under ``no_grad`` with only the BatchNorms in
    train mode (dropout and the rest stay in eval). Momentum and every module's mode are restored.

    Args:
        model: the model to calibrate (modified in place).
        batches: a sequence of positional-input tuples, or a function from batch index to one.
        n_batches: how many batches when ``batches`` is a function.
        source: description of the inputs, for the report.

    Raises:
        UsageError: ``n_batches`` below 1, or the forward fails on the inputs.
        ConversionError: the model has no BatchNorm tracking running statistics.
    """
    count, get = batch_getter(batches, n_batches, 1)
    if count < 1:
        raise UsageError(f"calibration needs at least 1 batch, got {count}")
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.running_mean is not None]
    if not bns:
        raise ConversionError("model has no BatchNorm with running statistics to calibrate")
    before = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())  # type: ignore[union-attr]
              for n, m in bns}
    momenta = {n: m.momentum for n, m in bns}
    like = reference_tensor(model)
    samples = 0
    with EvalModes(model), torch.no_grad():
        try:
            for _, m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for k in range(count):
                inputs = cast_like(get(k), like)
                forward(model, inputs, "calibration")
                samples += int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
        except BaseException:
            for n, m in bns:
                m.running_mean.copy_(before[n][0])  # type: ignore[union-attr]
                m.running_var.copy_(before[n][1])  # type: ignore[union-attr]
            raise
        finally:
            for n, m in bns:
                m.momentum = momenta[n]
    shift, ratio = {}, {}
    for n, m in bns:
        old_m, old_v = before[n]
        new_m, new_v = cast(Tensor, m.running_mean), cast(Tensor, m.running_var)
        shift[n] = float((new_m - old_m).double().norm() / math.sqrt(max(new_m.numel(), 1)))
        denom = float(old_v.double().mean())
        ratio[n] = float(new_v.double().mean()) / denom if denom > 0 else math.inf
    return CalibrationReport([n for n, _ in bns], count, samples, source, shift, ratio)
