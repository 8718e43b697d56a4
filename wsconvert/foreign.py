"""Fold WS layers made by other libraries: timm, Hugging Face BiT, BiT, mmcv, Composer.

Those layers standardize their weight inside ``forward()``; exported as they are, the
standardization lands in the ONNX graph (timm's ``F.batch_norm`` trick even as training-mode
BatchNormalization). Each adapter here recognizes a layer by its class name and attributes, reads
the convention and eps *from the layer* (timm BiT models use 1e-8, NFNets 1e-5: never a default),
and computes the effective weight in float64 with the formulas of :mod:`wsconvert.conventions`.

Register your own layer with :func:`register_adapter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from wsconvert.conventions import Convention, get_convention, standardize_rows
from wsconvert.errors import ConversionError

__all__ = [
    "ADAPTERS",
    "FOREIGN_WS_CLASSES",
    "PARAMETRIZATIONS",
    "Adapter",
    "SamePadConv2d",
    "describe_chains",
    "find_adapter",
    "fold_foreign",
    "known_parametrization",
    "parametrization_chains",
    "register_adapter",
]


class SamePadConv2d(nn.Conv2d):
    """A plain Conv2d with TensorFlow 'SAME' padding computed from each input's size.

    What timm ``*Same`` layers and HF ``DynamicPad2d`` do for strided or even kernels: pad
    ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)`` per spatial dim, the extra pixel on the
    bottom / right. The weight is static; only the padding depends on the input.
    """

    def forward(self, x: Tensor) -> Tensor:
        pads: list[int] = []
        for i, k, s, d in reversed(list(zip(x.shape[-2:], self.kernel_size, self.stride,
                                            self.dilation, strict=True))):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


@dataclass(frozen=True)
class Adapter:
    """How to recognize and fold one foreign WS layer class.

    Attributes:
        name: label shown by ``inspect`` (e.g. ``"timm StdConv2d"``).
        matches: does this module belong to the adapter?
        convention: ``(module) -> (convention name, eps)`` as read from the layer.
        weight: ``(module) -> effective weight`` computed in float64.
        dynamic_same: ``(module) -> bool``: the layer pads 'SAME' from the input size.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    convention: Callable[[nn.Module], tuple[str, float]]
    weight: Callable[[nn.Module], Tensor]
    dynamic_same: Callable[[nn.Module], bool] = lambda m: False


def _class_names(m: nn.Module) -> set[str]:
    return {c.__name__ for c in type(m).__mro__}


def _rows64(m: nn.Module) -> Tensor:
    w = cast(Tensor, m.weight).detach().double()
    return w.reshape(w.shape[0], -1)


def _standardized(m: nn.Module, convention: Convention | str, eps: float) -> Tensor:
    rows = standardize_rows(_rows64(m), convention, eps)
    return rows.reshape(cast(Tensor, m.weight).shape)


def _per_channel(t: Tensor, rank: int = 4) -> Tensor:
    return t.detach().double().reshape(-1, *([1] * (rank - 1)))


_PLAIN_TIMM = get_convention("timm")  # biased var, eps inside the sqrt, no N**-0.5


def _timm_std(m: nn.Module) -> tuple[str, float]:
    return "timm", float(cast(Any, m).eps)


def _scaled(m: nn.Module) -> Tensor:
    rank = cast(Tensor, m.weight).dim()
    a = _per_channel(cast(Tensor, m.gain), rank) * float(cast(Any, m).scale)
    return a * _standardized(m, _PLAIN_TIMM, float(cast(Any, m).eps))


def _aws(m: nn.Module) -> Tensor:
    y = _standardized(m, "aws", 1e-5)
    return _per_channel(cast(Tensor, m.weight_gamma), y.dim()) * y + _per_channel(
        cast(Tensor, m.weight_beta), y.dim())


def _composer_eps(p: nn.Module) -> float:
    for attr in ("epsilon", "eps"):
        if hasattr(p, attr):
            return float(getattr(p, attr))
    return 1e-10


ADAPTERS: list[Adapter] = [
    Adapter("timm ScaledStdConv2d",
            lambda m: bool({"ScaledStdConv2d", "ScaledStdConv2dSame"} & _class_names(m))
            and hasattr(m, "gain") and hasattr(m, "scale"),
            lambda m: ("scaled", float(cast(Any, m).eps)), _scaled,
            lambda m: bool(getattr(m, "same_pad", False))),
    Adapter("timm StdConv2d",
            lambda m: bool({"StdConv2d", "StdConv2dSame"} & _class_names(m))
            and hasattr(m, "eps"),
            _timm_std, lambda m: _standardized(m, _PLAIN_TIMM, float(cast(Any, m).eps)),
            lambda m: bool(getattr(m, "same_pad", False))),
    Adapter("BiT StdConv2d",
            lambda m: "StdConv2d" in _class_names(m) and not hasattr(m, "eps"),
            lambda m: ("bit", 1e-10), lambda m: _standardized(m, "bit", 1e-10)),
    Adapter("HF WeightStandardizedConv2d",
            lambda m: "WeightStandardizedConv2d" in _class_names(m) and hasattr(m, "eps"),
            _timm_std, lambda m: _standardized(m, _PLAIN_TIMM, float(cast(Any, m).eps)),
            lambda m: getattr(m, "pad", None) is not None),
    Adapter("mmcv ConvAWS2d",
            lambda m: "ConvAWS2d" in _class_names(m) and hasattr(m, "weight_gamma"),
            lambda m: ("aws", 1e-5), _aws),
    Adapter("mmcv ConvWS2d",
            lambda m: "ConvWS2d" in _class_names(m) and hasattr(m, "eps"),
            lambda m: ("paper", float(cast(Any, m).eps)),
            lambda m: _standardized(m, "paper", float(cast(Any, m).eps))),
]

# Layer classes of other libraries that standardize their weight inside forward(): ``apply``
# refuses them and ``inspect`` reports them even when no adapter matches their attributes.
FOREIGN_WS_CLASSES = frozenset({
    "StdConv1d", "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame",
    "WeightStandardizedConv2d", "ConvWS2d", "ConvAWS2d",
})

# Parametrizations (``torch.nn.utils.parametrize``) known to be WS: class name -> convention.
PARAMETRIZATIONS: dict[str, Callable[[nn.Module], tuple[str, float]]] = {
    # MosaicML Composer's apply_weight_standardization: biased var, eps inside the sqrt.
    "WeightStandardizer": lambda p: ("bit", _composer_eps(p)),
}


def parametrization_chains(module: nn.Module) -> dict[str, list[nn.Module]]:
    """``{tensor name: [parametrization, ...]}`` for a parametrized module (empty otherwise)."""

    if not parametrize.is_parametrized(module):
        return {}
    plist = cast(nn.ModuleDict, module.parametrizations)
    return {k: list(cast(nn.ModuleList, plist[k])) for k in plist}


def known_parametrization(module: nn.Module) -> tuple[str, str, float] | None:
    """``(class name, convention, eps)`` when the module's only parametrization is a known WS
    one on its weight (see :data:`PARAMETRIZATIONS`)."""
    chains = parametrization_chains(module)
    weight = chains.get("weight", [])
    if set(chains) != {"weight"} or len(weight) != 1:
        return None
    name = type(weight[0]).__name__
    if name not in PARAMETRIZATIONS:
        return None
    convention, eps = PARAMETRIZATIONS[name](weight[0])
    return name, convention, eps


def describe_chains(chains: dict[str, list[nn.Module]]) -> str:
    """``weight: A+B; bias: C`` for messages."""
    return "; ".join(f"{k}: {'+'.join(type(p).__name__ for p in c)}" for k, c in chains.items())


def register_adapter(adapter: Adapter) -> None:
    """Teach ``inspect`` and ``fold`` a WS layer class of your own (checked before the built-ins).

    Example:
        >>> register_adapter(Adapter(                                   # doctest: +SKIP
        ...     "mylib WSConv", lambda m: type(m).__name__ == "WSConv",
        ...     lambda m: ("timm", m.eps),
        ...     lambda m: standardize_weight(m.weight.double(), "timm", m.eps)))
    """
    ADAPTERS.insert(0, adapter)


def find_adapter(module: nn.Module) -> Adapter | None:
    """The adapter that recognizes ``module``, if any."""
    if not isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return None
    return next((a for a in ADAPTERS if a.matches(module)), None)


def fold_foreign(module: nn.Module, adapter: Adapter) -> nn.Module:
    """A plain ``nn.Conv1d/2d/3d`` (or :class:`SamePadConv2d`) holding the effective weight.

    The weight is computed in float64 and rounded once to the layer's dtype.

    Raises:
        ConversionError: dynamic 'SAME' padding on a layer that is not 2-D.
    """
    conv = cast(nn.Conv2d, module)
    weight = adapter.weight(module).to(conv.weight.dtype)
    same = adapter.dynamic_same(module)
    rank = len(conv.kernel_size)
    if same and rank != 2:
        raise ConversionError(f"{adapter.name}: dynamic 'SAME' padding is supported for 2-D "
                              "convs only")
    cls: type[nn.Module] = SamePadConv2d if same else {1: nn.Conv1d, 2: nn.Conv2d,
                                                       3: nn.Conv3d}[rank]
    padding = 0 if same else conv.padding
    plain = cls(conv.in_channels, conv.out_channels, cast(Any, conv.kernel_size),
                cast(Any, conv.stride), cast(Any, padding), cast(Any, conv.dilation), conv.groups,
                conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                dtype=conv.weight.dtype)
    with torch.no_grad():
        cast(Tensor, plain.weight).copy_(weight)
        if conv.bias is not None:
            cast(Tensor, plain.bias).copy_(conv.bias)
    return plain.train(conv.training)
