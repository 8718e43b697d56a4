"""The wsconvert checkpoint format, and loading a model from any supported checkpoint form.

Input forms of :func:`load_model`:

* a state dict, bare or nested under ``state_dict`` / ``model_state_dict`` / ``model``, with the
  ``module.`` / ``model.`` / ``_orig_mod.`` prefixes that DDP, Lightning and ``torch.compile``
  leave, plus a ``MODULE:FACTORY`` spec that builds the architecture;
* a whole pickled ``nn.Module``, loaded only when the caller trusts the file: unpickling runs code;
* a wsconvert checkpoint (written by :func:`save`), which records how to rebuild the WS model.

A wsconvert checkpoint is a dict: ``wsconvert_format`` (:data:`FORMAT_VERSION`),
``wsconvert_version``, ``arch`` (the record of :mod:`wsconvert.io.arch`), ``ws_layers`` (the WS
settings per layer), ``state_dict``, and for ``{"kind": "pickle"}`` the base ``module``. Format 1
recorded a GroupNorm swap as the factory ``wsconvert.norms:build_with_group_norm``; it loads as
the equivalent format-2 ``group_norm`` transform.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from wsconvert import __version__
from wsconvert.errors import (
    CheckpointError,
    ConversionError,
    ModelSpecError,
    UntrustedCheckpointError,
    UsageError,
)
from wsconvert.io.arch import arch_of, current_arch, set_arch
from wsconvert.io.atomic import atomic_output, save_bytes
from wsconvert.io.safe import read_checkpoint
from wsconvert.io.spec import BUNDLED_FACTORIES, build_model, parse_kwargs
from wsconvert.io.state import (
    WS_FORMAT_KEY,
    is_state_dict,
    load_state_dict_strict,
    rekeyed,
    strip_prefix,
    unwrap,
)
from wsconvert.norms import restore_group_norm
from wsconvert.surgery import restore_ws, unregister_ws, ws_layer_configs, ws_layers
from wsconvert.ws import standardize_ahead

__all__ = ["FORMAT_VERSION", "TRANSFORMS", "LoadedModel", "check_finite", "is_ws_checkpoint",
           "load", "load_model", "save"]

FORMAT_VERSION = 2
_V1_GROUP_NORM_FACTORY = "wsconvert.norms:build_with_group_norm"

TRANSFORMS: dict[str, Callable[[nn.Module, Mapping[str, Any]], None]] = {
    "group_norm": lambda model, t: restore_group_norm(model, t.get("layers") or {}),
}
"""Architecture transforms a checkpoint may name, each ``(model, record) -> None`` in place."""


@dataclass
class LoadedModel:
    """A model read from disk.

    Attributes:
        model: the module (with WS registered when the file was a wsconvert checkpoint).
        path: the file it came from.
        source: ``state_dict``, ``module`` or ``wsconvert``.
        arch: how to rebuild the architecture (see :mod:`wsconvert.io.arch`).
        stripped_prefix: the key prefix removed from a state dict (``""`` if none).
        notes: non-fatal observations worth showing the user.
    """

    model: nn.Module
    path: Path
    source: str
    arch: dict[str, Any]
    stripped_prefix: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def has_ws(self) -> bool:
        return next(ws_layers(self.model), None) is not None


def is_ws_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and WS_FORMAT_KEY in obj


def check_finite(model: nn.Module, where: str, *, allow_nonfinite: bool = False) -> None:
    """Refuse weights or statistics holding NaN or inf (a diverged run, a corrupted file).

    Raises:
        CheckpointError: naming the first offending entries, unless ``allow_nonfinite``.
    """
    if allow_nonfinite:
        return
    bad = [k for k, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:4]) + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else "")
        raise CheckpointError(f"{where}: non-finite values (NaN or inf) in {shown}; pass "
                              "`allow_nonfinite=True` to load it anyway")


def load_model(path: str | os.PathLike[str], model: str | None = None,
               model_kwargs: Mapping[str, Any] | str | None = None, *, trust: bool = False,
               allow_classes: Sequence[str] = (), allow_nonfinite: bool = False) -> LoadedModel:
    """Load a model from any supported checkpoint form.

    A wsconvert checkpoint records the ``MODULE:FACTORY`` that rebuilds its architecture. Running
    a factory named in a file needs consent, as running its code would: ``model`` naming the same
    factory (checked against the record), or ``trust``. wsconvert's own builders
    (:data:`~wsconvert.io.spec.BUNDLED_FACTORIES`) need none.

    Args:
        path: checkpoint file.
        model: ``MODULE:FACTORY`` building the architecture, for state dicts; for a wsconvert
            checkpoint, the consent to run the factory it records (must be the same).
        model_kwargs: keyword arguments for the factory (a mapping or a JSON object string); for
            a wsconvert checkpoint, when given, must equal the recorded ones.
        trust: allow unpickling whole modules, and running a recorded factory (runs code).
        allow_classes: ``MODULE.CLASS`` names to allow without full trust.
        allow_nonfinite: accept NaN / inf weights and statistics.

    Raises:
        CheckpointError, UntrustedCheckpointError, ModelSpecError, UsageError.
    """
    p = Path(path)
    obj = read_checkpoint(p, trust=trust, allow_classes=allow_classes)
    if is_ws_checkpoint(obj):
        loaded = _load_ws(obj, p, model, model_kwargs, trust=trust)
        check_finite(loaded.model, str(p), allow_nonfinite=allow_nonfinite)
        return loaded
    obj = unwrap(obj)
    if isinstance(obj, nn.Module):
        arch: dict[str, Any] = {"kind": "pickle"}
        check_finite(obj, str(p), allow_nonfinite=allow_nonfinite)
        if model is not None:
            note = f"{p} holds a whole module; `model` {model} was not used"
            return LoadedModel(obj.eval(), p, "module", arch, notes=[note])
        return LoadedModel(obj.eval(), p, "module", arch)
    if not is_state_dict(obj):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, neither a state dict nor a "
                              "module")
    if model is None:
        raise UsageError(f"{p} is a state dict: pass `model` MODULE:FACTORY to build the "
                         "architecture")
    net = build_model(model, model_kwargs)
    state, prefix = strip_prefix(obj, set(net.state_dict()))
    load_state_dict_strict(net, state, str(p))
    check_finite(net, str(p), allow_nonfinite=allow_nonfinite)
    arch = {"kind": "factory", "factory": model, "kwargs": parse_kwargs(model_kwargs)}
    set_arch(net, arch)
    return LoadedModel(net, p, "state_dict", arch, stripped_prefix=prefix)


def _consent(arch: Mapping[str, Any], path: Path, model: str | None,
             model_kwargs: Mapping[str, Any] | str | None, trust: bool) -> None:
    """Allow running the factory a checkpoint records only with the caller's consent.

    Raises:
        UsageError: ``model`` / ``model_kwargs`` given and not the recorded ones.
        UntrustedCheckpointError: no consent for a factory that is not wsconvert's own.
    """
    factory = str(arch.get("factory"))
    recorded = dict(arch.get("kwargs") or {})
    if model is not None:
        if model != factory:
            raise UsageError(f"{path}: the file records the factory {factory}, not `model` "
                             f"{model}; pass `model='{factory}'` to rebuild it with that factory")
        if model_kwargs is not None and parse_kwargs(model_kwargs) != recorded:
            raise UsageError(f"{path}: `model_kwargs` {parse_kwargs(model_kwargs)} differ from "
                             f"the recorded {recorded}; leave `model_kwargs` out")
        return
    if trust or factory in BUNDLED_FACTORIES:
        return
    shown = f"{factory}(**{recorded})" if recorded else factory
    raise UntrustedCheckpointError(
        f"{path}: rebuilding its model calls {shown}, a factory named in the file (running it "
        f"runs that module's code)", f"pass `model='{factory}'` to consent if you trust it, or "
        "`trust=True`")


def _upgrade(arch: dict[str, Any]) -> dict[str, Any]:
    """A format-1 architecture record as format 2."""
    if arch.get("kind") == "factory" and arch.get("factory") == _V1_GROUP_NORM_FACTORY:
        kwargs = dict(arch.get("kwargs") or {})
        return {"kind": "factory", "factory": kwargs.get("factory"),
                "kwargs": dict(kwargs.get("kwargs") or {}),
                "transforms": [{"transform": "group_norm",
                                "layers": dict(kwargs.get("norms") or {})}]}
    return arch


_FLOAT_DTYPES = {str(d).replace("torch.", ""): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64)}
"""The dtype names a checkpoint's ``buffer_dtypes`` may hold (read through this table, never
looked up on ``torch`` by a name the file gives)."""


def _check_shapes(arch: Mapping[str, Any], configs: Mapping[str, Any], state: Any,
                  path: Path, extra: Mapping[str, Any]) -> None:
    """Refuse records whose parts have the wrong type (an edited or corrupted file).

    Raises:
        CheckpointError: naming the part.
    """
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: wsconvert checkpoint is malformed: {what}")

    if not isinstance(arch.get("kwargs") or {}, Mapping):
        raise bad("the factory's kwargs are not a mapping")
    transforms = arch.get("transforms") or []
    if not isinstance(transforms, list) or not all(isinstance(t, Mapping) for t in transforms):
        raise bad("the architecture transforms are not a list of records")
    for t in transforms:
        layers = t.get("layers") or {}
        if not isinstance(layers, Mapping) or not all(
                isinstance(k, str) and isinstance(v, Mapping) for k, v in layers.items()):
            raise bad(f"transform {t.get('transform')!r} does not map layer names to records")
    if not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in configs.items()):
        raise bad("the WS layer records do not map layer names to records")
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise bad("the state dict does not map names to tensors")
    frozen = extra.get("frozen") or []
    if not isinstance(frozen, list) or not all(isinstance(k, str) for k in frozen):
        raise bad("the frozen parameters are not a list of names")
    buffer_dtypes = extra.get("buffer_dtypes") or {}
    if not isinstance(buffer_dtypes, Mapping) or not all(
            isinstance(k, str) and v in _FLOAT_DTYPES for k, v in buffer_dtypes.items()):
        raise bad("the buffer dtypes are not a mapping of names to floating-point dtypes")


def _build(arch: Mapping[str, Any], path: Path) -> nn.Module:
    net = build_model(str(arch["factory"]), arch.get("kwargs") or {})
    for record in arch.get("transforms") or []:
        apply = TRANSFORMS.get(str(record.get("transform")))
        if apply is None:
            raise CheckpointError(f"{path}: unknown architecture transform "
                                  f"{record.get('transform')!r}")
        apply(net, record)
    return net


def _match_dtypes(net: nn.Module, state: Mapping[str, torch.Tensor],
                  buffer_dtypes: Mapping[str, str]) -> None:
    """Give the rebuilt model's floating parameters and buffers the dtypes they were saved in
    (a model cast to bfloat16 comes back in bfloat16; ``load_state_dict`` would cast the values
    to the factory's dtype). Buffers the state dict leaves out (non-persistent) take the dtype
    the file records for them."""
    own = {**dict(net.named_parameters(remove_duplicate=False)),
           **dict(net.named_buffers(remove_duplicate=False))}
    wanted = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    for key, name in buffer_dtypes.items():
        wanted.setdefault(key, _FLOAT_DTYPES[name])
    for key, dtype in wanted.items():
        t = own.get(key)
        if t is not None and t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)


def _load_ws(obj: Mapping[str, Any], path: Path, model: str | None = None,
             model_kwargs: Mapping[str, Any] | str | None = None, *,
             trust: bool = False) -> LoadedModel:
    version = obj.get(WS_FORMAT_KEY)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: wsconvert format {version!r} is newer than this "
                              f"wsconvert understands ({FORMAT_VERSION})")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: wsconvert format {version!r} is not a format this "
                              f"wsconvert knows (1 to {FORMAT_VERSION})")
    try:
        arch = dict(obj["arch"])
        configs = dict(obj["ws_layers"])
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: wsconvert checkpoint is incomplete") from None
    arch = _upgrade(arch)  # a format-1 record, in whatever file it comes
    _check_shapes(arch, configs, state, path, obj)
    if arch.get("kind") == "factory":
        _consent(arch, path, model, model_kwargs, trust)
        try:
            net = _build(arch, path)
            restore_ws(net, configs)
        except (UsageError, ModelSpecError, ConversionError) as exc:
            # Values read from the file, not arguments: no flag to blame (backticks would make
            # the CLI name one the user never passed).
            detail = str(exc).replace("`", "")
            raise CheckpointError(f"{path}: its recorded architecture cannot be rebuilt: "
                                  f"{detail}") from None
        _match_dtypes(net, state, obj.get("buffer_dtypes") or {})
        load_state_dict_strict(net, state, str(path))
    elif arch.get("kind") == "pickle" and isinstance(obj.get("module"), nn.Module):
        if model is not None:
            edited = arch.get("edited_from")
            why = (f"the model was edited after it was built from {edited}, so it was saved "
                   "whole" if isinstance(edited, str) else "no factory to rebuild")
            raise UsageError(f"{path}: holds a pickled module ({why}); `model` does not apply, "
                             "leave it out")
        net = obj["module"]
        restore_ws(net, configs)
        # The pickled module already holds the trainable weights; the state dict has the rest.
        missing, unexpected = net.load_state_dict(state, strict=False)
        lost = [k for k in missing if ".parametrizations.weight.0." in k]
        if unexpected or lost:
            raise CheckpointError(f"{path}: wsconvert checkpoint does not fit its own module")
    else:
        raise CheckpointError(f"{path}: wsconvert checkpoint has an unknown architecture record")
    params = dict(net.named_parameters(remove_duplicate=False))
    for name in obj.get("frozen") or []:
        if name in params:
            params[name].requires_grad_(False)
    set_arch(net, arch)
    return LoadedModel(net.eval(), path, "wsconvert", arch)


def load(path: str | os.PathLike[str], *, model: str | None = None,
         model_kwargs: Mapping[str, Any] | str | None = None, trust: bool = False,
         allow_classes: Sequence[str] = (), allow_nonfinite: bool = False) -> nn.Module:
    """Load a WS model written by ``wsconvert apply`` or :func:`save`, ready to train.

    Args:
        path: the wsconvert checkpoint.
        model: the ``MODULE:FACTORY`` the file records: consent to run it (wsconvert's own
            builders need none).
        model_kwargs: when given, must equal the recorded keyword arguments.
        trust: consent to run the recorded factory; needed too when the original model was a
            pickled module.
        allow_classes: ``MODULE.CLASS`` names to allow without full trust.
        allow_nonfinite: accept NaN / inf weights and statistics.

    Raises:
        CheckpointError: not a wsconvert checkpoint, unreadable, or non-finite values.
        UntrustedCheckpointError: a recorded factory without consent.

    Example:
        >>> model = wsconvert.load("resnet.ws.pt", model="torchvision.models:resnet50")
        ... # doctest: +SKIP
        >>> model.train()                                   # doctest: +SKIP
    """
    p = Path(path)
    obj = read_checkpoint(p, trust=trust, allow_classes=allow_classes)
    if not is_ws_checkpoint(obj):
        raise CheckpointError(f"{p}: not a wsconvert checkpoint (write one with `wsconvert apply`)")
    loaded = _load_ws(obj, p, model, model_kwargs, trust=trust)
    check_finite(loaded.model, str(p), allow_nonfinite=allow_nonfinite)
    return loaded.model.train()


def ws_payload(model: nn.Module) -> dict[str, Any]:
    """What :func:`save` writes for ``model``."""
    configs = ws_layer_configs(model)
    recorded = arch_of(model)
    arch = dict(current_arch(model) or {"kind": "pickle"})
    if recorded is not None and recorded.get("kind") == "factory" and arch["kind"] == "pickle":
        # Edited since it was built: the factory would rebuild another model. Stored whole.
        arch["edited_from"] = str(recorded.get("factory"))
    state = rekeyed(model.state_dict(), lambda k: k)
    for k, v in state.items():
        state[k] = v.detach().clone()
    payload: dict[str, Any] = {WS_FORMAT_KEY: FORMAT_VERSION, "wsconvert_version": __version__,
                               "arch": arch, "ws_layers": configs}
    if arch["kind"] == "pickle":
        base = copy.deepcopy(model)
        standardize_ahead(base, enable=False)  # a training setting, not part of the model
        for name, module in base.named_modules():
            if name in configs:
                unregister_ws(module)
        set_arch(base, None)
        others = [name or "<root>" for name, m in base.named_modules()
                  if parametrize.is_parametrized(m)]
        if others:
            raise UsageError(f"layer {others[0]} carries a parametrization other than WS, which "
                             "torch cannot pickle and no factory rebuilds: remove it first "
                             "(torch.nn.utils.parametrize.remove_parametrizations)")
        base_keys = set(base.state_dict())
        payload["module"] = base
        state = rekeyed(state, lambda k: None if k in base_keys or k.endswith(
            ".parametrizations.weight.original") else k)
    else:
        # Buffers a state dict leaves out (non-persistent) are rebuilt by the factory: their
        # dtype (model.to(dtype) moved them) is recorded beside it.
        payload["buffer_dtypes"] = {
            k: str(v.dtype).replace("torch.", "")
            for k, v in model.named_buffers(remove_duplicate=False)
            if k not in state and str(v.dtype).replace("torch.", "") in _FLOAT_DTYPES}
    # A state dict keeps values, not which parameters were frozen (nor does restoring WS on a
    # pickled base, which makes gains afresh): recorded beside it.
    payload["frozen"] = sorted(k for k, v in model.named_parameters(remove_duplicate=False)
                               if not v.requires_grad)
    payload["state_dict"] = state
    return payload


def save(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False,
         protect: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Write a WS model as a wsconvert checkpoint that :func:`load` rebuilds with nothing else.

    Models built from a ``MODULE:FACTORY`` spec are stored as a state dict plus that spec (loads
    with ``weights_only=True``; frozen parameters and dtypes come back as saved); others as a
    pickled base module (loading needs ``trust``). A model edited after it was built (a module
    replaced, added or removed: a new head, say) is one of the others: its factory would
    rebuild a different model.

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.

    Example:
        >>> wsconvert.save(model, "finetuned.ws.pt")       # doctest: +SKIP
    """
    payload = ws_payload(model)
    with atomic_output(path, force=force, protect=protect) as tmp:
        save_bytes(payload, tmp)
    return Path(path)
