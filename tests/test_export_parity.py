"""Real torch.onnx export and onnxruntime parity on small models."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from wsconvert import apply_ws
from wsconvert.errors import OutputExistsError, ParityFailure, UsageError
from wsconvert.export import (
    ExportConfig,
    export_onnx,
    graph_residue,
    infer_input_shape,
    parse_shape,
)
from wsconvert.fold import fold_ws
from wsconvert.parity import (
    check_parity,
    compare,
    fmt_up,
    load_inputs,
    make_inputs,
    save_failing_inputs,
    within_tolerance,
)


class TwoHeads(nn.Module):
    """Two inputs (2-D and 3-D convs), nested outputs (a dict holding a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(3, 6, 3, padding=1, groups=3)
        self.c3 = nn.Conv3d(2, 6, (1, 3, 3), padding=(0, 1, 1))
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> dict[str, object]:
        f = torch.relu(self.c2(a)) + self.c3(b).mean(2)
        return {"logits": self.fc(f.mean((2, 3))), "maps": (self.up(f), f.sum(1))}


def _ws_two_heads() -> nn.Module:
    torch.manual_seed(0)
    return apply_ws(TwoHeads(), "scaled", init="scale", transposed=True).model.eval()


def test_parse_and_infer_shape() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) == parse_shape("1x3x224x224")
    for bad in ("", "a,b", "1,-3", "1,0"):
        with pytest.raises(UsageError):
            parse_shape(bad)
    assert infer_input_shape(nn.Sequential(nn.Conv2d(5, 2, 3))) == (1, 5, 224, 224)
    assert infer_input_shape(nn.Sequential(nn.Conv1d(5, 2, 3))) == (1, 5, 256)


def test_export_multi_io_dynamic_batch_and_parity(tmp_path: Path) -> None:
    ws = _ws_two_heads()
    folded = fold_ws(ws).model
    cfg = ExportConfig(((1, 3, 8, 8), (1, 2, 4, 8, 8)), dynamic_batch=True)
    result = export_onnx(folded, tmp_path / "m.onnx", cfg)
    assert result.op_histogram["Conv"] == 2 and result.op_histogram["ConvTranspose"] == 1
    assert len(result.input_names) == 2 and len(result.output_names) == 3
    proto = onnx.load(str(tmp_path / "m.onnx"))
    assert graph_residue(proto) == []
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temp leftovers

    inputs = make_inputs(cfg.input_shapes, seeds=2, batch_sizes=[1, 3])
    report = check_parity(tmp_path / "m.onnx", ws, inputs, folded=folded)
    assert report.passed(), report.failures
    assert report.stages == ["fold", "export"]
    names = {c.output for c in report.comparisons}
    assert names == {"output['logits']", "output['maps'][0]", "output['maps'][1]"}
    assert len(report.comparisons) == 2 * 4 * 3
    summary = report.stage_summary()
    assert summary["export"]["max_abs"] < 1e-4 and summary["fold"]["min_cosine"] > 0.999999

    junit = ET.fromstring(report.to_junit())
    assert len(junit.findall(".//testcase")) == 24 and not junit.findall(".//failure")
    assert json.loads(report.to_json())["passed"] is True

    with pytest.raises(OutputExistsError):
        export_onnx(folded, tmp_path / "m.onnx", cfg)


RESIDUE_GRAPH = """
<ir_version: 8, opset_import: ["" : 18]>
ws (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) <float[4, 3, 3, 3] w, float[1] eps> {
    mu = ReduceMean <keepdims: int = 1> (w, axes)
    axes = Constant <value: tensor = int64[3] {1, 2, 3}> ()
    centered = Sub (w, mu)
    sq = Mul (centered, centered)
    var = ReduceMean <keepdims: int = 1> (sq, axes)
    std = Sqrt (var)
    den = Add (std, eps)
    wn = Div (centered, den)
    y = Conv (x, wn)
}
"""

CLEAN_GRAPH = """
<ir_version: 8, opset_import: ["" : 18]>
plain (float[1, 3, 8, 8] x) => (float[1] y) <float[4, 3, 3, 3] w> {
    c = Conv (x, w)
    y = ReduceMean <keepdims: int = 0> (c)
}
"""


ATTENTION_GRAPH = """
<ir_version: 8, opset_import: ["" : 18]>
attn (float[1, 4, 8] x) => (float[1, 4, 4] y) <float[8, 8] wq, float[8, 8] wk, float[8] bk> {
    q = MatMul (x, wq)
    k0 = MatMul (x, wk)
    k = Add (k0, bk)
    kt = Transpose <perm: ints = [0, 2, 1]> (k)
    y = MatMul (q, kt)
}
"""


def test_graph_residue_on_inline_graphs() -> None:
    # q @ k.T multiplies two activations: its "weight" input reaches a graph input.
    assert graph_residue(onnx.parser.parse_model(ATTENTION_GRAPH)) == []
    problems = graph_residue(onnx.parser.parse_model(RESIDUE_GRAPH))
    assert len(problems) == 1 and "weight computed by Div" in problems[0]
    # A ReduceMean on activations is not residue.
    assert graph_residue(onnx.parser.parse_model(CLEAN_GRAPH)) == []
    bn = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 18]>
bn (float[1, 4, 2, 2] x, float[4] s, float[4] b, float[4] m, float[4] v) => (float[1, 4, 2, 2] y) {
    y = BatchNormalization <training_mode: int = 1> (x, s, b, m, v)
}
""")
    assert "training-mode" in graph_residue(bn)[0]


def test_export_refuses_residue_and_leaves_nothing(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import wsconvert.export as export

    monkeypatch.setattr(export, "graph_residue", lambda proto: ["Conv: weight computed by Div"])
    folded = fold_ws(apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3))).model).model
    with pytest.raises(ParityFailure, match="WS residue"):
        export_onnx(folded, tmp_path / "ws.onnx", ExportConfig(((1, 3, 8, 8),)))
    assert list(tmp_path.iterdir()) == []


def test_input_shape_that_does_not_fit(tmp_path: Path) -> None:
    folded = fold_ws(apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3))).model).model
    with pytest.raises(UsageError, match="does not fit"):
        export_onnx(folded, tmp_path / "x.onnx", ExportConfig(((1, 5, 8, 8),)))


def test_perturbed_weight_fails_and_saves_inputs(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ws = apply_ws(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)),
                  "timm").model.eval()
    folded = fold_ws(ws).model
    cfg = ExportConfig(((2, 3, 10, 10),))
    export_onnx(folded, tmp_path / "m.onnx", cfg)
    proto = onnx.load(str(tmp_path / "m.onnx"))
    init = proto.graph.initializer[0]
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.05
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    inputs = make_inputs(cfg.input_shapes, seeds=2)
    report = check_parity(tmp_path / "bad.onnx", ws, inputs, folded=folded)
    assert not report.passed()
    assert {c.stage for c in report.failures} == {"export"}
    failing = report.failures[0]
    assert 0 < failing.frac_out < 1 and failing.cosine < 1
    assert ET.fromstring(report.to_junit()).findall(".//failure")
    saved = save_failing_inputs(report, inputs, tmp_path / "failing")
    assert {p.name for p in saved} == {"seed0.pt", "seed1.pt", "report.json"}
    again = load_inputs(tmp_path / "failing" / "seed0.pt")
    assert torch.equal(again[0].tensors[0], inputs[0].tensors[0])


def test_shape_mismatch_fails_the_gate(tmp_path: Path) -> None:
    torch.manual_seed(4)
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    small(torch.randn(1, 3, 6, 6))
    export_onnx(small, tmp_path / "s.onnx", ExportConfig(((1, 3, 6, 6),)))
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    report = check_parity(tmp_path / "s.onnx", other, make_inputs([(1, 3, 6, 6)]))
    assert not report.passed()
    assert report.failures[0].reason == "shape mismatch"
    assert report.stage_summary()["export"]["max_abs"] is None


def test_compare_semantics() -> None:
    inf = float("inf")
    ref = torch.tensor([1.0, 0.0, 100.0, 7.0])
    got = torch.tensor([1.0 + 2e-4, 5e-5, 100.05, 7.0])
    c = compare("export", "s", "o", ref, got, atol=1e-4, rtol=1e-3)
    # elementwise |got-ref| <= atol + rtol*|ref|: 2e-4 <= 1.1e-3, 5e-5 <= 1e-4, .05 <= .1001
    assert c.passed and c.frac_out == 0
    assert c.max_abs == pytest.approx(0.05, rel=1e-3)
    c = compare("export", "s", "o", ref, got, atol=0, rtol=1e-4)
    assert not c.passed and c.frac_out == pytest.approx(0.75)
    assert c.max_rel == inf and c.min_rtol == inf  # 5e-5 against a zero reference
    assert c.to_dict()["min_rtol"] == "inf" and json.dumps(c.to_dict(), allow_nan=False)
    # NaN on both sides is no evidence the model works: it fails, saying why (issue #11).
    nan = torch.tensor([float("nan")])
    c = compare("export", "s", "o", torch.cat([ref, nan]), torch.cat([got, nan]), atol=1, rtol=1)
    assert not c.passed and "non-finite" in c.reason
    c = compare("export", "s", "o", ref, got[:3], atol=1, rtol=1)
    assert not c.passed and c.reason == "shape mismatch" and c.min_atol == inf
    # An infinity never passes, whatever the tolerance, not even against the same infinity.
    for other in (1e38, inf):
        c = compare("export", "s", "o", torch.tensor([1.0, inf]), torch.tensor([1.0, other]),
                    atol=1e30, rtol=1e30)
        assert not c.passed and c.min_atol == inf == c.min_rtol and "non-finite" in c.reason


@pytest.mark.parametrize("where", ["reference", "candidate", "both"])
def test_nan_never_passes(where: str) -> None:
    """Not even against a NaN at the same place: no evidence the model works (issue #11)."""
    ref = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = ref.clone()
    if where in ("reference", "both"):
        ref[1, 0] = float("nan")
    if where in ("candidate", "both"):
        got[1, 0] = float("nan")
    c = compare("export", "s", "o", ref, got, atol=1e30, rtol=1e30)
    assert not c.passed and "non-finite values (NaN or inf)" in c.reason
    assert c.min_atol == c.min_rtol == float("inf")
    assert c.top1 == 0.5  # the row with a NaN does not agree
    assert c.to_dict()["min_atol"] == "inf"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("atol", "rtol"), [(1e-4, 1e-3), (0.0, 1e-3), (1e-4, 0.0)])
def test_reported_minimum_tolerances_are_exact(seed: int, atol: float, rtol: float) -> None:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(4, 50, generator=g) * 3
    got = ref + torch.randn(4, 50, generator=g) * 1e-3
    c = compare("export", "s", "o", ref, got, atol, rtol)
    assert 0 < c.min_atol < float("inf") and 0 < c.min_rtol < float("inf")
    assert c.passed == (c.min_atol <= atol)
    for a, ok in ((c.min_atol, True), (math.nextafter(c.min_atol, 0), False),
                  (c.min_atol * (1 - 1e-6), False)):
        assert compare("export", "s", "o", ref, got, a, rtol).passed is ok
    for r, ok in ((c.min_rtol, True), (math.nextafter(c.min_rtol, 0), False),
                  (c.min_rtol * (1 - 1e-6), False)):
        assert compare("export", "s", "o", ref, got, atol, r).passed is ok
    # The rounded-up figure in the text report passes too.
    assert compare("export", "s", "o", ref, got, float(fmt_up(c.min_atol)), rtol).passed


def test_minimum_tolerance_zero_when_exact() -> None:
    ref = torch.randn(3, 4)
    c = compare("export", "s", "o", ref, ref.clone(), 0.0, 0.0)
    assert c.passed and c.min_atol == 0 and c.min_rtol == 0


def test_fmt_up_rounds_up() -> None:
    assert fmt_up(1.2341e-4) == "0.000124" and float(fmt_up(1.2301e-4)) >= 1.2301e-4
    assert fmt_up(0.0) == "0" and fmt_up(float("inf")) == "inf" and fmt_up(None) == "n/a"
    assert fmt_up(9.991) == "10" and fmt_up(1.5) == "1.5"


def test_top_k_agreement_and_its_edge() -> None:
    ref = torch.zeros(4, 8)
    ref[:, :6] = torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])
    got = ref.clone()
    got[0, [0, 1]] = got[0, [1, 0]]  # top-1 changes, the top-5 set does not
    got[1, [4, 5]] = got[1, [5, 4]]  # the top-5 set changes, top-1 does not
    c = compare("export", "s", "o", ref, got, atol=10, rtol=0)
    assert c.passed and c.top1 == 0.75 and c.top5 == 0.75
    assert compare("export", "s", "o", ref, got, 10, 0, min_top1=0.75).passed
    c = compare("export", "s", "o", ref, got, 10, 0, min_top1=math.nextafter(0.75, 1))
    assert not c.passed and "top-1 agreement 0.75 <" in c.reason
    # Five classes or fewer: top-1 only; not 2-D or one class: not a classifier.
    few = compare("export", "s", "o", ref[:, :5], got[:, :5], 10, 0)
    assert few.top1 == 0.75 and math.isnan(few.top5) and few.to_dict()["top5"] is None
    for shape in ((4, 1), (2, 4, 8)):
        r = torch.randn(shape)
        assert not compare("export", "s", "o", r, r, 1, 1, min_top1=1.0).classifier


def test_load_inputs_npz(tmp_path: Path) -> None:
    import numpy as np

    np.savez(tmp_path / "x.npz", a=np.ones((1, 3, 4, 4), np.float32), b=np.zeros((1, 2)))
    (s,) = load_inputs(tmp_path / "x.npz")
    assert [t.shape for t in s.tensors] == [(1, 3, 4, 4), (1, 2)]


def test_min_top1_agreement_gate_at_its_edge(tmp_path: Path) -> None:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 10)).eval()
    with torch.no_grad():
        net[4].weight.mul_(20)  # logits that differ between samples
    export_onnx(net, tmp_path / "c.onnx", ExportConfig(((16, 3, 8, 8),)))
    proto = onnx.load(str(tmp_path / "c.onnx"))
    (bias,) = [i for i in proto.graph.initializer if i.name == "4.bias"]
    noise = torch.randn(10, generator=torch.Generator().manual_seed(0)).numpy()
    noisy = numpy_helper.to_array(bias) + 0.5 * noise  # 10 of 16 samples keep their top-1
    bias.CopyFrom(numpy_helper.from_array(noisy.astype("float32"), bias.name))
    onnx.save(proto, str(tmp_path / "noisy.onnx"))
    inputs = make_inputs([(16, 3, 8, 8)], seeds=1)
    loose = {"atol": 10.0, "rtol": 0.0, "locate": "never"}
    (case,) = check_parity(tmp_path / "noisy.onnx", net, inputs, **loose).comparisons
    assert case.passed and 0 < case.top1 < 1 and case.top1 * 16 == round(case.top1 * 16)
    at = check_parity(tmp_path / "noisy.onnx", net, inputs, min_top1_agreement=case.top1, **loose)
    assert at.passed() and at.to_dict()["stages"]["export"]["min_top1"] == case.top1
    above = check_parity(tmp_path / "noisy.onnx", net, inputs, **loose,
                         min_top1_agreement=math.nextafter(case.top1, 1))
    assert not above.passed() and "top-1 agreement" in above.failures[0].reason
    with pytest.raises(UsageError, match="min_top1_agreement"):
        check_parity(tmp_path / "noisy.onnx", net, inputs, min_top1_agreement=1.5)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3)).eval()
    export_onnx(conv, tmp_path / "maps.onnx", ExportConfig(((1, 3, 6, 6),)))
    with pytest.raises(UsageError, match="no output is classifier-like"):
        check_parity(tmp_path / "maps.onnx", conv, make_inputs([(1, 3, 6, 6)]),
                     min_top1_agreement=0.9)


def test_within_tolerance_agrees_with_compare() -> None:
    g = torch.Generator().manual_seed(7)
    ref = torch.randn(200, generator=g)
    inf, nan = float("inf"), float("nan")
    cases = [ref + torch.randn(200, generator=g) * 1e-4, ref.clone(), ref * (1 + 2e-3)]
    special = ref.clone()
    special[0] = nan
    cases.append(special)
    for bad in (inf, -inf):
        c = ref.clone()
        c[3] = bad
        cases.append(c)
    r_inf = ref.clone()
    r_inf[5] = inf
    for got in cases:
        for atol, rtol in ((1e-4, 1e-3), (0.0, 0.0), (1e30, 1e30)):
            for r in (ref, r_inf):
                full = compare("e", "s", "o", r, got, atol, rtol).passed
                assert within_tolerance(r, got, atol, rtol) <= full  # never passes what fails
                if r is ref and not got.isnan().any() and not got.isinf().any():
                    assert within_tolerance(r, got, atol, rtol) == full
