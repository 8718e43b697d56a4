"""Folding other libraries' WS layers, against faithful implementations of each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import foreign_layers as fl
import pytest
import torch
from torch import nn

from wsconvert import apply_ws
from wsconvert.errors import ConversionError
from wsconvert.export import ExportConfig, export_onnx
from wsconvert.fold import fold_ws
from wsconvert.foreign import ADAPTERS, Adapter, SamePadConv2d, find_adapter, register_adapter
from wsconvert.inspection import inspect_model

if TYPE_CHECKING:
    from conftest import Cli
from wsconvert.parity import check_parity, make_inputs

EXPECTED = {  # layer -> (adapter, convention, eps) as read from the layer itself
    "a": ("timm StdConv2d", "timm", 1e-8), "b": ("timm StdConv2d", "timm", 1e-8),
    "c": ("timm ScaledStdConv2d", "scaled", 1e-5), "d": ("timm ScaledStdConv2d", "scaled", 1e-5),
    "e": ("HF WeightStandardizedConv2d", "timm", 1e-8),
    "f": ("HF WeightStandardizedConv2d", "timm", 1e-8), "g": ("BiT StdConv2d", "bit", 1e-10),
    "h": ("mmcv ConvWS2d", "paper", 1e-4), "i": ("mmcv ConvAWS2d", "aws", 1e-5),
    "j": ("timm StdConv2d", "timm", 1e-6),
}


def test_inspect_reads_convention_and_eps_from_the_layer() -> None:
    infos = {i.name: i for i in inspect_model(fl.zoo())}
    for name, (source, convention, eps) in EXPECTED.items():
        assert (infos[name].ws, infos[name].source, infos[name].convention, infos[name].eps) == (
            "foreign", source, convention, eps), name


@pytest.mark.parametrize("size", [15, 16, 17, 32])
def test_fold_matches_each_layer_at_odd_and_even_sizes(size: int) -> None:
    model = fl.zoo()
    report = fold_ws(model)
    folded = report.model
    assert len(report.folded) == 10
    assert {type(m) for m in folded.modules() if isinstance(m, nn.Conv2d)} == {
        nn.Conv2d, SamePadConv2d}
    assert isinstance(folded.b, SamePadConv2d) and isinstance(folded.j, SamePadConv2d)
    assert type(folded.f) is nn.Conv2d and not hasattr(folded.e, "pad")
    assert "c.gain" not in dict(folded.named_parameters())
    x = torch.randn(2, 3, size, size + 1)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    # The foreign model itself is untouched.
    assert type(model.a).__name__ == "StdConv2d"


def test_each_adapter_folds_its_own_formula_exactly() -> None:
    model = fl.zoo().double()
    folded = fold_ws(model).model
    for name in EXPECTED:
        layer, plain = getattr(model, name), getattr(folded, name)
        x = torch.randn(1, layer.in_channels, 9, 10, dtype=torch.float64)
        torch.testing.assert_close(plain(x), layer(x), atol=1e-10, rtol=1e-9, msg=name)


def test_zoo_exports_clean_and_passes_parity(tmp_path: Path) -> None:
    model = fl.zoo()
    folded = fold_ws(model).model
    result = export_onnx(folded, tmp_path / "zoo.onnx", ExportConfig(((1, 3, 17, 17),)))
    assert result.op_histogram["Conv"] == 10 and "BatchNormalization" not in result.op_histogram
    report = check_parity(tmp_path / "zoo.onnx", model, make_inputs([(1, 3, 17, 17)], 2),
                          folded=folded)
    assert report.passed(), report.failures


def test_composer_parametrization_folds_and_unknown_needs_bake() -> None:
    net = fl.composer_net()
    info = inspect_model(net)[0]
    assert (info.ws, info.source, info.convention, info.eps) == (
        "parametrization", "WeightStandardizer", "bit", 1e-10)
    with pytest.raises(ConversionError, match="already standardizes"):
        apply_ws(net)
    folded = fold_ws(net).model
    assert [type(m) for m in folded] == [nn.Conv2d, nn.ReLU, nn.Conv2d]
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    assert net[0].parametrizations.weight.original is not None  # original untouched

    torch.manual_seed(0)
    odd = nn.Sequential(nn.Conv2d(3, 4, 3))
    torch.nn.utils.parametrize.register_parametrization(odd[0], "weight", fl.Scale())
    assert inspect_model(odd)[0].ws == "unknown"
    with pytest.raises(ConversionError, match="`bake_unknown=True`"):
        fold_ws(odd)
    baked = fold_ws(odd, bake_unknown=True)
    assert baked.folded[0].kind == "baked" and type(baked.model[0]) is nn.Conv2d
    torch.testing.assert_close(baked.model[0].weight, odd[0].weight)


def test_register_adapter_for_a_user_layer() -> None:
    class MyWSConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
            return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)

    layer = MyWSConv(3, 4, 3)
    assert find_adapter(layer) is None
    adapter = Adapter("mine", lambda m: type(m).__name__ == "MyWSConv",
                      lambda m: ("centered", 0.0),
                      lambda m: m.weight.double() - m.weight.double().mean((1, 2, 3),
                                                                           keepdim=True))
    register_adapter(adapter)
    try:
        folded = fold_ws(nn.Sequential(layer)).model
        x = torch.randn(1, 3, 6, 6)
        torch.testing.assert_close(folded(x), layer(x))
        assert type(folded[0]) is nn.Conv2d
    finally:
        ADAPTERS.remove(adapter)


def test_registered_adapter_on_conv1d() -> None:
    class WSConv1d(nn.Conv1d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight - self.weight.mean((1, 2), keepdim=True)
            return nn.functional.conv1d(x, w, self.bias, self.stride, self.padding)

    layer = WSConv1d(3, 4, 3, padding=1)
    adapter = Adapter("mine1d", lambda m: type(m).__name__ == "WSConv1d",
                      lambda m: ("centered", 0.0),
                      lambda m: m.weight.double() - m.weight.double().mean((1, 2), keepdim=True))
    register_adapter(adapter)
    try:
        folded = fold_ws(nn.Sequential(layer)).model
        assert type(folded[0]) is nn.Conv1d
        x = torch.randn(2, 3, 11)
        torch.testing.assert_close(folded(x), layer(x))
    finally:
        ADAPTERS.remove(adapter)


def test_cli_inspect_and_fold_a_pickled_foreign_model(cli: Cli, tmp_path: Path) -> None:
    shutil.copy(Path(__file__).with_name("foreign_layers.py"), tmp_path / "foreign_layers.py")
    torch.save(fl.zoo(), tmp_path / "zoo.pt")
    proc = cli.run("inspect", "zoo.pt", "--trust", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    layers = {r["name"]: r for r in json.loads(proc.stdout)["layers"]}
    assert layers["a"]["eps"] == 1e-8 and layers["c"]["source"] == "timm ScaledStdConv2d"
    proc = cli.run("fold", "zoo.pt", "--trust", "--onnx", "zoo.onnx", "--input-shape",
                   "1,3,16,16", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["parity"]["passed"] and len(payload["fold"]["folded"]) == 10
    assert "BatchNormalization" not in payload["onnx"]["op_histogram"]
    proc = cli.run("check", "zoo.onnx", "--against", "zoo.pt", "--trust", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["parity"]["stages"]) == ["fold", "export"]
