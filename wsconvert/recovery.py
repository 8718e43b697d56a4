"""Recovery: make a converted model compute what the original did, from unlabeled samples.

Putting Weight Standardization on a BatchNorm-pretrained model and swapping its BatchNorms for
GroupNorm (``swap_norm``) throws part of the pretrained function away: the GroupNorm normalizes
over other statistics than the BatchNorm's running ones, and with ``init="plain"`` every filter's
mean and scale change. :func:`recover` gets the function back on real samples of the model's
domain (no labels), in two stages:

1. **Closed form**, layer by layer in forward order. Each norm of the converted model that has a
   counterpart of the same name in the original (a GroupNorm that replaced a BatchNorm, or a kept
   BatchNorm) gets its per-channel affine ``(weight, bias)`` refitted by least squares, so that its
   output, computed on the *converted* model's own upstream activations (with every earlier norm
   already refitted), matches the original module's output on the same samples. Kept BatchNorms
   first get their running statistics re-estimated on the same samples
   (:func:`wsconvert.calibration.calibrate_bn`). Each fit runs both models only up to the layer (the
   forward stops there), so the stage costs about as many full forward passes as there are norms.
2. **Distillation**: ``steps`` Adam steps (learning rate on a cosine decay to zero) on the
   converted model's trainable parameters, in eval mode (kept BatchNorms use their running
   statistics), matching the original's outputs: a temperature-scaled KL divergence for
   classifier-like outputs (one ``[N, classes]`` tensor), a relative mean squared error otherwise,
   plus (``features``) the relative squared error of every refitted norm's output against the
   original module's. With ``mixup`` the inputs are mixed pairs of samples
   (``lam * x_i + (1 - lam) * x_j``), the targets the original's outputs on them.

A seeded slice of the samples is held out: both stages fit on the rest, and the report measures,
on the held-out slice, the relative output error ``||y - y_orig|| / ||y_orig||`` and (classifier
outputs) top-1 agreement with the original, before and after each stage. During distillation the
held-out figures are checked every ``eval_every`` steps and the best state is kept, starting from
the better of the converted and the closed-form states: the returned model is never worse than
either on the held-out slice, by the distillation loss measured there (smoother than top-1
agreement on a small slice).

The library never prints: ``progress`` receives a :class:`RecoveryProgress` after each layer and
step, and ``should_stop`` is polled as often; when it returns true (or on ``KeyboardInterrupt``)
every parameter and buffer goes back to its value on entry and :class:`RecoveryInterrupted` is
raised. Results are deterministic for a ``seed`` (the split, the batch order).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsconvert.defaults import RECOVER_BATCH_SIZE, RECOVER_HOLDOUT, RECOVER_LR, RECOVER_STEPS
from wsconvert.errors import ConversionError, UsageError, WsconvertError
from wsconvert.io.inputs import as_samples
from wsconvert.probes import EvalModes, cast_like, reference_tensor, tensors_in

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_FEATURES",
    "DEFAULT_HOLDOUT",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "DEFAULT_TEMPERATURE",
    "LOSSES",
    "MIN_FIT",
    "MIN_HOLDOUT",
    "FitRecord",
    "RecoveryInterrupted",
    "RecoveryProgress",
    "RecoveryReport",
    "StageResult",
    "check_options",
    "check_samples",
    "fit_norms",
    "measure",
    "measure_inits",
    "recover",
]

DEFAULT_STEPS = RECOVER_STEPS
"""Distillation steps (see docs/recovery.md for the measurement behind it)."""
DEFAULT_BATCH_SIZE = RECOVER_BATCH_SIZE
DEFAULT_LR = RECOVER_LR
DEFAULT_HOLDOUT = RECOVER_HOLDOUT
"""Fraction of the samples held out for measuring (a count when >= 1)."""
DEFAULT_TEMPERATURE = 2.0
DEFAULT_FEATURES = 5.0
"""Weight of the feature-matching term (the refitted norms' outputs) in the distillation loss."""
MIN_HOLDOUT = 2
MIN_FIT = 2
_CHUNK = 64  # samples per forward pass when measuring and in the closed form


_STOPPED = "recovery stopped on request; the model is as it was before recovery"


class RecoveryInterrupted(WsconvertError):
    """Recovery stopped on request (``should_stop`` or Ctrl-C); the model is unchanged."""

    exit_code = 130


@dataclass(frozen=True)
class RecoveryProgress:
    """One progress event.

    Attributes:
        stage: ``calibrate``, ``closed-form`` or ``distill``.
        done: layers fitted / steps taken so far in this stage.
        total: layers / steps in this stage.
        seconds: time since the stage started.
        loss: the last distillation loss (``None`` outside distillation).
        detail: the layer just fitted, or the held-out figures when they were measured.
    """

    stage: str
    done: int
    total: int
    seconds: float
    loss: float | None = None
    detail: str = ""


@dataclass(frozen=True)
class StageResult:
    """Held-out figures after one stage (``converted``: before any recovery).

    ``loss`` is the distillation loss on the held-out slice: the figure the best state is chosen
    by (smoother than agreement on a small slice).
    """

    stage: str
    relative_error: float
    agreement: float | None
    loss: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class FitRecord:
    """One norm whose affine was refitted in closed form.

    Attributes:
        name: dotted module name.
        kind: its class name in the converted model.
        channels: channels fitted.
        before: relative error of its output against the original's, on the fit samples, before.
        after: the same after the fit.
    """

    name: str
    kind: str
    channels: int
    before: float
    after: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoveryReport:
    """What :func:`recover` did and measured.

    Attributes:
        samples_fit: samples both stages fit on.
        samples_holdout: samples held out for the figures.
        classifier: the output is one ``[N, classes]`` tensor (agreement is measured).
        stages: held-out figures: ``converted``, ``closed-form`` and (steps > 0) ``distill``.
        fitted: per norm refitted in closed form.
        skipped: norms not refitted, with the reason.
        calibrated: BatchNorms whose running statistics were re-estimated first.
        steps: distillation steps asked for; ``steps_run`` taken.
        best_step: the step whose state was kept (0: the closed-form state).
        batch_size, lr, loss, temperature: distillation settings.
        seconds_per_step: mean wall time of one distillation step (held-out checks excluded).
        seed: the seed of the split and the batch order.
        kept: the state returned: ``converted`` (the closed form measured worse and was undone,
            and no distillation step improved on it), ``closed-form`` or ``distill``.
    """

    samples_fit: int
    samples_holdout: int
    classifier: bool
    stages: list[StageResult] = field(default_factory=list)
    fitted: list[FitRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    calibrated: list[str] = field(default_factory=list)
    steps: int = 0
    steps_run: int = 0
    best_step: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    lr: float = DEFAULT_LR
    loss: str = ""
    temperature: float = DEFAULT_TEMPERATURE
    seconds_per_step: float = 0.0
    seed: int = 0
    kept: str = "closed-form"

    @property
    def before(self) -> StageResult:
        return self.stages[0]

    @property
    def after(self) -> StageResult:
        """Figures of the returned model (the kept state)."""
        if self.kept == "distill" or len(self.stages) == 3:
            return self.stages[-1]  # the distill record holds the best state's figures
        return next(s for s in self.stages if s.stage == self.kept)

    def summary(self) -> str:
        def fmt(s: StageResult) -> str:
            text = f"error {100 * s.relative_error:.3g}%"
            if s.agreement is not None:
                text += f", agreement {100 * s.agreement:.1f}%"
            return text
        return (f"recovered on {self.samples_fit} sample(s) ({self.samples_holdout} held out): "
                f"{fmt(self.before)} -> {fmt(self.after)}")

    def to_dict(self) -> dict[str, Any]:
        return {"samples_fit": self.samples_fit, "samples_holdout": self.samples_holdout,
                "classifier": self.classifier, "seed": self.seed,
                "stages": [s.to_dict() for s in self.stages],
                "fitted": [r.to_dict() for r in self.fitted], "skipped": dict(self.skipped),
                "calibrated": list(self.calibrated), "steps": self.steps,
                "steps_run": self.steps_run, "best_step": self.best_step,
                "batch_size": self.batch_size, "lr": self.lr, "loss": self.loss,
                "temperature": self.temperature, "seconds_per_step": self.seconds_per_step,
                "kept": self.kept}


# ---------------------------------------------------------------------------- samples


def _first_conv(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)


def check_samples(model: nn.Module, samples: tuple[Tensor, ...], name: str = "data") -> None:
    """Refuse samples the model cannot take: wrong channel count, or a failing forward.

    Raises:
        UsageError: naming ``name`` (a file or parameter) and the reason.
    """
    conv = _first_conv(model)
    if conv is not None and len(samples) == 1:
        want = int(getattr(conv, "in_channels", 0))
        got = int(samples[0].shape[1])
        if want and got != want:
            raise UsageError(f"{name}: samples have {got} channel(s), the model's first conv "
                             f"takes {want}")
    probe = tuple(t[:2] for t in samples)
    with EvalModes(model), torch.no_grad():
        try:
            _forward(model, _to_model(model, probe))
        except WsconvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is bad data
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else (
                type(exc).__name__)
            raise UsageError(f"{name}: the model cannot run on these samples of shape "
                             f"{list(samples[0].shape[1:])} ({reason})") from None


def check_options(*, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
                  lr: float = DEFAULT_LR, holdout: float = DEFAULT_HOLDOUT,
                  prefix: str = "") -> None:
    """Refuse settings :func:`recover` cannot use; messages name `` `<prefix>steps` `` etc.

    Raises:
        UsageError: negative or non-integer ``steps``, ``batch_size`` below 1, ``lr`` not a
            positive finite number, ``holdout`` not a fraction in (0, 1) or a whole count >= 1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"`{prefix}steps` must be an integer >= 0, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"`{prefix}batch_size` must be an integer >= 1, got {batch_size!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"`{prefix}lr` must be a finite number > 0, got {lr!r}")
    if not (holdout > 0 and math.isfinite(holdout)) or (holdout >= 1 and holdout != int(holdout)):
        raise UsageError(f"`{prefix}holdout` must be a fraction in (0, 1) or a whole count >= 1, "
                         f"got {holdout!r}")


def _split(n: int, holdout: float, seed: int, name: str) -> tuple[Tensor, Tensor]:
    n_hold = int(holdout) if holdout >= 1 else max(MIN_HOLDOUT, round(holdout * n))
    if n_hold < MIN_HOLDOUT or n - n_hold < MIN_FIT:
        raise UsageError(
            f"{name}: {n} sample(s) is too few to hold {max(n_hold, MIN_HOLDOUT)} out and fit on "
            f"at least {MIN_FIT} (recovery needs {MIN_HOLDOUT + MIN_FIT} or more; lower holdout "
            "or pass more samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


# ---------------------------------------------------------------------------- forward helpers


def _flat(out: Any) -> list[Tensor]:
    return [t for t in tensors_in(out) if t.is_floating_point()]


def _to_model(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return cast_like(inputs, reference_tensor(model))


def _forward(model: nn.Module, inputs: tuple[Tensor, ...]) -> Any:
    return model(*inputs)


def _chunks(samples: tuple[Tensor, ...], index: Tensor, size: int) -> Iterator[tuple[Tensor, ...]]:
    for part in torch.split(index, size):
        yield tuple(t[part] for t in samples)


def _outputs(model: nn.Module, samples: tuple[Tensor, ...], index: Tensor) -> list[Tensor]:
    """The model's float outputs on ``samples[index]`` (eval, no grad), concatenated, float64."""
    parts: list[list[Tensor]] = []
    with EvalModes(model), torch.no_grad():
        for chunk in _chunks(samples, index, _CHUNK):
            parts.append([t.detach().double().cpu()
                          for t in _flat(_forward(model, _to_model(model, chunk)))])
    if not parts or not parts[0]:
        raise ConversionError("the model has no floating-point output to recover")
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


def _is_classifier(outs: list[Tensor]) -> bool:
    return len(outs) == 1 and outs[0].dim() == 2 and outs[0].shape[1] >= 2


def _figures(got: list[Tensor], ref: list[Tensor], classifier: bool) -> tuple[float, float | None]:
    if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref, strict=True)):
        raise ConversionError("the converted model's outputs differ in number or shape from the "
                              "original's")
    diff = sum(float((a - b).square().sum()) for a, b in zip(got, ref, strict=True))
    norm = sum(float(b.square().sum()) for b in ref)
    rel = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
    agree = None
    if classifier:
        agree = float((got[0].argmax(1) == ref[0].argmax(1)).double().mean())
    return rel, agree


def measure(converted: nn.Module, original: nn.Module | list[Tensor],
            data: Tensor | Sequence[Tensor], *, stage: str = "measure") -> StageResult:
    """Relative output error and (classifier outputs) top-1 agreement of ``converted`` against
    ``original`` (a model, or its outputs on ``data`` already computed), eval mode, no grad."""
    samples = as_samples(data)
    index = torch.arange(samples[0].shape[0])
    t0 = time.perf_counter()
    ref = original if isinstance(original, list) else _outputs(original, samples, index)
    classifier = _is_classifier(ref)
    got = _outputs(converted, samples, index)
    rel, agree = _figures(got, ref, classifier)
    with torch.no_grad():
        value = float(_loss_fn("kl" if classifier else "mse", DEFAULT_TEMPERATURE)(got, ref))
    return StageResult(stage, rel, agree, value, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- closed form


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
            _forward(model, _to_model(model, probe))
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
        _forward(model, _to_model(model, chunk))
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
    for chunk in _chunks(samples, index, _CHUNK):
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
                raise RecoveryInterrupted(_STOPPED)
            fitted.append(_fit_one(name, norm, reference, converted, original, samples, index))
            if progress is not None:
                progress(RecoveryProgress("closed-form", k + 1, len(targets),
                                          time.perf_counter() - t0, detail=name))
    return fitted, skipped


# ---------------------------------------------------------------------------- distillation


LOSSES = ("auto", "kl", "mse")


def _loss_fn(kind: str, temperature: float) -> Callable[[list[Tensor], list[Tensor]], Tensor]:
    if kind == "kl":
        def kl(got: list[Tensor], ref: list[Tensor]) -> Tensor:
            log_p = F.log_softmax(got[0] / temperature, dim=1)
            log_q = F.log_softmax(ref[0] / temperature, dim=1)
            return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * (
                temperature ** 2)
        return kl

    def mse(got: list[Tensor], ref: list[Tensor]) -> Tensor:
        diff = sum(((a - b).square().sum() for a, b in zip(got, ref, strict=True)),
                   start=torch.zeros(()))
        norm = sum(float(b.square().sum()) for b in ref)
        return diff / max(norm, 1e-30)
    return mse


class _Taps:
    """Feature matching: the outputs of named modules in both models during distillation.

    Each step runs the original first (its outputs stored), then the converted model; ``loss()``
    is the mean over the modules of ``||out - out_orig||^2 / ||out_orig||^2``.
    """

    def __init__(self, converted: nn.Module, original: nn.Module, names: Sequence[str]) -> None:
        self.pairs = [(converted.get_submodule(n), original.get_submodule(n)) for n in names]
        self.ref: dict[int, Tensor] = {}
        self.terms: list[Tensor] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _Taps:
        for k, (mine, theirs) in enumerate(self.pairs):
            self.handles.append(theirs.register_forward_hook(self._keep(k)))
            self.handles.append(mine.register_forward_hook(self._compare(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _keep(self, k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
            self.ref[k] = out.detach().clone()
        return hook

    def _compare(self, k: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Tensor) -> None:
            ref = self.ref.get(k)
            if ref is not None and ref.shape == out.shape:
                self.terms.append((out - ref).square().sum() / ref.square().sum().clamp_min(1e-30))
        return hook

    def clear(self) -> None:
        self.ref.clear()
        self.terms.clear()

    def loss(self) -> Tensor:
        if not self.terms:
            return torch.zeros(())
        return torch.stack(self.terms).mean()


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _restore(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    current = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(v)


def recover(converted: nn.Module, original: nn.Module, data: Tensor | Sequence[Tensor], *,
            steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
            lr: float = DEFAULT_LR, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
            temperature: float = DEFAULT_TEMPERATURE, loss: str = "auto",
            features: float = DEFAULT_FEATURES, mixup: bool = False, eval_every: int | None = None,
            calibrate: bool = True, name: str = "data",
            progress: Callable[[RecoveryProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RecoveryReport:
    """Make ``converted`` reproduce ``original`` on ``data``, in place (see the module docs).

    Args:
        converted: the converted model (``apply_ws``, optionally ``swap_norm``); modified in place.
        original: the model before conversion; never modified.
        data: unlabeled samples ``[N, C, ...]`` of the model's domain (a sequence of tensors for
            several positional inputs).
        steps: distillation steps after the closed form; 0 = closed form only.
        batch_size: distillation batch size.
        lr: Adam learning rate.
        holdout: fraction of the samples held out for measuring (a count when >= 1).
        seed: seed of the split and of the batch order.
        temperature: KL temperature for classifier-like outputs.
        loss: ``kl`` (classifier-like outputs only), ``mse`` (relative mean squared error) or
            ``auto`` (``kl`` for classifier-like outputs, else ``mse``).
        features: weight of feature matching: the mean relative squared error of every refitted
            norm's output against the original module's, added to the output loss (0: off).
        mixup: distill on mixed pairs of samples (``lam * x_i + (1 - lam) * x_j``, ``lam``
            uniform) instead of the samples themselves; the targets are the original's outputs
            on the mixed inputs.
        eval_every: steps between held-out checks (default ``max(steps // 10, 1)``).
        calibrate: re-estimate kept BatchNorms' running statistics first.
        name: what to call ``data`` in error messages (a file name, say).
        progress: receives a :class:`RecoveryProgress` after each layer and step.
        should_stop: polled after each layer and step; true stops (see module docs).

    Returns:
        A :class:`RecoveryReport`.

    Raises:
        UsageError: bad data or settings (naming ``name`` or the parameter).
        ConversionError: the models' outputs do not match in shape.
        RecoveryInterrupted: stopped; ``converted`` is as it was on entry.
    """
    check_options(steps=steps, batch_size=batch_size, lr=lr, holdout=holdout)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise UsageError(f"`temperature` must be a finite number > 0, got {temperature!r}")
    if loss not in LOSSES:
        raise UsageError(f"`loss` must be one of {', '.join(LOSSES)}, got {loss!r}")
    if not (features >= 0 and math.isfinite(features)):
        raise UsageError(f"`features` must be a finite number >= 0, got {features!r}")
    if eval_every is not None and eval_every < 1:
        raise UsageError(f"`eval_every` must be >= 1, got {eval_every!r}")
    samples = as_samples(data, name)
    check_samples(original, samples, name)
    fit_idx, hold_idx = _split(samples[0].shape[0], holdout, seed, name)
    entry = _snapshot(converted)
    modes = [(m, m.training) for m in converted.modules()]
    try:
        return _recover(converted, original, samples, fit_idx, hold_idx, steps=steps,
                        batch_size=batch_size, lr=lr, seed=seed, temperature=temperature,
                        loss=loss, features=features, mixup=mixup,
                        eval_every=eval_every or max(steps // 10, 1), calibrate=calibrate,
                        progress=progress, should_stop=should_stop)
    except BaseException:
        _restore(converted, entry)
        raise
    finally:
        for m, training in modes:
            m.training = training


def _recover(converted: nn.Module, original: nn.Module, samples: tuple[Tensor, ...],
             fit_idx: Tensor, hold_idx: Tensor, *, steps: int, batch_size: int, lr: float,
             seed: int, temperature: float, loss: str, features: float, mixup: bool,
             eval_every: int,
             calibrate: bool,
             progress: Callable[[RecoveryProgress], None] | None,
             should_stop: Callable[[], bool] | None) -> RecoveryReport:
    stop = should_stop or (lambda: False)
    t0 = time.perf_counter()
    ref_hold = _outputs(original, samples, hold_idx)
    classifier = _is_classifier(ref_hold)

    kind = loss if loss != "auto" else ("kl" if classifier else "mse")
    if kind == "kl" and not classifier:
        raise UsageError("loss 'kl' needs a classifier-like output (one [N, classes] tensor)")
    loss_fn = _loss_fn(kind, temperature)

    def held_out(stage: str, seconds: float) -> StageResult:
        got = _outputs(converted, samples, hold_idx)
        rel, agree = _figures(got, ref_hold, classifier)
        with torch.no_grad():
            value = float(loss_fn(got, ref_hold))
        return StageResult(stage, rel, agree, value, round(seconds, 4))

    report = RecoveryReport(len(fit_idx), len(hold_idx), classifier, steps=steps,
                            batch_size=batch_size, lr=lr, temperature=temperature, seed=seed,
                            loss=kind)
    report.stages.append(held_out("converted", time.perf_counter() - t0))

    # Stage 1: closed form.
    t1 = time.perf_counter()
    before_fit = _snapshot(converted)
    fit = tuple(t[fit_idx] for t in samples)
    if calibrate:
        report.calibrated = _calibrate(converted, fit, progress)
    if stop():
        raise RecoveryInterrupted(_STOPPED)
    report.fitted, report.skipped = fit_norms(converted, original, fit, progress=progress,
                                              should_stop=stop)
    closed = held_out("closed-form", time.perf_counter() - t1)
    report.stages.append(closed)
    best, best_state = closed, _snapshot(converted)
    if closed.loss > report.stages[0].loss:
        # Norms fitted one by one can leave the output measured worse than the plain conversion:
        # never return that state (distillation still starts from the refit, a better start in
        # every case measured).
        best, best_state, report.kept = report.stages[0], before_fit, "converted"
    if steps == 0:
        _restore(converted, best_state)
        return report

    # Stage 2: distillation, keeping the best held-out state (the closed-form one included).
    t2 = time.perf_counter()
    ref_fit = [] if mixup else _outputs(original, samples, fit_idx)
    params = [p for p in converted.parameters() if p.requires_grad]
    if not params:
        raise ConversionError("the converted model has no trainable parameter to distill")
    opt = torch.optim.Adam(params, lr=lr)
    # Cosine decay to zero over the steps: large moves first, a settled state at the end.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    order = torch.Generator().manual_seed(seed + 1)
    step_time = 0.0
    batches = _batch_indices(len(fit_idx), batch_size, order)
    last = float("nan")
    taps = _Taps(converted, original, [r.name for r in report.fitted]) if features else None
    with EvalModes(converted, original), taps or contextlib.nullcontext():
        for step in range(1, steps + 1):
            ts = time.perf_counter()
            pick = next(batches)
            chunk = tuple(t[fit_idx[pick]] for t in samples)
            if mixup:
                chunk = _mix(chunk, order)
            chunk = _to_model(converted, chunk)
            ref_now: list[Tensor] | None = None
            if taps is not None or mixup:
                if taps is not None:
                    taps.clear()
                with torch.no_grad():
                    ref_now = _flat(_forward(original, _to_model(original, chunk)))
            got = _flat(_forward(converted, chunk))
            ref = [r.to(got[0].device, got[0].dtype) for r in (
                ref_now if ref_now is not None else [r[pick] for r in ref_fit])]
            value = loss_fn(got, ref)
            if taps is not None:
                value = value + features * taps.loss()
            opt.zero_grad(set_to_none=True)
            value.backward()  # type: ignore[no-untyped-call]
            opt.step()
            schedule.step()
            last = float(value.detach())
            step_time += time.perf_counter() - ts
            detail = ""
            if step % eval_every == 0 or step == steps:
                current = held_out("distill", time.perf_counter() - t2)
                if current.loss < best.loss:
                    best, report.best_step, report.kept = current, step, "distill"
                    best_state = _snapshot(converted)
                detail = _describe(current)
            report.steps_run = step
            if progress is not None:
                progress(RecoveryProgress("distill", step, steps, time.perf_counter() - t2,
                                          last, detail))
            if not math.isfinite(last):
                break
            if stop():
                raise RecoveryInterrupted(_STOPPED)
    _restore(converted, best_state)
    report.seconds_per_step = step_time / max(report.steps_run, 1)
    report.stages.append(StageResult("distill", best.relative_error, best.agreement, best.loss,
                                     round(time.perf_counter() - t2, 4)))
    return report


def _describe(s: StageResult) -> str:
    text = f"held-out error {100 * s.relative_error:.3g}%"
    if s.agreement is not None:
        text += f", agreement {100 * s.agreement:.1f}%"
    return text


def _mix(chunk: tuple[Tensor, ...], gen: torch.Generator) -> tuple[Tensor, ...]:
    """Mixup of the batch with a shuffled copy of itself: ``lam * x + (1 - lam) * x[perm]``,
    ``lam`` uniform per sample (new inputs between real ones; the targets are the original
    model's outputs on them)."""
    n = chunk[0].shape[0]
    perm = torch.randperm(n, generator=gen)
    lam = torch.rand(n, generator=gen)
    out = []
    for t in chunk:
        w = lam.view(n, *([1] * (t.dim() - 1))).to(t.dtype)
        out.append(w * t + (1 - w) * t[perm])
    return tuple(out)


def _batch_indices(n: int, size: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Shuffled batches over ``range(n)``, epoch after epoch (the last partial one dropped when a
    full batch is possible)."""
    size = min(size, n)
    while True:
        perm = torch.randperm(n, generator=gen)
        for k in range(0, n - size + 1, size):
            yield perm[k:k + size]


def _calibrate(model: nn.Module, fit: tuple[Tensor, ...],
               progress: Callable[[RecoveryProgress], None] | None) -> list[str]:
    from wsconvert.calibration import calibrate_bn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns:
        return []
    t0 = time.perf_counter()
    n = fit[0].shape[0]
    batches = [tuple(t[k:k + _CHUNK] for t in fit) for k in range(0, n, _CHUNK)]
    result = calibrate_bn(model, batches, source="recovery samples")
    if progress is not None:
        progress(RecoveryProgress("calibrate", 1, 1, time.perf_counter() - t0))
    return list(result.layers)



# ---------------------------------------------------------------------------- measured advice


def measure_inits(original: nn.Module, convert: Callable[[str], nn.Module],
                  batches: Sequence[tuple[Tensor, ...]], inits: Sequence[str]
                  ) -> dict[str, float]:
    """The overall relative output drift each ``init`` would give, measured on ``batches``.

    For advice that is measured, not guessed: ``convert(init)`` builds the conversion the user
    asked for with another ``init`` (a fresh copy each time), and both models run in eval mode on
    the same probe batches. A conversion that fails or whose forward fails is left out.

    Returns:
        ``{init: ||y_conv - y_orig|| / ||y_orig||}`` over all the batches.
    """
    out: dict[str, float] = {}
    with EvalModes(original), torch.no_grad():
        refs = [_flat(_forward(original, _to_model(original, b))) for b in batches]
    for init in inits:
        try:
            candidate = convert(init)
            with EvalModes(candidate), torch.no_grad():
                diff = norm = 0.0
                for b, ref in zip(batches, refs, strict=True):
                    got = _flat(_forward(candidate, _to_model(candidate, b)))
                    for a, r in zip(got, ref, strict=True):
                        diff += float((a.double() - r.double()).square().sum())
                        norm += float(r.double().square().sum())
        except Exception:  # noqa: BLE001 - an alternative that cannot run is simply not advised
            continue
        out[init] = math.sqrt(diff / norm) if norm > 0 else (0.0 if diff == 0 else math.inf)
    return out
