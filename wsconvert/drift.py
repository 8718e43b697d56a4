"""How much a conversion changed a model's function, and where.

Weight Standardization (arXiv:1903.10520) changes every converted filter's mean and scale, and a
GroupNorm swap changes what the norms normalize over, so a converted model computes a different
function until it is fine-tuned (``init="exact"`` keeps it, see :mod:`wsconvert.ws`). This module
measures that change on probe inputs (:mod:`wsconvert.probes`):

* overall: ``||y_conv - y_orig||_2 / ||y_orig||_2`` over all outputs of all probe samples;
* per layer: the same relative L2 on the output of every leaf module of the original model that
  has the same dotted name in the converted one (forward hooks; a module called several times is
  compared call by call and summed), in the order the original first calls them;
* the layer where the drift jumps most: the largest increase of the per-layer figure over the
  previous layer in call order (with branches, "previous" is the previous call, an approximation).

:func:`check_drift` is what ``apply`` runs: measure, optionally re-calibrate BatchNorms
(:mod:`wsconvert.calibration`), measure again, advise (:mod:`wsconvert.advice`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from wsconvert.advice import drift_advice
from wsconvert.calibration import CalibrationReport, calibrate_bn, check_calibrate
from wsconvert.defaults import DRIFT_BATCHES, DRIFT_THRESHOLD
from wsconvert.errors import ConversionError
from wsconvert.probes import (
    Batches,
    EvalModes,
    ProbeSource,
    batch_getter,
    cast_like,
    float_tensors,
    forward,
    reference_tensor,
    relative_l2,
    tensors_in,
)

__all__ = [
    "DriftCheck", "DriftReport", "LayerDrift", "check_drift", "measure_drift", "measure_inits",
]

_CALIBRATION_SEED_OFFSET = 1000  # calibration batches never reuse the drift batches' seeds

@dataclass(frozen=True)
class LayerDrift:
    """Relative L2 change of one module's output.

    Attributes:
        name: dotted module name (same in both models).
        kind: class in the original model.
        converted_kind: class in the converted one (``GroupNorm`` after a swap...).
        relative: ``||out_conv - out_orig|| / ||out_orig||`` over all calls and probe samples.
        jump: ``relative`` minus the previous layer's in call order (the first layer's from 0).
        calls: how many calls were compared.
    """

    name: str
    kind: str
    converted_kind: str
    relative: float
    jump: float
    calls: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DriftReport:
    """Result of :func:`measure_drift`.

    Attributes:
        output_relative: relative L2 change of all outputs.
        output_max_abs: largest absolute change of any output element.
        layers: per-layer drift in the original model's call order.
        samples: probe samples compared.
        source: description of the probe inputs.
    """

    output_relative: float
    output_max_abs: float
    layers: list[LayerDrift] = field(default_factory=list)
    samples: int = 0
    source: str = ""

    @property
    def worst_layer(self) -> LayerDrift | None:
        """The first layer (call order) with the largest relative drift."""
        if not self.layers:
            return None
        top = max(r.relative for r in self.layers)
        return next(r for r in self.layers if r.relative == top)

    @property
    def divergence_layer(self) -> LayerDrift | None:
        """The first layer where the drift jumps most over the previous layer."""
        if not self.layers:
            return None
        top = max(r.jump for r in self.layers)
        return next(r for r in self.layers if r.jump == top)

    def to_dict(self) -> dict[str, Any]:
        worst, jump = self.worst_layer, self.divergence_layer
        return {"output_relative": self.output_relative, "output_max_abs": self.output_max_abs,
                "samples": self.samples, "source": self.source,
                "worst_layer": worst.to_dict() if worst else None,
                "divergence_layer": jump.to_dict() if jump else None,
                "layers": [r.to_dict() for r in self.layers]}


def _leaf_names(original: nn.Module,
                converted: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    conv_modules = dict(converted.named_modules())
    pairs = {}
    for name, module in original.named_modules():
        if name and not any(True for _ in module.children()) and name in conv_modules:
            pairs[name] = (module, conv_modules[name])
    return pairs


def _kind(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def measure_drift(original: nn.Module, converted: nn.Module, batches: Batches,
                  n_batches: int | None = None, *, source: str = "") -> DriftReport:
    """Run both models (eval mode, no grad) on the same probe batches and compare outputs.

    Args:
        original: the model before conversion.
        converted: the converted model (same dotted names for the layers to compare).
        batches: a sequence of positional-input tuples, or a function from batch index to one.
        n_batches: how many batches when ``batches`` is a function.
        source: description of the inputs, for the report.

    Returns:
        A :class:`DriftReport`. Module modes are restored afterwards.

    Raises:
        UsageError: a model's forward fails on the probe inputs.
        ConversionError: the two models' outputs do not have the same shapes.
    """
    count, get = batch_getter(batches, n_batches or None, 1)
    pairs = _leaf_names(original, converted)
    order: list[str] = []
    stored: dict[str, list[list[Tensor]]] = {}
    diff_sq: dict[str, float] = dict.fromkeys(pairs, 0.0)
    ref_sq: dict[str, float] = dict.fromkeys(pairs, 0.0)
    calls: dict[str, int] = dict.fromkeys(pairs, 0)
    cursor: dict[str, int] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if name not in stored:
                stored[name] = []
                if name not in order:
                    order.append(name)
            # Clone: an in-place op after this module (ReLU(inplace=True)) would change it.
            stored[name].append([t.detach().double().clone() for t in float_tensors(out)])
        return hook

    def compare(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            k = cursor.get(name, 0)
            cursor[name] = k + 1
            refs = stored.get(name, [])
            if k >= len(refs):
                return
            outs = [t.detach().double() for t in float_tensors(out)]
            if len(outs) != len(refs[k]) or any(a.shape != b.shape
                                                for a, b in zip(outs, refs[k], strict=True)):
                return
            for a, b in zip(outs, refs[k], strict=True):
                diff_sq[name] += float((a - b).square().sum())
                ref_sq[name] += float(b.square().sum())
            calls[name] += 1
        return hook

    out_diff = out_ref = 0.0
    max_abs = 0.0
    samples = 0
    handles = []
    try:
        for name, (a, b) in pairs.items():
            handles.append(a.register_forward_hook(keep(name)))
            handles.append(b.register_forward_hook(compare(name)))
        like = reference_tensor(original)
        with EvalModes(original, converted), torch.no_grad():
            for k in range(count):
                inputs = cast_like(get(k), like)
                stored.clear()
                cursor.clear()
                ref = [t.double() for t in tensors_in(forward(original, inputs, "original"))]
                got = [t.double() for t in tensors_in(forward(converted, inputs, "converted"))]
                if len(ref) != len(got) or any(x.shape != y.shape
                                               for x, y in zip(ref, got, strict=True)):
                    raise ConversionError("the converted model's outputs differ in number or "
                                          "shape from the original's")
                for x, y in zip(ref, got, strict=True):
                    d = y - x
                    out_diff += float(d.square().sum())
                    out_ref += float(x.square().sum())
                    if d.numel():
                        max_abs = max(max_abs, float(d.abs().max()))
                samples += int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    finally:
        for h in handles:
            h.remove()
        stored.clear()
    layers = []
    previous = 0.0
    for name in order:
        if calls[name] == 0:
            continue
        rel = relative_l2(diff_sq[name], ref_sq[name])
        a, b = pairs[name]
        layers.append(LayerDrift(name, _kind(a), _kind(b), rel, rel - previous, calls[name]))
        previous = rel
    return DriftReport(relative_l2(out_diff, out_ref), max_abs, layers, samples, source)


@dataclass
class DriftCheck:
    """What ``wsconvert apply`` reports about the conversion's effect.

    Attributes:
        before: drift of the converted model right after conversion.
        calibration: the BatchNorm re-estimation, when asked.
        after: drift after calibration (``None`` without calibration).
        threshold: overall relative change above which the drift counts as large.
        suggestion: what to do about a large drift (empty when small).
        alternatives: the overall drift the other inits measured on the same probes (empty when
            not measured).
    """

    before: DriftReport
    calibration: CalibrationReport | None = None
    after: DriftReport | None = None
    threshold: float = DRIFT_THRESHOLD
    suggestion: str = ""
    alternatives: dict[str, float] = field(default_factory=dict)

    @property
    def final(self) -> DriftReport:
        return self.after if self.after is not None else self.before

    @property
    def large(self) -> bool:
        return not self.final.output_relative <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "large": self.large,
                "before": self.before.to_dict(),
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "after": self.after.to_dict() if self.after else None,
                "suggestion": self.suggestion, "alternatives": dict(self.alternatives)}


def check_drift(original: nn.Module, converted: nn.Module, source: ProbeSource, *,
                calibrate: int = 0, init: str = "plain", norm: str = "keep",
                threshold: float = DRIFT_THRESHOLD,
                max_batches: int = DRIFT_BATCHES,
                alternatives: Callable[[str], nn.Module] | None = None,
                recovering: bool = False) -> DriftCheck:
    """Measure the conversion's drift, optionally calibrate BatchNorms, measure again, advise.

    Calibration (``calibrate`` batches) modifies ``converted`` in place. Random calibration batches
    use other seeds than the drift batches, so the "after" figure is not measured on the data the
    statistics were fitted to; real samples from a file are shared by both.

    Args:
        original: the model before conversion.
        converted: the converted model.
        source: the probe inputs.
        calibrate: number of calibration batches (0: none).
        init: the ``init`` the conversion used (for the advice).
        norm: ``keep`` or ``gn`` (for the advice).
        threshold: relative output change above which the drift is large.
        max_batches: random probe batches for the drift measurement.
        alternatives: ``init -> the same conversion with that init``; when the drift is large,
            the other inits are measured on the same probes
            (:func:`measure_inits`) and only one that measured lower is
            suggested.
        recovering: recovery on real samples follows (the advice does not suggest it).

    Raises:
        UsageError: the forward fails on the probe inputs, or ``calibrate`` is negative.
        ConversionError: calibration asked but no BatchNorm to calibrate.
    """
    check_calibrate(calibrate)
    like = reference_tensor(original)
    n = source.drift_batches(max_batches)
    before = measure_drift(original, converted, lambda k: source.batch(k, like), n,
                           source=source.describe())
    check = DriftCheck(before, threshold=threshold)
    if calibrate:
        offset = 0 if source.real else _CALIBRATION_SEED_OFFSET
        check.calibration = calibrate_bn(
            converted, lambda k: source.batch(offset + k, like), calibrate,
            source=source.describe())
        check.after = measure_drift(original, converted, lambda k: source.batch(k, like), n,
                                    source=source.describe())
    if alternatives is not None and check.large:
        from wsconvert.ws import INIT_MODES

        others = [i for i in INIT_MODES if i != init]
        check.alternatives = measure_inits(original, alternatives,
                                           [source.batch(k, like) for k in range(n)], others)
    check.suggestion = drift_advice(check, init, norm, real=source.real, recovering=recovering)
    return check


def measure_inits(original: nn.Module, convert: Callable[[str], nn.Module],
                  batches: Sequence[tuple[Tensor, ...]], inits: Sequence[str]
                  ) -> dict[str, float]:
    """The overall relative output drift each ``init`` would give, measured on ``batches``.

    For advice that is measured, not guessed: ``convert(init)`` builds the conversion the user
    asked for with another ``init`` (a fresh copy each time), and both models run in eval mode on
    the same probe batches. A conversion that fails or whose forward fails is left out.

    Returns:
        ``{init: ||y_conv - y_orig|| / ||y_orig||}`` over all the batches.
    """
    out: dict[str, float] = {}
    with EvalModes(original), torch.no_grad():
        refs = [float_tensors(original(*cast_like(b, reference_tensor(original)))) for b in batches]
    for init in inits:
        try:
            candidate = convert(init)
            with EvalModes(candidate), torch.no_grad():
                diff = norm = 0.0
                for b, ref in zip(batches, refs, strict=True):
                    got = float_tensors(candidate(*cast_like(b, reference_tensor(candidate))))
                    for a, r in zip(got, ref, strict=True):
                        diff += float((a.double() - r.double()).square().sum())
                        norm += float(r.double().square().sum())
        except Exception:  # noqa: BLE001 - an alternative that cannot run is simply not advised
            continue
        out[init] = relative_l2(diff, norm)
    return out
