"""fold_ws: correctly rounded static weights, strict loading into the original architecture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from wsconvert import apply_ws
from wsconvert.conventions import CONVENTIONS
from wsconvert.fold import fold_ws, folded_weight
from wsconvert.surgery import ws_layers


def _plain() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Conv1d(6, 6, 3, groups=3), nn.ReLU(),
        nn.ConvTranspose1d(6, 4, 2, stride=2, groups=2), nn.ReLU(), nn.Conv1d(4, 4, 3, groups=4),
        nn.Conv1d(4, 4, 1, groups=4))


def _ulps(a: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    spacing = torch.nextafter(a.abs(), torch.tensor(float("inf"))) - a.abs()
    return (a.double() - exact).abs() / spacing.double()


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("init", ["plain", "scale", "exact"])
def test_fold_matches_ws_and_loads_strictly(convention: str, init: str) -> None:
    ws = apply_ws(_plain(), convention, init=init, transposed=True, linear=True).model.eval()
    # Fine-tune a little so gain / weights move away from their init.
    opt = torch.optim.SGD(ws.parameters(), lr=0.05)
    x = torch.randn(2, 3, 16)
    ws.train()
    ws(x).square().mean().backward()
    opt.step()
    ws.eval()
    report = fold_ws(ws)
    folded = report.model
    assert len(report.folded) == 4 and not list(ws_layers(folded))
    assert [type(m) for m in folded] == [type(m) for m in _plain()]
    fresh = _plain()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), ws(x), atol=1e-5, rtol=1e-4)
    # The WS model itself is untouched (fold copies by default).
    assert len(list(ws_layers(ws))) == 4


def test_folded_weight_is_correctly_rounded() -> None:
    torch.manual_seed(1)
    layer = apply_ws(nn.Conv2d(64, 64, 3), "paper", init="scale").model
    with torch.no_grad():
        layer.parametrizations.weight[0].gain.mul_(torch.rand(64) + 0.5)
    p = layer.parametrizations.weight[0]
    w = layer.parametrizations.weight.original.detach()
    exact = p.double().reference(w.double())
    p.float()
    folded = folded_weight(layer)
    assert folded.dtype == torch.float32
    assert _ulps(folded, exact).max() <= 0.5 + 1e-9  # correctly rounded
    direct = layer.weight.detach()  # the float32 WS path, for comparison
    assert _ulps(direct, exact).max() > 0.5


def test_fold_without_ws_is_noop() -> None:
    report = fold_ws(_plain())
    assert report.noop and "already plain" in report.summary()


def test_fuse_bn() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                        nn.BatchNorm2d(4))
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    ws = apply_ws(net, "timm").model.eval()
    report = fold_ws(ws, fuse_bn=True)
    assert [r.name for r in report.fused] == ["1", "4"]
    assert isinstance(report.model[1], nn.Identity)
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(report.model(x), ws(x), atol=1e-5, rtol=1e-4)


def test_fuse_bn_only_when_bn_is_the_conv_s_sole_consumer() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(x))  # conv feeds bn and the sum

    net = Skip().eval()
    net.bn.running_mean.normal_()
    report = fold_ws(apply_ws(net).model.eval(), fuse_bn=True)
    assert [r.name for r in report.fused] == ["bn2"]
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(report.model(x), apply_ws(net).model.eval()(x), atol=1e-5,
                               rtol=1e-4)
