"""apply_ws: which layers convert, which are skipped and why, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsconvert import apply_ws
from wsconvert.errors import ConversionError, UsageError
from wsconvert.surgery import restore_ws, ws_layer_configs, ws_layers
from wsconvert.ws import WeightStandardization


class MyConv(nn.Conv2d):
    """A user subclass: still a conv, still converted."""


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),          # 0 converted
        nn.Conv2d(8, 8, 1, groups=8),  # 1 fan-in 1
        MyConv(8, 8, 3, groups=2),   # 2 subclass
        nn.ConvTranspose2d(8, 4, 2),  # 3 transposed
        nn.Conv1d(4, 4, 3),          # 4
        nn.Linear(4, 2),             # 5
    )


def _status(report) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r.name: r.status for r in report.layers}


def test_default_rules() -> None:
    report = apply_ws(_net())
    assert _status(report) == {"0": "converted", "1": "skipped", "2": "converted",
                               "3": "skipped", "4": "converted", "5": "skipped"}
    reasons = {r.name: r.reason for r in report.skipped}
    assert "fan-in 1" in reasons["1"]
    assert "--transposed" in reasons["3"] and "--linear" in reasons["5"]
    rec = report.layers[2]
    assert (rec.kind, rec.shape, rec.fan_in) == ("MyConv", (8, 4, 3, 3), 36)
    assert "3 layer(s) converted" in report.summary()


def test_flags_and_globs() -> None:
    report = apply_ws(_net(), transposed=True, linear=True, exclude=["4"])
    assert _status(report) == {"0": "converted", "1": "skipped", "2": "converted",
                               "3": "converted", "4": "skipped", "5": "converted"}
    report = apply_ws(_net(), include=["[02]"])
    assert [r.name for r in report.converted] == ["0", "2"]
    assert report.layers[4].reason == "not matched by --include"


def test_copy_by_default_and_inplace() -> None:
    net = _net()
    report = apply_ws(net)
    assert report.model is not net and next(ws_layers(net), None) is None
    report = apply_ws(net, inplace=True)
    assert report.model is net and len(list(ws_layers(net))) == 3


def test_refuses_twice_and_foreign_ws() -> None:
    net = apply_ws(_net()).model
    with pytest.raises(ConversionError, match="already has Weight Standardization"):
        apply_ws(net)

    class StdConv2d(nn.Conv2d):
        pass

    with pytest.raises(ConversionError, match="StdConv2d"):
        apply_ws(nn.Sequential(StdConv2d(3, 4, 3)))


def test_refusals() -> None:
    with pytest.raises(ConversionError, match="no convolution"):
        apply_ws(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ConversionError, match="no layer was converted"):
        apply_ws(nn.Sequential(nn.Conv2d(3, 3, 1, groups=3)))
    with pytest.raises(UsageError, match="convention"):
        apply_ws(_net(), "nope")
    with pytest.raises(UsageError, match="init"):
        apply_ws(_net(), init="nope")
    for eps in (float("nan"), -1e-12, float("inf")):
        with pytest.raises(UsageError, match="eps must be a finite number >= 0"):
            apply_ws(_net(), eps=eps)
        with pytest.raises(UsageError, match="eps must be a finite number >= 0"):
            WeightStandardization(torch.ones(2, 3, 3, 3), eps=eps)
    apply_ws(_net(), eps=0.0)  # the edge: 0 is allowed
    bad = _net()
    bad[0].weight.data[0, 0, 0, 0] = float("nan")
    with pytest.raises(ConversionError, match="NaN or inf"):
        apply_ws(bad)


def test_eps_override_and_report_json() -> None:
    report = apply_ws(_net(), "timm", eps=1e-8)
    assert {r.eps for r in report.converted} == {1e-8}
    d = report.to_dict()
    assert d["converted"] == 3 and d["layers"][0]["shape"] == [8, 3, 3, 3]


def test_configs_restore_same_model() -> None:
    ws = apply_ws(_net(), "scaled", init="exact", transposed=True).model
    fresh = _net()
    restore_ws(fresh, ws_layer_configs(ws))
    fresh.load_state_dict(ws.state_dict())
    x = torch.randn(1, 3, 9, 9)
    assert torch.equal(fresh[:4](x), ws[:4](x))


def test_non_finite_standardization_is_refused_before_any_layer_converts() -> None:
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    with torch.no_grad():
        model[1].weight[2].fill_(0.5)  # a constant filter: std 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConversionError, match="layer 1: standardizing gives non-finite"):
        apply_ws(model, "paper", eps=0.0, inplace=True)
    # The first layer passed its check but was not converted either: the model is as it was.
    assert not any(parametrize.is_parametrized(m) for m in model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # A conversion that succeeds leaves no evaluation cache behind (nothing ran the model).
    report = apply_ws(model, "paper")
    for m in report.model:
        assert m.parametrizations.weight[0]._cache is None
