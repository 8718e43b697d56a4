"""The wsconvert file format: format-1 files written by release 0.1.0 still load, format 2
records named transforms (never wsconvert's module paths), state-dict metadata survives."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import wsconvert
from wsconvert.io.safe import read_checkpoint
from wsconvert.io.state import strip_prefix
from wsconvert.io.wsfile import FORMAT_VERSION, load_model

DATA = Path(__file__).with_name("data")


def test_format_1_files_load_with_their_outputs() -> None:
    expected = torch.load(DATA / "tinynet_v1_outputs.pt", weights_only=True)
    for name, key in (("tinynet_v1.ws.pt", "plain"), ("tinynet_gn_v1.ws.pt", "gn")):
        assert read_checkpoint(DATA / name)["wsconvert_format"] == 1
        loaded = load_model(DATA / name)
        assert loaded.source == "wsconvert" and loaded.has_ws
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(expected["x"]), expected[key], rtol=0, atol=0)
    gn = load_model(DATA / "tinynet_gn_v1.ws.pt")
    assert gn.arch["factory"] == "wsconvert.examples.tinynet:build"
    assert [t["transform"] for t in gn.arch["transforms"]] == ["group_norm"]
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.model.modules()) == 5


def test_format_2_records_a_named_transform(tmp_path: Path) -> None:
    model = wsconvert.load(DATA / "tinynet_gn_v1.ws.pt")
    wsconvert.save(model, tmp_path / "again.ws.pt")
    raw = read_checkpoint(tmp_path / "again.ws.pt")
    assert raw["wsconvert_format"] == FORMAT_VERSION == 2
    assert "wsconvert." not in str(raw["arch"]).replace("wsconvert.examples", "")
    layers = raw["arch"]["transforms"][0]["layers"]
    assert layers["features.0.1"] == {"groups": 4, "eps": 1e-5, "affine": True}
    again = wsconvert.load(tmp_path / "again.ws.pt").eval()
    x = torch.load(DATA / "tinynet_v1_outputs.pt", weights_only=True)["x"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), model.eval()(x), rtol=0, atol=0)
    # The saved state dict keeps the per-module versions load_state_dict passes to modules.
    assert raw["state_dict"]._metadata["features.0.1"] == {"version": 1}


def test_prefix_stripping_keeps_metadata() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    wrapped = nn.ModuleDict({"module": net})
    state = wrapped.state_dict()
    stripped, prefix = strip_prefix(state, set(net.state_dict()))
    assert prefix == "module."
    assert list(stripped) == list(net.state_dict())
    assert stripped._metadata["1"] == state._metadata["module.1"]  # type: ignore[attr-defined]
    assert stripped._metadata[""] == state._metadata["module"]  # type: ignore[attr-defined]
