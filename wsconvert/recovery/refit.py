"""The closed-form stage of recovery: refit each norm's affine by least squares, in forward order.

Each norm of the converted model that has a counterpart of the same name in the original (a
GroupNorm that replaced a BatchNorm, or a kept BatchNorm) gets its per-channel ``(weight, bias)``
fitted so that its output, computed on the *converted* model's own upstream activations (every
earlier norm already refitted), matches the original module's output on the same samples. A
forward hook stops each model at the layer, so the stage costs about one forward prefix per norm.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsconvert.errors import ConversionError
from wsconvert.io.inputs import as_samples
from wsconvert.probes import EvalModes
from wsconvert.recovery.report import (
    CHUNK,
    STOPPED,
    FitRecord,
    RecoveryInterrupted,
    RecoveryProgress,
    chunks,
    to_model,
)

__all__ = ["fit_norms"]


_NORMS = (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def _normalized(module: nn.Module, x: Tensor) -> Tensor:
    """The norm's output without its affine (what the affine's weight multiplies)."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    assert isinstance(module, nn.modules.batchnorm._BatchNorm)
    use_batch = module.running_mean is None or module.running_var is None
    return F.batch_norm(x, module.running_mean, module.running_var, None, None, use_batch, 0.0,
                        module.eps)


def _call_order(model: nn.Module, probe: tuple[Tensor, ...]) -> dict[str, int]:
    """Per module name, how many times one forward calls it, in first-call order."""
    calls: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Callable[..., None]:
        def record(_m: nn.Module, _i: Any, _o: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
        return record

    # Forward *pre*-hooks would give call order; output hooks give completion order, the same
    # for leaf norms.
    for name, m in model.named_modules():
        if name and isinstance(m, _NORMS):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with EvalModes(model), torch.no_grad():
            model(*to_model(model, probe))
    finally:
        for h in handles:
            h.remove()
    return calls


def _norm_targets(converted: nn.Module, original: nn.Module, probe: tuple[Tensor, ...]
                  ) -> tuple[list[tuple[str, nn.Module, nn.Module]], dict[str, str]]:
    """Norms to refit, in forward order, with their original counterparts; and those skipped."""
    orig = dict(original.named_modules())
    calls = _call_order(converted, probe)
    modules = dict(converted.named_modules())
    targets, skipped = [], {}
    for name, m in converted.named_modules():
        if not name or not isinstance(m, _NORMS):
            continue
        other = orig.get(name)
        if other is None or not isinstance(other, _NORMS):
            skipped[name] = "no norm of that name in the original model"
        elif not getattr(m, "affine", False):
            skipped[name] = "no affine to fit"
        elif calls.get(name, 0) == 0:
            skipped[name] = "not called by forward"
        elif calls[name] > 1:
            skipped[name] = f"called {calls[name]} times per forward (shared module)"
    for name in calls:
        if name not in skipped and name in orig:
            targets.append((name, modules[name], orig[name]))
    return targets, skipped


def _capture(model: nn.Module, module: nn.Module, chunk: tuple[Tensor, ...],
             want_input: bool) -> Tensor:
    """Run ``model`` up to ``module`` on ``chunk``; its input (or output), float64."""
    got: list[Tensor] = []

    def hook(_m: nn.Module, args: Any, out: Any) -> None:
        got.append((args[0] if want_input else out).detach())
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(*to_model(model, chunk))
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise ConversionError("a norm to fit did not run on the samples")
    return got[0]


def _channels_last(x: Tensor) -> Tensor:
    """``[N, C, ...]`` as ``[C, N * ...]`` in float64."""
    return x.double().transpose(0, 1).reshape(x.shape[1], -1)


def _fit_one(name: str, norm: nn.Module, reference: nn.Module, converted: nn.Module,
             original: nn.Module, samples: tuple[Tensor, ...], index: Tensor) -> FitRecord:
    weight, bias = norm.weight, norm.bias
    assert isinstance(weight, Tensor) and isinstance(bias, Tensor)
    c = int(weight.shape[0])
    s_n = torch.zeros(c, dtype=torch.float64)
    s_t, s_nn, s_nt, s_tt, s_yy, s_yt = (torch.zeros_like(s_n) for _ in range(6))
    count = 0
    w_old = weight.detach().double().cpu()
    b_old = bias.detach().double().cpu()
    for chunk in chunks(samples, index, CHUNK):
        x = _capture(converted, norm, chunk, want_input=True)
        n = _channels_last(_normalized(norm, x)).cpu()
        t = _channels_last(_capture(original, reference, chunk, want_input=False)).cpu()
        if n.shape != t.shape:
            raise ConversionError(f"norm {name}: output shape differs from the original's")
        y = n * w_old[:, None] + b_old[:, None]
        s_n += n.sum(1)
        s_t += t.sum(1)
        s_nn += n.square().sum(1)
        s_nt += (n * t).sum(1)
        s_tt += t.square().sum(1)
        s_yy += y.square().sum(1)
        s_yt += (y * t).sum(1)
        count += n.shape[1]
    mean_n, mean_t = s_n / count, s_t / count
    var_n = s_nn / count - mean_n.square()
    cov = s_nt / count - mean_n * mean_t
    live = var_n > 1e-12
    a = torch.where(live, cov / var_n.clamp_min(1e-12), w_old)
    b = mean_t - a * mean_n
    # Residual of the fit, sum over channels of ||a n + b - t||^2, from the same sums.
    resid = (a.square() * s_nn + b.square() * count + s_tt + 2 * a * b * s_n
             - 2 * a * s_nt - 2 * b * s_t).sum().clamp_min(0.0)
    before = (s_yy - 2 * s_yt + s_tt).sum().clamp_min(0.0)
    ref = float(s_tt.sum())
    with torch.no_grad():
        weight.copy_(a.to(weight.dtype))
        bias.copy_(b.to(bias.dtype))
    def rel(v: Tensor) -> float:
        return math.sqrt(float(v) / ref) if ref > 0 else 0.0

    return FitRecord(name, type(norm).__name__, c, rel(before), rel(resid))


def fit_norms(converted: nn.Module, original: nn.Module, data: Tensor | Sequence[Tensor], *,
              progress: Callable[[RecoveryProgress], None] | None = None,
              should_stop: Callable[[], bool] | None = None
              ) -> tuple[list[FitRecord], dict[str, str]]:
    """The closed-form stage alone: refit every norm's affine in forward order, in place.

    Returns the fitted layers and the skipped ones (with reasons). No rollback here: see
    :func:`recover`.
    """
    samples = as_samples(data)
    index = torch.arange(samples[0].shape[0])
    targets, skipped = _norm_targets(converted, original, tuple(t[:1] for t in samples))
    fitted = []
    t0 = time.perf_counter()
    with EvalModes(converted, original), torch.no_grad():
        for k, (name, norm, reference) in enumerate(targets):
            if should_stop is not None and should_stop():
                raise RecoveryInterrupted(STOPPED)
            fitted.append(_fit_one(name, norm, reference, converted, original, samples, index))
            if progress is not None:
                progress(RecoveryProgress("closed-form", k + 1, len(targets),
                                          time.perf_counter() - t0, detail=name))
    return fitted, skipped
