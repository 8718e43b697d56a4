"""wsconvert.testing.assert_parity: the gate as a pytest assertion."""

from __future__ import annotations

import math
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import wsconvert
from wsconvert import apply_ws
from wsconvert.errors import CheckpointError, UsageError
from wsconvert.export import ExportConfig, export_onnx
from wsconvert.fold import fold_ws
from wsconvert.parity import graph_input_shapes, make_inputs
from wsconvert.testing import assert_parity


def _export(model: nn.Module, path: Path, shape: tuple[int, ...], dynamic: bool = False) -> Path:
    export_onnx(fold_ws(model).model, path, ExportConfig((shape,), dynamic_batch=dynamic))
    return path


def _ws_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                        nn.ReLU(), nn.Conv2d(8, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(6, 7))
    return apply_ws(net, "paper").model.eval()


def _scaled(model: nn.Module, tmp_path: Path, initializer: str) -> Path:
    """``model`` exported at batch 2, with one initializer scaled by 1%."""
    path = _export(model, tmp_path / "m.onnx", (2, 3, 12, 12))
    proto = onnx.load(str(path))
    (init,) = [i for i in proto.graph.initializer if i.name == initializer]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    return tmp_path / "bad.onnx"


def test_holds_with_a_module_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ws = _ws_net()
    path = _export(ws, tmp_path / "m.onnx", (1, 3, 12, 12), dynamic=True)
    assert graph_input_shapes(path) == ([(1, 3, 12, 12)], True)
    report = assert_parity(path, ws, seeds=2, min_top1_agreement=1.0)
    assert report.passed() and report.stages == ["fold", "export"]
    # Dynamic batch: every seed at batch 1 and 4 by default.
    assert report.meta["input_sets"] == ["seed0-b1", "seed0-b4", "seed1-b1", "seed1-b4"]
    assert all(c.top1 == 1.0 for c in report.comparisons)
    assert capsys.readouterr() == ("", "")  # the library never prints


def test_fails_with_the_readable_report(tmp_path: Path) -> None:
    ws = _ws_net()
    bad = _scaled(ws, tmp_path, "3.weight")
    with pytest.raises(AssertionError) as info:
        assert_parity(bad, ws)
    text = str(info.value)
    assert "parity FAILS" in text and "min atol" in text
    assert "export stage, input set seed0: first divergence at 3 (Conv2d)" in text
    assert "ONNX nodes:" in text and "3.weight" in text
    with pytest.raises(AssertionError) as info:
        assert_parity(bad, ws, locate="never")
    assert "parity FAILS" in str(info.value) and "divergence" not in str(info.value)


def test_minimum_atol_from_the_report_passes(tmp_path: Path) -> None:
    from wsconvert.parity import check_parity

    ws = _ws_net()
    bad = _scaled(ws, tmp_path, "5.weight")
    with pytest.raises(AssertionError):
        assert_parity(bad, ws, seeds=1)
    report = check_parity(bad, ws, make_inputs([(2, 3, 12, 12)]), folded=fold_ws(ws).model,
                          locate="never")
    worst = max(c.min_atol for c in report.comparisons)
    assert assert_parity(bad, ws, seeds=1, atol=worst).passed()
    with pytest.raises(AssertionError):
        assert_parity(bad, ws, seeds=1, atol=math.nextafter(worst, 0))


def test_checkpoint_reference_and_explicit_inputs(net_state: Path, tmp_path: Path) -> None:
    plain = wsconvert.load_model(net_state, "wsnets:build").model
    ws = apply_ws(plain, "paper").model.eval()
    wsconvert.save(ws, tmp_path / "net.ws.pt")
    path = _export(ws, tmp_path / "net.onnx", (1, 3, 10, 10), dynamic=True)
    ws_file = {"reference": tmp_path / "net.ws.pt", "model": "wsnets:build"}  # consent: factory
    report = assert_parity(path, **ws_file, input_shape=(2, 3, 10, 10), seeds=1,
                           batch_sizes=[2, 3])
    assert report.stages == ["fold", "export"]
    assert report.meta["input_sets"] == ["seed0-b2", "seed0-b3"]
    x = torch.randn(3, 3, 10, 10)
    report = assert_parity(path, **ws_file, inputs=x)
    assert report.meta["input_sets"] == ["inputs"]
    torch.save((x,), tmp_path / "x.pt")
    assert assert_parity(path, **ws_file, inputs=tmp_path / "x.pt").passed()
    # A plain state dict needs its architecture: a plain reference, the export stage only.
    plain_onnx = tmp_path / "plain.onnx"
    export_onnx(plain, plain_onnx, ExportConfig(((1, 3, 10, 10),), dynamic_batch=True))
    report = assert_parity(plain_onnx, net_state, model="wsnets:build", batch_sizes=[2])
    assert report.stages == ["export"] and report.meta["input_sets"] == ["seed0-b2"]
    with pytest.raises(AssertionError, match="parity FAILS"):  # WS graph, plain reference
        assert_parity(path, net_state, model="wsnets:build")
    with pytest.raises(UsageError, match="state dict"):
        assert_parity(plain_onnx, net_state)


def test_bad_arguments_are_errors_not_failures(tmp_path: Path) -> None:
    ws = _ws_net()
    path = _export(ws, tmp_path / "m.onnx", (1, 3, 12, 12))
    with pytest.raises(UsageError, match="reference"):
        assert_parity(path, 42)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="inputs"):
        assert_parity(path, ws, inputs=[1, 2])
    with pytest.raises(UsageError, match="batch_sizes"):
        assert_parity(path, ws, batch_sizes=[2])
    with pytest.raises(CheckpointError):
        assert_parity(tmp_path / "missing.onnx", ws)
    with pytest.raises(UsageError, match="does not fit"):
        assert_parity(path, ws, input_shape=[(1, 5, 12, 12)])
