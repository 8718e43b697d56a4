"""Image-folder loading for recovery data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from wsconvert.errors import UsageError
from wsconvert.io.images import IMAGENET_MEAN, IMAGENET_STD, image_files, load_image_folder
from wsconvert.io.inputs import load_samples


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int],
         mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    img.putpixel((0, 0), (255, 0, 0))
    (img.convert(mode) if mode != "RGB" else img).save(path)
    return path


def test_loads_normalized_rgb_in_sorted_order(tmp_path: Path) -> None:
    _png(tmp_path / "b.png", (5, 4), (0, 128, 255))
    _png(tmp_path / "a.PNG", (5, 4), (255, 255, 255))
    _png(tmp_path / "sub" / "c.png", (5, 4), (10, 20, 30), mode="L")
    (tmp_path / ".DS_Store").write_bytes(b"x")
    files = image_files(tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["a.PNG", "b.png", "sub/c.png"]
    x = load_image_folder(tmp_path)
    assert x.shape == (3, 3, 4, 5) and x.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = x * std + mean
    torch.testing.assert_close(pixels[0, :, 1, 1], torch.ones(3))
    torch.testing.assert_close(pixels[1, :, 2, 3], torch.tensor([0.0, 128 / 255, 1.0]))
    torch.testing.assert_close(pixels[1, :, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    grey = pixels[2, :, 1, 1]  # L mode: one value in all three channels
    assert torch.allclose(grey, grey[0].expand(3))


def test_custom_mean_std(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (2, 2), (255, 0, 51))
    x = load_image_folder(tmp_path, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.1))
    torch.testing.assert_close(x[0, :, 1, 1], torch.tensor([1.0, -1.0, -3.0]))


def test_jpeg_and_resize_to_cover_then_centre_crop(tmp_path: Path) -> None:
    _png(tmp_path / "wide.jpg", (40, 20), (200, 100, 50))
    _png(tmp_path / "tall.jpeg", (10, 30), (200, 100, 50))
    x = load_image_folder(tmp_path, image_size=8)
    assert x.shape == (2, 3, 8, 8)
    y = load_image_folder(tmp_path, image_size=(6, 9))
    assert y.shape == (2, 3, 6, 9)


def test_load_samples_reads_a_folder(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (3, 3), (1, 2, 3))
    (x,) = load_samples(tmp_path, image_size=4)
    assert x.shape == (1, 3, 4, 4)


@pytest.mark.parametrize("case", ["empty", "text", "corrupt", "mixed", "not-a-folder"])
def test_bad_folders_name_the_file(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    if case == "text":
        _png(folder / "a.png", (3, 3), (0, 0, 0))
        (folder / "notes.txt").write_text("hi")
        message = r"notes\.txt: not an image file"
    elif case == "corrupt":
        (folder / "broken.png").write_bytes(b"not a png")
        message = r"broken\.png: not a readable image"
    elif case == "mixed":
        _png(folder / "a.png", (3, 3), (0, 0, 0))
        _png(folder / "b.png", (4, 3), (0, 0, 0))
        message = r"b\.png: 4x3 pixels, but a\.png is 3x3; pass `image_size`"
    elif case == "not-a-folder":
        folder = folder / "missing"
        message = "missing: not a folder"
    else:
        message = "imgs: holds no image file"
    with pytest.raises(UsageError, match=message):
        load_image_folder(folder)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"image_size": 0}, "image_size` must be"),
    ({"image_size": (4, 4, 4)}, "image_size` must be"),
    ({"mean": (0.5, 0.5)}, "mean` needs 3 values"),
    ({"std": (0.5, 0.0, 0.5)}, "std` must be finite and > 0"),
    ({"limit": 0}, "limit` must be >= 1"),
])
def test_bad_options(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    _png(tmp_path / "a.png", (3, 3), (0, 0, 0))
    with pytest.raises(UsageError, match=message):
        load_image_folder(tmp_path, **kwargs)  # type: ignore[arg-type]


def test_mixed_sizes_load_with_image_size(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (3, 3), (0, 0, 0))
    _png(tmp_path / "b.png", (4, 3), (0, 0, 0))
    assert load_image_folder(tmp_path, image_size=3, limit=1).shape == (1, 3, 3, 3)
    assert load_image_folder(tmp_path, image_size=3).shape == (2, 3, 3, 3)


def test_image_size_limit_edge() -> None:
    """A mistyped --image-size (40000) is refused before one image allocates tens of GB; the
    largest square that fits the limit passes."""
    from wsconvert.io.images import MAX_IMAGE_ELEMENTS, _size

    assert 3 * 6688 * 6688 <= MAX_IMAGE_ELEMENTS < 3 * 6689 * 6689
    assert _size(6688) == (6688, 6688)
    assert _size((4096, 10922)) == (4096, 10922)  # 3 * 4096 * 10922 just inside
    for size in (6689, (4096, 10923), 40000):
        with pytest.raises(UsageError, match=r"`image_size` .* above the limit"):
            _size(size)
