"""The architecture record a model carries so that a wsconvert checkpoint can rebuild it.

A record is ``{"kind": "factory", "factory": "MODULE:FACTORY", "kwargs": {...}}`` for a model
built from a spec, or ``{"kind": "pickle"}`` for a whole pickled module, plus an optional list of
named architecture transforms applied after the build, each ``{"transform": NAME, ...params}``
(for example ``{"transform": "group_norm", "layers": {"bn1": {"groups": 32, "eps": 1e-5,
"affine": true}}}``). The record names what was done, never where wsconvert's code lives.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from torch.nn.utils import parametrize

from wsconvert.ws import ws_parametrization

__all__ = ["add_transform", "arch_of", "current_arch", "set_arch", "structure"]

_ATTR = "_wsconvert_arch"
_SHAPE = "_wsconvert_arch_structure"  # the model's structure when its record was last set
_WS_ORIGINAL = ".parametrizations.weight.original"


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """The model's architecture record (``None`` when it has none)."""
    arch = model.__dict__.get(_ATTR)
    return arch if isinstance(arch, dict) else None


def set_arch(model: nn.Module, arch: dict[str, Any] | None) -> None:
    """Attach (or with ``None``, remove) the model's architecture record; ``model`` must be what
    the record builds (its :func:`structure` is kept to tell later edits apart)."""
    if arch is None:
        model.__dict__.pop(_ATTR, None)
        model.__dict__.pop(_SHAPE, None)
    else:
        model.__dict__[_ATTR] = arch
        model.__dict__[_SHAPE] = structure(model)


def structure(model: nn.Module) -> tuple[tuple[Any, ...], ...]:
    """What a rebuild from the record must reproduce: every module's name, class and settings
    (``extra_repr``: a BatchNorm's eps, a conv's stride), every state-dict entry's name and shape.
    WS is left out (the checkpoint records it per layer): a WS layer counts as its plain class
    with its ``weight``. Any other parametrization counts, since the factory does not make it."""
    # WS layers whose weight carries nothing else: a parametrization stacked on WS counts.
    ws_names = {name for name, m in model.named_modules()
                if ws_parametrization(m) is not None
                and len(cast(Any, m).parametrizations) == 1
                and len(cast(Any, m).parametrizations["weight"]) == 1}

    def inside_ws(name: str) -> str | None:
        """The WS layer whose parametrization ``name`` (a module or a key) belongs to."""
        layer, sep, rest = f".{name}".partition(".parametrizations")
        if sep and (not rest or rest.startswith(".")) and layer[1:] in ws_names:
            return layer[1:]
        return None

    modules = []
    for name, m in model.named_modules():
        if inside_ws(name) is not None:
            continue
        cls = parametrize.type_before_parametrizations(m) if name in ws_names else type(m)
        modules.append((name, f"{cls.__module__}.{cls.__qualname__}", _settings(cls, m)))
    state = []
    for key, value in model.state_dict(keep_vars=True).items():
        layer = inside_ws(key)
        if layer is not None:
            if not f".{key}".endswith(_WS_ORIGINAL):
                continue  # WS's own gain / gamma / beta
            key = f"{layer}.weight" if layer else "weight"
        state.append((key, tuple(value.shape)))
    return tuple(sorted(modules)), tuple(sorted(state))


def _settings(cls: type, module: nn.Module) -> str:
    """A torch layer's settings (a BatchNorm's eps, a conv's stride), as torch's own
    ``extra_repr`` prints them, for subclasses too (one that overrides it may print learned
    values or counters). Containers (ParameterList prints dtypes and devices) and other code's
    modules have none."""
    for base in cls.__mro__:
        owner = base.__module__
        if owner.startswith("torch.nn.modules.") and owner != "torch.nn.modules.container":
            return cast(str, base.extra_repr(module))  # type: ignore[attr-defined]
    return ""


def _refreshed(model: nn.Module, layers: Any) -> tuple[tuple[Any, ...], ...]:
    """The recorded structure with only ``layers`` (the ones a transform changed) taken from the
    model as it is now: an edit elsewhere, made before the transform, still shows."""
    old = model.__dict__.get(_SHAPE)
    now = structure(model)
    if old is None or not isinstance(layers, dict):
        return now

    def changed(name: str) -> bool:
        return any(name == layer or name.startswith(f"{layer}.") for layer in layers)

    return tuple(tuple(sorted([e for e in o if not changed(e[0])]
                              + [e for e in n if changed(e[0])]))
                 for o, n in zip(old, now, strict=True))


def current_arch(model: nn.Module) -> dict[str, Any] | None:
    """The record, if ``model`` is still what it builds: ``None`` when it has none, or when the
    model was edited since (a module replaced, added or removed, a weight reshaped)."""
    arch = arch_of(model)
    if arch is None or model.__dict__.get(_SHAPE) != structure(model):
        return None
    return arch


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
    shape = _refreshed(model, params.get("layers"))
    model.__dict__[_ATTR] = {**arch, "transforms": transforms}
    model.__dict__[_SHAPE] = shape
