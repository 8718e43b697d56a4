"""``MODULE:FACTORY`` model specs: import the callable and build the architecture.

Two short forms name a model of a model zoo, with random weights (the checkpoint provides them;
nothing is downloaded): ``timm:NAME`` (``timm.create_model(NAME, pretrained=False)``) and
``torchvision:NAME`` (``torchvision.models.get_model(NAME, weights=None)``). A NAME that is not a
model of the zoo but an attribute of the package (``timm:create_model``) is the generic form.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from wsconvert.errors import ModelSpecError, UsageError
from wsconvert.io.safe import cwd_importable

__all__ = ["BUNDLED_FACTORIES", "ZOOS", "build_model", "factory_source", "parse_kwargs"]

BUNDLED_FACTORIES = frozenset({"wsconvert.examples.tinynet:build"})
"""wsconvert's own model builders: a checkpoint that records one of these needs no consent to
rebuild (every other recorded factory does, see :func:`wsconvert.io.wsfile.load_model`)."""

ZOOS = {"timm": "pretrained", "torchvision": "weights"}
"""Packages with a ``PACKAGE:NAME`` short form, and the keyword that would download weights."""


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


def factory_source(spec: str | None) -> Path | None:
    """The file that defines the module of a ``MODULE:FACTORY`` spec, without importing it: the
    loaded module's file, else Python's own finder's answer for the top-level name (editable
    installs included), else a search of the package's folders, ``sys.path`` and the current
    directory (last, as :func:`build_model` imports it). ``None`` for the zoo short forms or
    when none is found. An input of the run: no output may replace the code that builds the
    model."""
    if spec is None:
        return None
    module_name = spec.partition(":")[0]
    if not module_name or module_name in ZOOS:
        return None
    if module_name in sys.modules:  # already imported (a bundled builder, an earlier run)
        origin = getattr(sys.modules[module_name], "__file__", None)
        return Path(origin) if origin else None
    parts = module_name.split(".")
    roots = [Path(entry or ".") for entry in [*sys.path, os.getcwd()]]
    # Python's own finders (editable installs included) say where a top-level module or package
    # is; asking runs no code (asking about ``pkg.sub`` would import ``pkg``, so its folder is
    # searched instead).
    with contextlib.suppress(Exception):
        found = importlib.util.find_spec(parts[0])
        if found is not None and len(parts) == 1 and found.origin and Path(found.origin).is_file():
            return Path(found.origin)  # .py, .pyc or an extension module
        if found is not None and found.submodule_search_locations:
            roots = [Path(p).parent for p in found.submodule_search_locations] + roots
    suffixes = importlib.machinery.all_suffixes()
    for root in roots:
        base = root.joinpath(*parts)
        # A package wins over a module of the same name, as in Python's own finder.
        for candidate in (base / "__init__.py", *(base.with_name(base.name + x) for x in suffixes)):
            if candidate.is_file():
                return candidate
    return None


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
    if module_name in ZOOS:
        zoo_model = _build_from_zoo(module_name, attr, arguments, spec)
        if zoo_model is not None:
            return zoo_model
    cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except SystemExit as exc:  # sys.exit or argparse at import: never wsconvert's exit code
        raise ModelSpecError(f"cannot import {module_name!r} for `model` {spec}: it called "
                             f"sys.exit({exc.code!r}) on import") from None
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
    except SystemExit as exc:  # the factory's exit code must not become the gate's
        raise ModelSpecError(f"`model` {spec} called sys.exit({exc.code!r}) instead of "
                             "building the model") from None
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


def _import_zoo(package: str, spec: str) -> Any:
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as exc:
        if exc.name != package:
            raise ModelSpecError(f"`model` {spec}: {package} is installed but needs module "
                                 f"{exc.name!r}, which is not") from None
        raise ModelSpecError(f"`model` {spec}: {package} is not installed (pip install "
                             f"{package}, or wsconvert[compat])") from None
    except Exception as exc:  # noqa: BLE001 - e.g. torchvision built for another torch
        reason = " ".join(str(exc).split())[:160]
        raise ModelSpecError(f"`model` {spec}: {package} cannot be imported "
                             f"({type(exc).__name__}: {reason}); install the {package} release "
                             "that matches your torch") from None


def _build_from_zoo(package: str, name: str, arguments: dict[str, Any],
                    spec: str) -> nn.Module | None:
    """``timm:NAME`` / ``torchvision:NAME``; ``None`` when NAME is not a model of the zoo but an
    attribute of the package (the generic ``MODULE:FACTORY`` form then applies).

    Raises:
        ModelSpecError: the package is missing or broken, NAME is neither, or the builder fails.
        UsageError: ``kwargs`` ask for downloaded weights.
    """
    zoo = _import_zoo(package, spec)
    defaults: dict[str, Any]
    if package == "timm":
        known = bool(zoo.is_model(name))
        builder, defaults = zoo.create_model, {"pretrained": False}
    else:
        models = _import_zoo("torchvision.models", spec)
        known = name in models.list_models()
        builder, defaults = models.get_model, {"weights": None}
    if not known:
        if hasattr(zoo, name.split(".")[0]):
            return None
        lister = "timm.list_models()" if package == "timm" else "torchvision.models.list_models()"
        raise ModelSpecError(f"`model` {spec}: {package} has no model named {name!r} "
                             f"({lister} lists them)")
    keyword = ZOOS[package]
    if arguments.get(keyword) not in (None, False):
        raise UsageError(f"`model_kwargs` {keyword}={arguments[keyword]!r}: the checkpoint holds "
                         "the weights; wsconvert never downloads any")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the zoos' deprecation notices
            model = builder(name, **{**arguments, **defaults})
    except Exception as exc:  # noqa: BLE001 - the zoo's builders raise many types
        raise ModelSpecError(f"`model` {spec} failed to build the model: "
                             f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"`model` {spec} returned {type(model).__name__}, not an nn.Module")
    return model.eval()
