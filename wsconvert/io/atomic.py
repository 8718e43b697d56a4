"""Writing outputs: every file goes to a temporary name beside its target and is renamed into
place when complete. :class:`OutputSet` does this for several outputs at once: all are checked
before any work, and all are committed only when every stage succeeded."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsconvert.errors import OutputExistsError, UsageError

__all__ = [
    "OutputSet",
    "Protected",
    "atomic_output",
    "check_output",
    "check_weights_output",
    "identity",
    "save_bytes",
    "save_safetensors",
    "save_state_dict",
    "save_weights",
    "write_text",
]

PathLike = str | os.PathLike[str]
Protected = PathLike | tuple[str, PathLike]
"""An input that no output may replace: a path, or ``(parameter, path)`` to name it in errors."""


def identity(path: PathLike) -> tuple[Any, ...]:
    """Which file ``path`` names: its device and inode when it exists (symlinks followed, so
    links and hard links to one file are the same), else its resolved path."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return ("path", real)
    return ("inode", st.st_dev, st.st_ino)


def _label(name: str | None, path: PathLike) -> str:
    return f"`{name}` {path}" if name else str(path)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_output(path: PathLike, *, force: bool = False, protect: Sequence[Protected] = (),
                 name: str | None = None, replace: bool = False,
                 parent_may_be_missing: bool = False) -> Path:
    """Refuse an output that cannot or may not be written, before any work is done; return the
    path to write.

    Rules: an output is never an input (the same file, through symlinks and hard links too); it
    is a regular file or does not exist yet (directories, FIFOs, devices and sockets are refused,
    even with ``force``); an existing file is replaced only with ``force`` (or ``replace``, for
    reports); a symlink at the output path is refused without ``force``, and with ``force`` the
    file it points to is written (a dangling link's target is created), the link kept.

    Args:
        path: the output as given.
        force: allow replacing an existing file and writing through a symlink.
        protect: the run's inputs.
        name: the parameter the path was given as, for error messages.
        replace: allow replacing an existing regular file without ``force``.
        parent_may_be_missing: the directory is created later (``save_failing``).

    Raises:
        OutputExistsError: exists (or is a symlink) and not ``force``.
        UsageError: an input, not a regular file, or its directory is missing.
    """
    target = Path(path)
    label = _label(name, target)
    ident = identity(target)
    for q in protect:
        q_name, q_path = q if isinstance(q, tuple) else (None, q)
        if os.path.exists(q_path) and identity(q_path) == ident:
            raise UsageError(f"{label}: would overwrite the input {_label(q_name, q_path)}; "
                             "an output never replaces an input")
    write = target
    if target.is_symlink():
        if not force:
            raise OutputExistsError(f"{label}: is a symbolic link (to {os.readlink(target)}); "
                                    "pass `force=True` to write the file it points to")
        write = Path(os.path.realpath(target))
    try:
        mode: int | None = os.stat(write).st_mode
    except OSError:
        mode = None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise UsageError(f"{label}: output path is a directory")
        if not stat.S_ISREG(mode):
            raise UsageError(f"{label}: is {_kind(mode)}, not a regular file; outputs are only "
                             "written to regular files")
        if not (force or replace):
            raise OutputExistsError(f"{label}: already exists (pass `force=True` to overwrite)")
    if not parent_may_be_missing and not write.parent.is_dir():
        raise UsageError(f"{label}: output directory {write.parent} does not exist")
    _check_writable(write.parent, label)
    return write


def _check_writable(directory: Path, label: str) -> None:
    """The directory that will hold an output (or, when it does not exist yet, the nearest one
    that does, where it will be made) is writable: found now, not after the work."""
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    if not d.is_dir():
        raise UsageError(f"{label}: {d} is not a directory, so nothing can be written under it")
    if not os.access(d, os.W_OK | os.X_OK):
        raise UsageError(f"{label}: cannot write to {d} (permission denied)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: PathLike, *, force: bool = False,
                  protect: Sequence[Protected] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.
    The file gets the permissions ``open()`` would give it (``0o666`` less the umask).

    Args:
        path: the final output.
        force: allow replacing an existing file (see :func:`check_output` for every rule).
        protect: inputs that must never be the output.

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.
        UsageError: see :func:`check_output`, or the directory is not writable.
    """
    target = check_output(path, force=force, protect=protect)
    parent = target.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:
        raise UsageError(f"{target}: cannot write to {parent} ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def save_bytes(obj: Any, tmp: Path) -> None:
    """``torch.save`` to ``tmp`` and flush it to disk."""
    # A file object, not a path: torch names the archive after a path's stem, and temp names vary.
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def check_weights_output(path: PathLike, *, whole_module: bool = False) -> None:
    """A ``.safetensors`` output holds a state dict (tensors only), never a pickled module.

    Raises:
        UsageError: ``whole_module`` with a ``.safetensors`` path.
    """
    if whole_module and Path(path).suffix == ".safetensors":
        raise UsageError(f"{path}: a .safetensors file holds tensors only, not a whole module; "
                         "drop `whole_module=True` or write a .pt file")


def save_safetensors(state: Mapping[str, Any], tmp: Path) -> None:
    """Write a state dict as safetensors: ``format: pt`` and the state dict's ``_metadata`` (as
    JSON, see :data:`wsconvert.io.safe.SAFETENSORS_METADATA_KEY`) in the header. Tensors that
    share storage (tied weights) are written as separate copies, as the format requires.

    Raises:
        UsageError: a value that is not a tensor (``_extra_state`` objects).
    """
    from safetensors.torch import save_file

    from wsconvert.io.safe import SAFETENSORS_METADATA_KEY

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"{key}: a .safetensors file holds tensors only, not "
                             f"{type(value).__name__}; write a .pt file")
        t = value.detach()
        # Storage-sharing tensors (tied weights, views) would be refused: give each its own.
        where = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (
            0, 0)
        if where in seen or not t.is_contiguous():
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.numel():
            seen.add(where)
        tensors[key] = t.cpu()
    header = {"format": "pt"}
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        header[SAFETENSORS_METADATA_KEY] = json.dumps(metadata)
    save_file(tensors, str(tmp), metadata=header)
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())


def save_weights(obj: Mapping[str, Any] | nn.Module, staged: Path) -> None:
    """A folded checkpoint: safetensors when ``staged`` ends in ``.safetensors`` (a state dict
    only, see :func:`check_weights_output`), ``torch.save`` otherwise."""
    if staged.suffix == ".safetensors":
        if isinstance(obj, nn.Module):
            check_weights_output(staged, whole_module=True)
        else:
            save_safetensors(obj, staged)
    else:
        save_bytes(obj, staged)


def write_text(path: PathLike, text: str) -> Path:
    """Write a report file atomically (replacing an older report)."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_state_dict(state: Mapping[str, torch.Tensor] | nn.Module | tuple[torch.Tensor, ...],
                    path: PathLike, *, force: bool = False,
                    protect: Sequence[PathLike] = ()) -> Path:
    """Write a plain state dict (or a whole module, or a tuple of input tensors) atomically; a
    state dict as safetensors when ``path`` ends in ``.safetensors``."""
    safetensors = Path(path).suffix == ".safetensors"
    if safetensors and not isinstance(state, Mapping):
        check_weights_output(path, whole_module=True)
    with atomic_output(path, force=force, protect=protect) as tmp:
        if safetensors and isinstance(state, Mapping):
            save_safetensors(state, tmp)
        else:
            save_bytes(state, tmp)
    return Path(path)


COMMITTED: list[Path] = []
"""Every file an :class:`OutputSet` moved into place in this process, in order (the command line
says which, when a signal stops it after they were written)."""

_HELD_SIGNALS = [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and termination signals until the block ends, then deliver them to the
    handlers that were in force. Python runs signal handlers in the main thread whichever thread
    the system picked, so swapping the handlers there holds them all (blocking the signals would
    only hold those sent to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    # Only signals a Python handler receives (the command line installs one for each): the
    # default and ignore dispositions, and ones set outside Python, are left as they are (Python
    # cannot tell what C code set, nor put it back).
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum))
                for sig in _HELD_SIGNALS if callable(signal.getsignal(sig))}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(held):
            signal.raise_signal(sig)


class OutputSet:
    """The outputs of one operation: checked up front, staged, committed together.

    ``add`` checks a target at once (before any work), against the inputs (``protect``) and every
    output claimed before (the same file under two names, links included, is refused).
    ``stage(path)`` gives the path to write it at: a file of the same name in a hidden staging
    directory beside the file to be written, so writers that put companion files beside their
    output (ONNX external data) stage those too. ``commit`` moves everything staged into place;
    leaving the ``with`` block without committing (an error in any stage, an interrupt) deletes
    everything staged and leaves the targets as they were. Staged files get the permissions
    ``open()`` gives (the umask is honoured).

    Example:
        >>> with OutputSet(force=False, protect=[src]) as outputs:    # doctest: +SKIP
        ...     outputs.add(dst)
        ...     torch.save(obj, outputs.stage(dst))
        ...     outputs.commit()
    """

    def __init__(self, *, force: bool = False, protect: Sequence[Protected] = ()) -> None:
        self.force = force
        self.protect = list(protect)
        self._write: dict[Path, Path] = {}
        self._claimed: dict[tuple[Any, ...], str] = {}
        self._staging: dict[Path, Path] = {}

    def _claim(self, path: PathLike, write: Path, name: str | None) -> None:
        label = _label(name, path)
        ident = identity(write)
        if ident in self._claimed:
            raise UsageError(f"{label}: also named as {self._claimed[ident]}; each output "
                             "needs a file of its own")
        self._claimed[ident] = label

    def add(self, path: PathLike, *, replace: bool = False, name: str | None = None) -> Path:
        """Check ``path`` may be written and claim it; ``replace`` allows replacing an existing
        regular file without ``force`` (reports); ``name`` is the parameter it came from."""
        target = Path(path)
        write = check_output(target, force=self.force, protect=self.protect, name=name,
                             replace=replace)
        self._claim(target, write, name)
        self._write[target] = write
        return target

    def claim_of(self, path: PathLike) -> str | None:
        """What claimed ``path`` as an output file (its label), if anything did."""
        return self._claimed.get(identity(path))

    def reserve(self, path: PathLike, *, name: str | None = None) -> Path:
        """Check and claim a file written later outside the set (its directory may not exist
        yet); returns the path to write."""
        write = check_output(path, force=self.force, protect=self.protect, name=name,
                             parent_may_be_missing=True)
        self._claim(path, write, name)
        return write

    def stage(self, path: PathLike) -> Path:
        """Where to write ``path`` (added before) until :meth:`commit`."""
        target = Path(path)
        if target not in self._write:
            raise ValueError(f"{target} was not added to the output set")
        write = self._write[target]
        directory = self._staging.get(write.parent)
        if directory is None:
            try:
                directory = Path(tempfile.mkdtemp(prefix=".wsconvert-", dir=write.parent))
            except OSError as exc:
                raise UsageError(f"{target}: cannot write to {write.parent} "
                                 f"({exc.strerror or exc})") from None
            self._staging[write.parent] = directory
        return directory / write.name

    def final(self, staged: PathLike) -> Path:
        """The path a staged file will have after :meth:`commit`."""
        p = Path(staged)
        for parent, directory in self._staging.items():
            if p.parent == directory:
                return parent / p.name
        return p

    def commit(self) -> list[Path]:
        """Move every staged file into place; returns the final paths. Ctrl-C and termination
        signals wait until every file is moved: the outputs are all old or all new."""
        moved = []
        written = set(self._write.values())
        for parent, directory in self._staging.items():
            for f in sorted(directory.iterdir()):
                final = parent / f.name
                if final not in written:
                    check_output(final, force=self.force, protect=self.protect)
                moved.append((f, final))
        with _signals_held():
            for f, final in moved:
                os.replace(f, final)
            COMMITTED.extend(final for _, final in moved)
        self.discard()
        return [final for _, final in moved]

    def discard(self) -> None:
        """Delete everything staged."""
        for directory in self._staging.values():
            shutil.rmtree(directory, ignore_errors=True)
        self._staging.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()
