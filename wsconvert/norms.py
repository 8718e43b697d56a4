"""Swap the BatchNorms that follow Weight-Standardized layers for GroupNorm.

The paper's recipe for one or two images per GPU is WS + GroupNorm (Qiao et al.,
arXiv:1903.10520, Sec. 5): GroupNorm has no batch statistics, and WS supplies the smoothing that
BatchNorm's batch dependence used to give. A user's model arrives pretrained with BatchNorm;
:func:`swap_norm` turns each BatchNorm directly after a WS layer into a GroupNorm that carries the
BatchNorm's affine ``weight`` / ``bias`` and ``eps``.

Which norms "directly follow" a WS layer:

1. When the model traces with :mod:`torch.fx` (conv, linear and norm layers kept as leaves), a
   norm follows a WS layer when every call of it takes the output of a WS layer's call as its
   first argument, with nothing in between. Norms never called in ``forward`` do not follow.
2. When tracing fails (data-dependent control flow, unsupported ops), the rule falls back to
   registration order: the norm's previous sibling in its parent module (``Sequential`` order or
   attribute assignment order) is a WS layer.

The report says which rule decided. Frozen BatchNorms (classes named ``FrozenBatchNorm*``, or a
BatchNorm whose affine parameters all have ``requires_grad=False``) are reported and left alone
unless ``convert_frozen=True``; converted frozen norms keep their affine frozen.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wsconvert.defaults import GROUPS
from wsconvert.errors import ConversionError, UsageError
from wsconvert.io.arch import add_transform
from wsconvert.surgery import ws_layers

__all__ = [
    "NormRecord",
    "NormSwapReport",
    "check_groups",
    "choose_groups",
    "group_norm_from",
    "norm_layers",
    "norms_after",
    "restore_group_norm",
    "swap_norm",
]


@dataclass(frozen=True)
class NormRecord:
    """What happened to one BatchNorm.

    Attributes:
        name: dotted module name.
        kind: the norm's class name before the swap.
        channels: number of channels (features) it normalizes.
        groups: GroupNorm groups used (``None`` when not swapped).
        status: ``swapped`` or ``kept``.
        reason: why it was kept, or a note on the swap (group count lowered, frozen affine).
        follows: dotted name of the layer it follows (``""`` when unknown or none).
    """

    name: str
    kind: str
    channels: int
    groups: int | None
    status: str
    reason: str = ""
    follows: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NormSwapReport:
    """Result of :func:`swap_norm`: the model and a record per BatchNorm found.

    Attributes:
        model: the model with GroupNorms in place.
        norms: one :class:`NormRecord` per BatchNorm-like module, in module order.
        groups: the group count asked for.
        rule: ``fx`` (traced data flow) or ``registration order`` (fallback), see module docs.
        trace_error: why tracing failed, when the fallback rule was used.
    """

    model: nn.Module
    norms: list[NormRecord] = field(default_factory=list)
    groups: int = GROUPS
    rule: str = "fx"
    trace_error: str = ""

    @property
    def swapped(self) -> list[NormRecord]:
        return [r for r in self.norms if r.status == "swapped"]

    @property
    def kept(self) -> list[NormRecord]:
        return [r for r in self.norms if r.status == "kept"]

    def summary(self) -> str:
        return (f"{len(self.swapped)} BatchNorm(s) swapped to GroupNorm (groups<={self.groups}), "
                f"{len(self.kept)} kept; 'follows' decided by {self.rule}")

    def to_dict(self) -> dict[str, Any]:
        return {"groups": self.groups, "rule": self.rule, "trace_error": self.trace_error,
                "swapped": len(self.swapped), "kept": len(self.kept),
                "norms": [r.to_dict() for r in self.norms]}


def check_groups(groups: int) -> None:
    """Raises:
        UsageError: ``groups`` below 1.
    """
    if groups < 1:
        raise UsageError(f"`groups` must be >= 1, got {groups}")


def choose_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` not above ``groups``.

    Raises:
        UsageError: ``groups`` or ``channels`` below 1.

    Example:
        >>> choose_groups(64, 32), choose_groups(48, 32), choose_groups(7, 32)
        (32, 24, 7)
    """
    check_groups(groups)
    if channels < 1:
        raise UsageError(f"channels must be >= 1, got {channels}")
    for g in range(min(groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1  # pragma: no cover - g = 1 always divides


def _is_frozen_class(module: nn.Module) -> bool:
    return "FrozenBatchNorm" in type(module).__name__


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or _is_frozen_class(module)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-like module (BatchNorm1d/2d/3d, SyncBatchNorm, FrozenBatchNorm*)."""
    return [(n, m) for n, m in model.named_modules() if n and _is_batchnorm(m)]


def _frozen_reason(module: nn.Module) -> str:
    if _is_frozen_class(module):
        return f"frozen ({type(module).__name__})"
    params = [p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
              if isinstance(p, nn.Parameter)]
    if params and not any(p.requires_grad for p in params):
        return "frozen (affine requires_grad=False)"
    return ""


def _affine(module: nn.Module) -> tuple[Tensor | None, Tensor | None]:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (w if isinstance(w, Tensor) else None), (b if isinstance(b, Tensor) else None)


def _channels(module: nn.Module) -> int:
    n = getattr(module, "num_features", None)
    if isinstance(n, int):
        return n
    w, _ = _affine(module)
    if w is None:
        raise ConversionError(f"cannot tell the channel count of {type(module).__name__}")
    return int(w.shape[0])


def group_norm_from(norm: nn.Module, groups: int) -> nn.GroupNorm:
    """A GroupNorm with ``norm``'s channels, eps, affine weight and bias, device and dtype.

    ``groups`` is lowered to the largest divisor of the channel count not above it. The affine
    tensors are copied (new Parameters) with ``norm``'s ``requires_grad``; a frozen norm's buffers
    become Parameters that do not require grad. ``norm``'s running statistics are dropped:
    GroupNorm computes its statistics per sample.

    Raises:
        UsageError: ``groups`` below 1.
        ConversionError: ``norm`` is a lazy module that has not run yet.
    """
    w, b = _affine(norm)
    if isinstance(w, nn.parameter.UninitializedParameter):
        raise ConversionError("lazy BatchNorm not initialized yet (run one forward pass first)")
    channels = _channels(norm)
    ref = w if w is not None else next(iter(norm.buffers()), None)
    gn = nn.GroupNorm(choose_groups(channels, groups), channels,
                      eps=float(getattr(norm, "eps", 1e-5)), affine=w is not None,
                      device=None if ref is None else ref.device,
                      dtype=None if ref is None else ref.dtype)
    if w is not None:
        with torch.no_grad():
            gn.weight.copy_(w.detach())
            if b is not None:
                gn.bias.copy_(b.detach())
            else:
                gn.bias.zero_()
        gn.weight.requires_grad_(isinstance(w, nn.Parameter) and w.requires_grad)
        gn.bias.requires_grad_(isinstance(b, nn.Parameter) and b.requires_grad)
    gn.train(norm.training)
    return gn


class _LeafTracer(torch.fx.Tracer):
    """Keeps conv, linear and norm layers (parametrized or not) as single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear) or _is_batchnorm(m):
            return True
        return bool(super().is_leaf_module(m, module_qualified_name))


def _follows_by_trace(model: nn.Module, ws_names: set[str], norm_names: set[str],
                      exclusive: bool = False) -> dict[str, str]:
    """Map norm name -> the layer it follows, by tracing (raises when tracing fails).

    ``exclusive``: the norm must also be the layer's only consumer (what fusing needs).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = _LeafTracer().trace(model)
    calls: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in norm_names:
            continue
        src = node.args[0] if node.args else None
        prev = (str(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module"
                and (not exclusive or len(src.users) == 1) else "")
        calls.setdefault(str(node.target), []).append(prev)
    return {name: prevs[0] for name, prevs in calls.items()
            if prevs and all(p == prevs[0] and p in ws_names for p in prevs)}


def _follows_by_order(model: nn.Module, ws_names: set[str], norm_names: set[str],
                      sequential_only: bool = False) -> dict[str, str]:
    """Map norm name -> layer registered just before it in the same parent (only inside
    ``nn.Sequential`` parents, where that is the data flow, with ``sequential_only``)."""
    found: dict[str, str] = {}
    for parent_name, parent in model.named_modules():
        if sequential_only and not isinstance(parent, nn.Sequential):
            continue
        prefix = f"{parent_name}." if parent_name else ""
        previous = ""
        for child_name, child in parent._modules.items():
            if child is None:
                continue
            full = prefix + child_name
            if full in norm_names and previous in ws_names:
                found[full] = previous
            previous = full
    return found


def norms_after(model: nn.Module, layer_names: set[str], norm_names: set[str], *,
                exclusive: bool = False) -> tuple[dict[str, str], str | None]:
    """Which norms directly follow which layers: ``({norm: layer}, trace_error)``.

    Traced with torch.fx; when tracing fails (``trace_error`` says why) the fallback is the
    registration order within a parent. ``exclusive`` (for fusion) also requires the norm to be
    the layer's only consumer, and limits the fallback to ``nn.Sequential`` parents.
    """
    try:
        return _follows_by_trace(model, layer_names, norm_names, exclusive), None
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: use the fallback rule
        text = str(exc).strip()
        error = f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else (
            type(exc).__name__)
        return _follows_by_order(model, layer_names, norm_names, exclusive), error


def _ws_names(model: nn.Module) -> set[str]:
    return {name for name, _, _ in ws_layers(model)}


def _preceding_layer(model: nn.Module, name: str) -> str:
    """The sibling registered just before ``name`` (for the report's 'follows' column)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    previous = ""
    for key in parent._modules:
        if key == child:
            return f"{parent_name}.{previous}" if parent_name and previous else previous
        previous = key
    return ""


def swap_norm(model: nn.Module, groups: int = GROUPS, *, after: Iterable[str] | None = None,
              convert_frozen: bool = False, inplace: bool = False) -> NormSwapReport:
    """Replace every BatchNorm that directly follows a WS layer with GroupNorm.

    The GroupNorm carries the BatchNorm's affine ``weight`` and ``bias`` and its ``eps``; the
    running statistics are dropped. When the channel count is not divisible by ``groups``, the
    largest divisor not above ``groups`` is used and the record says so. See the module docs for
    the "directly follows" rule.

    Args:
        model: the model, normally already converted by :func:`wsconvert.surgery.apply_ws`.
        groups: GroupNorm groups to aim for (the paper uses 32).
        after: dotted names of the layers whose BatchNorms to swap; default every layer carrying
            Weight Standardization.
        convert_frozen: also swap frozen BatchNorms (their affine stays frozen).
        inplace: modify ``model`` itself instead of a copy.

    Returns:
        A :class:`NormSwapReport`; ``report.model`` is the swapped model.

    Raises:
        UsageError: ``groups`` below 1.
        ConversionError: the model has no layer to follow (no WS layer and no ``after``).

    Example:
        >>> from wsconvert.surgery import apply_ws
        >>> net = nn.Sequential(nn.Conv2d(3, 48, 3), nn.BatchNorm2d(48), nn.ReLU())
        >>> report = swap_norm(apply_ws(net).model, groups=32)
        >>> [(r.name, r.status, r.groups) for r in report.norms]
        [('1', 'swapped', 24)]
    """
    check_groups(groups)
    target = model if inplace else copy.deepcopy(model)
    ws_names = set(after) if after is not None else _ws_names(target)
    if not ws_names:
        raise ConversionError("no Weight-Standardized layer to swap norms after (run apply_ws "
                              "first)")
    norms = norm_layers(target)
    norm_names = {n for n, _ in norms}
    report = NormSwapReport(target, groups=groups)
    follows, trace_error = norms_after(target, ws_names, norm_names)
    if trace_error is not None:
        report.rule = "registration order"
        report.trace_error = trace_error
    swapped: dict[str, dict[str, Any]] = {}
    for name, norm in norms:
        kind = type(norm).__name__
        channels = _channels(norm)
        prev = follows.get(name, "")
        if not prev:
            before = _preceding_layer(target, name)
            why = ("does not directly follow a Weight-Standardized layer" if report.rule == "fx"
                   else "previous sibling is not a Weight-Standardized layer")
            report.norms.append(NormRecord(name, kind, channels, None, "kept", why, before))
            continue
        frozen = _frozen_reason(norm)
        if frozen and not convert_frozen:
            report.norms.append(NormRecord(name, kind, channels, None, "kept",
                                           f"{frozen}; pass convert_frozen / --convert-frozen",
                                           prev))
            continue
        w, _ = _affine(norm)
        if isinstance(w, nn.parameter.UninitializedParameter):
            report.norms.append(NormRecord(name, kind, channels, None, "kept",
                                           "lazy layer not initialized yet", prev))
            continue
        gn = group_norm_from(norm, groups)
        target.set_submodule(name, gn)
        notes = []
        if gn.num_groups != groups:
            why = (f"fewer than {groups}" if channels < groups
                   else f"not divisible by {groups}")
            notes.append(f"{channels} channels {why}: using {gn.num_groups} groups")
        if frozen:
            notes.append(f"{frozen}: affine kept frozen")
        report.norms.append(NormRecord(name, kind, channels, gn.num_groups, "swapped",
                                       "; ".join(notes), prev))
        swapped[name] = {"groups": gn.num_groups, "eps": gn.eps, "affine": gn.affine}
    if swapped:
        add_transform(target, "group_norm", layers=swapped)
    return report


def restore_group_norm(model: nn.Module, layers: Mapping[str, Mapping[str, Any]]) -> None:
    """Swap the named BatchNorms to GroupNorm in place, as a checkpoint's ``group_norm``
    transform records them (so the saved GroupNorm state dict fits the rebuilt model).

    Args:
        model: the freshly built original architecture.
        layers: per dotted norm name, ``{"groups": int, "eps": float, "affine": bool}``.

    Raises:
        ConversionError: a named norm is missing from the model or is not a BatchNorm.
    """
    modules = dict(model.named_modules())
    for name, spec in layers.items():
        norm = modules.get(name)
        if norm is None or not _is_batchnorm(norm):
            raise ConversionError(f"recorded GroupNorm swap {name!r} is not a BatchNorm of "
                                  f"{type(model).__name__}")
        groups, eps = spec.get("groups"), spec.get("eps", getattr(norm, "eps", 1e-5))
        channels = _channels(norm)
        # The record holds the groups actually used: a value that is not one of the channel
        # count's divisors (or an eps that is not a finite number >= 0) would build another model.
        if (isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
                or channels % groups):
            raise ConversionError(f"recorded GroupNorm swap {name!r}: groups {groups!r} is not "
                                  f"a divisor of its {channels} channels")
        if (isinstance(eps, bool) or not isinstance(eps, int | float)
                or not 0 <= eps < float("inf")):
            raise ConversionError(f"recorded GroupNorm swap {name!r}: eps {eps!r} is not a "
                                  "finite number >= 0")
        gn = group_norm_from(norm, groups)
        gn.eps = float(eps)
        model.set_submodule(name, gn)
