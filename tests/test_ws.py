"""The WS parametrization: values, fused gradients, init modes, precision, accumulation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

import pytest
import torch
from test_conventions import bit_var_mean, mmcv_aws, seed_paper, tf_keras, timm_batch_norm
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

import wsconvert
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
    """First order through the fused backward; second order (create_graph=True, Hessians)
    through the plain steps: a differentiable gradient, not zeros."""
    p, params, w = _gradcheck_inputs(convention, init)
    names = list(params)

    def f(weight: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        return functional_call(p, dict(zip(names, extra, strict=True)), (weight,))

    assert torch.autograd.gradcheck(f, (w, *params.values()))
    assert torch.autograd.gradgradcheck(f, (w, *params.values()))


def test_gradgradcheck_through_gain_and_shift() -> None:
    from wsconvert.ws import _Standardize

    torch.manual_seed(3)
    w = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, dtype=torch.float64).add_(0.5).requires_grad_()
    shift = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for unbiased, in_sqrt in ((True, False), (False, True)):
        def f(w: torch.Tensor, gain: torch.Tensor, shift: torch.Tensor,
              unbiased: bool = unbiased, in_sqrt: bool = in_sqrt) -> torch.Tensor:
            return cast(torch.Tensor, _Standardize.apply(w, 1e-5, unbiased, in_sqrt, False, 1,
                                                         gain, shift, None))

        assert torch.autograd.gradcheck(f, (w, gain, shift))
        assert torch.autograd.gradgradcheck(f, (w, gain, shift))


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_hessian_equals_the_oracles(convention: str) -> None:
    torch.manual_seed(4)
    w0 = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    g = torch.randn_like(w0)
    p = WeightStandardization(w0, convention).double()
    hess = torch.autograd.functional.hessian(lambda w: (p(w) * g).square().sum(), w0)
    oracle = torch.autograd.functional.hessian(
        lambda w: (ORACLES[convention](w) * g).square().sum(), w0)
    assert hess.abs().max() > 1e-2  # not the zeros a once-differentiable backward gave
    torch.testing.assert_close(hess, oracle, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("convention", ["timm", "paper"])
def test_second_derivatives_at_a_constant_filter_are_finite(convention: str) -> None:
    """A constant (e.g. zero-initialised) filter: eps inside the square root is smooth there
    (its second derivatives are those of the formula), eps outside gets 0 like the fused
    subgradient; NaN never."""
    torch.manual_seed(5)
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    w[1] = 0.7
    w.requires_grad_()
    p = WeightStandardization(w.detach(), convention).double()
    (g,) = torch.autograd.grad(p(w)[0].square().sum(), w, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), w)
    assert bool(gg.isfinite().all())
    if convention == "timm":  # against the oracle, which is smooth there too
        w2 = w.detach().clone().requires_grad_()
        (o,) = torch.autograd.grad(ORACLES[convention](w2)[0].square().sum(), w2,
                                   create_graph=True)
        (oo,) = torch.autograd.grad(o.square().sum(), w2)
        torch.testing.assert_close(gg, oo, rtol=1e-7, atol=1e-9)


def test_double_backward_under_activation_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(6)
    conv = apply_ws(nn.Conv2d(3, 4, 3), "paper").model.double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    w = conv.parametrizations.weight.original

    def penalty(use_checkpoint: bool) -> torch.Tensor:
        out = (checkpoint(conv, x, use_reentrant=False) if use_checkpoint else conv(x))
        (g,) = torch.autograd.grad(out.square().sum(), w, create_graph=True)
        return g.square().sum()

    expected = torch.autograd.grad(penalty(False), w)[0]
    torch.testing.assert_close(torch.autograd.grad(penalty(True), w)[0], expected)


def test_writing_the_weight_between_forward_and_backward_is_allowed() -> None:
    """As before second-order support: the first-order backward never reads the weight."""
    conv = apply_ws(nn.Conv2d(3, 4, 3), "paper").model
    out = conv(torch.randn(1, 3, 6, 6))
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(2)
    out.sum().backward()
    assert conv.parametrizations.weight.original.grad is not None


def test_create_graph_refuses_a_weight_written_since_the_forward() -> None:
    """The second-order path needs the weight's value at the forward: a write in between is an
    error, as in plain autograd, never a gradient at the new value."""
    conv = apply_ws(nn.Conv2d(3, 4, 3), "paper").model.double()
    w = conv.parametrizations.weight.original
    out = conv(torch.randn(1, 3, 6, 6, dtype=torch.float64)).square().sum()
    with torch.no_grad():
        w.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, w, create_graph=True)


def test_forward_mode_ad_through_the_weight() -> None:
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(7)
    w0 = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    tangent = torch.randn_like(w0)
    p = WeightStandardization(w0, "paper").double()
    with fwAD.dual_level():
        got = fwAD.unpack_dual(p(fwAD.make_dual(w0, tangent))).tangent
    _, expected = torch.func.jvp(ORACLES["paper"], (w0,), (tangent,))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


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


# --------------------------------------------------- evaluation cache and training workspace


def _eval_layer(convention: str = "paper", init: str = "plain") -> tuple[nn.Module,
                                                                        WeightStandardization]:
    torch.manual_seed(9)
    layer = apply_ws(nn.Conv2d(4, 6, 3), convention, init=init).model.eval()
    p = layer.parametrizations.weight[0]
    assert isinstance(p, WeightStandardization)
    return layer, p


def _fresh(layer: nn.Module, p: WeightStandardization) -> torch.Tensor:
    with torch.no_grad():
        return p.standardize(layer.parametrizations.weight.original)


def _assert_recomputed(layer: nn.Module, p: WeightStandardization, old: torch.Tensor) -> None:
    with torch.no_grad():
        new = layer.weight
    assert new is not old
    torch.testing.assert_close(new, _fresh(layer, p), rtol=0, atol=0)
    with torch.no_grad():
        assert layer.weight is new  # and cached again


def test_eval_reuses_the_standardized_weight() -> None:
    layer, p = _eval_layer()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first
        torch.testing.assert_close(first, _fresh(layer, p), rtol=0, atol=0)
        x = torch.randn(2, 4, 7, 7)
        torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    with torch.inference_mode():
        assert layer.weight is first


def test_frozen_layer_with_grad_enabled_is_cached_and_still_passes_gradients() -> None:
    layer, p = _eval_layer()
    layer.requires_grad_(False)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    first = layer.weight
    assert layer.weight is first and not first.requires_grad
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer.requires_grad_(True)
    w = layer.weight
    assert w.requires_grad and p._cache is None  # recording a gradient: no cache


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-foreach", "adamw-fused"])
def test_optimizer_step_invalidates(optimizer: str) -> None:
    layer, p = _eval_layer("scaled", init="scale")
    params = list(layer.parameters())
    opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, foreach=False),
           "sgd-foreach": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True),
           "adamw-fused": lambda: torch.optim.AdamW(params, lr=0.1, fused=True)}[optimizer]()
    with torch.no_grad():
        old = layer.weight
    layer.train()
    layer(torch.randn(2, 4, 6, 6)).square().mean().backward()
    layer.eval()
    with torch.no_grad():
        assert layer.weight is not old  # gradients alone change nothing, but the cache was freed
        cached = layer.weight
    opt.step()
    _assert_recomputed(layer, p, cached)


def test_gain_change_alone_invalidates() -> None:
    layer, p = _eval_layer("scaled")
    with torch.no_grad():
        old = layer.weight
        assert p.gain is not None
        p.gain.mul_(2.0)
    _assert_recomputed(layer, p, old)


def test_load_state_dict_invalidates_weight_gamma_and_beta() -> None:
    layer, p = _eval_layer("aws", init="exact")
    other = apply_ws(nn.Conv2d(4, 6, 3), "aws", init="exact").model
    for key in ("parametrizations.weight.original", "parametrizations.weight.0.gamma",
                "parametrizations.weight.0.beta"):
        with torch.no_grad():
            old = layer.weight
        state = layer.state_dict()
        state[key] = other.state_dict()[key]
        layer.load_state_dict(state)
        _assert_recomputed(layer, p, old)
    with torch.no_grad():
        old = layer.weight
    layer.load_state_dict(other.state_dict(), assign=True)  # new tensors, not copies
    _assert_recomputed(layer, p, old)


def test_copy_and_dtype_changes_invalidate() -> None:
    layer, p = _eval_layer()
    with torch.no_grad():
        old = layer.weight
        layer.parametrizations.weight.original.copy_(torch.randn(6, 4, 3, 3))
    _assert_recomputed(layer, p, old)
    with torch.no_grad():
        old = layer.weight
    layer.to(torch.float64)
    with torch.no_grad():
        assert layer.weight.dtype == torch.float64
    _assert_recomputed(layer, p, old)
    with torch.no_grad():
        old = layer.weight
    layer.to(torch.float32)
    _assert_recomputed(layer, p, old)
    with torch.no_grad():
        assert layer.weight.dtype == torch.float32


def test_new_storage_at_a_reused_address_invalidates() -> None:
    """``param.data = t`` keeps the version counter; a freed storage's address can come back."""
    layer, p = _eval_layer()
    original = layer.parametrizations.weight.original
    for seed in range(5):
        with torch.no_grad():
            old = layer.weight
        original.data = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(seed))
        _assert_recomputed(layer, p, old)


def test_eps_change_and_clear_cache() -> None:
    layer, p = _eval_layer("timm")
    with torch.no_grad():
        old = layer.weight
    p.eps = 1e-2
    _assert_recomputed(layer, p, old)
    with torch.no_grad():
        old = layer.weight
        # Writes through .data bypass the version counter: clear_cache is the way out.
        layer.parametrizations.weight.original.data.mul_(3.0).add_(1.0)
        p.clear_cache()
    _assert_recomputed(layer, p, old)


def test_writing_into_the_cached_weight_invalidates_it() -> None:
    layer, p = _eval_layer()
    with torch.no_grad():
        w = layer.weight
        w.mul_(0.0)
    _assert_recomputed(layer, p, w)


def test_accumulate_frees_the_cache_and_the_next_eval_sees_the_step() -> None:
    layer, p = _eval_layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        old = layer.weight
    with accumulate(layer):
        assert p._cache is None
        with torch.no_grad():
            inside = layer.weight
        for _ in range(2):
            layer(torch.randn(1, 4, 6, 6)).square().mean().backward()
    torch.testing.assert_close(inside, old, rtol=0, atol=0)
    opt.step()
    _assert_recomputed(layer, p, old)


def test_accumulate_refuses_a_step_inside_and_nesting() -> None:
    from wsconvert.errors import UsageError

    torch.manual_seed(6)
    gen = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3)), "paper").model
    other = nn.Linear(2, 2)  # a second network (a GAN's discriminator, say)
    opt, opt_other = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (gen, other))
    before = gen[0].parametrizations.weight.original.detach().clone()
    with pytest.raises(UsageError, match="step after the block"), accumulate(gen):
        gen(torch.randn(1, 3, 6, 6)).sum().backward()
        other(torch.randn(1, 2)).sum().backward()
        opt_other.step()  # another model's optimizer is left alone
        opt.step()
    assert torch.equal(gen[0].parametrizations.weight.original, before)  # nothing half done
    with pytest.raises(UsageError, match="do not nest"), accumulate(gen), accumulate(gen):
        pass
    opt.zero_grad()
    with accumulate(gen):  # the guard is gone with the blocks
        gen(torch.randn(1, 3, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(gen[0].parametrizations.weight.original, before)
    from wsconvert.ws import _AccumulateSteps

    assert _AccumulateSteps.active == [] and _AccumulateSteps._handle is None


def test_cache_memory_freed_in_training_and_workspace_freed_in_eval() -> None:
    layer, p = _eval_layer()
    with torch.no_grad():
        layer(torch.randn(1, 4, 6, 6))
    assert p._cache is not None and not p._work
    layer.train()
    assert p._cache is None
    layer(torch.randn(1, 4, 6, 6)).sum().backward()
    assert p._work and p._cache is None
    layer.eval()
    assert not p._work
    with torch.no_grad():
        layer(torch.randn(1, 4, 6, 6))
    layer(torch.randn(1, 4, 6, 6)).sum().backward()  # grad-enabled forward in eval mode
    assert p._cache is None


def test_cache_never_saved_nor_copied() -> None:
    import pickle

    layer, p = _eval_layer("scaled", init="exact")
    with torch.no_grad():
        w = layer.weight
    assert p._cache is not None
    assert set(layer.state_dict()) == {
        "bias", "parametrizations.weight.original", "parametrizations.weight.0.gain",
        "parametrizations.weight.0.gamma", "parametrizations.weight.0.beta"}
    clone = pickle.loads(pickle.dumps(p))
    assert clone._cache is None and clone._work == [] and p._cache is not None
    twin = copy.deepcopy(layer)
    q = twin.parametrizations.weight[0]
    assert q._cache is None
    with torch.no_grad():
        torch.testing.assert_close(twin.weight, w, rtol=0, atol=0)
        twin.parametrizations.weight.original.add_(1.0)
        assert not torch.equal(twin.weight, w)
        assert layer.weight is w


def test_inference_mode_caches_a_normal_tensor() -> None:
    layer, _ = _eval_layer()
    with torch.inference_mode():
        w = layer.weight
        assert layer.weight is w
    assert not w.is_inference()
    # Usable outside inference mode, where the conv saves it for an input's gradient.
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    layer.requires_grad_(False)
    layer(x).sum().backward()
    assert x.grad is not None


def test_model_built_in_inference_mode_is_not_cached() -> None:
    with torch.inference_mode():
        layer = apply_ws(nn.Conv2d(4, 6, 3), "paper").model.eval()
        p = layer.parametrizations.weight[0]
        out = layer(torch.randn(1, 4, 6, 6))
        assert p._cache is None and out.shape == (1, 6, 4, 4)


def test_parametrize_cached_context_still_works() -> None:
    torch.manual_seed(10)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)), "bit").model
    x = torch.randn(2, 3, 9, 9)
    ref = net(x)
    with parametrize.cached():
        torch.testing.assert_close(net(x), ref)
        net(x).sum().backward()
    net.eval()
    with torch.no_grad(), parametrize.cached():
        torch.testing.assert_close(net(x), ref)
    assert net[0].parametrizations.weight.original.grad is not None


def test_training_workspace_is_reused_only_when_nothing_holds_it() -> None:
    torch.manual_seed(11)
    layer = apply_ws(nn.Conv2d(4, 6, 3), "paper").model
    p = layer.parametrizations.weight[0]
    x = torch.randn(1, 4, 6, 6)
    layer(x).sum().backward()
    ptr = layer.weight.data_ptr()  # the graph of this access is dropped at once
    assert ptr == p._work[0].data_ptr()
    held = layer.weight  # a caller keeps the standardized weight ...
    value = held.detach().clone()
    with torch.no_grad():
        layer.parametrizations.weight.original.add_(0.5)
    again = layer.weight  # ... so the next one goes to a new buffer
    assert again.data_ptr() != held.data_ptr()
    torch.testing.assert_close(held, value, rtol=0, atol=0)
    torch.testing.assert_close(again, _fresh(layer, p), rtol=0, atol=0)


def test_two_forwards_before_one_backward_give_the_reference_gradients() -> None:
    torch.manual_seed(12)
    layer = apply_ws(nn.Conv2d(3, 4, 3).double(), "tf").model
    twin = copy.deepcopy(layer)
    xs = [torch.randn(1, 3, 7, 7, dtype=torch.float64) for _ in range(3)]
    loss = sum(layer(x).square().mean() for x in xs)
    loss.backward()  # type: ignore[union-attr]
    w = twin.parametrizations.weight.original
    ref = sum(torch.nn.functional.conv2d(x, ORACLES["tf"](w), twin.bias).square().mean()
              for x in xs)
    ref.backward()  # type: ignore[union-attr]
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, w.grad)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(reentrant: bool) -> None:
    """Checkpointing runs the WS forward without keeping its output (no_grad, or saved-tensor
    hooks that drop it), so the workspace is free again before the backward recomputes it."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(13)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3)), "aws").model
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    for _ in range(2):  # a second step reuses the workspaces of the first
        for m in (net, twin):
            m.zero_grad(set_to_none=True)
        checkpoint(net, x, use_reentrant=reentrant).square().mean().backward()
        twin(x).square().mean().backward()
        for (name, a), b in zip(net.named_parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, msg=name)
        with torch.no_grad():
            for m in (net, twin):
                for prm in m.parameters():
                    prm.sub_(0.1 * prm.grad)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_exact_init_gradient_with_a_mean_larger_than_the_spread(offset: float) -> None:
    """init="exact" keeps only z = gamma*y + beta for the backward, which takes beta as batch
    norm's "mean"; with a filter mean 20x its spread the float32 gradient still matches the
    float64 reference formula on the same (float32-rounded) weights."""
    torch.manual_seed(14)
    w = (torch.randn(6, 4, 3, 3) * 0.05 + offset).requires_grad_()
    g = torch.randn(6, 4, 3, 3)
    p = WeightStandardization(w.detach(), "paper", init="exact")
    (p(w) * g).sum().backward()
    ref = w.detach().double().requires_grad_()
    (copy.deepcopy(p).double().reference(ref) * g.double()).sum().backward()
    torch.testing.assert_close(w.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_no_grad_forward_in_training_keeps_the_workspace() -> None:
    layer, p = _eval_layer()
    layer.train()
    layer(torch.randn(1, 4, 6, 6)).sum().backward()
    (work,) = p._work
    with torch.no_grad():  # a validation pass without model.eval()
        layer(torch.randn(1, 4, 6, 6))
    assert p._work and p._work[-1] is work
    layer.eval()
    assert not p._work  # evaluation frees it


def _through_torch(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` through torch's own ParametrizationList, not the fast getter."""
    return layer.parametrizations.weight()  # type: ignore[no-any-return, operator]


@pytest.mark.parametrize("init", ["plain", "scale", "exact"])
def test_fast_weight_read_equals_torch_chain_values_and_gradients(init: str) -> None:
    torch.manual_seed(20)
    layer = apply_ws(nn.ConvTranspose2d(4, 6, 3, groups=2), "scaled", init=init,
                     transposed=True).model
    assert getattr(type(layer).__dict__["weight"].fget, "__wsconvert_fast__", False)
    fast, slow = layer.weight, _through_torch(layer)
    assert torch.equal(fast, slow)
    params = list(layer.parametrizations.weight.parameters())
    g = torch.randn_like(fast)
    fast_grads = torch.autograd.grad(fast, params, g)
    slow_grads = torch.autograd.grad(slow, params, g)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        assert torch.equal(a, b)
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer.weight, _through_torch(layer))


class _Double(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2


def test_fast_weight_read_defers_to_torch_for_chains_hooks_and_cached() -> None:
    torch.manual_seed(21)
    layer = apply_ws(nn.Conv2d(3, 4, 3), "paper").model
    p = layer.parametrizations.weight[0]
    standardized = layer.weight.detach().clone()
    seen: list[int] = []
    handle = p.register_forward_hook(lambda mod, args, out: seen.append(1))
    layer.weight  # noqa: B018 (the read runs the hook)
    assert seen == [1]
    handle.remove()
    parametrize.register_parametrization(layer, "weight", _Double())
    torch.testing.assert_close(layer.weight, standardized * 2, rtol=0, atol=0)
    with parametrize.cached():
        assert layer.weight is layer.weight  # parametrize's own cache holds it
    torch.testing.assert_close(layer.weight, standardized * 2, rtol=0, atol=0)


def test_fast_weight_read_survives_deepcopy_and_goes_with_unregister() -> None:
    from wsconvert.surgery import unregister_ws

    torch.manual_seed(22)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), "timm").model
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin[0].parametrizations.weight.original.mul_(3).add_(1)
    assert not torch.equal(twin[0].weight, net[0].weight)
    torch.testing.assert_close(twin[0].weight, _through_torch(twin[0]), rtol=0, atol=0)
    torch.testing.assert_close(net[0].weight, _through_torch(net[0]), rtol=0, atol=0)
    unregister_ws(twin[0])
    assert type(twin[0]) is nn.Conv2d and isinstance(twin[0].weight, nn.Parameter)
    torch.testing.assert_close(net[0].weight, _through_torch(net[0]), rtol=0, atol=0)


class _Branchy(nn.Module):
    """A shared conv used twice, and a conv this forward never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.unused = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.shared(torch.relu(self.shared(x))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.parametrize(("convention", "init"), [("paper", "plain"), ("scaled", "plain"),
                                                  ("timm", "exact"), ("aws", "scale")])
def test_standardize_ahead_gives_bit_identical_values_and_gradients(convention: str,
                                                                    init: str) -> None:
    torch.manual_seed(23)
    lazy = apply_ws(_Branchy(), convention, init=init).model
    ahead = copy.deepcopy(lazy)
    wsconvert.standardize_ahead(ahead)
    x = torch.randn(2, 3, 8, 8)
    for step in range(2):  # the second step runs on updated weights
        outs = []
        for model in (lazy, ahead):
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.square().sum().backward()
            outs.append(out)
        assert torch.equal(outs[0], outs[1]), step
        for (name, a), b in zip(lazy.named_parameters(), ahead.parameters(), strict=True):
            assert (a.grad is None) == (b.grad is None), name
            assert a.grad is None or torch.equal(a.grad, b.grad), name
        with torch.no_grad():
            for a, b in zip(lazy.parameters(), ahead.parameters(), strict=True):
                a.sub_(0.1 * a.grad if a.grad is not None else 0.0)
                b.sub_(0.1 * b.grad if b.grad is not None else 0.0)
    unused = ahead.unused.parametrizations.weight[0]
    during: list[bool] = []
    ahead.head.register_forward_pre_hook(lambda m, a: during.append(unused._ahead is not None))
    ahead(x)
    assert during == [True]  # made ahead, never used by this forward ...
    assert unused._ahead is None  # ... and dropped when it ends


def _backward_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The order of two backward events: a conv's output gradient arriving, its backward next
    ("conv"), and the WS backward handing the weight gradient to the trainable weight ("ws")."""
    events: list[str] = []

    def on_output(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(lambda g: events.append("conv"))  # the conv's backward is next

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.parametrizations.weight.original.register_post_accumulate_grad_hook(
                lambda p: events.append("ws"))
            m.register_forward_hook(on_output)
    model(x).sum().backward()
    return events


def test_standardize_ahead_runs_the_ws_backward_after_the_convolutions() -> None:
    torch.manual_seed(24)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                        nn.Conv2d(4, 2, 3))
    lazy = apply_ws(net, "paper").model
    ahead = apply_ws(net, "paper").model
    wsconvert.standardize_ahead(ahead)
    x = torch.randn(1, 3, 9, 9)
    assert _backward_order(lazy, x) == ["conv", "ws"] * 3
    assert _backward_order(ahead, x) == ["conv"] * 3 + ["ws"] * 3


def test_standardize_ahead_recomputes_a_weight_changed_after_the_hook() -> None:
    torch.manual_seed(25)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), "bit").model
    wsconvert.standardize_ahead(net)
    original = net[1].parametrizations.weight.original

    def edit(module: nn.Module, args: tuple[torch.Tensor]) -> None:
        with torch.no_grad():
            original.mul_(-2).add_(0.5)

    net.register_forward_pre_hook(edit)  # runs after standardize_ahead's hook
    x = torch.randn(1, 3, 5, 5)
    out = net(x)
    expected = nn.functional.conv2d(net[0](x), standardize_rows(
        original.detach().reshape(4, -1), CONVENTIONS["bit"], 1e-10).reshape(4, 4, 1, 1),
        net[1].bias)
    torch.testing.assert_close(out, expected)


def test_standardize_ahead_stays_out_of_eval_no_grad_accumulate_and_can_be_removed() -> None:
    torch.manual_seed(26)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), "timm").model
    wsconvert.standardize_ahead(net)
    wsconvert.standardize_ahead(net)  # idempotent
    assert len(net._forward_pre_hooks) == 1
    ps = [m.parametrizations.weight[0] for m in net]
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        net(x)
    net.eval()
    net(x)
    assert all(p._ahead is None for p in ps)
    net.train()
    twin = copy.deepcopy(net)
    with wsconvert.accumulate(net):
        net(x).sum().backward()
        assert all(p._ahead is None for p in ps)
    twin(x).sum().backward()  # the copy keeps the hook and standardizes its own weights
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    wsconvert.standardize_ahead(net, enable=False)
    assert not net._forward_pre_hooks
    net(x)
    assert all(p._ahead is None for p in ps)


def test_standardize_ahead_with_non_reentrant_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = checkpoint(self.conv, x, use_reentrant=False)
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(27)
    lazy = apply_ws(Net(), "paper").model
    ahead = copy.deepcopy(lazy)
    wsconvert.standardize_ahead(ahead)
    x = torch.randn(2, 3, 8, 8)
    for model in (lazy, ahead):
        model(x).square().sum().backward()
    for a, b in zip(lazy.parameters(), ahead.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_standardize_ahead_never_serves_a_value_outside_the_root_forward() -> None:
    class Net(nn.Module):  # ``aux`` is called by the training loop, not by forward
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Conv2d(3, 4, 3)
            self.aux = nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)

    torch.manual_seed(28)
    net = apply_ws(Net(), "paper").model
    wsconvert.standardize_ahead(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5, fused=True)  # bumps no version counter
    for q in net.parameters():
        q.grad = torch.randn_like(q)
    h = net(torch.randn(1, 3, 6, 6))
    opt.step()
    aux = net.aux.parametrizations.weight
    torch.testing.assert_close(net.aux.weight, standardize_rows(
        aux.original.detach().reshape(4, -1), CONVENTIONS["paper"], 1e-5).reshape(4, 4, 1, 1))
    net.aux(h).sum().backward()  # through the current weights' graph


def test_ws_reads_gain_gamma_beta_however_they_are_registered() -> None:
    torch.manual_seed(29)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3)), "paper", init="exact").model
    p = net[0].parametrizations.weight[0]
    before = net[0].weight.detach().clone()
    p.gamma = nn.Parameter(p.gamma.clone())  # learn the exact-init affine
    p.beta = nn.Parameter(p.beta.clone())
    torch.testing.assert_close(net[0].weight, before, rtol=0, atol=0)
    net[0].weight.sum().backward()
    assert p.gamma.grad is not None and p.beta.grad is not None
    with torch.no_grad():
        p.gamma.mul_(2)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net[0].weight, p.reference(
            net[0].parametrizations.weight.original))
    scaled = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3)), "scaled").model
    q = scaled[0].parametrizations.weight[0]
    parametrize.register_parametrization(q, "gain", _Double())  # a parametrized gain
    expected = _through_torch(scaled[0])
    torch.testing.assert_close(scaled[0].weight, expected, rtol=0, atol=0)
    torch.testing.assert_close(scaled[0].weight, 2 * standardize_rows(  # gain 1, doubled
        scaled[0].parametrizations.weight.original.detach().reshape(4, -1),
        CONVENTIONS["scaled"], 1e-6).reshape(4, 3, 3, 3))


def test_fast_weight_read_runs_every_hook_torch_would() -> None:
    torch.manual_seed(30)
    layer = apply_ws(nn.Conv2d(3, 4, 3), "paper").model
    plist = layer.parametrizations.weight
    seen: list[str] = []
    h1 = plist.register_forward_hook(lambda m, a, o: seen.append("list"))
    layer.weight  # noqa: B018
    h1.remove()
    h2 = plist[0].register_full_backward_hook(lambda m, gi, go: seen.append("backward"))
    layer.weight.sum().backward()
    h2.remove()
    assert seen == ["list", "backward"]


def test_a_saved_model_carries_no_standardize_ahead_hook(tmp_path: Path) -> None:
    torch.manual_seed(31)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), "tf").model
    wsconvert.standardize_ahead(net)
    wsconvert.save(net, tmp_path / "m.ws.pt")
    assert len(net._forward_pre_hooks) == 1 and len(net._forward_hooks) == 1  # left as it was
    again = wsconvert.load(tmp_path / "m.ws.pt", trust=True)
    assert not again._forward_pre_hooks and not again._forward_hooks
    x = torch.randn(1, 3, 6, 6)
    torch.testing.assert_close(again(x), net.eval()(x), rtol=0, atol=0)


def _func_net(convention: str, init: str) -> nn.Module:
    torch.manual_seed(32)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.ReLU(),
                        nn.ConvTranspose2d(4, 2, 3), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))
    with torch.no_grad():
        net[0].weight[1] = 0.25  # a constant filter: no derivative, the subgradient is used
        net[2].weight.add_(0.3)  # a mean far from zero
    return apply_ws(net.double(), convention, init=init, transposed=True).model


@pytest.mark.parametrize(("convention", "init"), [("paper", "plain"), ("timm", "plain"),
                                                  ("scaled", "plain"), ("paper", "exact"),
                                                  ("bit", "scale")])
def test_torch_func_transforms_agree_with_autograd(convention: str, init: str) -> None:
    """grad, per-sample grads (vmap of grad), jvp and vmap over inputs run the layer's formula in
    plain autograd ops (the fused Function cannot run inside them) and agree with autograd."""
    net = _func_net(convention, init)
    wsconvert.standardize_ahead(net)  # inert inside transforms
    x = torch.randn(4, 3, 10, 10, dtype=torch.float64)
    t = torch.randint(0, 3, (4,))
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(net, p, (xb,)), tb)

    net.zero_grad()
    loss(dict(net.named_parameters()), x, t).backward()  # the fused Function's gradients
    expected = {k: v.grad for k, v in net.named_parameters()}
    assert all(g is not None and bool(g.isfinite().all()) for g in expected.values())
    got = torch.func.grad(loss)(params, x, t)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-12)

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        params, x.unsqueeze(1), t.unsqueeze(1))
    for i in range(2):
        net.zero_grad()
        loss(dict(net.named_parameters()), x[i:i + 1], t[i:i + 1]).backward()
        for k, v in net.named_parameters():
            torch.testing.assert_close(per_sample[k][i], v.grad, rtol=1e-9, atol=1e-12)

    tangent = {k: torch.randn_like(v) for k, v in params.items()}
    _, directional = torch.func.jvp(lambda p: loss(p, x, t), (params,), (tangent,))
    torch.testing.assert_close(directional, sum((expected[k] * tangent[k]).sum() for k in params),
                               rtol=1e-9, atol=1e-12)

    net.eval()
    with torch.no_grad():
        plain = net(x)
    mapped = torch.func.vmap(lambda xb: net(xb.unsqueeze(0)).squeeze(0))(x)
    torch.testing.assert_close(mapped, plain, rtol=1e-12, atol=1e-12)


def test_jit_trace_records_the_plain_steps() -> None:
    """A traced WS model trains like the eager one and follows its weights (nothing baked in)."""
    net = _func_net("paper", "exact")  # float64: the two paths' rounding stays far below 1e-9
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    for mode in ("train", "eval"):
        net.train(mode == "train")
        traced = torch.jit.trace(net, x, check_trace=False)
        torch.testing.assert_close(traced(x), net(x), rtol=1e-9, atol=1e-12)
        net.zero_grad()
        net(x).square().sum().backward()
        eager = {k: v.grad.clone() for k, v in net.named_parameters() if v.grad is not None}
        net.zero_grad()
        traced(x).square().sum().backward()
        for k, v in net.named_parameters():
            if k in eager:
                torch.testing.assert_close(v.grad, eager[k], rtol=1e-9, atol=1e-12)
        torch.optim.SGD(net.parameters(), lr=0.1).step()
        with torch.no_grad():
            torch.testing.assert_close(traced(x), net(x), rtol=1e-9, atol=1e-12)


def test_a_functorch_transform_leaves_nothing_behind() -> None:
    from wsconvert.ws import _is_functorch_wrapped

    net = _func_net("paper", "plain").float()
    wsconvert.standardize_ahead(net)
    x = torch.randn(2, 3, 10, 10)
    params = {k: v.detach() for k, v in net.named_parameters()}
    net(x).sum().backward()  # a workspace exists
    p = net[0].parametrizations.weight[0]
    torch.func.grad(lambda q: functional_call(net, q, (x,)).sum())(params)
    assert p._ahead is None and p._cache is None
    assert not any(_is_functorch_wrapped(w) for w in p._work)
    net.eval()
    torch.func.vmap(lambda xb: net(xb.unsqueeze(0)))(x)
    assert p._cache is None  # nothing cached from inside a transform
    net.train()
    net(x).sum().backward()  # the next ordinary step runs


def test_standardize_ahead_keeps_module_hooks_and_saved_tensor_hooks_working(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import wsconvert.ws as ws_module

    torch.manual_seed(33)
    net = apply_ws(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)), "paper").model
    wsconvert.standardize_ahead(net)
    x = torch.randn(1, 3, 8, 8)
    fired: list[str] = []
    handle = net[0].parametrizations.weight[0].register_full_backward_hook(
        lambda m, gi, go: fired.append("ws"))
    net(x).sum().backward()
    assert fired == ["ws"]
    handle.remove()
    calls: list[int] = []
    real = ws_module._Standardize.forward
    monkeypatch.setattr(ws_module._Standardize, "forward",
                        staticmethod(lambda *a: calls.append(1) or real(*a)))
    with torch.autograd.graph.save_on_cpu():
        net(x).sum().backward()
    assert len(calls) == 2  # once per layer, not once ahead and again in the layer
    calls.clear()
    net(x).sum().backward()
    assert len(calls) == 2


def test_save_strips_standardize_ahead_from_submodules(tmp_path: Path) -> None:
    torch.manual_seed(34)
    net = apply_ws(nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.Conv2d(4, 2, 1)),
                   "bit").model
    wsconvert.standardize_ahead(net[0])  # on the backbone only
    wsconvert.save(net, tmp_path / "m.ws.pt")
    again = wsconvert.load(tmp_path / "m.ws.pt", trust=True)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in again.modules())
    assert net[0]._forward_pre_hooks  # the caller's model keeps its setting
