"""Reading files with ``torch.load`` safely: ``weights_only`` unless trusted, allowed classes,
and errors that say what the file is when it is not a checkpoint."""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from wsconvert.errors import CheckpointError, UntrustedCheckpointError, UsageError

__all__ = ["check_file", "cwd_importable", "read_checkpoint", "unsafe_globals"]


def check_file(path: Path) -> None:
    """Refuse a missing, directory, unreadable or empty file with a one-line reason.

    Raises:
        CheckpointError: naming ``path``.
    """
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


def cwd_importable() -> None:
    """As ``python -m`` does: user model code next to the checkpoint must be importable."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


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
        raise UsageError(f"`allow_classes` wants MODULE.CLASS, got {qualname!r}")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except Exception as exc:  # noqa: BLE001 - any import failure is the same user error
        raise UsageError(f"cannot import allowed class {qualname!r}: {exc}") from None
    if not callable(obj):
        raise UsageError(f"{qualname!r} is not a class or function")
    return obj  # type: ignore[no-any-return]


def unsafe_globals(path: Path) -> list[str]:
    """The ``MODULE.NAME`` globals unpickling ``path`` would import (empty when unknown)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return []


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


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
    check_file(p)
    if _is_torchscript(p):
        # torch.load would hand it to torch.jit.load: a compiled program, not a checkpoint.
        raise CheckpointError(f"{p}: {_describe_unreadable(p, RuntimeError())}")
    if trust:
        cwd_importable()
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
        names = unsafe_globals(p)
        if trust or not names:
            raise CheckpointError(f"{p}: {_describe_unreadable(p, exc)}") from None
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise UntrustedCheckpointError(
            f"{p}: loading would import {shown} (unpickling runs code); pass `trust=True` if you "
            "trust this file, or `allow_classes=[MODULE.CLASS]` for each class") from None
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"{p}: the pickled model needs module {exc.name!r}, which is not "
                              "importable from here") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError,
            IndexError, UnicodeDecodeError, OverflowError, MemoryError, zipfile.BadZipFile,
            ImportError) as exc:
        raise CheckpointError(f"{p}: {_describe_unreadable(p, exc)}") from None
