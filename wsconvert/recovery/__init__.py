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
   original module's. With ``augment`` (the default, for inputs with one to three spatial
   dimensions) each batch is randomly flipped and shifted; with ``mixup`` the inputs are mixed
   pairs of samples (``lam * x_i + (1 - lam) * x_j``). The targets are then the original's
   outputs on the inputs as changed.

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
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from wsconvert.errors import ConversionError, UsageError, WsconvertError
from wsconvert.io.inputs import as_samples
from wsconvert.probes import EvalModes, float_tensors, restore_modes
from wsconvert.recovery.distill import LOSSES, Taps, batch_indices, can_augment, loss_fn, mix
from wsconvert.recovery.distill import augment as augment_batch
from wsconvert.recovery.refit import fit_norms
from wsconvert.recovery.report import (
    CHUNK,
    DEFAULT_AUGMENT,
    DEFAULT_BATCH_SIZE,
    DEFAULT_FEATURES,
    DEFAULT_HOLDOUT,
    DEFAULT_LR,
    DEFAULT_STEPS,
    DEFAULT_TEMPERATURE,
    MIN_FIT,
    MIN_HOLDOUT,
    STOPPED,
    FitRecord,
    RecoveryInterrupted,
    RecoveryProgress,
    RecoveryReport,
    StageResult,
    is_classifier,
    outputs,
    stage_result,
    to_model,
)

__all__ = [
    "DEFAULT_AUGMENT",
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
    "recover",
]



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
            model(*to_model(model, probe))
        except WsconvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the user's forward is bad data
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else (
                type(exc).__name__)
            raise UsageError(f"{name}: the model cannot run on these samples of shape "
                             f"{list(samples[0].shape[1:])} ({reason})") from None


def check_options(*, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
                  lr: float = DEFAULT_LR, holdout: float = DEFAULT_HOLDOUT, seed: int = 0,
                  prefix: str = "") -> None:
    """Refuse settings :func:`recover` cannot use; messages name `` `<prefix>steps` `` etc.

    Raises:
        UsageError: negative or non-integer ``steps``, ``batch_size`` below 1, ``lr`` not a
            positive finite number, ``holdout`` not a fraction in (0, 1) or a whole count >= 1,
            ``seed`` not an integer in [0, 2**63 - 2] (the batch order uses ``seed + 1``).
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
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**63 - 2:
        raise UsageError(f"`{prefix}seed` must be an integer in [0, 2**63 - 2], got {seed!r}")


def _split(n: int, holdout: float, seed: int, name: str) -> tuple[Tensor, Tensor]:
    n_hold = int(holdout) if holdout >= 1 else max(MIN_HOLDOUT, round(holdout * n))
    if n_hold < MIN_HOLDOUT or n - n_hold < MIN_FIT:
        raise UsageError(
            f"{name}: {n} sample(s) is too few to hold {max(n_hold, MIN_HOLDOUT)} out and fit on "
            f"at least {MIN_FIT} (recovery needs {MIN_HOLDOUT + MIN_FIT} or more; lower holdout "
            "or pass more samples)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_hold:].sort().values, perm[:n_hold].sort().values


def measure(converted: nn.Module, original: nn.Module | list[Tensor],
            data: Tensor | Sequence[Tensor], *, stage: str = "measure") -> StageResult:
    """Relative output error and (classifier outputs) top-1 agreement of ``converted`` against
    ``original`` (a model, or its outputs on ``data`` already computed), eval mode, no grad."""
    samples = as_samples(data)
    index = torch.arange(samples[0].shape[0])
    t0 = time.perf_counter()
    ref = original if isinstance(original, list) else outputs(original, samples, index)
    objective = loss_fn("kl" if is_classifier(ref) else "mse", DEFAULT_TEMPERATURE)
    return stage_result(stage, converted, samples, index, ref, objective, t0)


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
            features: float = DEFAULT_FEATURES, augment: bool | None = None,
            mixup: bool = False, eval_every: int | None = None,
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
        augment: distill on randomly flipped and shifted samples (see
            :func:`wsconvert.recovery.distill.augment`; the targets are the original's outputs on
            them). ``None`` (default): where it applies. It does not apply to inputs without one
            to three spatial dimensions: it is then reported off, and ``True`` also adds a note
            (:attr:`RecoveryReport.notes`) saying so.
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
    check_options(steps=steps, batch_size=batch_size, lr=lr, holdout=holdout, seed=seed)
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
    wanted = DEFAULT_AUGMENT if augment is None else augment
    applies = steps > 0 and can_augment(samples)
    try:
        report = _recover(converted, original, samples, fit_idx, hold_idx, steps=steps,
                          batch_size=batch_size, lr=lr, seed=seed, temperature=temperature,
                          loss=loss, features=features, mixup=mixup,
                          augment=wanted and applies,
                          eval_every=eval_every or max(steps // 10, 1), calibrate=calibrate,
                          progress=progress, should_stop=should_stop)
    except BaseException:
        _restore(converted, entry)
        raise
    finally:
        restore_modes(modes)
    if augment and steps > 0 and not applies:
        report.notes.append(f"`augment=True`: not applied; it needs inputs [N, C, *spatial] "
                            f"with 1-3 spatial dimensions, the same for every input ({name})")
    return report


def _recover(converted: nn.Module, original: nn.Module, samples: tuple[Tensor, ...],
             fit_idx: Tensor, hold_idx: Tensor, *, steps: int, batch_size: int, lr: float,
             seed: int, temperature: float, loss: str, features: float, mixup: bool,
             augment: bool,
             eval_every: int,
             calibrate: bool,
             progress: Callable[[RecoveryProgress], None] | None,
             should_stop: Callable[[], bool] | None) -> RecoveryReport:
    stop = should_stop or (lambda: False)
    t0 = time.perf_counter()
    ref_hold = outputs(original, samples, hold_idx)
    classifier = is_classifier(ref_hold)

    kind = loss if loss != "auto" else ("kl" if classifier else "mse")
    if kind == "kl" and not classifier:
        raise UsageError("loss 'kl' needs a classifier-like output (one [N, classes] tensor)")
    objective = loss_fn(kind, temperature)

    def held_out(stage: str, since: float) -> StageResult:
        return stage_result(stage, converted, samples, hold_idx, ref_hold, objective, since)

    report = RecoveryReport(len(fit_idx), len(hold_idx), classifier, steps=steps,
                            batch_size=batch_size, lr=lr, temperature=temperature, seed=seed,
                            loss=kind, augment=augment, mixup=mixup, features=features)
    report.stages.append(held_out("converted", t0))

    # Stage 1: closed form.
    t1 = time.perf_counter()
    before_fit = _snapshot(converted)
    fit = tuple(t[fit_idx] for t in samples)
    if calibrate:
        report.calibrated = _calibrate(converted, fit, progress)
    if stop():
        raise RecoveryInterrupted(STOPPED)
    report.fitted, report.skipped = fit_norms(converted, original, fit, progress=progress,
                                              should_stop=stop)
    closed = held_out("closed-form", t1)
    report.stages.append(closed)
    best, best_state = closed, _snapshot(converted)
    if math.isnan(closed.loss) or closed.loss > report.stages[0].loss:
        # Norms fitted one by one can leave the output measured worse than the plain conversion
        # (or not finite): never return that state (distillation still starts from the refit,
        # a better start in every case measured).
        best, best_state, report.kept = report.stages[0], before_fit, "converted"
    if steps == 0:
        _restore(converted, best_state)
        return report

    # Stage 2: distillation, keeping the best held-out state (the closed-form one included).
    t2 = time.perf_counter()
    taps = Taps(converted, original, [r.name for r in report.fitted]) if features else None
    # Targets computed per step on the inputs as changed, or alongside the feature taps; else
    # once for all fit samples.
    online = mixup or augment or taps is not None
    ref_fit = [] if online else outputs(original, samples, fit_idx)
    params = [p for p in converted.parameters() if p.requires_grad]
    if not params:
        raise ConversionError("the converted model has no trainable parameter to distill")
    opt = torch.optim.Adam(params, lr=lr)
    # Cosine decay to zero over the steps: large moves first, a settled state at the end.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps)))
    order = torch.Generator().manual_seed(seed + 1)
    step_time = 0.0
    batches = batch_indices(len(fit_idx), batch_size, order)
    last = float("nan")
    with EvalModes(converted, original), taps or contextlib.nullcontext():
        for step in range(1, steps + 1):
            ts = time.perf_counter()
            pick = next(batches)
            chunk = tuple(t[pick] for t in fit)
            if augment:
                chunk = augment_batch(chunk, order)
            if mixup:
                chunk = mix(chunk, order)
            chunk = to_model(converted, chunk)
            ref_now: list[Tensor] | None = None
            if online:
                if taps is not None:
                    taps.clear()
                with torch.no_grad():
                    ref_now = float_tensors(original(*to_model(original, chunk)))
            got = float_tensors(converted(*chunk))
            ref = [r.to(got[0].device, got[0].dtype) for r in (
                ref_now if ref_now is not None else [r[pick] for r in ref_fit])]
            value = objective(got, ref)
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
                current = held_out("distill", t2)
                if current.loss < best.loss:
                    best, report.best_step, report.kept = current, step, "distill"
                    best_state = _snapshot(converted)
                detail = f"held-out {current.describe()}"
            report.steps_run = step
            if progress is not None:
                progress(RecoveryProgress("distill", step, steps, time.perf_counter() - t2,
                                          last, detail))
            if not math.isfinite(last):
                break
            if stop():
                raise RecoveryInterrupted(STOPPED)
    _restore(converted, best_state)
    report.seconds_per_step = step_time / max(report.steps_run, 1)
    report.stages.append(StageResult("distill", best.relative_error, best.agreement, best.loss,
                                     round(time.perf_counter() - t2, 4)))
    return report


def _calibrate(model: nn.Module, fit: tuple[Tensor, ...],
               progress: Callable[[RecoveryProgress], None] | None) -> list[str]:
    from wsconvert.calibration import calibrate_bn

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns:
        return []
    t0 = time.perf_counter()
    n = fit[0].shape[0]
    batches = [tuple(t[k:k + CHUNK] for t in fit) for k in range(0, n, CHUNK)]
    result = calibrate_bn(model, batches, source="recovery samples")
    if progress is not None:
        progress(RecoveryProgress("calibrate", 1, 1, time.perf_counter() - t0))
    return list(result.layers)
