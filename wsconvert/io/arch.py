"""The architecture record a model carries so that a wsconvert checkpoint can rebuild it.

A record is ``{"kind": "factory", "factory": "MODULE:FACTORY", "kwargs": {...}}`` for a model
built from a spec, or ``{"kind": "pickle"}`` for a whole pickled module, plus an optional list of
named architecture transforms applied after the build, each ``{"transform": NAME, ...params}``
(for example ``{"transform": "group_norm", "layers": {"bn1": {"groups": 32, "eps": 1e-5,
"affine": true}}}``). The record names what was done, never where wsconvert's code lives.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["add_transform", "arch_of", "set_arch"]

_ATTR = "_wsconvert_arch"


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """The model's architecture record (``None`` when it has none)."""
    arch = model.__dict__.get(_ATTR)
    return arch if isinstance(arch, dict) else None


def set_arch(model: nn.Module, arch: dict[str, Any] | None) -> None:
    """Attach (or with ``None``, remove) the model's architecture record."""
    if arch is None:
        model.__dict__.pop(_ATTR, None)
    else:
        model.__dict__[_ATTR] = arch


def add_transform(model: nn.Module, name: str, **params: Any) -> None:
    """Record that transform ``name`` with ``params`` was applied to a factory-built model.

    A transform of the same name with a ``layers`` mapping merges into the previous one. Models
    without a factory record need nothing: their pickled module holds the result.
    """
    arch = arch_of(model)
    if arch is None or arch.get("kind") != "factory":
        return
    transforms = [dict(t) for t in arch.get("transforms", [])]
    if transforms and transforms[-1].get("transform") == name and "layers" in params:
        transforms[-1]["layers"] = {**transforms[-1].get("layers", {}), **params["layers"]}
    else:
        transforms.append({"transform": name, **params})
    set_arch(model, {**arch, "transforms": transforms})
