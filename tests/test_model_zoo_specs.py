"""``--model timm:NAME`` / ``torchvision:NAME`` when the package is missing or broken: one clear
line, exit 2. (Building real zoo models is in tests/compat/test_zoo_specs.py.)"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from wsconvert.errors import ModelSpecError
from wsconvert.io.spec import build_model


@pytest.fixture
def no_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import raises ModuleNotFoundError


@pytest.fixture
def broken_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torchvision built for another torch: importing it raises, as PyPI's does beside the
    CPU wheel."""
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n')
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(fake.parent))


def test_missing_timm(no_timm: None) -> None:
    with pytest.raises(ModelSpecError) as err:
        build_model("timm:resnet18")
    assert str(err.value) == ("`model` timm:resnet18: timm is not installed (pip install timm, "
                              "or wsconvert[compat])")


def test_broken_torchvision(broken_torchvision: None) -> None:
    with pytest.raises(ModelSpecError) as err:
        build_model("torchvision:resnet18")
    assert str(err.value) == (
        "`model` torchvision:resnet18: torchvision cannot be imported (RuntimeError: operator "
        "torchvision::nms does not exist); install the torchvision release that matches your "
        "torch")


def test_cli_names_the_flag(no_timm: None, net_state: Path, cli: Any) -> None:
    cli.assert_bad(["apply", net_state, "--model", "timm:convnext_atto"],
                   "--model timm:convnext_atto: timm is not installed", cwd=net_state.parent)


def test_other_modules_keep_the_generic_form(nets_dir: Path) -> None:
    assert type(build_model("wsnets:build")).__name__ == "Net"
