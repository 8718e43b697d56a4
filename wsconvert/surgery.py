"""Module walkers: put Weight Standardization on a model's layers, find it, take it back off.

The WS math lives in :mod:`wsconvert.conventions` and :mod:`wsconvert.ws`; this module decides
*which* layers get it and returns a report that says what was done to each and why.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from wsconvert.conventions import check_eps, fan_in, get_convention
from wsconvert.errors import ConversionError, UsageError
from wsconvert.foreign import (
    FOREIGN_WS_CLASSES,
    PARAMETRIZATIONS,
    find_adapter,
    parametrization_chains,
)
from wsconvert.ws import (
    INIT_MODES,
    WeightStandardization,
    layer_weight,
    register_ws,
    trainable_weight,
    ws_parametrization,
)

__all__ = [
    "ApplyReport",
    "LayerRecord",
    "apply_ws",
    "bake_parametrizations",
    "candidate_layers",
    "restore_ws",
    "unregister_ws",
    "ws_layer_configs",
    "ws_layers",
]



@dataclass(frozen=True)
class LayerRecord:
    """What happened to one layer.

    Attributes:
        name: dotted module name (``""`` is the root).
        kind: the layer's class name (before any parametrization).
        shape: weight shape.
        fan_in: weights per output-channel filter.
        status: ``converted`` or ``skipped``.
        reason: why it was skipped (empty when converted).
        convention, eps, init: the WS settings applied (``None`` when skipped).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    fan_in: int
    status: str
    reason: str = ""
    convention: str | None = None
    eps: float | None = None
    init: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass
class ApplyReport:
    """Result of :func:`apply_ws`: the converted model and a record per candidate layer."""

    model: nn.Module
    layers: list[LayerRecord] = field(default_factory=list)
    convention: str = "paper"
    eps: float = 1e-5
    init: str = "plain"

    @property
    def converted(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "converted"]

    @property
    def skipped(self) -> list[LayerRecord]:
        return [r for r in self.layers if r.status == "skipped"]

    def summary(self) -> str:
        return (f"{len(self.converted)} layer(s) converted to WS ({self.convention}, "
                f"eps={self.eps:g}, init={self.init}), {len(self.skipped)} skipped")

    def to_dict(self) -> dict[str, Any]:
        return {"convention": self.convention, "eps": self.eps, "init": self.init,
                "converted": len(self.converted), "skipped": len(self.skipped),
                "layers": [r.to_dict() for r in self.layers]}


def _is_transposed(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and bool(module.transposed)


def candidate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every conv (any dimension, transposed included) and Linear layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            yield name, module


def ws_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, WeightStandardization]]:
    """Every layer carrying a :class:`WeightStandardization` parametrization."""
    for name, module in model.named_modules():
        p = ws_parametrization(module)
        if p is not None:
            yield name, module, p


def _kind(module: nn.Module) -> str:
    return parametrize.type_before_parametrizations(module).__name__


def _foreign(module: nn.Module) -> bool:
    if find_adapter(module) is not None:
        return True
    return any(type(p).__name__ in PARAMETRIZATIONS
               for p in parametrization_chains(module).get("weight", []))


def _refuse_existing_ws(model: nn.Module) -> None:
    for name, module in model.named_modules():
        label = name or "<root>"
        if ws_parametrization(module) is not None:
            raise ConversionError(
                f"model already has Weight Standardization (layer {label}); refusing to apply it "
                "twice")
        if _kind(module) in FOREIGN_WS_CLASSES or _foreign(module):
            raise ConversionError(
                f"model already standardizes its weights (layer {label} is a {_kind(module)}); "
                "refusing to apply WS twice")


def _skip_reason(name: str, module: nn.Module, include: Sequence[str], exclude: Sequence[str],
                 transposed: bool, linear: bool) -> str:
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialized yet (run one forward pass first)"
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        return "no floating-point weight"
    if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
        return "not matched by `include`"
    if any(fnmatch.fnmatchcase(name, g) for g in exclude):
        return "matched by `exclude`"
    if isinstance(module, nn.Linear) and not linear:
        return "Linear layer (pass `linear=True` to convert)"
    if _is_transposed(module) and not transposed:
        return "transposed conv (pass `transposed=True` to convert)"
    if parametrize.is_parametrized(module, "weight"):
        return "weight already carries another parametrization"
    if "weight" not in module._parameters and "weight" not in module._buffers:
        return ("weight is not the layer's own parameter (computed by a hook, as "
                "torch.nn.utils.spectral_norm does)")
    if weight.is_meta:
        raise ConversionError(f"layer {name}: weight is on the meta device (no values yet); "
                              "load the model's weights first")
    if _fan_in_of(module) == 1:
        return "fan-in 1: standardizing would give NaN or a dead layer"
    if not bool(torch.isfinite(weight).all()):
        raise ConversionError(f"layer {name}: weight holds NaN or inf values")
    return ""


def _globs(value: str | Sequence[str] | None, name: str) -> tuple[str, ...]:
    """``include`` / ``exclude`` as a tuple of globs (one glob may come as a plain string)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    try:
        globs = tuple(value)
    except TypeError:
        globs = (value,)  # type: ignore[assignment]
    if not all(isinstance(g, str) for g in globs):
        raise UsageError(f"`{name}` takes glob strings, got {value!r}")
    return globs


def _fan_in_of(module: nn.Module) -> int:
    shape = layer_weight(module).shape
    groups = int(getattr(module, "groups", 1))
    return fan_in(shape, transposed=_is_transposed(module), groups=groups)


def _parametrization(module: nn.Module, convention: str, eps: float | None, init: str,
                     scaled_gamma: float = 1.0) -> WeightStandardization:
    return WeightStandardization(layer_weight(module), convention, eps, init,
                                 transposed=_is_transposed(module),
                                 groups=int(getattr(module, "groups", 1)),
                                 scaled_gamma=scaled_gamma)


def _register(module: nn.Module, convention: str, eps: float | None, init: str,
              scaled_gamma: float = 1.0) -> WeightStandardization:
    p = _parametrization(module, convention, eps, init, scaled_gamma)
    register_ws(module, p)
    return p


def apply_ws(model: nn.Module, convention: str = "paper", eps: float | None = None,
             init: str = "plain", include: str | Sequence[str] = (),
             exclude: str | Sequence[str] = (), *, transposed: bool = False,
             linear: bool = False, inplace: bool = False) -> ApplyReport:
    """Put Weight Standardization on a model's convolutions, keeping their pretrained weights.

    Every ``Conv1d/2d/3d`` (and subclass) is converted; transposed convs only with
    ``transposed=True``, ``Linear`` only with ``linear=True``. Layers whose filters hold a single
    weight (fan-in 1, e.g. depthwise 1x1) are skipped: WS would make them NaN or zero.

    Args:
        model: the model; copied unless ``inplace``.
        convention: one of :data:`wsconvert.conventions.CONVENTIONS`.
        eps: overrides the convention's default eps.
        init: ``plain``, ``scale`` or ``exact`` (see :class:`wsconvert.ws.WeightStandardization`).
        include: globs over dotted module names (one glob or several); when given, only
            matching layers convert.
        exclude: globs over dotted module names never to convert (one glob or several).
        transposed: also convert transposed convs (standardized per output channel).
        linear: also convert Linear layers.
        inplace: modify ``model`` itself.

    Returns:
        An :class:`ApplyReport`; ``report.model`` is the converted model.

    Raises:
        UsageError: unknown convention or init.
        ConversionError: the model already has WS, has no conv layer, holds non-finite weights,
            or no layer was left to convert.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1, groups=8))
        >>> report = apply_ws(net, "timm")
        >>> [(r.name, r.status) for r in report.layers]
        [('0', 'converted'), ('2', 'skipped')]
    """
    spec = get_convention(convention)
    if init not in INIT_MODES:
        raise UsageError(f"unknown init {init!r}; choose one of: {', '.join(INIT_MODES)}")
    if eps is not None:
        check_eps(eps)  # before copying the model (each layer's parametrization checks it too)
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    _refuse_existing_ws(model)
    candidates = list(candidate_layers(model))
    if not any(isinstance(m, nn.modules.conv._ConvNd) for _, m in candidates) and not (
            linear and candidates):
        raise ConversionError("model has no convolution layer to standardize")
    target = model if inplace else copy.deepcopy(model)
    report = ApplyReport(target, convention=spec.name, eps=spec.eps if eps is None else eps,
                         init=init)
    modules = dict(target.named_modules())
    # Every layer is checked before any is converted: a refusal leaves an ``inplace`` model as it
    # was.
    planned: list[tuple[nn.Module, WeightStandardization]] = []
    for name, _ in candidates:
        module = modules[name]
        reason = _skip_reason(name, module, include, exclude, transposed, linear)
        weight = layer_weight(module)
        shape = tuple(weight.shape) if not isinstance(
            weight, nn.parameter.UninitializedParameter) else ()
        fan = _fan_in_of(module) if shape else 0
        if reason:
            report.layers.append(LayerRecord(name, _kind(module), shape, fan, "skipped", reason))
            continue
        p = _parametrization(module, spec.name, eps, init)
        with torch.no_grad():
            finite = bool(torch.isfinite(p.standardize(weight)).all())
        if not finite:
            raise ConversionError(
                f"layer {name}: standardizing gives non-finite weights (a constant filter has "
                f"std 0 and eps={p.eps:g} does not cover it); use `eps` > 0 or exclude the layer")
        planned.append((module, p))
        report.layers.append(LayerRecord(name, _kind(module), shape, fan, "converted",
                                         convention=spec.name, eps=p.eps, init=init))
    done: list[nn.Module] = []
    try:
        for module, p in planned:
            register_ws(module, p)
            done.append(module)
    except Exception as exc:  # noqa: BLE001 - torch's parametrize raises several types
        for module in done:  # nothing half-converted, inplace or not
            unregister_ws(module)
        raise ConversionError(f"WS could not be registered on a layer: "
                              f"{str(exc).splitlines()[0]}") from None
    if not report.converted:
        reasons = sorted({r.reason for r in report.skipped})
        raise ConversionError("no layer was converted: " + "; ".join(reasons))
    return report


def ws_layer_configs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per WS layer, the settings needed to put the same parametrization back on a fresh model."""
    return {name: p.config() for name, _, p in ws_layers(model)}


def restore_ws(model: nn.Module, configs: dict[str, dict[str, Any]]) -> None:
    """Register WS on ``model`` in place as described by :func:`ws_layer_configs`.

    Raises:
        ConversionError: a named layer is missing or is not a conv / linear layer.
    """
    modules = dict(model.named_modules())
    for name, cfg in configs.items():
        module = modules.get(name)
        if module is None or not isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
            raise ConversionError(f"WS layer {name!r} recorded in the checkpoint is not a conv or "
                                  "linear layer of the model")
        _register(module, cfg["convention"], cfg["eps"], cfg["init"],
                  float(cfg.get("scaled_gamma", 1.0)))


def bake_parametrizations(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Replace every parametrized tensor of ``module`` by a plain Parameter holding ``values``.

    Restores the module's original class. Unlike
    :func:`torch.nn.utils.parametrize.remove_parametrizations` this never edits the generated
    ``Parametrized*`` class, which ``copy.deepcopy`` shares between a model and its copies:
    removing through one copy would break the others.

    Raises:
        ConversionError: ``values`` does not name exactly the parametrized tensors.
    """
    plist = cast(nn.ModuleDict, module.parametrizations)
    if set(plist.keys()) != set(values):
        raise ConversionError(f"cannot bake {sorted(values)}: the layer parametrizes "
                              f"{sorted(plist.keys())}")
    grads = {k: bool(cast(Any, plist[k]).original.requires_grad) for k in values}
    base = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    module.__class__ = base
    for name, value in values.items():
        module.register_parameter(name, nn.Parameter(value, requires_grad=grads[name]))


def unregister_ws(module: nn.Module, weight: torch.Tensor | None = None) -> nn.Parameter:
    """Take WS off ``module``: its class back to the original and ``weight`` a plain Parameter.

    With ``weight``, a new Parameter holding it; without, the trainable (unstandardized)
    Parameter itself, so a weight tied between layers stays one Parameter and an optimizer
    holding it still updates the layer.

    Raises:
        ConversionError: ``module`` has no WS, or has other parametrizations too.
    """
    if ws_parametrization(module) is None:
        raise ConversionError(f"{type(module).__name__} has no Weight Standardization")
    plist = cast(nn.ModuleDict, module.parametrizations)
    if len(plist) != 1 or len(cast(nn.ModuleList, plist["weight"])) != 1:
        raise ConversionError("layer carries other parametrizations besides WS; remove them first")
    if weight is None:
        original = cast(nn.Parameter, trainable_weight(module))
        bake_parametrizations(module, {"weight": original.detach()})
        module.weight = original
        return original
    bake_parametrizations(module, {"weight": weight.detach().clone()})
    return cast(nn.Parameter, module.weight)
