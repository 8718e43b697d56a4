"""Writing outputs: every file goes to a temporary name beside its target and is renamed into
place when complete. :class:`OutputSet` does this for several outputs at once: all are checked
before any work, and all are committed only when every stage succeeded."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsconvert.errors import OutputExistsError, UsageError

__all__ = ["OutputSet", "atomic_output", "save_bytes", "save_state_dict", "write_text"]

PathLike = str | os.PathLike[str]


def check_output(path: PathLike, *, force: bool = False, protect: Sequence[PathLike] = ()) -> Path:
    """Refuse an output that cannot or may not be written, before any work is done.

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.
        UsageError: ``path`` is one of ``protect``, a directory, or its directory is missing.
    """
    target = Path(path)
    for q in protect:
        if Path(q).exists() and target.exists() and target.resolve() == Path(q).resolve():
            raise UsageError(f"{target}: output would overwrite the input")
    if target.is_dir():
        raise UsageError(f"{target}: output path is a directory")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists (pass `force=True` to overwrite)")
    if not target.parent.is_dir():
        raise UsageError(f"{target}: output directory {target.parent} does not exist")
    return target


@contextlib.contextmanager
def atomic_output(path: PathLike, *, force: bool = False,
                  protect: Sequence[PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    Args:
        path: the final output.
        force: allow replacing an existing file.
        protect: inputs that must never be the output.

    Raises:
        OutputExistsError: ``path`` exists and not ``force``.
        UsageError: ``path`` is one of ``protect``, a directory, or its directory is not writable.
    """
    target = check_output(path, force=force, protect=protect)
    parent = target.parent
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


def save_bytes(obj: Any, tmp: Path) -> None:
    """``torch.save`` to ``tmp`` and flush it to disk."""
    # A file object, not a path: torch names the archive after a path's stem, and temp names vary.
    with tmp.open("wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: PathLike, text: str) -> Path:
    """Write a report file atomically (replacing an older report)."""
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_state_dict(state: Mapping[str, torch.Tensor] | nn.Module | tuple[torch.Tensor, ...],
                    path: PathLike, *, force: bool = False,
                    protect: Sequence[PathLike] = ()) -> Path:
    """Write a plain state dict (or a whole module, or a tuple of input tensors) atomically."""
    with atomic_output(path, force=force, protect=protect) as tmp:
        save_bytes(state, tmp)
    return Path(path)


class OutputSet:
    """The outputs of one operation: checked up front, staged, committed together.

    ``add`` checks a target at once (before any work). ``stage(path)`` gives the path to write it
    at: a file of the same name in a hidden staging directory beside the target, so writers that
    put companion files beside their output (ONNX external data) stage those too. ``commit``
    moves everything staged into place; leaving the ``with`` block without committing (an error
    in any stage) deletes everything staged and leaves the targets as they were.

    Example:
        >>> with OutputSet(force=False, protect=[src]) as outputs:    # doctest: +SKIP
        ...     outputs.add(dst)
        ...     torch.save(obj, outputs.stage(dst))
        ...     outputs.commit()
    """

    def __init__(self, *, force: bool = False, protect: Sequence[PathLike] = ()) -> None:
        self.force = force
        self.protect = list(protect)
        self.targets: list[Path] = []
        self._staging: dict[Path, Path] = {}

    def add(self, path: PathLike, *, replace: bool = False) -> Path:
        """Check ``path`` may be written and claim it (duplicates are refused); ``replace``
        allows replacing an existing file without ``force`` (reports)."""
        target = check_output(path, force=self.force or replace, protect=self.protect)
        if any(target.resolve() == t.resolve() for t in self.targets):
            raise UsageError(f"{target}: named as two different outputs")
        self.targets.append(target)
        return target

    def stage(self, path: PathLike) -> Path:
        """Where to write ``path`` (added before) until :meth:`commit`."""
        target = Path(path)
        if target not in self.targets:
            raise ValueError(f"{target} was not added to the output set")
        directory = self._staging.get(target.parent)
        if directory is None:
            try:
                directory = Path(tempfile.mkdtemp(prefix=".wsconvert-", dir=target.parent))
            except OSError as exc:
                raise UsageError(f"{target}: cannot write to {target.parent} "
                                 f"({exc.strerror or exc})") from None
            self._staging[target.parent] = directory
        return directory / target.name

    def final(self, staged: PathLike) -> Path:
        """The path a staged file will have after :meth:`commit`."""
        p = Path(staged)
        for parent, directory in self._staging.items():
            if p.parent == directory:
                return parent / p.name
        return p

    def commit(self) -> list[Path]:
        """Move every staged file into place; returns the final paths."""
        moved = []
        for parent, directory in self._staging.items():
            for f in sorted(directory.iterdir()):
                final = parent / f.name
                if final not in self.targets:
                    check_output(final, force=self.force, protect=self.protect)
                moved.append((f, final))
        for f, final in moved:
            os.replace(f, final)
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
