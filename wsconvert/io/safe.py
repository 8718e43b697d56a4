"""Reading files with ``torch.load`` safely: ``weights_only`` unless trusted, allowed classes,
and errors that say what the file is when it is not a checkpoint. ``.safetensors`` files are read
with the ``safetensors`` package (no pickle, so no trust question) as state dicts."""

from __future__ import annotations

import _compat_pickle
import contextlib
import importlib
import io
import json
import os
import pickle
import pickletools
import stat
import struct
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from wsconvert.errors import CheckpointError, UntrustedCheckpointError, UsageError

__all__ = [
    "SAFETENSORS_METADATA_KEY",
    "check_file",
    "cwd_importable",
    "is_dangerous",
    "is_safetensors",
    "read_checkpoint",
    "read_safetensors",
    "unsafe_globals",
]

SAFETENSORS_METADATA_KEY = "_metadata"
"""The safetensors header entry holding a state dict's ``_metadata`` (per-module versions that
``load_state_dict`` hands to ``_load_from_state_dict``) as JSON; written by
:func:`wsconvert.io.atomic.save_safetensors`. Other header entries (``format``) are ignored."""

# Globals whose only use in a pickle is running commands or code, reading or writing files, or
# reaching other globals: never suggested for (nor accepted by) ``allow_classes``. A list can
# never be complete: ``allow_classes`` also accepts only classes (see ``_import_class``).
_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "_posixsubprocess", "sys", "shutil",
                      "socket", "importlib", "runpy", "pty", "code", "codeop", "pickle",
                      "_pickle", "marshal", "ctypes", "webbrowser", "multiprocessing", "tempfile",
                      "asyncio", "signal", "builtins", "io", "_io", "_pyio", "codecs", "cProfile",
                      "profile", "timeit", "pdb", "bdb", "trace", "pydoc", "inspect", "types",
                      "gc", "operator", "threading", "_thread", "concurrent", "urllib", "http",
                      "ftplib", "smtplib", "xmlrpc", "zipimport", "pkgutil", "dill",
                      "cloudpickle", "joblib", "torch.serialization", "torch.hub", "torch.jit",
                      "torch.package", "torch.utils.cpp_extension", "numpy.testing",
                      "numpy.f2py", "numpy.distutils", "zipfile", "tarfile", "shelve", "dbm",
                      "sqlite3", "logging", "mmap", "gzip", "bz2", "lzma", "fcntl", "wave",
                      "aifc", "sunau", "mailbox", "torch._C", "torch.PyTorchFileWriter",
                      "numpy.memmap", "numpy.core.memmap", "numpy._core.memmap")
# Value types: building one runs no code and touches nothing (``slice(1, 2)``, ``complex``).
_SAFE_BUILTINS = {f"builtins.{n}" for n in ("slice", "complex", "range", "bytearray", "bytes",
                                            "frozenset", "set", "int", "float", "bool", "str",
                                            "tuple", "list", "dict")}
# The functions ``allow_classes`` accepts besides classes: numpy's array and scalar rebuilders
# (checkpoints holding numpy values need them; they only build arrays).
_SAFE_FUNCTIONS = {"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                   "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar"}
# Single names in modules that are otherwise fine (the modules above cover builtins, operator,
# torch.hub and torch.jit whole).
_DANGEROUS_NAMES = {"functools.partial", "torch.load", "torch.save", "numpy.load", "numpy.save"}


def is_dangerous(qualname: str) -> bool:
    """A ``MODULE.NAME`` global that runs code or touches files when called from a pickle."""
    if qualname in _SAFE_BUILTINS:
        return False
    if qualname in _DANGEROUS_NAMES:
        return True
    return any(qualname == m or qualname.startswith(m + ".") for m in _DANGEROUS_MODULES)


def check_file(path: Path) -> None:
    """Refuse a missing, directory, non-regular (FIFO, device), unreadable or empty file with a
    one-line reason, without opening anything that could block.

    Raises:
        CheckpointError: naming ``path``.
    """
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(path.stat().st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device); wsconvert "
                              "reads only regular files")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")


def cwd_importable() -> None:
    """Make user model code in the current directory importable, after everything else: the
    directory is appended to ``sys.path``, so a file there named like a standard or installed
    module (``onnx.py``, ``numpy.py``) never shadows it. Called only when a user factory or a
    trusted pickle is about to run."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


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
    if path.suffix == ".py" or head.startswith((b"import ", b"from ", b"#", b'"""')):
        return ("looks like Python source, not a PyTorch checkpoint (code that builds the model "
                "goes in `model` as MODULE:FACTORY)")
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
    if not isinstance(obj, type) and qualname not in _SAFE_FUNCTIONS:
        raise UsageError(f"`allow_classes` {qualname}: refused: not a class; allowing a "
                         "function by name would let the file call it with any arguments")
    real = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if real != qualname:  # another name for it (a re-export): judged by what it is
        _checked_allow(real)
    return obj  # type: ignore[no-any-return]


def _checked_allow(qualname: str) -> str:
    if is_dangerous(qualname):
        raise UsageError(f"`allow_classes` {qualname}: refused: unpickling it runs commands or "
                         "code, or touches files; it is never allowed by name")
    return qualname


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GETS = {"GET", "BINGET", "LONG_BINGET"}


def _pickle_globals(data: bytes) -> list[str]:
    """The globals every pickle in ``data`` would import, read without unpickling (one pickle, or
    the several back-to-back pickles of torch's legacy format). Stops at the first byte that is
    not a pickle (the legacy format's raw tensor data)."""
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[object] = []  # the stack of recent pushes, strings or None
        memo: dict[object, object] = {}
        start = stream.tell()
        try:
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL" and len(strings) >= 2:
                    module, attr = strings[-2], strings[-1]
                    if isinstance(module, str) and isinstance(attr, str):
                        found.append(f"{module}.{attr}")
                if name in _STRING_OPS:
                    strings.append(arg if isinstance(arg, str) else None)
                elif name in _MEMO_PUTS:
                    memo[arg] = strings[-1] if strings else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name in _MEMO_GETS:
                    strings.append(memo.get(arg))
                else:
                    strings.append(None)
        except (ValueError, EOFError, UnicodeDecodeError, KeyError, IndexError):
            break
        if stream.tell() == start:
            break
    # Protocol-2 pickles (torch's legacy format) name Python 2 modules; pickle maps them
    # (``commands.Popen`` is ``subprocess.Popen``), with the same table.
    return list(dict.fromkeys(_python3_name(n) for n in found))


def _python3_name(qualname: str) -> str:
    module, _, attr = qualname.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[(module, attr)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{attr}"


def unsafe_globals(path: Path) -> list[str]:
    """The ``MODULE.NAME`` globals unpickling ``path`` would import beyond what ``weights_only``
    allows (empty when unknown): from the archive's ``data.pkl`` for zip checkpoints, from the
    pickle stream for torch's legacy format and raw pickles."""
    try:
        if zipfile.is_zipfile(path):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            return list(dict.fromkeys(_python3_name(n) for n in names))
        from torch import _weights_only_unpickler as unpickler

        data = path.read_bytes()
        if data[:1] != b"\x80":
            # Not a pickle of protocol 2 or later (torch writes those; text such as a .py file
            # would parse as a protocol-0 pickle and name nonsense "globals").
            return []
        safe = set(unpickler._get_allowed_globals()) | set(
            unpickler._get_user_allowed_globals())  # type: ignore[no-untyped-call]
        return [n for n in _pickle_globals(data) if n not in safe]
    except Exception:  # noqa: BLE001 - only used to enrich an error message
        return []


def _untrusted(path: Path, names: Sequence[str]) -> UntrustedCheckpointError:
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    dangerous = [n for n in names if is_dangerous(n)]
    if dangerous:
        return UntrustedCheckpointError(
            f"{path}: loading would call {', '.join(dangerous[:3])}, which runs commands or "
            f"code (it imports {shown})", "this is not what a model checkpoint needs: pass "
            "`trust=True` only if you made this file yourself")
    return UntrustedCheckpointError(
        f"{path}: loading would import {shown} (unpickling runs code)", "pass `trust=True` if "
        "you trust this file, or `allow_classes=[MODULE.CLASS]` for each class")


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or the format's layout: an 8-byte little-endian header length,
    then a JSON object (a torch zip starts ``PK``, a legacy pickle ``0x80``)."""
    if path.suffix == ".safetensors":
        return True
    try:
        with path.open("rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def read_safetensors(path: str | os.PathLike[str]) -> OrderedDict[str, torch.Tensor]:
    """A ``.safetensors`` file as a state dict on the CPU, with its ``_metadata`` restored from
    the header's :data:`SAFETENSORS_METADATA_KEY` entry when there is one.

    Raises:
        CheckpointError: missing, empty, corrupt, or a header ``_metadata`` that is not JSON.
    """
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    check_file(p)
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:  # type: ignore[no-untyped-call]
            header = dict(f.metadata() or {})
            names = f.keys()  # a safe_open handle is not iterable
            state: OrderedDict[str, torch.Tensor] = OrderedDict(
                (key, f.get_tensor(key)) for key in names)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"{p}: not a readable safetensors file ({reason})") from None
    versions = header.get(SAFETENSORS_METADATA_KEY)
    if versions is not None:
        try:
            metadata = json.loads(versions, object_pairs_hook=OrderedDict)
        except json.JSONDecodeError:
            metadata = None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{p}: safetensors header entry "
                                  f"{SAFETENSORS_METADATA_KEY!r} is not a JSON object")
        state._metadata = metadata  # type: ignore[attr-defined]
    return state


def read_checkpoint(path: str | os.PathLike[str], *, trust: bool = False,
                    allow_classes: Sequence[str] = ()) -> Any:
    """``torch.load`` with the safety rules of wsconvert, on the CPU; a safetensors file (by
    name or content) through :func:`read_safetensors`.

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
    if is_safetensors(p):
        return read_safetensors(p)
    if _is_torchscript(p):
        # torch.load would hand it to torch.jit.load: a compiled program, not a checkpoint.
        raise CheckpointError(f"{p}: {_describe_unreadable(p, RuntimeError())}")
    if trust:
        cwd_importable()
        loader: Callable[[], Any] = lambda: torch.load(p, map_location="cpu", weights_only=False)  # noqa: E731
    else:
        allowed: list[Any] = [_import_class(_checked_allow(q)) for q in allow_classes]

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
        raise _untrusted(p, names) from None
    except ModuleNotFoundError as exc:
        raise CheckpointError(f"{p}: the pickled model needs module {exc.name!r}, which is not "
                              "importable from here") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, KeyError, TypeError,
            IndexError, UnicodeDecodeError, OverflowError, MemoryError, zipfile.BadZipFile,
            ImportError) as exc:
        names = [] if trust else unsafe_globals(p)
        if names:  # a raw pickle: torch reads it as a broken legacy archive
            raise _untrusted(p, names) from None
        raise CheckpointError(f"{p}: {_describe_unreadable(p, exc)}") from None
