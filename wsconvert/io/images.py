"""Read a folder of images as one normalized ``[N, 3, H, W]`` float tensor (for recovery data).

Files ending in ``.png``, ``.jpg`` or ``.jpeg`` (any case) are read with Pillow, converted to RGB,
scaled to ``[0, 1]`` and normalized per channel with ``(x - mean) / std`` (ImageNet statistics by
default). Sub-folders are read too (an ``ImageFolder`` layout with one folder per class works; the
labels are ignored), in sorted path order, so the order is the same on every machine. Hidden
entries (names starting with ``.``) are skipped; any other file is an error, as is an unreadable
image.

``image_size`` resizes each image (bilinear, antialiased) so that it covers ``(H, W)`` and crops the
centre: an ``int`` is a square. Without it every image must have the same size.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from wsconvert.errors import UsageError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_SUFFIXES", "MAX_IMAGE_ELEMENTS", "image_files",
           "load_image_folder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def image_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image file under ``folder`` in sorted order (hidden entries skipped).

    Raises:
        UsageError: not a folder, a non-image file inside, or no image at all.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath, name)
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise UsageError(f"{path}: not an image file (expected "
                                 f"{', '.join(IMAGE_SUFFIXES)})")
            found.append(path)
    if not found:
        raise UsageError(f"{root}: holds no image file ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(found)


MAX_IMAGE_ELEMENTS = 2**27
"""The most values one resized image may hold (3 x height x width): a mistyped ``image_size``
is refused before it allocates tens of GB per image."""


def _size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    sizes = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sizes) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                  for s in sizes):
        raise UsageError(f"`image_size` must be a positive integer or (height, width), got "
                         f"{image_size!r}")
    height, width = int(sizes[0]), int(sizes[1])
    if 3 * height * width > MAX_IMAGE_ELEMENTS:
        raise UsageError(f"`image_size` {height}x{width}: one image would hold "
                         f"{3 * height * width:,} values, above the limit of "
                         f"{MAX_IMAGE_ELEMENTS:,} (6,688 x 6,688 pixels square)")
    return height, width


def _stats(values: Sequence[float], name: str, positive: bool) -> Tensor:
    t = torch.tensor([float(v) for v in values], dtype=torch.float32)
    if t.numel() != 3:
        raise UsageError(f"`{name}` needs 3 values (one per RGB channel), got {t.numel()}")
    if not all(math.isfinite(float(v)) for v in t) or (positive and bool((t <= 0).any())):
        raise UsageError(f"`{name}` must be finite{' and > 0' if positive else ''}, got "
                         f"{[float(v) for v in t]}")
    return t.view(3, 1, 1)


def load_image_folder(folder: str | os.PathLike[str], *,
                      image_size: int | Sequence[int] | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      limit: int | None = None) -> Tensor:
    """Every image under ``folder`` as a normalized ``[N, 3, H, W]`` float32 tensor.

    Args:
        folder: the folder (read recursively, see the module docs).
        image_size: resize to cover and centre-crop to this size (``int``: square).
        mean, std: per-channel normalization, RGB order, for pixels scaled to ``[0, 1]``
            (``None``: ImageNet's :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`).
        limit: read at most this many images (the first in sorted order).

    Raises:
        UsageError: not a folder, empty, a non-image or unreadable file, images of different
            sizes without ``image_size``, bad ``image_size`` / ``mean`` / ``std`` / ``limit``.
            Each message names the file or the parameter.
    """
    from PIL import Image, UnidentifiedImageError

    size = _size(image_size)
    m = _stats(IMAGENET_MEAN if mean is None else mean, "mean", False)
    s = _stats(IMAGENET_STD if std is None else std, "std", True)
    if limit is not None and limit < 1:
        raise UsageError(f"`limit` must be >= 1, got {limit}")
    files = image_files(folder)[:limit]
    images: list[Tensor] = []
    first: tuple[Path, tuple[int, int]] | None = None
    for path in files:
        try:
            with Image.open(path) as opened:
                rgb = opened.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError,
                Image.DecompressionBombError) as exc:
            reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else (
                type(exc).__name__)
            raise UsageError(f"{path}: not a readable image ({reason})") from None
        if size is not None:
            rgb = _cover_crop(rgb, size)
        elif first is None:
            first = (path, rgb.size)
        elif rgb.size != first[1]:
            raise UsageError(f"{path}: {rgb.size[0]}x{rgb.size[1]} pixels, but {first[0].name} is "
                             f"{first[1][0]}x{first[1][1]}; pass `image_size` to resize")
        data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
        pixels = data.view(rgb.size[1], rgb.size[0], 3).permute(2, 0, 1).float().div_(255)
        images.append(pixels.sub_(m).div_(s))
    return torch.stack(images)


def _cover_crop(image: PILImage, size: tuple[int, int]) -> PILImage:
    from PIL import Image

    height, width = size
    w0, h0 = image.size
    scale = max(height / h0, width / w0)
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    resized = image.resize((w1, h1), Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (w1 - width) // 2, (h1 - height) // 2
    return resized.crop((left, top, left + width, top + height))
