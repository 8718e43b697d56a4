"""The named Weight Standardization conventions, as pure tensor functions.

Weight Standardization (Qiao et al., arXiv:1903.10520) re-parametrizes a convolution's weight so
that each output channel's filter has zero mean and unit spread over its fan-in
``N = (C_in / groups) * prod(kernel)``. Implementations in the wild disagree on the spread
(biased or unbiased), on where eps goes (added to the std, or inside the square root) and on eps
itself; a model trained with one convention must be run with the same one. Each convention here is
exactly one published formula:

======== ======================================================= =============================
name     formula (per output channel)                            from
======== ======================================================= =============================
paper    ``(w - mu) / (std_unbiased + eps)``, eps 1e-5           the paper's PyTorch code
tf       ``(w - mu) / (std_biased + eps)``, eps 1e-5             the paper's TF code
bit      ``(w - mu) / sqrt(var_biased + eps)``, eps 1e-10        BiT (big_transfer)
timm     ``(w - mu) / sqrt(var_biased + eps)``, eps 1e-6         timm ``StdConv2d``
scaled   ``gain * gamma * N**-0.5 * (w - mu) / sqrt(var_b + eps)`` timm ``ScaledStdConv2d`` (NFNet)
aws      ``(w - mu) / sqrt(var_unbiased + eps)``, eps 1e-5             mmcv ``ConvAWS2d``
======== ======================================================= =============================

Functions here work on *rows*: a 2-D ``[out_channels, fan_in]`` view of a weight. Layout helpers
turn conv, transposed-conv and linear weights into rows and back.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from wsconvert.errors import UsageError

__all__ = [
    "CONVENTIONS",
    "Convention",
    "check_eps",
    "fan_in",
    "from_rows",
    "get_convention",
    "inv_std",
    "standardize_rows",
    "standardize_weight",
    "to_rows",
]


@dataclass(frozen=True)
class Convention:
    """One WS formula: ``y = scale * (w - mu) * inv_std``.

    Attributes:
        name: registry key.
        eps: default eps.
        unbiased: divide the variance by ``N - 1`` (True) or ``N`` (False).
        eps_in_sqrt: ``1 / sqrt(var + eps)`` (True) or ``1 / (sqrt(var) + eps)`` (False).
        fan_in_scale: multiply by ``gamma * N**-0.5`` and carry a learnable per-channel gain.
        source: where the formula comes from.
    """

    name: str
    eps: float
    unbiased: bool
    eps_in_sqrt: bool
    fan_in_scale: bool
    source: str

    @property
    def formula(self) -> str:
        var = "var_u" if self.unbiased else "var_b"
        denom = f"sqrt({var} + eps)" if self.eps_in_sqrt else f"(sqrt({var}) + eps)"
        prefix = "gain * gamma * N**-0.5 * " if self.fan_in_scale else ""
        return f"{prefix}(w - mu) / {denom}"


CONVENTIONS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("paper", 1e-5, True, False, False, "paper's PyTorch code; mmcv ConvWS2d"),
        Convention("tf", 1e-5, False, False, False, "paper's TF code; big_vision bit.py"),
        Convention("bit", 1e-10, False, True, False, "BiT (big_transfer); Composer"),
        Convention("timm", 1e-6, False, True, False, "timm StdConv2d; HF transformers BiT"),
        Convention("scaled", 1e-6, False, True, True, "timm ScaledStdConv2d (NFNet)"),
        Convention("aws", 1e-5, True, True, False, "mmcv ConvAWS2d (DetectoRS), before its affine"),
    )
}


def check_eps(eps: float) -> float:
    """``eps`` as a float, if it is a finite number >= 0.

    Raises:
        UsageError: anything else (negative, NaN, inf, a bool, a string).
    """
    value = math.nan
    if not isinstance(eps, (bool, str, bytes)):  # float("1e-5") and float(True) would pass
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            value = float(eps)  # Python, numpy and 0-d tensor numbers
    if not (math.isfinite(value) and value >= 0):
        raise UsageError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def get_convention(name: str) -> Convention:
    """Return the convention registered under ``name``.

    Raises:
        UsageError: unknown name.
    """
    try:
        return CONVENTIONS[name]
    except KeyError:
        known = ", ".join(CONVENTIONS)
        raise UsageError(f"unknown convention {name!r}; choose one of: {known}") from None


def fan_in(weight_shape: tuple[int, ...] | torch.Size, *, transposed: bool = False,
           groups: int = 1) -> int:
    """Number of weights each output channel's filter holds."""
    if transposed:
        return (weight_shape[0] // groups) * math.prod(weight_shape[2:])
    return math.prod(weight_shape[1:])


def to_rows(weight: Tensor, *, transposed: bool = False, groups: int = 1) -> Tensor:
    """View ``weight`` as ``[out_channels, fan_in]`` (a copy only for transposed convs).

    Conv and linear weights are ``[out, in/groups, *kernel]`` already. Transposed convs store
    ``[in, out/groups, *kernel]``, where output channel ``g * out_g + j`` reads the slice
    ``weight[g*in_g:(g+1)*in_g, j]``.
    """
    if not transposed:
        return weight.reshape(weight.shape[0], -1)
    c_in, out_g = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, c_in // groups, out_g, -1).transpose(1, 2)
    return w.reshape(groups * out_g, -1)


def from_rows(rows: Tensor, shape: torch.Size | tuple[int, ...], *, transposed: bool = False,
              groups: int = 1) -> Tensor:
    """Inverse of :func:`to_rows`."""
    if not transposed:
        return rows.reshape(shape)
    c_in, out_g = shape[0], shape[1]
    w = rows.reshape(groups, out_g, c_in // groups, -1).transpose(1, 2)
    return w.reshape(shape)


def inv_std(var: Tensor, convention: Convention, eps: float) -> Tensor:
    """``1 / spread`` of a row given its variance (already with the convention's correction)."""
    if convention.eps_in_sqrt:
        return torch.rsqrt(var + eps)
    return 1.0 / (var.sqrt() + eps)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    # Statistics never in half precision: eps 1e-5 added to a std that underflowed is how the
    # paper's code produced NaNs under AMP.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def standardize_rows(rows: Tensor, convention: Convention | str = "paper",
                     eps: float | None = None) -> Tensor:
    """Reference formula on ``[out, fan_in]`` rows, with plain autograd (no fused backward).

    The fast training path is :class:`wsconvert.ws.WeightStandardization`; this one is the
    readable definition, used for folding (in float64) and as the benchmark's baseline.
    Includes ``N**-0.5`` for ``scaled`` but not the learnable gain.
    """
    conv = get_convention(convention) if isinstance(convention, str) else convention
    e = conv.eps if eps is None else eps
    x = rows.to(_stat_dtype(rows.dtype))
    var, mu = torch.var_mean(x, dim=1, keepdim=True, correction=1 if conv.unbiased else 0)
    y = (x - mu) * inv_std(var, conv, e)
    if conv.fan_in_scale:
        y = y * rows.shape[1] ** -0.5
    return y.to(rows.dtype)


def standardize_weight(weight: Tensor, convention: Convention | str = "paper",
                       eps: float | None = None, *, transposed: bool = False,
                       groups: int = 1) -> Tensor:
    """Standardize a conv / transposed-conv / linear weight per output channel.

    Example:
        >>> w = torch.randn(8, 3, 3, 3)
        >>> y = standardize_weight(w, "timm")
        >>> bool(y.reshape(8, -1).mean(1).abs().max() < 1e-6)
        True
    """
    rows = to_rows(weight, transposed=transposed, groups=groups)
    return from_rows(standardize_rows(rows, convention, eps), weight.shape,
                     transposed=transposed, groups=groups)
