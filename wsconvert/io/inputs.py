"""Model inputs: shapes given as text or inferred from the first conv, and sample files.

Sample files are read without unpickling: ``.npz`` (arrays in key order) and ``.npy`` (one array)
through numpy with ``allow_pickle=False``; anything else as a ``weights_only`` checkpoint. The
object in the file becomes one or more :class:`InputSet`:

* a tensor is one model input; a tuple or list of tensors are positional inputs;
* a mapping uses its ``inputs`` / ``input`` / ``x`` / ``images`` / ``data`` entry when it has
  one (so ``{"images": ..., "labels": ...}`` works), else its values in order;
* a list of tuples / mappings is several input sets.

Every problem with a sample file is an :class:`~wsconvert.errors.InputsError` naming the file.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from wsconvert.defaults import EXPORT_SPATIAL
from wsconvert.errors import CheckpointError, InputsError, UntrustedCheckpointError, UsageError
from wsconvert.io.images import load_image_folder
from wsconvert.io.safe import check_file, read_checkpoint

__all__ = [
    "MAX_INPUT_ELEMENTS",
    "InputSet",
    "as_samples",
    "check_input_size",
    "image_sets",
    "infer_input_shape",
    "load_inputs",
    "load_samples",
    "parse_shape",
    "parse_shapes",
    "sample_tensors",
]

_KEYS = ("inputs", "input", "x", "images", "data")

MAX_INPUT_ELEMENTS = 2**27
"""The most elements the random inputs of one operation may hold in all (512 MiB as float32):
a larger shape is almost always a typo (``1,3,20000,20000``), and the model's activations
would need many times more. ``allow_large_inputs=True`` lifts it."""


def check_input_size(shapes: Sequence[Sequence[int]], *, copies: int = 1,
                     allow_large: bool = False, what: str = "`input_shape`") -> None:
    """Refuse random inputs above :data:`MAX_INPUT_ELEMENTS` elements before allocating them.

    Args:
        shapes: the shapes of one input set (or of every set), batch dimension included.
        copies: how many such sets are made (seeds x batch sizes).
        allow_large: skip the check.
        what: the parameters the size came from, for the message.

    Raises:
        UsageError: above the limit.
    """
    if allow_large:
        return
    total = copies * sum(math.prod(int(d) for d in shape) for shape in shapes)
    if total > MAX_INPUT_ELEMENTS:
        raise UsageError(
            f"{what}: the inputs would hold {total:,} elements ({total * 4 / 2**30:,.1f} GiB as "
            f"float32, before any activation), above the limit of {MAX_INPUT_ELEMENTS:,} "
            "elements; check the shape, or pass `allow_large_inputs=True`")


@dataclass(frozen=True)
class InputSet:
    """One set of model inputs (one tensor per forward argument)."""

    name: str
    tensors: tuple[Tensor, ...]


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) to a tuple of positive ints.

    Raises:
        UsageError: malformed.
    """
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"`input_shape` {text!r}: want comma-separated integers such as "
                         "1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"`input_shape` {text!r}: every dimension must be a positive integer")
    return shape


def parse_shapes(values: str | Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """One shape per model input, from several values and/or ``;``-separated ones
    (``"8,4,32;8,2,3,8,8"``).

    Raises:
        UsageError: any shape malformed.
    """
    items = [values] if isinstance(values, str) else list(values)
    return tuple(parse_shape(part) for value in items for part in value.split(";"))


def infer_input_shape(model: nn.Module, batch: int = 1,
                      spatial: Mapping[int, tuple[int, ...]] | None = None) -> tuple[int, ...]:
    """``batch``, the first conv's input channels (module order), then the spatial size for its
    rank from ``spatial`` (default :data:`wsconvert.defaults.EXPORT_SPATIAL`; drift probes use
    :data:`~wsconvert.defaults.PROBE_SPATIAL`).

    Raises:
        UsageError: the model has no conv layer to infer from.
    """
    sizes = EXPORT_SPATIAL if spatial is None else spatial
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            rank = len(module.kernel_size)
            return (batch, module.in_channels, *sizes[rank])
    raise UsageError("cannot infer the input shape (no conv layer); pass `input_shape`")


def _read(p: Path, name: str) -> Any:
    try:
        check_file(p)
        if p.suffix not in (".npz", ".npy"):
            return read_checkpoint(p)
    except UntrustedCheckpointError as exc:
        # Never loaded with trust (the flag is for the model): say what an input file may hold.
        raise InputsError(f"`{name}` {exc.finding}; input files hold tensors only (a tensor, or "
                          "a tuple / list / dict of tensors), read without running code") from None
    except CheckpointError as exc:
        raise InputsError(f"`{name}` {exc}") from None
    try:
        loaded = np.load(p, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                return {k: torch.from_numpy(loaded[k]) for k in loaded.files}
        return torch.from_numpy(loaded)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else (
            type(exc).__name__)
        raise InputsError(f"`{name}` {p}: not a readable numpy file ({reason})") from None


def _tensors(obj: Any) -> tuple[Tensor, ...] | None:
    if isinstance(obj, Mapping):
        key = next((k for k in _KEYS if k in obj), None)
        return _tensors(obj[key]) if key is not None else _tensors(list(obj.values()))
    if isinstance(obj, Tensor):
        return (obj,)
    if isinstance(obj, tuple | list) and obj and all(isinstance(v, Tensor) for v in obj):
        return tuple(obj)
    return None


def load_inputs(path: str | os.PathLike[str], *, name: str = "inputs") -> list[InputSet]:
    """The input sets in a sample file (see the module docs for the forms).

    Args:
        path: the file.
        name: the parameter the path was given as, for error messages.

    Raises:
        InputsError: unreadable, or not tensors.
    """
    p = Path(path)
    obj = _read(p, name)
    many = isinstance(obj, list) and obj and all(isinstance(o, tuple | dict) for o in obj)
    items = [(f"{p.stem}[{i}]", o) for i, o in enumerate(obj)] if many else [(p.stem, obj)]
    sets = []
    for set_name, item in items:
        tensors = _tensors(item)
        if tensors is None:
            raise InputsError(f"`{name}` {p}: inputs must be tensors, a tuple/dict of tensors, "
                              "or a list of those")
        sets.append(InputSet(set_name, tuple(t.detach().cpu() for t in tensors)))
    return sets


def sample_tensors(path: str | os.PathLike[str], *, name: str = "inputs") -> tuple[Tensor, ...]:
    """A sample file as one tensor per positional input whose first dimension indexes samples
    (several input sets are concatenated).

    Raises:
        InputsError: unreadable, no sample dimension, or inputs with different sample counts.
    """
    p = Path(path)
    sets = load_inputs(p, name=name)
    if len({len(s.tensors) for s in sets}) != 1:
        raise InputsError(f"`{name}` {p}: input sets disagree on the number of inputs")
    if any(t.dim() < 1 or t.shape[0] < 1 for s in sets for t in s.tensors):
        raise InputsError(f"`{name}` {p}: each input needs a leading sample dimension")
    try:
        tensors = tuple(torch.cat(parts) for parts in zip(*(s.tensors for s in sets),
                                                          strict=True))
    except RuntimeError:
        raise InputsError(f"`{name}` {p}: input sets do not share sample shapes") from None
    if len({t.shape[0] for t in tensors}) != 1:
        raise InputsError(f"`{name}` {p}: inputs disagree on the number of samples")
    return tensors


def image_sets(folder: str | os.PathLike[str], batch: int, *,
               image_size: int | Sequence[int] | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               name: str = "inputs") -> list[InputSet]:
    """A folder of images (read as ``apply``'s ``calib_data``: see
    :func:`wsconvert.io.images.load_image_folder`) as input sets of ``batch`` images each (the
    last one may be smaller), named ``FOLDER[start:stop]``.

    Raises:
        UsageError: no images, unreadable or mixed-size images without ``image_size``, bad
            ``mean`` / ``std``, or ``batch`` < 1.
    """
    if batch < 1:
        raise UsageError(f"`{name}`: the batch of an image folder must be >= 1, got {batch}")
    p = Path(folder)
    images = load_image_folder(p, image_size=image_size, mean=mean, std=std)
    return [InputSet(f"{p.name}[{i}:{min(i + batch, len(images))}]", (images[i:i + batch],))
            for i in range(0, len(images), batch)]


def as_samples(data: Tensor | Sequence[Tensor], name: str = "data") -> tuple[Tensor, ...]:
    """``data`` as a tuple of positional inputs sharing the first (sample) dimension.

    Raises:
        UsageError: no tensor, a tensor without a sample dimension, non-floating or non-finite
            values, or inputs that disagree on the sample count.
    """
    items = (data,) if isinstance(data, Tensor) else tuple(data)
    if not items or not all(isinstance(t, Tensor) for t in items):
        raise UsageError(f"{name}: expected a tensor or a sequence of tensors")
    for t in items:
        if t.dim() < 2:
            raise UsageError(f"{name}: samples need shape [N, C, ...], got {list(t.shape)}")
        if not t.is_floating_point():
            raise UsageError(f"{name}: samples must be floating point (normalized), got {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise UsageError(f"{name}: holds NaN or inf values")
    if len({t.shape[0] for t in items}) != 1:
        raise UsageError(f"{name}: inputs disagree on the number of samples")
    return tuple(t.detach() for t in items)


def load_samples(path: str | os.PathLike[str], *, image_size: int | Sequence[int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 name: str = "data") -> tuple[Tensor, ...]:
    """Samples from disk (``apply``'s ``calib_data``): a folder of images, or a tensor file,
    never unpickled.

    A folder goes through :func:`wsconvert.io.images.load_image_folder` (``image_size``, ``mean``,
    ``std``; ImageNet statistics by default). A file is ``.pt`` / ``.npy`` / ``.npz`` read by
    :func:`wsconvert.io.inputs.sample_tensors` (``[N, C, ...]`` tensors, one per positional
    input); ``image_size`` / ``mean`` / ``std`` do not apply to it.

    Raises:
        UsageError: naming the file (and ``name``, the parameter it came as): missing,
            unreadable, no tensors, not ``[N, C, ...]`` floating-point finite samples, or image
            options given for a tensor file.
    """
    p = Path(path)
    if p.is_dir():
        return as_samples(load_image_folder(p, image_size=image_size, mean=mean, std=std), str(p))
    if image_size is not None or mean is not None or std is not None:
        raise UsageError(f"{p}: `image_size`, `mean` and `std` apply to a folder of images, "
                         "not to a tensor file")
    return as_samples(sample_tensors(p, name=name), str(p))
