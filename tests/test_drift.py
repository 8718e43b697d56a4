"""Drift figures against independent computations, BN calibration, probes (the CLI side is in
tests/cli/test_apply.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from wsconvert.calibration import calibrate_bn
from wsconvert.defaults import DRIFT_THRESHOLD, PROBE_BATCH, PROBE_SPATIAL
from wsconvert.drift import check_drift, measure_drift
from wsconvert.errors import ConversionError, UsageError
from wsconvert.io.inputs import infer_input_shape, parse_shapes, sample_tensors
from wsconvert.probes import ProbeSource
from wsconvert.surgery import apply_ws


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                        nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net.eval()


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_measure_drift_matches_slices() -> None:
    original = _net()
    converted = apply_ws(original).model
    batches = [(torch.randn(4, 3, 6, 6),), (torch.randn(2, 3, 6, 6),)]
    report = measure_drift(original, converted, batches, source="test")
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        ref = original(x)
        got = converted(x)
        assert report.output_relative == pytest.approx(_rel(got, ref), rel=1e-6)
        assert report.output_max_abs == pytest.approx(float((got - ref).abs().max()), rel=1e-5)
        # Per layer: the outputs of the first i+1 modules, computed independently. Module 2 is an
        # in-place ReLU: module 1's figure must be the BN output before the ReLU ran.
        expected = {}
        for i in range(len(original)):
            a = original[: i + 1](x.clone())
            b = converted[: i + 1](x.clone())
            expected[str(i)] = _rel(b, a)
    names = [r.name for r in report.layers]
    assert names == [str(i) for i in range(len(original))]
    for r in report.layers:
        assert r.relative == pytest.approx(expected[r.name], rel=1e-6), r.name
        assert r.calls == 2
    assert report.samples == 6
    jumps = [report.layers[0].relative] + [
        b.relative - a.relative for a, b in zip(report.layers, report.layers[1:], strict=False)]
    assert [r.jump for r in report.layers] == pytest.approx(jumps)
    top = max(r.relative for r in report.layers)
    assert report.worst_layer is not None and report.worst_layer.relative == top
    assert report.divergence_layer is not None
    assert report.divergence_layer.jump == max(jumps)
    d = report.to_dict()
    assert d["layers"][0]["converted_kind"] == "Conv2d" and d["source"] == "test"
    # The models are back in eval mode and unchanged.
    assert not original.training and not converted.training


def test_identical_models_have_zero_drift() -> None:
    net = _net()
    report = measure_drift(net, net, [(torch.randn(2, 3, 5, 5),)])
    assert report.output_relative == 0.0 and all(r.relative == 0.0 for r in report.layers)


def test_exact_init_has_small_drift_and_no_advice() -> None:
    original = _net()
    converted = apply_ws(original, init="exact").model
    check = check_drift(original, converted, ProbeSource(shapes=((4, 3, 8, 8),)), init="exact")
    assert check.before.output_relative < 1e-4 and not check.large
    assert check.suggestion == ""


def test_plain_init_large_drift_suggests_exact() -> None:
    original = _net()
    converted = apply_ws(original).model
    check = check_drift(original, converted, ProbeSource(shapes=((4, 3, 8, 8),)))
    assert check.large and check.before.output_relative > DRIFT_THRESHOLD
    assert "--init exact" in check.suggestion and "--calibrate" in check.suggestion
    gn = check_drift(original, converted, ProbeSource(shapes=((4, 3, 8, 8),)), norm="gn")
    assert "GroupNorm swap" in gn.suggestion


def test_calibrate_bn_cumulative_average_of_batches() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5),
                          nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    model.eval()
    model[4].train()  # modes must come back exactly as they were
    batches = [(torch.randn(3, 3, 6, 6) * (k + 1) + k,) for k in range(3)]
    report = calibrate_bn(model, batches, source="unit")
    # Independent: momentum None averages the per-batch mean and unbiased variance.
    with torch.no_grad():
        feats = [model[0](b[0]) for b in batches]
        means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
        vars_ = torch.stack([f.transpose(0, 1).reshape(4, -1).var(1, unbiased=True)
                             for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, vars_, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 3
    assert model[1].momentum == 0.3 and model[4].momentum == 0.1
    assert [m.training for m in model] == [False, False, False, False, True]
    assert report.layers == ["1", "4"] and report.batches == 3 and report.samples == 9
    assert report.var_ratio["1"] == pytest.approx(float(vars_.mean()), rel=1e-5)
    with pytest.raises(ConversionError):
        calibrate_bn(nn.Sequential(nn.Conv2d(3, 3, 1)), batches)


def test_calibration_reduces_drift_on_real_samples(tmp_path: Path) -> None:
    original = _net()
    torch.manual_seed(1)
    # Data whose statistics the original's BN running stats describe: calibrate the original
    # itself first, on the same kind of data the probes come from.
    data = torch.randn(64, 3, 8, 8) * 2 + 0.5
    calibrate_bn(original, [(data,)])
    torch.save({"inputs": data}, tmp_path / "probe.pt")
    converted = apply_ws(original).model
    source = ProbeSource.for_model(original, inputs=tmp_path / "probe.pt")
    check = check_drift(original, converted, source, calibrate=8)
    assert check.after is not None and check.calibration is not None
    assert check.before.output_relative > 0.5
    assert check.after.output_relative < 0.1 * check.before.output_relative
    assert check.calibration.samples == 64
    assert "random probe" not in check.suggestion


def test_probe_shapes_and_files(tmp_path: Path) -> None:
    assert parse_shapes("1,3,224,224") == ((1, 3, 224, 224),)
    assert parse_shapes("2,4,9;2,2,3,5,5") == ((2, 4, 9), (2, 2, 3, 5, 5))
    for bad in ("", "1,a", "0,3"):
        with pytest.raises(UsageError):
            parse_shapes(bad)
    assert infer_input_shape(_net(), PROBE_BATCH, PROBE_SPATIAL) == (8, 3, 64, 64)
    assert infer_input_shape(nn.Conv3d(2, 3, 1), 2, PROBE_SPATIAL) == (2, 2, 16, 16, 16)
    with pytest.raises(UsageError, match="`input_shape`"):
        infer_input_shape(nn.Linear(2, 2))
    np.savez(tmp_path / "s.npz", x=np.ones((5, 3, 4, 4), dtype=np.float32))
    (x,) = sample_tensors(tmp_path / "s.npz")
    assert x.shape == (5, 3, 4, 4)
    torch.save((torch.zeros(3, 2), torch.ones(3, 4)), tmp_path / "pair.pt")
    assert [t.shape[1] for t in sample_tensors(tmp_path / "pair.pt")] == [2, 4]
    torch.save((torch.zeros(3, 2), torch.ones(2, 4)), tmp_path / "bad.pt")
    with pytest.raises(UsageError, match="disagree"):
        sample_tensors(tmp_path / "bad.pt")
    source = ProbeSource(samples=(torch.arange(5.0)[:, None],), batch_size=2)
    assert source.batch(2)[0].flatten().tolist() == [4.0, 0.0]  # cycles
    assert source.drift_batches() == 3
    random = ProbeSource(shapes=((2, 3),), seed=4)
    torch.testing.assert_close(random.batch(1)[0], random.batch(1)[0])
    assert not torch.equal(random.batch(0)[0], random.batch(1)[0])


def test_forward_failure_is_a_usage_error() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    with pytest.raises(UsageError, match="`input_shape`"):
        check_drift(net, apply_ws(net).model, ProbeSource.for_model(net))
    ok = check_drift(net, apply_ws(net).model, ProbeSource.for_model(net, "2,3,8,8"))
    assert ok.before.samples == 4
