"""The WS parametrization: values, fused gradients, init modes, precision, accumulation."""

from __future__ import annotations

import pytest
import torch
from test_conventions import bit_var_mean, mmcv_aws, seed_paper, tf_keras, timm_batch_norm
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from wsconvert import accumulate, apply_ws
from wsconvert.conventions import CONVENTIONS, standardize_rows, to_rows
from wsconvert.ws import WeightStandardization

ORACLES = {
    "paper": seed_paper,
    "tf": tf_keras,
    "bit": bit_var_mean,
    "timm": timm_batch_norm,
    "scaled": lambda w: timm_batch_norm(w, gain=torch.ones(w.shape[0], dtype=w.dtype)),
    "aws": mmcv_aws,
}


def _layers() -> list[nn.Module]:
    return [nn.Conv1d(4, 6, 3), nn.Conv2d(4, 6, 3, groups=2), nn.Conv2d(6, 6, 3, groups=6),
            nn.Conv3d(2, 4, 3, dilation=2), nn.Conv2d(3, 5, 3, padding=1, padding_mode="circular")]


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("layer_idx", range(5))
def test_layer_weight_matches_oracle(convention: str, layer_idx: int) -> None:
    torch.manual_seed(layer_idx)
    layer = _layers()[layer_idx].double()
    original = layer.weight.detach().clone()
    apply_ws(layer, convention, inplace=True)
    torch.testing.assert_close(layer.weight, ORACLES[convention](original))
    torch.testing.assert_close(layer.parametrizations.weight.original, original, rtol=0, atol=0)


@pytest.mark.parametrize("groups", [1, 2])
def test_transposed_conv_standardized_per_output_channel(groups: int) -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 6, 3, groups=groups).double()
    w = layer.weight.detach().clone()
    apply_ws(layer, "timm", transposed=True, inplace=True)
    in_g, out_g = 4 // groups, 6 // groups
    for o in range(6):
        g, j = divmod(o, out_g)
        filt = w[g * in_g:(g + 1) * in_g, j]
        expected = (filt - filt.mean()) / torch.sqrt(filt.var(unbiased=False) + 1e-6)
        torch.testing.assert_close(layer.weight[g * in_g:(g + 1) * in_g, j], expected)


def _gradcheck_inputs(convention: str, init: str, transposed: bool = False
                      ) -> tuple[WeightStandardization, dict[str, torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    shape = (4, 3, 3, 3) if not transposed else (4, 3, 2, 2)
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    p = WeightStandardization(w.detach(), convention, init=init, transposed=transposed,
                              groups=2 if transposed else 1).double()
    params = {}
    if p.gain is not None:
        params["gain"] = (p.gain.detach() + 0.3 * torch.rand_like(p.gain)).requires_grad_()
    return p, params, w


@pytest.mark.parametrize("convention", list(CONVENTIONS))
@pytest.mark.parametrize("init", ["plain", "scale", "exact"])
def test_gradcheck_float64(convention: str, init: str) -> None:
    p, params, w = _gradcheck_inputs(convention, init)
    names = list(params)

    def f(weight: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return functional_call(p, dict(zip(names, extra, strict=True)), (weight,))

    assert torch.autograd.gradcheck(f, (w, *params.values()))


def test_gradcheck_transposed() -> None:
    p, _, w = _gradcheck_inputs("paper", "plain", transposed=True)
    assert torch.autograd.gradcheck(p, (w,))


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_fused_gradient_equals_autograd_of_reference(convention: str) -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    g = torch.randn(16, 8, 3, 3)
    p = WeightStandardization(w.detach(), convention)
    (fast,) = torch.autograd.grad(p(w), w, g)
    (ref,) = torch.autograd.grad(ORACLES[convention](w), w, g)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)


def test_gradient_is_projected_not_plain() -> None:
    """The seed's failed attempt cut the gradient; WS's is zero-mean and orthogonal to y."""
    torch.manual_seed(2)
    layer = nn.Conv2d(3, 4, 3).double()
    apply_ws(layer, "bit", inplace=True)  # eps 1e-10: orthogonality holds to ~1e-8
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layer(x).square().sum().backward()
    grad = to_rows(layer.parametrizations.weight.original.grad)
    y = to_rows(layer.weight.detach())
    assert grad.abs().max() > 1e-3
    torch.testing.assert_close(grad.sum(1), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    cos = (grad * y).sum(1) / (grad.norm(dim=1) * y.norm(dim=1))
    assert cos.abs().max() < 1e-6


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_exact_init_keeps_the_function(convention: str) -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
                        nn.Conv2d(8, 4, 1)).eval()
    for m in net:
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                m.weight.mul_(0.3).add_(0.01)
    x = torch.randn(2, 3, 12, 12)
    before = net(x)
    after = apply_ws(net, convention, init="exact").model(x)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-5, rel


def test_scale_init_keeps_filter_magnitude() -> None:
    torch.manual_seed(4)
    layer = nn.Conv2d(4, 6, 3)
    w = layer.weight.detach().clone()
    apply_ws(layer, "paper", init="scale", inplace=True)
    assert isinstance(layer.parametrizations.weight[0].gain, nn.Parameter)
    torch.testing.assert_close(layer.weight.reshape(6, -1).std(1), w.reshape(6, -1).std(1),
                               rtol=1e-3, atol=0)


def test_exact_init_buffers_not_trained() -> None:
    layer = nn.Conv2d(4, 6, 3)
    apply_ws(layer, "bit", init="exact", inplace=True)
    p = layer.parametrizations.weight[0]
    names = dict(layer.named_buffers())
    assert "parametrizations.weight.0.gamma" in names and "parametrizations.weight.0.beta" in names
    assert p.gain is None
    assert [n for n, _ in layer.named_parameters()] == ["bias", "parametrizations.weight.original"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_statistics_in_fp32(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    w = torch.randn(8, 4, 3, 3) * 2e-3
    layer = nn.Conv2d(4, 8, 3)
    layer.weight.data.copy_(w)
    layer.to(dtype)
    apply_ws(layer, "paper", inplace=True)
    assert layer.weight.dtype == dtype
    torch.testing.assert_close(layer.weight.float(), seed_paper(w.to(dtype).float()),
                               atol=1e-2, rtol=1e-2)


def test_fp16_small_weights_no_nan() -> None:
    """The paper's code in fp16 overflows in its backward (1/std**2 for std ~ 1e-3) and yields
    NaN gradients, as reported under AMP; statistics and backward in fp32 stay finite."""
    torch.manual_seed(0)
    w = (torch.randn(4, 2, 3, 3) * 1e-3).half()
    g = torch.randn(4, 2, 3, 3).half()
    naive = w.clone().requires_grad_()
    seed_paper(naive).mul(g).sum().backward()
    assert not torch.isfinite(naive.grad).all()  # what the reported NaNs looked like
    ours = w.clone().requires_grad_()
    out = WeightStandardization(ours.detach(), "paper")(ours)
    out.mul(g).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(ours.grad).all()
    ref = w.float().requires_grad_()
    seed_paper(ref).mul(g.float()).sum().backward()
    torch.testing.assert_close(ours.grad.float(), ref.grad, rtol=2e-2, atol=2.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_autocast_training_is_finite(dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    apply_ws(net, "paper", inplace=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=dtype):
            loss = net(torch.randn(2, 3, 10, 10)).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    for p in net.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("convention", ["paper", "scaled"])
def test_accumulate_gives_the_same_gradients(convention: str) -> None:
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    apply_ws(net, convention, init="scale", inplace=True)
    twin = apply_ws(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3)),
                    convention, init="scale").model
    twin.load_state_dict(net.state_dict())
    batches = [torch.randn(1, 3, 9, 9) for _ in range(4)]
    for x in batches:
        twin(x).square().mean().backward()
    with accumulate(net):
        for x in batches:
            net(x).square().mean().backward()
    for (name, a), b in zip(net.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert net[0].parametrizations.weight[0]._accum is None


def test_reference_path_equals_fast_path() -> None:
    torch.manual_seed(8)
    w = torch.randn(6, 3, 3, 3, dtype=torch.float64)
    for convention in CONVENTIONS:
        for init in ("plain", "scale", "exact"):
            p = WeightStandardization(w, convention, init=init).double()
            torch.testing.assert_close(p.reference(w), p(w))
    rows = standardize_rows(w.reshape(6, -1), "scaled")
    torch.testing.assert_close(rows.norm(dim=1), torch.ones(6, dtype=torch.float64), rtol=1e-4,
                               atol=0)


def test_parametrize_round_trip_keeps_parameter() -> None:
    layer = nn.Conv2d(3, 4, 3)
    original = layer.weight
    apply_ws(layer, inplace=True)
    assert parametrize.type_before_parametrizations(layer) is nn.Conv2d
    assert layer.parametrizations.weight.original is original
