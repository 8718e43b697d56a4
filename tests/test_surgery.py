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
    assert "`transposed=True`" in reasons["3"] and "`linear=True`" in reasons["5"]
    rec = report.layers[2]
    assert (rec.kind, rec.shape, rec.fan_in) == ("MyConv", (8, 4, 3, 3), 36)
    assert "3 layer(s) converted" in report.summary()


def test_flags_and_globs() -> None:
    report = apply_ws(_net(), transposed=True, linear=True, exclude=["4"])
    assert _status(report) == {"0": "converted", "1": "skipped", "2": "converted",
                               "3": "converted", "4": "skipped", "5": "converted"}
    report = apply_ws(_net(), include=["[02]"])
    assert [r.name for r in report.converted] == ["0", "2"]
    assert report.layers[4].reason == "not matched by `include`"


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


def test_include_and_exclude_take_one_glob_as_a_string() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    report = apply_ws(net, exclude="1")
    assert [r.status for r in report.layers] == ["converted", "skipped"]
    assert report.layers[1].reason == "matched by `exclude`"
    assert [r.status for r in apply_ws(net, include="1").layers] == ["skipped", "converted"]
    with pytest.raises(UsageError, match="`include` takes glob strings"):
        apply_ws(net, include=[1])  # type: ignore[list-item]
    with pytest.raises(UsageError, match="`exclude` takes glob strings"):
        apply_ws(net, exclude=0)  # type: ignore[arg-type]
    assert len(apply_ws(net, include=None, exclude=None).converted) == 2  # None: no filter


def test_a_hook_computed_weight_is_skipped_and_nothing_is_half_converted() -> None:
    """torch.nn.utils.spectral_norm (the old hook API) computes ``weight`` from ``weight_orig``:
    the layer is skipped with its reason; an inplace model is never left part converted."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.utils.spectral_norm(nn.Conv2d(4, 4, 3)))
    report = apply_ws(net, inplace=True)
    assert [r.status for r in report.layers] == ["converted", "skipped"]
    assert "spectral_norm" in report.layers[1].reason
    net(torch.randn(1, 3, 8, 8))


def test_a_failed_registration_leaves_an_inplace_model_as_it_was(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import wsconvert.surgery as surgery

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    weights = [m.weight for m in net]
    calls = []
    real = surgery.register_ws

    def flaky(module: nn.Module, p: WeightStandardization) -> None:
        calls.append(module)
        if len(calls) == 3:
            raise ValueError("refused\nsecond line")
        real(module, p)

    monkeypatch.setattr(surgery, "register_ws", flaky)
    with pytest.raises(ConversionError, match=r"could not be registered on a layer: refused$"):
        apply_ws(net, inplace=True)
    assert [type(m) for m in net] == [nn.Conv2d] * 3
    assert all(m.weight is w for m, w in zip(net, weights, strict=True))  # the same Parameters


def test_meta_device_weights_are_refused_in_one_line() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConversionError, match="meta device"):
        apply_ws(net)


@pytest.mark.parametrize("eps", [True, "1e-5", -1.0, float("nan"), None])
def test_eps_must_be_a_number(eps: object) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    if eps is None:
        import numpy as np

        for number in (0, np.float32(1e-5), np.int64(0), torch.tensor(1e-5)):  # all numbers
            assert apply_ws(net, eps=number).layers[0].eps == pytest.approx(float(number))
        return
    with pytest.raises(UsageError, match="eps must be a finite number >= 0"):
        apply_ws(net, eps=eps)  # type: ignore[arg-type]


def test_unregister_keeps_a_weight_tied_between_layers() -> None:
    from wsconvert.surgery import unregister_ws

    net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1))
    net[1].weight = net[0].weight
    ws = apply_ws(net).model
    assert len(list(ws.parameters())) == 3  # tied: one weight, two biases
    shared = ws[0].parametrizations.weight.original
    for m in ws:
        assert unregister_ws(m) is shared
    assert ws[0].weight is ws[1].weight is shared
