"""``MODULE:FACTORY`` model specs: import the callable and build the architecture."""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from typing import Any

from torch import nn

from wsconvert.errors import ModelSpecError, UsageError
from wsconvert.io.safe import cwd_importable

__all__ = ["BUNDLED_FACTORIES", "build_model", "parse_kwargs"]

BUNDLED_FACTORIES = frozenset({"wsconvert.examples.tinynet:build"})
"""wsconvert's own model builders: a checkpoint that records one of these needs no consent to
rebuild (every other recorded factory does, see :func:`wsconvert.io.wsfile.load_model`)."""


def parse_kwargs(kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """Factory keyword arguments from a mapping or a JSON object string.

    Raises:
        UsageError: not valid JSON, or not a JSON object.
    """
    if not isinstance(kwargs, str):
        return dict(kwargs or {})
    try:
        parsed = json.loads(kwargs)
    except json.JSONDecodeError as exc:
        raise UsageError(f"`model_kwargs` is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UsageError("`model_kwargs` must be a JSON object")
    return parsed


def build_model(spec: str, kwargs: Mapping[str, Any] | str | None = None) -> nn.Module:
    """Import ``MODULE:FACTORY`` and call it with ``kwargs``; returns the module in eval mode.

    The current directory is importable, after the standard library and the installed
    packages (so a file there never shadows them). This runs the named module's code.

    Raises:
        ModelSpecError: malformed spec, import failure, factory failure, or not an ``nn.Module``.
        UsageError: ``kwargs`` is a string that is not a JSON object.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(
            f"`model` wants MODULE:FACTORY (e.g. mypkg.nets:resnet18), got {spec!r}")
    arguments = parse_kwargs(kwargs)
    cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything on import
        raise ModelSpecError(f"cannot import {module_name!r} for `model` {spec}: "
                             f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r} (`model` {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"`model` {spec}: {attr!r} is not callable")
    try:
        model = obj(**arguments)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise ModelSpecError(f"`model` {spec} failed to build the model: "
                             f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"`model` {spec} returned {type(model).__name__}, not an nn.Module")
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if nn.parameter.is_lazy(t)]
    if lazy:
        raise ModelSpecError(
            f"`model` {spec} builds a model with lazy (uninitialized) parameters "
            f"({', '.join(lazy[:3])}{' ...' if len(lazy) > 3 else ''}); build it with concrete "
            "sizes (Conv2d instead of LazyConv2d), or run one forward pass in the factory")
    return model.eval()
