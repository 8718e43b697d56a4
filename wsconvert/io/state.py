"""State dicts: find one inside training-framework wrappers, strip wrapper key prefixes, load it
strictly with every misfit listed. A state dict's ``_metadata`` (per-module versions that
``load_state_dict`` hands to ``_load_from_state_dict``) survives every transform here."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsconvert.errors import CheckpointError
from wsconvert.io.safe import read_checkpoint

__all__ = [
    "is_state_dict",
    "load_state_dict_strict",
    "load_weights_into",
    "rekeyed",
    "strip_prefix",
    "unwrap",
]

WS_FORMAT_KEY = "wsconvert_format"
"""The key that marks a wsconvert checkpoint (see :mod:`wsconvert.io.wsfile`)."""
_PREFIXES = ("module.", "_orig_mod.", "model.")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def rekeyed(state: Mapping[str, Any], rename: Callable[[str], str | None]
            ) -> OrderedDict[str, Any]:
    """``state`` with every key renamed by ``rename`` (``None`` drops the entry), ``_metadata``
    renamed the same way (its keys are module prefixes, ``""`` for the root)."""
    out: OrderedDict[str, Any] = OrderedDict()
    for key, value in state.items():
        new = rename(key)
        if new is not None:
            out[new] = value
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        kept: OrderedDict[str, Any] = OrderedDict()
        for key, value in metadata.items():
            # A module prefix renames as its first key would: "module.layer1" -> "layer1".
            new = rename(f"{key}.") if key else ""
            if new is not None:
                kept[new.rstrip(".") if key else ""] = value
        out._metadata = kept  # type: ignore[attr-defined]
    return out


def unwrap(obj: Any) -> Any:
    """Find the state dict or module inside common training-framework wrappers."""
    for _ in range(3):
        if isinstance(obj, nn.Module) or is_state_dict(obj) or not isinstance(obj, Mapping):
            return obj
        for key in _NESTED_KEYS:
            if key in obj and (isinstance(obj[key], nn.Module | Mapping)):
                obj = obj[key]
                break
        else:
            return obj
    return obj


def strip_prefix(state: Mapping[str, torch.Tensor],
                 wanted: set[str]) -> tuple[OrderedDict[str, Any], str]:
    """Remove wrapper prefixes (DDP ``module.``, compile ``_orig_mod.``, Lightning ``model.``)
    that every key has and the model's own keys do not. Returns the state and what was removed."""
    out = rekeyed(state, lambda k: k)
    stripped = ""
    while True:
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in out) and not all(
                    k.startswith(prefix) for k in wanted):
                out = rekeyed(out, lambda k, n=len(prefix): k[n:])  # type: ignore[misc]
                stripped += prefix
                break
        else:
            return out, stripped


def _list(names: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``, listing every missing, unexpected and mis-shaped key.

    Raises:
        CheckpointError: any key does not fit.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    # Integer, bool or 8-bit float values would be cast silently into the model's floats: a
    # quantized or mislabeled file, not the weights it claims to be.
    mistyped = [f"{k} {str(state[k].dtype).replace('torch.', '')} for "
                f"{str(own[k].dtype).replace('torch.', '')}"
                for k in own if k in state and own[k].is_floating_point()
                and (not state[k].is_floating_point()
                     or (state[k].element_size() == 1 and own[k].element_size() != 1))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_list(unexpected)})")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped ({_list(misshaped, 2)})")
    if mistyped:
        problems.append(f"{len(mistyped)} not floating point ({_list(mistyped, 2)})")
    if problems:
        raise CheckpointError(f"{where}: state dict does not fit the model: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: state dict does not fit the model: "
                              f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # noqa: BLE001 - a module's own loader can raise anything
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{where}: {_refusing_module(model, exc)} refuses the state dict: "
                              f"{type(exc).__name__}: {reason}") from None


def _refusing_module(model: nn.Module, exc: BaseException) -> str:
    """``layers.0 (MNASNet, torchvision.models.mnasnet)``: the innermost module of ``model``
    whose ``_load_from_state_dict`` raised (from the traceback), else the model itself."""
    names = {id(m): name for name, m in model.named_modules()}
    found: nn.Module = model
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            found = owner
        tb = tb.tb_next
    cls = type(found)
    return f"{names[id(found)] or '<root>'} ({cls.__qualname__}, {cls.__module__})"


def load_weights_into(model: nn.Module, path: str | os.PathLike[str], *,
                      trust: bool = False, allow_classes: Sequence[str] = ()) -> str:
    """Load a state dict file (any wrapper / prefix form) into ``model`` strictly.

    Used to put a training loop's ``torch.save(model.state_dict())`` of a WS model back into the
    WS architecture rebuilt from its ``apply`` output. Returns the stripped key prefix.

    Raises:
        CheckpointError: unreadable, not a state dict, or keys that do not fit.
    """
    p = Path(path)
    obj = unwrap(read_checkpoint(p, trust=trust, allow_classes=allow_classes))
    if isinstance(obj, Mapping) and WS_FORMAT_KEY in obj:
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not is_state_dict(obj):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    state, prefix = strip_prefix(obj, set(model.state_dict()))
    load_state_dict_strict(model, state, str(p))
    return prefix
