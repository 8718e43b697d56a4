"""Every checkpoint read and write of wsconvert.

Input forms:

* a state dict, bare or nested under ``state_dict`` / ``model_state_dict`` / ``model``, with the
  ``module.`` / ``model.`` / ``_orig_mod.`` prefixes that DDP, Lightning and ``torch.compile``
  leave, plus a ``MODULE:FACTORY`` spec that builds the architecture;
* a whole pickled ``nn.Module``, loaded only when the caller trusts the file: unpickling runs code;
* a wsconvert checkpoint (written by :func:`save`), which records how to rebuild the WS model.

Everything is loaded with ``weights_only=True`` unless ``trust`` is given. Outputs are written to
a temporary file beside the target and renamed into place when complete.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsconvert.errors import (
    CheckpointError,
    ModelSpecError,
    OutputExistsError,
    UntrustedCheckpointError,
    UsageError,
)

__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "atomic_output",
    "build_model",
    "is_ws_checkpoint",
    "load",
    "load_model",
    "load_weights_into",
    "read_checkpoint",
    "read_inputs_file",
    "save",
    "save_state_dict",
    "write_text",
]

FORMAT_VERSION = 1
_FORMAT_KEY = "wsconvert_format"
_ARCH_ATTR = "_wsconvert_arch"
_PREFIXES = ("module.", "_orig_mod.", "model.")
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")


@dataclass
class LoadedModel:
    """A model read from disk.

    Attributes:
        model: the module (with WS registered when the file was a wsconvert checkpoint).
        path: the file it came from.
        source: ``state_dict``, ``module`` or ``wsconvert``.
        arch: how to rebuild the architecture (``{"kind": "factory", ...}`` or
            ``{"kind": "pickle"}``).
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
        from wsconvert.surgery import ws_layers

        return next(ws_layers(self.model), None) is not None


# ---------------------------------------------------------------------------- reading raw files


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("constants.pkl") for n in zf.namelist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def _describe_unreadable(path: Path, exc: BaseException) -> str:
    head = path.read_bytes()[:8]
    if zipfile.is_zipfile(path):
        with contextlib.suppress(Exception), zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if any(n.endswith("constants.pkl") for n in names):
                return "is a TorchScript archive, not a checkpoint (load it with torch.jit.load)"
            if not any(n.endswith("data.pkl") for n in names):
                return "is a zip file but not a PyTorch checkpoint"
    if path.suffix == ".onnx" or head[:1] == b"\x08":
        return "looks like an ONNX model, not a PyTorch checkpoint"
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"not a readable PyTorch checkpoint ({reason[:160]})"


def _import_class(qualname: str) -> type:
    module_name, _, attr = qualname.rpartition(".")
    if not module_name:
        raise UsageError(f"--allow-class wants MODULE.CLASS, got {qualname!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any import failure is the same user error
        raise UsageError(f"cannot import allowed class {qualname!r}: {exc}") from None
    if not callable(obj):
        raise UsageError(f"{qualname!r} is not a class or function")
    return obj  # type: ignore[no-any-return]


def read_checkpoint(path: str | os.PathLike[str], *, trust: bool = False,
                    allow_classes: Sequence[str] = ()) -> Any:
    """``torch.load`` with the safety rules of wsconvert, on the CPU.

    Args:
        path: the file.
        trust: allow full unpickling (runs code from the file).
        allow_classes: ``MODULE.CLASS`` names to allow while still refusing everything else.

    Raises:
        CheckpointError: missing, empty, corrupt or not a checkpoint.
        UntrustedCheckpointError: the file needs to run code and ``trust`` was not given.
    """
    p = Path(path)
    _check_file(p)
    if _is_torchscript(p):
        # torch.load would hand it to torch.jit.load: a compiled program, not a checkpoint.
        raise CheckpointError(f"{p}: {_describe_unreadable(p, RuntimeError())}")
    if trust:
        _cwd_importable()
        loader: Callable[[], Any] = lambda: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    else:
        allowed: list[Any] = [_import_class(q) for q in allow_classes]

        def loader() -> Any:
            with torch.serialization.safe_globals(allowed):
                return torch.load(p, map_location="cpu", weights_only=True)
    try:
        with _quiet_warnings():
            return loader()
    except pickle.UnpicklingError as exc:
        names = _unsafe_globals(p)
        if trust or not names:
            raise CheckpointError(f"{p}: {_describe_unreadable(p, exc)}") from None
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise UntrustedCheckpointError(
            f"{p}: loading would import {shown} (unpickling runs code); pass --trust "
            "(trust=True) if you trust this file, or --allow-class MODULE.CLASS "
            "(allow_classes=[...]) for each class"
        ) from None
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"{p}: the pickled model needs module {exc.name!r}, which is not "
                              "importable from here") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError,
            IndexError, UnicodeDecodeError, OverflowError, MemoryError, zipfile.BadZipFile,
            ImportError) as exc:
        raise CheckpointError(f"{p}: {_describe_unreadable(p, exc)}") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return []


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---------------------------------------------------------------------------- models


def build_model(spec: str, kwargs: Mapping[str, Any] | str | None = None) -> nn.Module:
    """Import ``MODULE:FACTORY`` and call it with ``kwargs``; returns the module in eval mode.

    The current directory is importable, as for ``python -m``. This runs the named module's code.

    Raises:
        ModelSpecError: malformed spec, import failure, factory failure, or not an ``nn.Module``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ModelSpecError(
            f"--model wants MODULE:FACTORY (e.g. mypkg.nets:resnet18), got {spec!r}")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(kwargs, dict):
            raise UsageError("--model-kwargs must be a JSON object")
    _cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - user code can raise anything on import
        raise ModelSpecError(f"cannot import {module_name!r} for --model {spec}: "
                             f"{type(exc).__name__}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r} (--model {spec})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"--model {spec}: {attr!r} is not callable")
    try:
        model = obj(**(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - user code can raise anything
        raise ModelSpecError(f"--model {spec} failed to build the model: "
                             f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec} returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _cwd_importable() -> None:
    # As `python -m` does: user model code next to the checkpoint must be importable.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj: Any) -> Any:
    """Find the state dict or module inside common training-framework wrappers."""
    for _ in range(3):
        if isinstance(obj, nn.Module) or _is_state_dict(obj) or not isinstance(obj, Mapping):
            return obj
        for key in _NESTED_KEYS:
            if key in obj and (isinstance(obj[key], nn.Module | Mapping)):
                obj = obj[key]
                break
        else:
            return obj
    return obj


def _strip_prefix(state: Mapping[str, torch.Tensor],
                  wanted: set[str]) -> tuple[dict[str, Any], str]:
    """Remove wrapper prefixes (DDP ``module.``, compile ``_orig_mod.``, Lightning ``model.``)
    that every key has and the model's own keys do not."""
    state = dict(state)
    stripped = ""
    while True:
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state) and not all(
                    k.startswith(prefix) for k in wanted):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped += prefix
                break
        else:
            return state, stripped


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
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_list(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_list(unexpected)})")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped ({_list(misshaped, 2)})")
    if problems:
        raise CheckpointError(f"{where}: state dict does not fit the model: " + "; ".join(problems))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: state dict does not fit the model: "
                              f"{str(exc).splitlines()[0]}") from None


def is_ws_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and _FORMAT_KEY in obj


def load_model(path: str | os.PathLike[str], model: str | None = None,
               model_kwargs: Mapping[str, Any] | str | None = None, *, trust: bool = False,
               allow_classes: Sequence[str] = ()) -> LoadedModel:
    """Load a model from any supported checkpoint form.

    Args:
        path: checkpoint file.
        model: ``MODULE:FACTORY`` building the architecture, for state dicts.
        model_kwargs: keyword arguments for the factory (a mapping or a JSON object string).
        trust: allow unpickling whole modules (runs code from the file).
        allow_classes: ``MODULE.CLASS`` names to allow without full trust.

    Raises:
        CheckpointError, UntrustedCheckpointError, ModelSpecError, UsageError.
    """
    p = Path(path)
    obj = read_checkpoint(p, trust=trust, allow_classes=allow_classes)
    if is_ws_checkpoint(obj):
        return _load_ws(obj, p)
    obj = _unwrap(obj)
    if isinstance(obj, nn.Module):
        arch: dict[str, Any] = {"kind": "pickle"}
        if model is not None:
            note = f"{p} holds a whole module; --model {model} was not used"
            return LoadedModel(obj.eval(), p, "module", arch, notes=[note])
        return LoadedModel(obj.eval(), p, "module", arch)
    if not _is_state_dict(obj):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, neither a state dict nor a "
                              "module")
    if model is None:
        raise UsageError(f"{p} is a state dict: pass --model MODULE:FACTORY to build the "
                         "architecture")
    net = build_model(model, model_kwargs)
    state, prefix = _strip_prefix(obj, set(net.state_dict()))
    load_state_dict_strict(net, state, str(p))
    kwargs = json.loads(model_kwargs) if isinstance(model_kwargs, str) else dict(model_kwargs or {})
    arch = {"kind": "factory", "factory": model, "kwargs": kwargs}
    net.__dict__[_ARCH_ATTR] = arch
    return LoadedModel(net, p, "state_dict", arch, stripped_prefix=prefix)


def _load_ws(obj: Mapping[str, Any], path: Path) -> LoadedModel:
    from wsconvert.surgery import restore_ws

    version = obj.get(_FORMAT_KEY)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: wsconvert format {version!r} is newer than this "
                              f"wsconvert understands ({FORMAT_VERSION})")
    try:
        arch = dict(obj["arch"])
        configs = dict(obj["ws_layers"])
        state = obj["state_dict"]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: wsconvert checkpoint is incomplete") from None
    if arch.get("kind") == "factory":
        net = build_model(str(arch["factory"]), arch.get("kwargs") or {})
        restore_ws(net, configs)
        load_state_dict_strict(net, state, str(path))
    elif arch.get("kind") == "pickle" and isinstance(obj.get("module"), nn.Module):
        net = obj["module"]
        restore_ws(net, configs)
        # The pickled module already holds the trainable weights; the state dict has the rest.
        missing, unexpected = net.load_state_dict(state, strict=False)
        lost = [k for k in missing if ".parametrizations.weight.0." in k]
        if unexpected or lost:
            raise CheckpointError(f"{path}: wsconvert checkpoint does not fit its own module")
    else:
        raise CheckpointError(f"{path}: wsconvert checkpoint has an unknown architecture record")
    net.__dict__[_ARCH_ATTR] = arch
    return LoadedModel(net.eval(), path, "wsconvert", arch)


def read_inputs_file(path: str | os.PathLike[str]) -> Any:
    """Sample inputs from disk, never unpickling: ``.npz`` (a dict of tensors in key order) and
    ``.npy`` (a tensor) through numpy with ``allow_pickle=False``; anything else as a
    ``weights_only`` checkpoint (see :func:`read_checkpoint`).

    Raises:
        CheckpointError: missing, empty or unreadable.
    """
    p = Path(path)
    _check_file(p)
    if p.suffix not in (".npz", ".npy"):
        return read_checkpoint(p)
    import numpy as np

    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: torch.from_numpy(loaded[k]) for k in loaded.files}
        return torch.from_numpy(loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else (
            type(exc).__name__)
        raise CheckpointError(f"{p}: not a readable numpy file ({reason})") from None


def load_weights_into(model: nn.Module, path: str | os.PathLike[str], *,
                      trust: bool = False, allow_classes: Sequence[str] = ()) -> str:
    """Load a state dict file (any wrapper / prefix form) into ``model`` strictly.

    Used to put a training loop's ``torch.save(model.state_dict())`` of a WS model back into the
    WS architecture rebuilt from its ``apply`` output. Returns the stripped key prefix.

    Raises:
        CheckpointError: unreadable, not a state dict, or keys that do not fit.
    """
    p = Path(path)
    obj = _unwrap(read_checkpoint(p, trust=trust, allow_classes=allow_classes))
    if is_ws_checkpoint(obj):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not _is_state_dict(obj):
        raise CheckpointError(f"{p}: holds a {type(obj).__name__}, not a state dict")
    state, prefix = _strip_prefix(obj, set(model.state_dict()))
    load_state_dict_strict(model, state, str(p))
    return prefix


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a report file atomically (replacing an older report)."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)
    return Path(path)


def load(path: str | os.PathLike[str], *, trust: bool = False,
         allow_classes: Sequence[str] = ()) -> nn.Module:
    """Load a WS model written by ``wsconvert apply`` or :func:`save`, ready to train.

    Args:
        path: the wsconvert checkpoint.
        trust: needed when the original model was a pickled module.
        allow_classes: ``MODULE.CLASS`` names to allow without full trust.

    Raises:
        CheckpointError: not a wsconvert checkpoint, or unreadable.

    Example:
        >>> model = wsconvert.load("resnet.ws.pt")          # doctest: +SKIP
        >>> model.train()                                   # doctest: +SKIP
    """
    p = Path(path)
    obj = read_checkpoint(p, trust=trust, allow_classes=allow_classes)
    if not is_ws_checkpoint(obj):
        raise CheckpointError(f"{p}: not a wsconvert checkpoint (write one with `wsconvert apply`)")
    return _load_ws(obj, p).model.train()


# ---------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False,
                  protect: Sequence[str | os.PathLike[str]] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Args:
        path: the final output.
        force: allow replacing an existing file.
        protect: inputs that must never be the output.

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.
        UsageError: ``path`` is one of ``protect``, a directory, or its directory is not writable.
    """
    target = Path(path)
    for q in protect:
        if Path(q).exists() and target.exists() and target.resolve() == Path(q).resolve():
            raise UsageError(f"{target}: output would overwrite the input")
    if target.is_dir():
        raise UsageError(f"{target}: output path is a directory")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists (pass --force to overwrite)")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"{target}: output directory {parent} does not exist")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write to {parent} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _save_bytes(obj: Any, tmp: Path) -> None:
    # A file object, not a path: torch names the archive after a path's stem, and temp names vary.
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save(model: nn.Module, path: str | os.PathLike[str], *, force: bool = False,
         protect: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Write a WS model as a wsconvert checkpoint that :func:`load` rebuilds with nothing else.

    Models built from a ``MODULE:FACTORY`` spec are stored as a state dict plus that spec (loads
    with ``weights_only=True``); others as a pickled base module (loading needs ``trust``).

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.

    Example:
        >>> wsconvert.save(model, "finetuned.ws.pt")       # doctest: +SKIP
    """
    from wsconvert import __version__
    from wsconvert.surgery import unregister_ws, ws_layer_configs

    configs = ws_layer_configs(model)
    arch = dict(model.__dict__.get(_ARCH_ATTR) or {"kind": "pickle"})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {_FORMAT_KEY: FORMAT_VERSION, "wsconvert_version": __version__,
                               "arch": arch, "ws_layers": configs}
    if arch["kind"] == "pickle":
        import copy

        base = copy.deepcopy(model)
        for name, module in base.named_modules():
            if name in configs:
                unregister_ws(module)
        base.__dict__.pop(_ARCH_ATTR, None)
        base_keys = set(base.state_dict())
        payload["module"] = base
        state = {k: v for k, v in state.items() if k not in base_keys
                 and not k.endswith(".parametrizations.weight.original")}
    payload["state_dict"] = state
    with atomic_output(path, force=force, protect=protect) as tmp:
        _save_bytes(payload, tmp)
    return Path(path)


def save_state_dict(state: Mapping[str, torch.Tensor] | nn.Module | tuple[torch.Tensor, ...],
                    path: str | os.PathLike[str], *, force: bool = False,
                    protect: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Write a plain state dict (or a whole module, or a tuple of input tensors) atomically."""
    with atomic_output(path, force=force, protect=protect) as tmp:
        _save_bytes(state, tmp)
    return Path(path)
