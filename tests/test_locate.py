"""Locating a parity failure: the first diverging module, at the fold and the export stage."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from wsconvert import apply_ws
from wsconvert.errors import CheckpointError, UsageError
from wsconvert.export import ExportConfig, export_onnx
from wsconvert.fold import fold_ws
from wsconvert.locate import locate_export, locate_fold, module_scopes
from wsconvert.parity import check_parity, make_inputs

if TYPE_CHECKING:
    from conftest import Cli


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.gn = nn.GroupNorm(2, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.gn(self.conv1(x)))) + x)


class Net(nn.Module):
    """Stem, two stages of two residual blocks, a classifier; a root-level offset buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.layer2 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, 10)
        self.register_buffer("offset", torch.linspace(-1, 1, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer2(self.layer1(self.stem(x))).mean((2, 3))) + self.offset


SHAPE = (1, 3, 12, 12)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, Path]:
    torch.manual_seed(0)
    ws = apply_ws(Net(), "paper").model.eval()
    folded = fold_ws(ws).model
    path = tmp_path_factory.mktemp("locate") / "net.onnx"
    export_onnx(folded, path, ExportConfig((SHAPE,), dynamic_batch=True))
    return ws, folded, path


def _edit_initializer(src: Path, dst: Path, name: str, scale: float) -> None:
    proto = onnx.load(str(src))
    (init,) = [i for i in proto.graph.initializer if i.name == name]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * scale, name))
    onnx.save(proto, str(dst))


@pytest.fixture
def scaled_conv(exported: tuple[nn.Module, nn.Module, Path],
                tmp_path: Path) -> tuple[nn.Module, nn.Module, Path]:
    """The exported graph with one conv weight in the middle (``layer2.0.conv2``) scaled by 1%."""
    ws, folded, path = exported
    bad = tmp_path / "bad.onnx"
    _edit_initializer(path, bad, "layer2.0.conv2.weight", 1.01)
    return ws, folded, bad


def test_scaled_conv_weight_is_named(scaled_conv: tuple[nn.Module, nn.Module, Path]) -> None:
    ws, folded, bad = scaled_conv
    inputs = make_inputs([SHAPE], seeds=2, batch_sizes=[1, 3])
    report = check_parity(bad, ws, inputs, folded=folded)
    assert not report.passed() and {c.stage for c in report.failures} == {"export"}
    (loc,) = report.localizations  # the fold stage passes: only the export stage is located
    assert loc.stage == "export" and loc.input_set == report.failures[0].input_set
    d = loc.divergence
    assert d is not None and d.module == "layer2.0.conv2" and d.module_type == "Conv2d"
    assert "Conv" in {op for _, op in d.nodes}
    assert "layer2.0.conv2.weight" in d.initializers
    assert not d.comparison.passed and d.comparison.max_abs > 1e-3
    # Everything before it (stem, layer1, layer2.0.conv1, layer2.0.gn) was compared and passed.
    assert loc.compared >= 10

    data = json.loads(report.to_json())
    (located,) = data["located"]
    assert located["divergence"]["module"] == "layer2.0.conv2"
    assert "Conv" in located["divergence"]["onnx_op_types"]
    junit = ET.fromstring(report.to_junit())
    failure = junit.find(".//failure")
    assert failure is not None and "layer2.0.conv2" in failure.get("message", "")
    props = {p.get("name"): p.get("value") for p in junit.iterfind(".//property")}
    assert props["diverges_at"] == "layer2.0.conv2" and "Conv" in props["diverges_at_onnx_ops"]
    assert "first divergence at layer2.0.conv2 (Conv2d)" in report.to_text()


def test_first_block_is_named_not_later_ones(exported: tuple[nn.Module, nn.Module, Path],
                                             tmp_path: Path) -> None:
    _, folded, path = exported
    bad = tmp_path / "stem.onnx"
    _edit_initializer(path, bad, "stem.bias", 1.05)
    loc = locate_export(bad, folded, make_inputs([SHAPE])[0], atol=1e-4, rtol=1e-3)
    assert loc.divergence is not None and loc.divergence.module == "stem"


def test_divergence_outside_any_module_names_onnx_nodes(
        exported: tuple[nn.Module, nn.Module, Path], tmp_path: Path) -> None:
    _, folded, path = exported
    bad = tmp_path / "offset.onnx"
    _edit_initializer(path, bad, "offset", 1.1)
    loc = locate_export(bad, folded, make_inputs([SHAPE])[0], atol=1e-4, rtol=1e-3)
    d = loc.divergence
    assert d is not None and d.module == ""
    assert [op for _, op in d.nodes] == ["Add"] and d.initializers == ("offset",)
    assert "outside any module" in d.where and "fc" not in d.where


def test_fold_stage_is_located_in_the_folded_model(
        exported: tuple[nn.Module, nn.Module, Path], tmp_path: Path) -> None:
    import copy

    ws, folded, _ = exported
    broken = copy.deepcopy(folded)
    with torch.no_grad():
        broken.layer1[1].conv2.weight.mul_(1.01)
    # Exported from the broken fold: the export stage agrees with it, the fold stage does not.
    path = tmp_path / "fold.onnx"
    export_onnx(broken, path, ExportConfig((SHAPE,)))
    report = check_parity(path, ws, make_inputs([SHAPE], seeds=2), folded=broken)
    assert {c.stage for c in report.failures} == {"fold"}
    (loc,) = report.localizations
    assert loc.stage == "fold" and loc.divergence is not None
    assert loc.divergence.module == "layer1.1.conv2" and loc.divergence.nodes == ()


def test_locate_always_when_parity_holds(exported: tuple[nn.Module, nn.Module, Path]) -> None:
    ws, folded, path = exported
    report = check_parity(path, ws, make_inputs([SHAPE]), folded=folded, locate="always")
    assert report.passed()
    assert [(loc.stage, loc.divergence) for loc in report.localizations] == [
        ("fold", None), ("export", None)]
    assert all(loc.compared >= 10 for loc in report.localizations)
    assert check_parity(path, ws, make_inputs([SHAPE]), folded=folded).localizations == []


def test_fused_batchnorm_is_compared_after_the_bn(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    ws = apply_ws(net, "paper").model.eval()
    fused = fold_ws(ws, fuse_bn=True).model
    x = make_inputs([(2, 3, 10, 10)])[0]
    loc = locate_fold(ws, fused, x, atol=1e-4, rtol=1e-3)
    assert loc.divergence is None and "0" in loc.skipped
    with torch.no_grad():
        fused[3].weight[0].mul_(1.05)
    loc = locate_fold(ws, fused, x, atol=1e-4, rtol=1e-3)
    assert loc.divergence is not None and loc.divergence.module == "3"


def _strip(src: Path, dst: Path, *, rename: bool) -> None:
    proto = onnx.load(str(src))
    renames = {}
    for i, init in enumerate(proto.graph.initializer):
        if rename:
            renames[init.name] = init.name = f"w{i}"
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.input[:] = [renames.get(n, n) for n in node.input]
    onnx.save(proto, str(dst))


def test_without_exporter_metadata(exported: tuple[nn.Module, nn.Module, Path],
                                   scaled_conv: tuple[nn.Module, nn.Module, Path],
                                   tmp_path: Path) -> None:
    ws, folded, bad = scaled_conv
    path = exported[2]
    # No metadata, but initializers named after parameters: located by parameter names.
    _strip(bad, tmp_path / "plain.onnx", rename=False)
    loc = locate_export(tmp_path / "plain.onnx", folded, make_inputs([SHAPE])[0], atol=1e-4,
                        rtol=1e-3)
    assert loc.divergence is not None and loc.divergence.module == "layer2.0.conv2"
    assert "initializer names" in loc.note
    scopes, any_meta = module_scopes(onnx.load(str(tmp_path / "plain.onnx")))
    assert scopes == {} and not any_meta

    # Nothing to map nodes to modules: parity still fails (exit 1), with the reason in the report.
    _strip(bad, tmp_path / "anon.onnx", rename=True)
    report = check_parity(tmp_path / "anon.onnx", ws, make_inputs([SHAPE]), folded=folded)
    assert not report.passed()
    (loc,) = report.localizations
    assert loc.divergence is None and "records no module scopes" in loc.note
    assert "not located" in report.to_text()
    # Asked for explicitly while parity holds: a usage error (exit 2).
    _strip(path, tmp_path / "anon_ok.onnx", rename=True)
    with pytest.raises(UsageError, match="records no module scopes"):
        check_parity(tmp_path / "anon_ok.onnx", folded, make_inputs([SHAPE]), locate="always")


def test_custom_op_is_a_clear_error(tmp_path: Path) -> None:
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 18, "acme" : 1]>
g (float[1, 3, 4, 4] x) => (float[1, 3, 4, 4] y) {
    y = acme.Frobnicate (x)
}
""")
    onnx.save(proto, str(tmp_path / "custom.onnx"))
    with pytest.raises(CheckpointError, match="onnxruntime cannot load it"):
        check_parity(tmp_path / "custom.onnx", nn.Identity(), make_inputs([(1, 3, 4, 4)]),
                     locate="always")


def test_different_output_structure_is_reported_not_raised(tmp_path: Path) -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.conv(x)
            return y, y.mean((2, 3))

    torch.manual_seed(2)
    two = Two().eval()
    export_onnx(two, tmp_path / "two.onnx", ExportConfig(((1, 3, 6, 6),)))
    one = nn.Sequential(two.conv)
    report = check_parity(tmp_path / "two.onnx", one, make_inputs([(1, 3, 6, 6)]),
                          locate="always")
    assert not report.passed()
    assert "output count differs" in report.failures[0].reason
    (loc,) = report.localizations
    assert loc.stage == "export"


def test_batchnorm_fused_by_the_exporter_is_named_at_the_bn(tmp_path: Path) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.BatchNorm2d(6),
                        nn.ReLU(), nn.Conv2d(6, 4, 3)).eval()
    export_onnx(net, tmp_path / "bn.onnx", ExportConfig(((1, 3, 12, 12),)))
    ops = [n.op_type for n in onnx.load(str(tmp_path / "bn.onnx")).graph.node]
    assert "BatchNormalization" not in ops  # the exporter's optimizer fused it into the conv
    _edit_initializer(tmp_path / "bn.onnx", tmp_path / "bad.onnx", "2.weight", 1.01)
    loc = locate_export(tmp_path / "bad.onnx", net, make_inputs([(1, 3, 12, 12)])[0], atol=1e-4,
                        rtol=1e-3)
    d = loc.divergence
    assert d is not None and d.module == "3" and d.module_type == "BatchNorm2d"
    assert [op for _, op in d.nodes] == ["Conv"] and "2.weight" in d.initializers


# -- the CLI, end to end through the entry point ------------------------------------------------

# The WS checkpoint records its factory; naming it is the consent to run it.
WS = ("net.ws.pt", "-m", "wsnets:build")
AGAINST = ("--against", *WS)


@pytest.fixture
def gate_files(cli: Cli, net_state: Path) -> Path:
    """In the working directory of ``wsnets``: ``net.ws.pt``, ``net.onnx`` (exported by ``fold``
    with ``--locate`` and ``--min-top1-agreement 1``) and ``bad.onnx`` (``dw``'s weight +10%)."""
    cwd = net_state.parent
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--convention", "bit", "--init",
                   "scale", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    proc = cli.run("fold", *WS, "--onnx", "net.onnx", "--input-shape", "1,3,16,16",
                   "--dynamic-batch", "--locate", "--min-top1-agreement", "1", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    for text in ("min atol", "min rtol", "top-1", "where it diverges",
                 "export stage, input set seed0-b1: no module output out of tolerance"):
        assert text in proc.stdout
    _edit_initializer(cwd / "net.onnx", cwd / "bad.onnx", "dw.weight", 1.1)
    return cwd


def test_cli_names_the_diverging_module(cli: Cli, gate_files: Path) -> None:
    cwd = gate_files
    proc = cli.run("check", "bad.onnx", *AGAINST, "--seeds", "1", "--junit",
                   "j.xml", "--report", "r.json", cwd=cwd)
    cli.one_line_error(proc, 1, "parity fails", "export stage first diverges at dw (Conv2d)")
    assert "export stage, input set seed0-b1: first divergence at dw (Conv2d)" in proc.stdout
    assert "initializers: dw.weight" in proc.stdout
    props = {p.get("name"): p.get("value") for p in ET.parse(cwd / "j.xml").iter("property")}
    assert props["diverges_at"] == "dw" and "Conv" in props["diverges_at_onnx_ops"]
    (located,) = json.loads((cwd / "r.json").read_text())["located"]
    assert located["divergence"]["module"] == "dw"

    proc = cli.run("check", "bad.onnx", *AGAINST, "--seeds", "1", "--json",
                   cwd=cwd)
    assert proc.returncode == 1
    parity = json.loads(proc.stdout)["parity"]
    assert parity["located"][0]["divergence"]["onnx_op_types"] == ["Conv", "Relu"]
    # What would pass, at its edge: the reported minimum atol passes, the float below fails.
    worst = max(c["min_atol"] for c in parity["comparisons"])
    at = cli.run("check", "bad.onnx", *AGAINST, "--seeds", "1", "--atol",
                 repr(worst), cwd=cwd)
    assert at.returncode == 0, at.stderr
    below = cli.run("check", "bad.onnx", *AGAINST, "--seeds", "1", "--atol",
                    repr(math.nextafter(worst, 0)), cwd=cwd)
    assert below.returncode == 1


def test_cli_min_top1_agreement_at_its_edge(cli: Cli, gate_files: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    cwd = gate_files
    # Move class 0's bias up by the median margin of class 2 over it: about half the samples of
    # the gate's input set (seed 0, batch 16) change their top-1 class.
    (x,) = make_inputs([(1, 3, 16, 16)], 1, [16])[0].tensors
    logits = ort.InferenceSession(str(cwd / "net.onnx")).run(None, {"input": x.numpy()})[0]
    proto = onnx.load(str(cwd / "net.onnx"))
    (bias,) = [i for i in proto.graph.initializer if i.name == "head.bias"]
    shifted = numpy_helper.to_array(bias).copy()
    shifted[0] += np.median(logits[:, 2] - logits[:, 0])
    bias.CopyFrom(numpy_helper.from_array(shifted, bias.name))
    onnx.save(proto, str(cwd / "noisy.onnx"))
    args = ["check", "noisy.onnx", *AGAINST, "--atol", "10", "--batch-sizes",
            "16", "--seeds", "1"]
    proc = cli.run(*args, "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    export = [c for c in json.loads(proc.stdout)["parity"]["comparisons"]
              if c["stage"] == "export"]
    top1 = min(c["top1"] for c in export)
    assert 0 < top1 < 1
    assert cli.run(*args, "--min-top1-agreement", repr(top1), cwd=cwd).returncode == 0
    proc = cli.run(*args, "--min-top1-agreement", repr(math.nextafter(top1, 1)), cwd=cwd)
    cli.one_line_error(proc, 1, "parity fails")
    assert "top-1 agreement" in proc.stdout


def test_cli_bad_locate_and_top1_input(cli: Cli, gate_files: Path, tmp_path: Path) -> None:
    cwd = gate_files
    cli.assert_bad(["check", "net.onnx", *AGAINST, "--min-top1-agreement",
                    "1.5"], "--min-top1-agreement", cwd=cwd)
    cli.assert_bad(["fold", *WS, "-o", "x.pt", "--onnx", "x.onnx", "--no-check",
                    "--locate"], "--locate", cwd=cwd)
    # No module metadata and no parameter names: --locate while parity holds is exit 2 ...
    _strip(cwd / "net.onnx", cwd / "anon.onnx", rename=True)
    proc = cli.run("check", "anon.onnx", *AGAINST, "--locate", cwd=cwd)
    cli.one_line_error(proc, 2, "records no module scopes")
    # ... and when parity fails, exit 1 with the reason in the report.
    _strip(cwd / "bad.onnx", cwd / "anon_bad.onnx", rename=True)
    proc = cli.run("check", "anon_bad.onnx", *AGAINST, "--seeds", "1", cwd=cwd)
    cli.one_line_error(proc, 1, "parity fails")
    assert "not located" in proc.stdout and "Traceback" not in proc.stderr
    # A graph with a custom op: onnxruntime cannot load it.
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 18, "acme" : 1]>
g (float[1, 3, 16, 16] x) => (float[1, 3] y) {
    y = acme.Frobnicate (x)
}
""")
    onnx.save(proto, str(cwd / "custom.onnx"))
    proc = cli.run("check", "custom.onnx", *AGAINST, "--locate", cwd=cwd)
    cli.one_line_error(proc, 2, "onnxruntime cannot load it")
