"""The wsconvert file format: format-1 files written by release 0.1.0 still load, format 2
records named transforms (never wsconvert's module paths), state-dict metadata survives."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import wsconvert
from wsconvert.errors import CheckpointError, UsageError
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


def test_an_edited_model_is_saved_whole_not_as_its_factory(nets_dir: Path,
                                                           net_state: Path) -> None:
    """Replacing a module (the new head of a fine-tune), adding or removing one after the model
    was built: the factory would rebuild another model, so save stores the module itself."""
    from wsconvert.io.arch import current_arch

    ws = wsconvert.apply_ws(load_model(net_state, "wsnets:build").model, init="exact").model
    x = torch.randn(2, 3, 8, 8)
    wsconvert.save(ws, nets_dir / "same.ws.pt")  # unedited: the factory and a state dict
    assert read_checkpoint(nets_dir / "same.ws.pt")["arch"]["kind"] == "factory"
    assert current_arch(wsconvert.swap_norm(ws, 4, inplace=False).model) is not None  # recorded
    edits = {"head": lambda m: setattr(m, "head", nn.Linear(16, 7)),
             "module": lambda m: setattr(m, "bn", nn.Identity()),
             "added": lambda m: m.add_module("extra", nn.ReLU()),
             # same class and shapes, other settings
             "settings": lambda m: setattr(m, "bn", nn.BatchNorm2d(8, eps=0.5)),
             # a parametrization the factory does not make
             "parametrized": lambda m: nn.utils.parametrizations.orthogonal(m.head),
             # an edit before a recorded transform is still an edit
             "then-swapped": lambda m: (setattr(m, "grouped", nn.Conv2d(8, 16, 3, padding=1)),
                                        wsconvert.swap_norm(m, 4, inplace=True))}
    for name, edit in edits.items():
        edited = copy.deepcopy(ws)
        edit(edited)
        assert current_arch(edited) is None, name
        path = nets_dir / f"{name}.ws.pt"
        if name == "parametrized":  # torch cannot pickle it: refused, nothing written
            with pytest.raises(UsageError, match="parametrization other than WS"):
                wsconvert.save(edited, path)
            assert not path.exists()
            continue
        wsconvert.save(edited, path)
        raw = read_checkpoint(path, trust=True)
        assert raw["arch"] == {"kind": "pickle", "edited_from": "wsnets:build"}
        with pytest.raises(UsageError, match="edited after it was built from wsnets:build"):
            wsconvert.load(path, model="wsnets:build", trust=True)
        back = wsconvert.load(path, trust=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(x), edited.eval()(x), rtol=0, atol=0)


def test_a_factory_checkpoint_keeps_dtypes_and_frozen_parameters(nets_dir: Path,
                                                                 net_state: Path) -> None:
    ws = wsconvert.apply_ws(load_model(net_state, "wsnets:build").model, init="scale").model
    ws = ws.to(torch.bfloat16)
    ws.stem.parametrizations.weight.original.requires_grad_(False)
    ws.head.bias.requires_grad_(False)
    wsconvert.save(ws, nets_dir / "bf16.ws.pt")
    raw = read_checkpoint(nets_dir / "bf16.ws.pt")
    assert raw["arch"]["kind"] == "factory"
    assert raw["frozen"] == ["head.bias", "stem.parametrizations.weight.original"]
    back = wsconvert.load(nets_dir / "bf16.ws.pt", model="wsnets:build")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert [k for k, p in back.named_parameters() if not p.requires_grad] == [
        "stem.parametrizations.weight.original", "head.bias"]
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), ws.eval()(x), rtol=0, atol=0)
    raw["frozen"] = "head.bias"
    torch.save(raw, nets_dir / "bad.ws.pt")
    # Buffers left out of the state dict (non-persistent) follow the model's dtype too.
    buffered = wsconvert.apply_ws(load_model(net_state, "wsnets:with_buffer").model).model
    wsconvert.save(buffered.to(torch.bfloat16), nets_dir / "buf.ws.pt")
    again = wsconvert.load(nets_dir / "buf.ws.pt", model="wsnets:with_buffer")
    assert again.gain.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), buffered.eval()(x), rtol=0, atol=0)
    # A pickled module (no factory) keeps WS's own frozen gains.
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    ws2 = wsconvert.apply_ws(net, init="scale").model
    ws2[0].parametrizations.weight[0].gain.requires_grad_(False)
    wsconvert.save(ws2, nets_dir / "pickled.ws.pt")
    back2 = wsconvert.load(nets_dir / "pickled.ws.pt", trust=True)
    assert not back2[0].parametrizations.weight[0].gain.requires_grad
    with pytest.raises(CheckpointError, match="frozen parameters are not a list"):
        wsconvert.load(nets_dir / "bad.ws.pt", model="wsnets:build")


def test_a_tied_weight_stays_tied_through_save_and_load(tmp_path: Path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1))
    net[2].weight = net[0].weight
    ws = wsconvert.apply_ws(net).model
    wsconvert.save(ws, tmp_path / "tied.ws.pt")  # no factory: the pickled module
    back = wsconvert.load(tmp_path / "tied.ws.pt", trust=True)
    assert len(list(back.parameters())) == len(list(ws.parameters())) == 3
    assert (back[0].parametrizations.weight.original
            is back[2].parametrizations.weight.original)
    x = torch.randn(2, 3, 6, 6)
    for m in (ws, back):  # one identical Adam step each
        opt = torch.optim.Adam(m.parameters(), lr=0.1)
        m(x).square().mean().backward()
        opt.step()
    torch.testing.assert_close(back[0].parametrizations.weight.original,
                               ws[0].parametrizations.weight.original, rtol=0, atol=0)


def test_structure_ignores_what_is_not_architecture_and_sees_stacked_parametrizations(
        nets_dir: Path, net_state: Path) -> None:
    from wsconvert.io.arch import current_arch

    class Scaled(nn.Module):  # another library's module: its extra_repr shows a learned value
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(()))

        def extra_repr(self) -> str:
            return f"s={float(self.s):.3f}"

    ws = wsconvert.apply_ws(load_model(net_state, "wsnets:build").model).model
    ws.extra = nn.ParameterList([nn.Parameter(torch.ones(2))])
    ws.scaled = Scaled()
    wsconvert.io.arch.set_arch(ws, wsconvert.io.arch.arch_of(ws))  # as if the factory made them
    with torch.no_grad():
        ws.scaled.s.mul_(3)
    assert current_arch(ws.to(torch.bfloat16)) is not None  # dtypes and values: not edits

    class Neg(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return -w

    stacked = wsconvert.apply_ws(load_model(net_state, "wsnets:build").model).model
    nn.utils.parametrize.register_parametrization(stacked.stem, "weight", Neg())
    assert current_arch(stacked) is None
    with pytest.raises(wsconvert.errors.ConversionError, match="other parametrizations"):
        wsconvert.save(stacked, nets_dir / "stacked.ws.pt")


def test_a_buffer_built_in_another_dtype_keeps_it(nets_dir: Path, net_state: Path) -> None:
    ws = wsconvert.apply_ws(load_model(net_state, "wsnets:with_f64_buffer").model).model
    assert ws.gain.dtype == torch.float64
    wsconvert.save(ws, nets_dir / "f64buf.ws.pt")
    back = wsconvert.load(nets_dir / "f64buf.ws.pt", model="wsnets:with_f64_buffer")
    assert back.gain.dtype == torch.float64  # unedited: as built, not the weights' float32
    wsconvert.save(ws.to(torch.bfloat16), nets_dir / "bf16buf.ws.pt")
    again = wsconvert.load(nets_dir / "bf16buf.ws.pt", model="wsnets:with_f64_buffer")
    assert again.gain.dtype == torch.bfloat16  # model.to moved it: the file says so
    x = torch.randn(2, 3, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), ws.eval()(x), rtol=0, atol=0)
    raw = read_checkpoint(nets_dir / "bf16buf.ws.pt")
    assert raw["buffer_dtypes"] == {"gain": "bfloat16"}
    for bad in (["gain"], {"gain": "load"}, {"gain": "int64"}):  # "load": never looked up
        raw["buffer_dtypes"] = bad
        torch.save(raw, nets_dir / "badbuf.ws.pt")
        with pytest.raises(CheckpointError, match="buffer dtypes"):
            wsconvert.load(nets_dir / "badbuf.ws.pt", model="wsnets:with_f64_buffer")


def test_settings_of_subclassed_torch_layers_count(nets_dir: Path) -> None:
    """A subclass of a torch layer has torch's settings (stride, eps), judged as torch prints
    them: changing one after the build is an edit."""
    from wsconvert.io.arch import current_arch, set_arch

    class MyConv(nn.Conv2d):
        def extra_repr(self) -> str:  # prints something learned: not a setting
            return f"norm={float(self.weight.norm()):.3f}"

    net = nn.Sequential(MyConv(3, 4, 3), nn.ReLU())
    ws = wsconvert.apply_ws(net).model
    set_arch(ws, {"kind": "factory", "factory": "x:y", "kwargs": {}})
    with torch.no_grad():
        ws[0].parametrizations.weight.original.mul_(2)
    assert current_arch(ws) is not None  # its own extra_repr changed: not an edit
    ws[0].stride = (2, 2)
    assert current_arch(ws) is None
