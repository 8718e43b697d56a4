"""Fold Weight Standardization back into static weights (arXiv:1903.10520).

A WS layer computes its weight from the trainable tensor on every call. Folding evaluates that
function once, in float64, and rounds once to the parameter's dtype, so each folded weight is the
correctly rounded value of the exact WS formula (gain, gamma, beta and ``N**-0.5`` included). The
layer then goes back to its original plain class, and the folded state dict loads with
``strict=True`` into the original, unmodified architecture.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from wsconvert.conventions import standardize_rows
from wsconvert.errors import ConversionError
from wsconvert.foreign import (
    describe_chains,
    find_adapter,
    fold_foreign,
    known_parametrization,
    parametrization_chains,
)
from wsconvert.norms import norm_layers, norms_after
from wsconvert.surgery import bake_parametrizations, unregister_ws, ws_layers
from wsconvert.ws import trainable_weight, ws_parametrization

__all__ = ["FoldRecord", "FoldReport", "fold_ws", "folded_weight"]


@dataclass(frozen=True)
class FoldRecord:
    """One folded layer or fused BatchNorm.

    ``kind``: ``ws`` (wsconvert's own), ``foreign`` (another library's WS layer),
    ``parametrization`` (a known WS parametrization), ``baked`` (an unknown parametrization, with
    ``bake_unknown``), ``bn`` (a BatchNorm fused into its conv).
    """

    name: str
    kind: str
    layer: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layer": self.layer, "detail": self.detail}


@dataclass
class FoldReport:
    """Result of :func:`fold_ws`; ``model`` is the plain model."""

    model: nn.Module
    folded: list[FoldRecord] = field(default_factory=list)
    fused: list[FoldRecord] = field(default_factory=list)

    @property
    def noop(self) -> bool:
        return not self.folded and not self.fused

    def summary(self) -> str:
        if self.noop:
            return "no WS layer to fold: the model is already plain"
        text = f"{len(self.folded)} WS layer(s) folded into static weights"
        if self.fused:
            text += f", {len(self.fused)} BatchNorm(s) fused"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"noop": self.noop, "folded": [r.to_dict() for r in self.folded],
                "fused": [r.to_dict() for r in self.fused]}


def folded_weight(module: nn.Module) -> torch.Tensor:
    """The effective weight of a WS layer, computed in float64 and rounded once."""
    p = ws_parametrization(module)
    if p is None:
        raise ConversionError(f"{type(module).__name__} has no Weight Standardization")
    original = trainable_weight(module)
    with torch.no_grad():
        exact = copy.deepcopy(p).double().reference(original.detach().double())
    return exact.to(original.dtype)


def _conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where the BN consumes the conv's output and nothing else does."""
    convs = {name for name, m in model.named_modules() if _is_plain_conv(m)}
    bns = {name for name, m in norm_layers(model)
           if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    follows, _ = norms_after(model, convs, bns, exclusive=True)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(((conv, bn) for bn, conv in follows.items()), key=lambda p: order[p[1]])


def _is_plain_conv(module: nn.Module | None) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed


def _fold_parametrized(target: nn.Module, report: FoldReport, bake_unknown: bool) -> None:
    """Composer-style WS parametrizations fold exactly; unknown ones only when asked."""
    for name, module in list(target.named_modules()):
        chains = parametrization_chains(module)
        if not chains:
            continue
        known = known_parametrization(module)
        if known is not None:
            cls, convention, eps = known
            original = trainable_weight(module).detach()
            rows = standardize_rows(original.double().reshape(original.shape[0], -1),
                                    convention, eps)
            bake_parametrizations(module, {"weight": rows.reshape(original.shape).to(
                original.dtype)})
            report.folded.append(FoldRecord(name, "parametrization", type(module).__name__,
                                            f"{cls}: {convention} eps={eps:g}"))
            continue
        kinds = describe_chains(chains)
        if not bake_unknown:
            raise ConversionError(f"layer {name or '<root>'} carries an unknown parametrization "
                                  f"({kinds}); pass `bake_unknown=True` to bake its current value")
        with torch.no_grad():
            values = {k: getattr(module, k).detach().clone() for k in chains}
        bake_parametrizations(module, values)
        report.folded.append(FoldRecord(name, "baked", type(module).__name__,
                                        f"unknown parametrization baked ({kinds})"))


def _fold_foreign(target: nn.Module, report: FoldReport) -> nn.Module:
    for name, module in list(target.named_modules()):
        adapter = find_adapter(module)
        if adapter is None:
            continue
        convention, eps = adapter.convention(module)
        plain = fold_foreign(module, adapter)
        if not name:
            target = plain
        else:
            target.set_submodule(name, plain)
        report.folded.append(FoldRecord(name, "foreign", adapter.name,
                                        f"{convention} eps={eps:g}"
                                        + (", dynamic SAME padding kept"
                                           if adapter.dynamic_same(module) else "")))
    return target


def fold_ws(model: nn.Module, *, fuse_bn: bool = False, bake_unknown: bool = False,
            inplace: bool = False) -> FoldReport:
    """Bake every WS layer into a plain layer of its original class holding the effective weight.

    Folds wsconvert's own WS, the foreign WS layers of :mod:`wsconvert.foreign` (timm, HF BiT,
    BiT, mmcv; as plain ``nn.Conv2d``, or :class:`~wsconvert.foreign.SamePadConv2d` where the
    layer pads 'SAME' from the input size) and WS parametrizations such as Composer's.

    Args:
        model: a model with WS layers (a model without any is returned unchanged, ``noop``).
        bake_unknown: bake the current value of parametrizations that are not known WS
            (otherwise they are an error).
        fuse_bn: also fuse eval-mode BatchNorms into the conv they follow
            (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the BN becomes ``nn.Identity``,
            so the state dict then fits the fused architecture, not the original one.
        inplace: modify ``model`` itself instead of a copy.

    Returns:
        A :class:`FoldReport`; ``report.model`` is the plain model, in eval mode.

    Raises:
        ConversionError: a WS layer also carries another parametrization, or a layer carries an
            unknown parametrization and ``bake_unknown`` is not set.

    Example:
        >>> ws = wsconvert.apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3))).model
        >>> plain = fold_ws(ws).model
        >>> type(plain[0]).__name__
        'Conv2d'
    """
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    report = FoldReport(target)
    for name, module, p in list(ws_layers(target)):
        weight = folded_weight(module)
        unregister_ws(module, weight)
        report.folded.append(FoldRecord(name, "ws", type(module).__name__,
                                        f"{p.convention} eps={p.eps:g} init={p.init}"))
    _fold_parametrized(target, report, bake_unknown)
    target = report.model = _fold_foreign(target, report)
    if fuse_bn:
        for conv_name, bn_name in _conv_bn_pairs(target):
            conv = target.get_submodule(conv_name)
            bn = target.get_submodule(bn_name)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
                continue
            fused = fuse_conv_bn_eval(cast(nn.Conv2d, conv), bn)
            target.set_submodule(conv_name, fused)
            target.set_submodule(bn_name, nn.Identity())
            report.fused.append(FoldRecord(bn_name, "bn", type(bn).__name__,
                                           f"fused into {conv_name}"))
    return report
