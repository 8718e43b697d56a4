"""Each convention against an independent implementation of its published formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsconvert.conventions import (
    CONVENTIONS,
    from_rows,
    get_convention,
    standardize_weight,
    to_rows,
)
from wsconvert.errors import UsageError


def seed_paper(weight: torch.Tensor) -> torch.Tensor:
    """The paper's PyTorch code (shared/seeds), generalised from 4-D to any conv rank."""
    weight_mean = weight.mean(dim=1, keepdim=True)
    for d in range(2, weight.dim()):
        weight_mean = weight_mean.mean(dim=d, keepdim=True)
    weight = weight - weight_mean
    std = weight.view(weight.size(0), -1).std(dim=1).view(-1, *[1] * (weight.dim() - 1)) + 1e-5
    return weight / std.expand_as(weight)


def tf_keras(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The paper's TF snippet: keras ``std`` (biased) over all but the output axis, eps outside."""
    w = weight.reshape(weight.shape[0], -1)
    mean = w.sum(1, keepdim=True) / w.shape[1]
    std = (((w - mean) ** 2).sum(1, keepdim=True) / w.shape[1]).sqrt()
    return ((w - mean) / (std + eps)).reshape(weight.shape)


def bit_var_mean(weight: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """BiT's StdConv2d: var_mean over the fan-in dims, unbiased=False, eps inside the sqrt."""
    dims = list(range(1, weight.dim()))
    v, m = torch.var_mean(weight, dim=dims, keepdim=True, unbiased=False)
    return (weight - m) / torch.sqrt(v + eps)


def timm_batch_norm(weight: torch.Tensor, eps: float = 1e-6,
                    gain: torch.Tensor | None = None, gamma: float = 1.0) -> torch.Tensor:
    """timm's StdConv2d / ScaledStdConv2d trick: F.batch_norm over [1, O, fan_in]."""
    o = weight.shape[0]
    scale = None
    if gain is not None:
        scale = (gain * gamma * weight[0].numel() ** -0.5).view(-1)
    return F.batch_norm(weight.reshape(1, o, -1), None, None, weight=scale, training=True,
                        momentum=0.0, eps=eps).reshape_as(weight)


def mmcv_aws(weight: torch.Tensor) -> torch.Tensor:
    """mmcv ConvAWS2d._get_weight before its gamma/beta: unbiased var, eps 1e-5 inside sqrt."""
    view = (-1, *[1] * (weight.dim() - 1))
    weight_flat = weight.view(weight.size(0), -1)
    mean = weight_flat.mean(dim=1).view(view)
    std = torch.sqrt(weight_flat.var(dim=1) + 1e-5).view(view)
    return (weight - mean) / std


SHAPES = [(8, 3, 3, 3), (6, 4, 5), (4, 2, 1, 3, 3), (16, 1, 3, 3), (5, 7)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_convention_matches_its_oracle(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = (torch.randn(shape, dtype=dtype) * 0.1 + 0.02)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-12, "rtol": 1e-10}
    torch.testing.assert_close(standardize_weight(w, "paper"), seed_paper(w), **tol)
    torch.testing.assert_close(standardize_weight(w, "tf"), tf_keras(w), **tol)
    torch.testing.assert_close(standardize_weight(w, "bit"), bit_var_mean(w), **tol)
    torch.testing.assert_close(standardize_weight(w, "timm"), timm_batch_norm(w), **tol)
    torch.testing.assert_close(standardize_weight(w, "timm", eps=1e-8),
                               timm_batch_norm(w, eps=1e-8), **tol)
    torch.testing.assert_close(standardize_weight(w, "aws"), mmcv_aws(w), **tol)
    torch.testing.assert_close(standardize_weight(w, "scaled"),
                               timm_batch_norm(w, gain=torch.ones(shape[0], dtype=dtype)), **tol)


def test_conventions_really_differ() -> None:
    """Guards the oracles above: biased vs unbiased and eps placement must be distinguishable."""
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    paper, tf = standardize_weight(w, "paper"), standardize_weight(w, "tf")
    ratio = (tf / paper).flatten()[0].item()
    assert ratio == pytest.approx((18 / 17) ** 0.5, rel=1e-4)
    assert not torch.allclose(standardize_weight(w, "bit"), standardize_weight(w, "timm", eps=1e-2))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_transposed_rows_are_output_channels(groups: int) -> None:
    c_in, out_g = 8, 3
    w = torch.randn(c_in, out_g, 2, 2, dtype=torch.float64)
    rows = to_rows(w, transposed=True, groups=groups)
    in_g = c_in // groups
    for o in range(groups * out_g):
        g, j = divmod(o, out_g)
        torch.testing.assert_close(rows[o], w[g * in_g:(g + 1) * in_g, j].flatten())
    torch.testing.assert_close(from_rows(rows, w.shape, transposed=True, groups=groups), w)


def test_half_precision_statistics_in_float32() -> None:
    w = (torch.randn(8, 4, 3, 3) * 1e-3).half()
    y = standardize_weight(w, "paper")
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), seed_paper(w.float()), atol=2e-3, rtol=2e-3)


def test_registry_and_unknown_name() -> None:
    assert set(CONVENTIONS) == {"paper", "tf", "bit", "timm", "scaled", "aws"}
    assert get_convention("bit").eps == 1e-10
    assert "sqrt(var_b + eps)" in get_convention("timm").formula
    with pytest.raises(UsageError, match="unknown convention"):
        get_convention("nope")
