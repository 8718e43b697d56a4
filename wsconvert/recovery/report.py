"""What recovery reports, and the forward helpers its stages share."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wsconvert.defaults import (
    RECOVER_AUGMENT,
    RECOVER_BATCH_SIZE,
    RECOVER_FEATURES,
    RECOVER_HOLDOUT,
    RECOVER_LR,
    RECOVER_STEPS,
)
from wsconvert.errors import ConversionError, WsconvertError
from wsconvert.probes import EvalModes, cast_like, float_tensors, reference_tensor, relative_l2

DEFAULT_STEPS = RECOVER_STEPS
"""Distillation steps (see docs/recovery.md for the measurement behind it)."""
DEFAULT_BATCH_SIZE = RECOVER_BATCH_SIZE
DEFAULT_LR = RECOVER_LR
DEFAULT_HOLDOUT = RECOVER_HOLDOUT
"""Fraction of the samples held out for measuring (a count when >= 1)."""
DEFAULT_TEMPERATURE = 2.0
DEFAULT_FEATURES = RECOVER_FEATURES
"""Weight of the feature-matching term (the refitted norms' outputs) in the distillation loss."""
DEFAULT_AUGMENT = RECOVER_AUGMENT
"""Distill on randomly flipped and shifted samples (inputs with spatial dimensions)."""
MIN_HOLDOUT = 2
MIN_FIT = 2
CHUNK = 64  # samples per forward pass when measuring and in the closed form


STOPPED = "recovery stopped on request; the model is as it was before recovery"


class RecoveryInterrupted(WsconvertError):
    """Recovery stopped on request (``should_stop`` or Ctrl-C); the model is unchanged."""

    exit_code = 130


@dataclass(frozen=True)
class RecoveryProgress:
    """One progress event.

    Attributes:
        stage: ``calibrate``, ``closed-form`` or ``distill``.
        done: layers fitted / steps taken so far in this stage.
        total: layers / steps in this stage.
        seconds: time since the stage started.
        loss: the last distillation loss (``None`` outside distillation).
        detail: the layer just fitted, or the held-out figures when they were measured.
    """

    stage: str
    done: int
    total: int
    seconds: float
    loss: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class StageResult:
    """Held-out figures after one stage (``converted``: before any recovery).

    ``loss`` is the distillation loss on the held-out slice: the figure the best state is chosen
    by (smoother than agreement on a small slice).
    """

    stage: str
    relative_error: float
    agreement: float | None
    loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """``error 1.2%, agreement 98.0%`` (no agreement for non-classifier outputs)."""
        text = f"error {100 * self.relative_error:.3g}%"
        if self.agreement is not None:
            text += f", agreement {100 * self.agreement:.1f}%"
        return text


@dataclass(frozen=True)
class FitRecord:
    """One norm whose affine was refitted in closed form.

    Attributes:
        name: dotted module name.
        kind: its class name in the converted model.
        channels: channels fitted.
        before: relative error of its output against the original's, on the fit samples, before.
        after: the same after the fit.
    """

    name: str
    kind: str
    channels: int
    before: float
    after: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoveryReport:
    """What :func:`recover` did and measured.

    Attributes:
        samples_fit: samples both stages fit on.
        samples_holdout: samples held out for the figures.
        classifier: the output is one ``[N, classes]`` tensor (agreement is measured).
        stages: held-out figures: ``converted``, ``closed-form`` and (steps > 0) ``distill``.
        fitted: per norm refitted in closed form.
        skipped: norms not refitted, with the reason.
        calibrated: BatchNorms whose running statistics were re-estimated first.
        steps: distillation steps asked for; ``steps_run`` taken.
        best_step: the step whose state was kept (0: the closed-form state).
        batch_size, lr, loss, temperature: distillation settings.
        seconds_per_step: mean wall time of one distillation step (held-out checks excluded).
        seed: the seed of the split and the batch order.
        augment, mixup, features: how the distillation drew its inputs (``augment`` as applied:
            off for inputs without spatial dimensions) and the feature-matching weight.
        kept: the state returned: ``converted`` (the closed form measured worse and was undone,
            and no distillation step improved on it), ``closed-form`` or ``distill``.
        notes: what the caller should know, one line each (a setting asked for that did not
            apply).
    """

    samples_fit: int
    samples_holdout: int
    classifier: bool
    stages: list[StageResult] = field(default_factory=list)
    fitted: list[FitRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    calibrated: list[str] = field(default_factory=list)
    steps: int = 0
    steps_run: int = 0
    best_step: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    loss: str = ""
    temperature: float = DEFAULT_TEMPERATURE
    seconds_per_step: float = 0.0
    seed: int = 0
    kept: str = "closed-form"
    augment: bool = False
    mixup: bool = False
    features: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def before(self) -> StageResult:
        return self.stages[0]

    @property
    def after(self) -> StageResult:
        """Figures of the returned model (the kept state)."""
        if self.kept == "distill" or len(self.stages) == 3:
            return self.stages[-1]  # the distill record holds the best state's figures
        return next(s for s in self.stages if s.stage == self.kept)

    def summary(self) -> str:
        return (f"recovered on {self.samples_fit} sample(s) ({self.samples_holdout} held out): "
                f"{self.before.describe()} -> {self.after.describe()}")

    def to_dict(self) -> dict[str, Any]:
        return {"samples_fit": self.samples_fit, "samples_holdout": self.samples_holdout,
                "classifier": self.classifier, "seed": self.seed,
                "stages": [s.to_dict() for s in self.stages],
                "fitted": [r.to_dict() for r in self.fitted], "skipped": dict(self.skipped),
                "calibrated": list(self.calibrated), "steps": self.steps,
                "steps_run": self.steps_run, "best_step": self.best_step,
                "batch_size": self.batch_size, "lr": self.lr, "loss": self.loss,
                "temperature": self.temperature, "seconds_per_step": self.seconds_per_step,
                "kept": self.kept, "augment": self.augment, "mixup": self.mixup,
                "features": self.features, "notes": list(self.notes)}


def to_model(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return cast_like(inputs, reference_tensor(model))


def chunks(samples: tuple[Tensor, ...], index: Tensor, size: int) -> Iterator[tuple[Tensor, ...]]:
    for part in torch.split(index, size):
        yield tuple(t[part] for t in samples)


def outputs(model: nn.Module, samples: tuple[Tensor, ...], index: Tensor) -> list[Tensor]:
    """The model's float outputs on ``samples[index]`` (eval, no grad), concatenated, float64."""
    parts: list[list[Tensor]] = []
    with EvalModes(model), torch.no_grad():
        for chunk in chunks(samples, index, CHUNK):
            parts.append([t.detach().double().cpu()
                          for t in float_tensors(model(*to_model(model, chunk)))])
    if not parts or not parts[0]:
        raise ConversionError("the model has no floating-point output to recover")
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def is_classifier(outs: list[Tensor]) -> bool:
    return len(outs) == 1 and outs[0].dim() == 2 and outs[0].shape[1] >= 2


def stage_result(stage: str, model: nn.Module, samples: tuple[Tensor, ...], index: Tensor,
                 ref: list[Tensor], objective: Callable[[list[Tensor], list[Tensor]], Tensor],
                 since: float) -> StageResult:
    """``model``'s figures on ``samples[index]`` against the original's outputs ``ref`` there:
    relative error, top-1 agreement (classifier outputs), ``objective``; seconds since ``since``."""
    got = outputs(model, samples, index)
    rel, agree = figures(got, ref, is_classifier(ref))
    with torch.no_grad():
        value = float(objective(got, ref))
    return StageResult(stage, rel, agree, value, round(time.perf_counter() - since, 4))


def figures(got: list[Tensor], ref: list[Tensor], classifier: bool) -> tuple[float, float | None]:
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref, strict=True)):
        raise ConversionError("the converted model's outputs differ in number or shape from the "
                              "original's")
    diff = sum(float((a - b).square().sum()) for a, b in zip(got, ref, strict=True))
    norm = sum(float(b.square().sum()) for b in ref)
    rel = relative_l2(diff, norm)
    agree = None
    if classifier:
        agree = float((got[0].argmax(1) == ref[0].argmax(1)).double().mean())
    return rel, agree
