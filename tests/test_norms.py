"""swap_norm: which BatchNorms become GroupNorm, what they carry, group choice, reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import wsconvert
from wsconvert.errors import ConversionError, UsageError
from wsconvert.io.wsfile import load_model
from wsconvert.norms import choose_groups, swap_norm
from wsconvert.surgery import apply_ws


def _randomize(bn: nn.Module) -> None:
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn_like(t))
        bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)


def _net(channels: int = 48, eps: float = 1e-3) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, channels, 3, bias=False), nn.BatchNorm2d(channels, eps=eps),
                        nn.ReLU(), nn.Conv2d(channels, 8, 1), nn.ReLU(), nn.BatchNorm2d(8))
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            _randomize(m)
    return net.eval()


@pytest.mark.parametrize(("channels", "groups", "expected"), [
    (64, 32, 32), (48, 32, 24), (20, 32, 20), (30, 8, 6), (7, 4, 1), (1, 32, 1), (96, 1, 1),
])
def test_choose_groups(channels: int, groups: int, expected: int) -> None:
    g = choose_groups(channels, groups)
    assert g == expected
    # Independent check: the largest divisor not above groups.
    assert g == max(d for d in range(1, groups + 1) if channels % d == 0)


def test_choose_groups_rejects_nonpositive() -> None:
    with pytest.raises(UsageError):
        choose_groups(8, 0)


def test_swap_carries_affine_eps_and_reports_group_choice() -> None:
    net = _net()
    bn = net[1]
    report = swap_norm(apply_ws(net).model, groups=32)
    gn = report.model[1]
    assert isinstance(gn, nn.GroupNorm)
    assert (gn.num_groups, gn.num_channels, gn.eps, gn.affine) == (24, 48, 1e-3, True)
    torch.testing.assert_close(gn.weight, bn.weight, rtol=0, atol=0)
    torch.testing.assert_close(gn.bias, bn.bias, rtol=0, atol=0)
    assert gn.weight is not bn.weight and gn.weight.requires_grad
    rec = {r.name: r for r in report.norms}
    assert rec["1"].status == "swapped" and rec["1"].groups == 24 and rec["1"].follows == "0"
    assert "48 channels not divisible by 32: using 24 groups" in rec["1"].reason
    # BN "5" follows a ReLU, not the WS conv "3".
    assert rec["5"].status == "kept" and "does not directly follow" in rec["5"].reason
    assert isinstance(report.model[5], nn.BatchNorm2d)
    assert report.rule == "fx" and len(report.swapped) == 1 and len(report.kept) == 1
    # The swapped layer computes GroupNorm with the BN's affine, written independently here.
    x = torch.randn(2, 48, 5, 5)
    xg = x.reshape(2, 24, -1)
    ref = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True)
                                                         + 1e-3)
    ref = ref.reshape_as(x) * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(gn(x), ref, rtol=1e-5, atol=1e-5)
    d = report.to_dict()
    assert d["swapped"] == 1 and d["norms"][0]["groups"] == 24 and d["rule"] == "fx"


def test_copy_by_default_inplace_when_asked() -> None:
    converted = apply_ws(_net()).model
    report = swap_norm(converted)
    assert report.model is not converted and isinstance(converted[1], nn.BatchNorm2d)
    report = swap_norm(converted, inplace=True)
    assert report.model is converted and isinstance(converted[1], nn.GroupNorm)


def test_only_after_ws_layers() -> None:
    net = _net()
    report = swap_norm(apply_ws(net, exclude=["0"]).model)
    assert {r.name: r.status for r in report.norms} == {"1": "kept", "5": "kept"}
    with pytest.raises(ConversionError, match="apply_ws"):
        swap_norm(net)
    # `after` names the layers explicitly, WS or not.
    assert swap_norm(net, after=["0"]).swapped[0].name == "1"


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 3)
        self.bn = nn.BatchNorm1d(6)
        self.conv3 = nn.Conv3d(6, 4, 1)
        self.bn3 = nn.BatchNorm3d(4)
        self.sync = nn.SyncBatchNorm(4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn(self.conv(x))
        if float(y.detach().sum()) > 0:
            y = -y
        z = self.bn3(self.conv3(y[..., None, None]))
        return self.sync(z)


def test_fallback_registration_order_all_bn_kinds() -> None:
    report = swap_norm(apply_ws(_Branchy()).model, groups=4)
    assert report.rule == "registration order" and report.trace_error
    status = {r.name: (r.kind, r.status, r.groups) for r in report.norms}
    assert status == {"bn": ("BatchNorm1d", "swapped", 3), "bn3": ("BatchNorm3d", "swapped", 4),
                      "sync": ("SyncBatchNorm", "kept", None)}
    out = report.model(torch.randn(2, 4, 9))
    assert out.shape == (2, 4, 7, 1, 1)


class FrozenBatchNorm2d(nn.Module):
    """Shaped like torchvision's: affine and statistics as buffers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps = 1e-5

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale[:, None, None] + shift[:, None, None]


def test_frozen_kept_unless_asked() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8), nn.Conv2d(8, 8, 3),
                        nn.BatchNorm2d(8))
    net[3].requires_grad_(False)
    converted = apply_ws(net).model
    report = swap_norm(converted, groups=4)
    kept = {r.name: r.reason for r in report.kept}
    assert "frozen (FrozenBatchNorm2d)" in kept["1"]
    assert "frozen (affine requires_grad=False)" in kept["3"]
    assert not report.swapped
    report = swap_norm(converted, groups=4, convert_frozen=True)
    assert [r.name for r in report.swapped] == ["1", "3"]
    gn = report.model[1]
    assert isinstance(gn, nn.GroupNorm) and not gn.weight.requires_grad
    torch.testing.assert_close(gn.weight, net[1].weight)
    assert "affine kept frozen" in report.swapped[0].reason


def test_checkpoint_round_trip_rebuilds_group_norm(net_state: Path, tmp_path: Path) -> None:
    loaded = load_model(net_state, "wsnets:build")
    report = swap_norm(apply_ws(loaded.model).model, groups=32)
    assert [(r.name, r.groups) for r in report.swapped] == [("bn", 8)]
    out = wsconvert.save(report.model, tmp_path / "gn.ws.pt")
    again = wsconvert.load(out, model="wsnets:build").eval()
    assert isinstance(again.bn, nn.GroupNorm) and again.bn.num_groups == 8
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(again(x), report.model.eval()(x))
    assert len(list(wsconvert.surgery.ws_layers(again))) == 3


def test_group_norm_matches_functional() -> None:
    report = swap_norm(apply_ws(_net(channels=16)).model, groups=4)
    gn = report.model[1]
    x = torch.randn(3, 16, 4, 4)
    torch.testing.assert_close(gn(x), F.group_norm(x, 4, gn.weight, gn.bias, 1e-3))
