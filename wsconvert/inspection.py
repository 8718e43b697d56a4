"""Read-only survey of a model's conv and linear layers: shapes, WS status, filter statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from wsconvert.conventions import fan_in, to_rows
from wsconvert.foreign import (
    FOREIGN_WS_CLASSES,
    describe_chains,
    find_adapter,
    known_parametrization,
    parametrization_chains,
)
from wsconvert.surgery import candidate_layers
from wsconvert.ws import trainable_weight, ws_parametrization

__all__ = ["LayerInfo", "inspect_model"]


@dataclass(frozen=True)
class LayerInfo:
    """One layer as :func:`inspect_model` sees it.

    ``mean_abs_max`` is the largest ``|mean|`` of any output channel's filter and
    ``std_min`` / ``std_max`` the range of the filters' (biased) std, all on the stored weight
    (for WS layers, the trainable weight before standardization). A standardized filter has mean 0
    and std 1. ``ws`` says who standardizes the layer: ``wsconvert``; ``foreign`` (a known layer
    class of another library, see :mod:`wsconvert.foreign`); ``parametrization`` (a known WS
    parametrization, e.g. Composer's); ``unknown`` (some other parametrization on the weight:
    ``fold`` bakes it only with ``--bake-unknown``); ``none``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    fan_in: int
    ws: str  # "wsconvert", "foreign", "parametrization", "unknown", "none"
    source: str | None  # the foreign layer / parametrization, when not wsconvert's own
    convention: str | None
    eps: float | None
    init: str | None
    mean_abs_max: float
    std_min: float
    std_max: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def _who_standardizes(module: nn.Module, kind: str
                      ) -> tuple[str, str | None, str | None, float | None]:
    p = ws_parametrization(module)
    if p is not None:
        return "wsconvert", None, p.convention, p.eps
    adapter = find_adapter(module)
    if adapter is not None:
        convention, eps = adapter.convention(module)
        return "foreign", adapter.name, convention, eps
    chains = parametrization_chains(module)
    if chains:
        known = known_parametrization(module)
        if known is not None:
            return "parametrization", *known
        return "unknown", describe_chains(chains), None, None
    if kind in FOREIGN_WS_CLASSES:
        return "foreign", f"{kind} (attributes not recognized)", None, None
    return "none", None, None, None


def inspect_model(model: nn.Module) -> list[LayerInfo]:
    """Describe every conv / transposed-conv / linear layer of ``model``.

    Example:
        >>> infos = inspect_model(nn.Sequential(nn.Conv2d(3, 4, 3)))
        >>> infos[0].kind, infos[0].fan_in
        ('Conv2d', 27)
    """
    infos = []
    for name, module in candidate_layers(model):
        p = ws_parametrization(module)
        stored = trainable_weight(module)
        if isinstance(stored, nn.parameter.UninitializedParameter):
            continue
        transposed = bool(getattr(module, "transposed", False))
        groups = int(getattr(module, "groups", 1))
        with torch.no_grad():
            rows = to_rows(stored.detach(), transposed=transposed, groups=groups).double()
            std, mean = torch.std_mean(rows, dim=1, correction=0)
        kind = parametrize.type_before_parametrizations(module).__name__
        status, source, convention, eps = _who_standardizes(module, kind)
        infos.append(LayerInfo(
            name=name, kind=kind, shape=tuple(stored.shape),
            fan_in=fan_in(stored.shape, transposed=transposed, groups=groups), ws=status,
            source=source, convention=convention, eps=eps,
            init=p.init if p else None, mean_abs_max=float(mean.abs().max()),
            std_min=float(std.min()), std_max=float(std.max())))
    return infos
