"""Training-overhead measurement: what Weight Standardization costs per optimizer step.

WS (Qiao et al., arXiv:1903.10520) recomputes every standardized weight on each training step.
:func:`run_bench` times one SGD step of the same model in several forms:

* ``plain``: the convolutions as they are (the baseline every ratio is taken against);
* ``wsconvert:<convention>``: :func:`wsconvert.apply_ws` with that convention (with
  ``accumulate > 1`` the micro-batches run inside :func:`wsconvert.accumulate`);
* ``wsconvert-ahead:<convention>`` (with ``ahead``): the same with
  :func:`wsconvert.standardize_ahead`;
* ``seed``: the paper's PyTorch formula (mean, subtract, ``std + 1e-5``, divide) in the conv's
  forward, differentiated by plain autograd;
* ``timm-bn``: timm ``StdConv2d``'s ``F.batch_norm(w.reshape(1, O, -1), training=True)`` trick.

The forms are measured alternately: every round times one step of each form, in a rotating
order, so that drift of the machine (frequency, other processes) hits all of them alike. The
report gives each form's median and fastest step, its ratios to the plain form (median, fastest,
and paired per round) and to each reference formulation, and an estimate of the weight-size
memory passes the form makes per conv layer per step (:func:`estimated_passes`). With
``evaluate`` it also times a forward pass in evaluation mode under ``torch.no_grad()``. All
forms start from the same weights and see the same data.

The library never prints; ``wsconvert bench`` renders the report.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsconvert.conventions import CONVENTIONS, get_convention
from wsconvert.errors import UsageError
from wsconvert.io.inputs import MAX_INPUT_ELEMENTS

__all__ = [
    "OPTIMIZERS",
    "BenchConfig",
    "BenchReport",
    "BenchRow",
    "BenchSetting",
    "estimated_passes",
    "plain_counterpart",
    "reference_net",
    "run_bench",
]

REFERENCE_FORMS = ("seed", "timm-bn")
OPTIMIZERS = ("sgd", "sgd-momentum", "adamw")
MODES = ("train", "eval")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
MAX_THREADS = 1024
"""Most threads a benchmark may ask for (torch takes a 32-bit count; beyond a machine's cores
more threads only measure oversubscription)."""


def reference_net(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The built-in benchmark net: a 9-conv GroupNorm ResNet-like stack without shortcuts.

    Stem conv 7x7 stride 2 (``in_channels`` -> 64), GN(8), ReLU; four stages of conv3x3 (stride
    1, 2, 2, 2) + GN + ReLU + conv3x3 + GN + ReLU with widths 64, 128, 256, 512; global average
    pool; linear to ``num_classes``. Convs carry no bias; 4.7 M conv parameters.
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                               nn.GroupNorm(8, 64), nn.ReLU(inplace=True)]
    width = 64
    for out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False),
                   nn.GroupNorm(8, out), nn.ReLU(inplace=True),
                   nn.Conv2d(out, out, 3, padding=1, bias=False),
                   nn.GroupNorm(8, out), nn.ReLU(inplace=True)]
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class BenchConfig:
    """What to measure.

    Attributes:
        batch_sizes: one setting per batch size (the micro-batch size when ``accumulate > 1``).
        input_shape: one sample's shape, e.g. ``(3, 64, 64)``.
        accumulate: micro-batches per optimizer step.
        conventions: WS conventions to time (each one a row).
        references: reference formulations to time (``seed``, ``timm-bn``).
        rounds: measured rounds (one step of every form per round).
        warmup: unmeasured steps of every form before the rounds.
        threads: ``torch.set_num_threads`` for the run (restored after; at most
            :data:`MAX_THREADS`); ``None`` leaves it.
        num_classes: output size, for the cross-entropy targets.
        seed: random seed of weights and data.
        clock: ``wall`` (``time.perf_counter``, the default) or ``cpu`` (``time.process_time``,
            this process's CPU time: steadier on a machine shared with other jobs, but it also
            counts threads spinning while they wait).
        optimizer: ``sgd`` (plain SGD, the leanest step and the default), ``sgd-momentum``
            (momentum 0.9) or ``adamw``.
        evaluate: also time one forward pass per form in evaluation mode under
            ``torch.no_grad()`` (a setting with ``mode == "eval"`` after each training one).
        ahead: also time each convention with :func:`wsconvert.standardize_ahead` (rows
            ``wsconvert-ahead:<convention>``), to choose between the two on this model and
            input size.
    """

    batch_sizes: tuple[int, ...] = (1, 8)
    input_shape: tuple[int, ...] = (3, 64, 64)
    accumulate: int = 1
    conventions: tuple[str, ...] = tuple(CONVENTIONS)
    references: tuple[str, ...] = REFERENCE_FORMS
    rounds: int = 30
    warmup: int = 3
    threads: int | None = None
    num_classes: int | None = None
    seed: int = 0
    clock: str = "wall"
    optimizer: str = "sgd"
    evaluate: bool = False
    ahead: bool = False

    def validate(self) -> None:
        """Raises:
            UsageError: a setting out of range or an unknown name.
        """
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UsageError(f"`batch_sizes` must be >= 1, got {list(self.batch_sizes)}")
        if not self.input_shape or any(d < 1 for d in self.input_shape):
            raise UsageError(f"`input_shape` must be positive sizes, got {list(self.input_shape)}")
        if self.accumulate < 1:
            raise UsageError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.rounds < 1 or self.warmup < 0:
            raise UsageError("rounds must be >= 1 and warmup >= 0")
        if self.threads is not None and not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"threads must be between 1 and {MAX_THREADS}, got {self.threads}")
        elements = max(self.batch_sizes) * math.prod(self.input_shape)
        if elements > MAX_INPUT_ELEMENTS:
            raise UsageError(f"`batch_sizes` x `input_shape`: a batch of {elements:,} elements "
                             f"is above the limit of {MAX_INPUT_ELEMENTS:,}")
        if self.clock not in CLOCKS:
            raise UsageError(f"unknown clock {self.clock!r}; choose from: {', '.join(CLOCKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose from: "
                             f"{', '.join(OPTIMIZERS)}")
        for name in self.conventions:
            get_convention(name)
        for ref in self.references:
            if ref not in REFERENCE_FORMS:
                raise UsageError(f"unknown reference formulation {ref!r}; choose from: "
                                 f"{', '.join(REFERENCE_FORMS)}")


@dataclass(frozen=True)
class BenchRow:
    """One form's timing in one setting.

    Attributes:
        form: ``plain``, ``wsconvert:<convention>``, ``wsconvert-ahead:<convention>``,
            ``seed`` or ``timm-bn``.
        median_ms: median step time in milliseconds.
        min_ms, max_ms: fastest and slowest measured step.
        ratio: ``median_ms`` over the plain form's.
        paired_ratio: median over rounds of this form's step time over the plain step of the
            same round (steadier than ``ratio`` when the machine's load drifts).
        min_ratio: ``min_ms`` over the plain form's (the least disturbed steps of each).
        vs_references: ``median_ms`` over each measured reference formulation's.
        passes: estimated weight-size memory passes per conv layer per step outside the
            convolution kernels (:func:`estimated_passes`); ``None`` where not estimated.
    """

    form: str
    median_ms: float
    min_ms: float
    max_ms: float
    ratio: float
    paired_ratio: float
    min_ratio: float = math.nan
    vs_references: dict[str, float] = field(default_factory=dict)
    passes: float | None = None


@dataclass(frozen=True)
class BenchSetting:
    """The rows measured at one batch size, training steps (``mode == "train"``) or evaluation
    forward passes (``"eval"``)."""

    batch_size: int
    rows: tuple[BenchRow, ...]
    mode: str = "train"

    def row(self, form: str) -> BenchRow:
        """The row of ``form`` (``KeyError`` if it was not measured)."""
        for r in self.rows:
            if r.form == form:
                return r
        raise KeyError(form)


@dataclass
class BenchReport:
    """Result of :func:`run_bench`."""

    model: str
    input_shape: tuple[int, ...]
    accumulate: int
    rounds: int
    threads: int
    clock: str
    torch_version: str
    optimizer: str
    conv_parameters: int
    ws_layers: int
    settings: list[BenchSetting] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_shape"] = list(self.input_shape)
        d["settings"] = [{"batch_size": s.batch_size, "mode": s.mode,
                          "rows": [asdict(r) for r in s.rows]} for s in self.settings]
        return d


# ---------------------------------------------------------------------- reference formulations


def _seed_weight(weight: Tensor) -> Tensor:
    # The paper's PyTorch code (arXiv:1903.10520 repository), any conv rank.
    mean = weight
    for d in range(1, weight.dim()):
        mean = mean.mean(dim=d, keepdim=True)
    weight = weight - mean
    std = weight.view(weight.size(0), -1).std(dim=1).view(-1, *[1] * (weight.dim() - 1)) + 1e-5
    return weight / std.expand_as(weight)


def _timm_weight(weight: Tensor, eps: float = 1e-6) -> Tensor:
    # timm StdConv2d: batch_norm over [1, out, fan_in] in training mode, no running stats.
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, training=True,
                        momentum=0.0, eps=eps).reshape_as(weight)


_FORMULAS: dict[str, Callable[[Tensor], Tensor]] = {"seed": _seed_weight, "timm-bn": _timm_weight}


def _with_formula(model: nn.Module, formula: Callable[[Tensor], Tensor]) -> int:
    """Make every (non-transposed) conv standardize its weight in forward, as the seed did."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            conv = cast(Any, module)

            def forward(self: Any, x: Tensor) -> Tensor:
                return cast(Tensor, self._conv_forward(x, formula(self.weight), self.bias))

            conv.forward = types.MethodType(forward, conv)
            count += 1
    return count


def plain_counterpart(model: nn.Module) -> nn.Module:
    """A copy of a WS model with each WS layer back to a plain weight holding its current value.

    A model without WS is simply copied.
    """
    from wsconvert.surgery import unregister_ws, ws_layers

    plain = copy.deepcopy(model)
    for _, module, _p in list(ws_layers(plain)):
        with torch.no_grad():
            value = cast(Tensor, module.weight).detach().clone()
        unregister_ws(module, value)
    return plain


# ----------------------------------------------------------------------- memory-pass estimate

# One pass = one full read or one full write of a weight-size tensor, per conv layer, outside
# the convolution kernels (they read the weight and write its gradient alike in every form).
# Counted from the code each form runs (torch 2.13 single-tensor optimizers, wsconvert.ws, the
# autograd formulas of the reference formulations); docs/performance.md shows the counts.
_OPTIMIZER_PASSES = {"sgd": 3, "sgd-momentum": 8, "adamw": 20}
_ACCUMULATE_PASSES = 3  # .grad += the next micro-batch's gradient
_FORWARD_PASSES = {"wsconvert": 6, "seed": 6, "timm-bn": 4}
_BACKWARD_PASSES = {"wsconvert": 5, "seed": 25, "timm-bn": 5}
_AFFINE_PASSES = 2  # one more in-place sweep each: the gain (or gamma), beta


def estimated_passes(form: str, *, optimizer: str = "sgd", accumulate: int = 1,
                     mode: str = "train", gain: bool = False, shift: bool = False) -> int:
    """Estimated weight-size memory passes per conv layer per step of ``form``.

    Args:
        form: ``plain``, ``wsconvert:...``, ``seed`` or ``timm-bn``.
        optimizer: one of :data:`OPTIMIZERS`.
        accumulate: micro-batches per optimizer step (``wsconvert`` standardizes once per
            step inside :func:`wsconvert.accumulate`; the references once per micro-batch).
        mode: ``train`` (one optimizer step) or ``eval`` (one forward under ``no_grad``;
            ``wsconvert`` reuses its cached standardized weight).
        gain: the WS layers multiply by a per-channel factor (the ``scaled`` convention,
            ``init="scale"`` or ``init="exact"``).
        shift: the WS layers add ``beta`` (``init="exact"``).

    Raises:
        UsageError: unknown form, optimizer or mode.

    Example:
        >>> estimated_passes("plain"), estimated_passes("wsconvert:paper")
        (3, 14)
    """
    kind = "wsconvert" if form.startswith("wsconvert") else form
    if kind not in ("plain", "wsconvert", *REFERENCE_FORMS):
        raise UsageError(f"unknown form {form!r}")
    if optimizer not in OPTIMIZERS or mode not in MODES:
        raise UsageError(f"unknown optimizer {optimizer!r} or mode {mode!r}")
    if mode == "eval":
        return 0 if kind in ("plain", "wsconvert") else _FORWARD_PASSES[kind]
    passes = _OPTIMIZER_PASSES[optimizer] + _ACCUMULATE_PASSES * (accumulate - 1)
    if kind == "plain":
        return passes
    ws = _FORWARD_PASSES[kind] + _BACKWARD_PASSES[kind]
    if kind == "wsconvert":
        return passes + ws + _AFFINE_PASSES * (int(gain) + int(shift))
    return passes + ws * accumulate


# ---------------------------------------------------------------------------------- measuring


@dataclass
class _Form:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    use_accumulate: bool
    times: list[float] = field(default_factory=list)


def _make_optimizer(name: str, params: Any) -> torch.optim.Optimizer:
    # Small learning rates keep the weights (and the timings) steady over the run.
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5)
    return torch.optim.SGD(params, lr=1e-4, momentum=0.9 if name == "sgd-momentum" else 0.0)


def _affine(model: nn.Module) -> tuple[bool, bool]:
    """Whether the model's WS layers multiply by a per-channel factor, and add beta."""
    from wsconvert.surgery import ws_layers

    layers = [p for _, _, p in ws_layers(model)]
    # A scale other than 1 (fan-in scaling) always comes with a gain.
    return (any(p.gain is not None or p.gamma is not None for p in layers),
            any(p.beta is not None for p in layers))


def _conv_parameters(model: nn.Module) -> int:
    from wsconvert.ws import trainable_weight

    return sum(trainable_weight(m).numel() for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd))


def _target_shape(model: nn.Module, example: Tensor) -> tuple[int, ...]:
    """``(classes, *spatial)`` of the model's output, for cross-entropy targets."""
    try:
        with torch.no_grad():
            out = model.eval()(example)
    except Exception as exc:  # noqa: BLE001 - any failure means the shape does not fit
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        shape = ",".join(str(d) for d in example.shape[1:])
        raise UsageError(f"`input_shape` {shape} does not fit the model: {msg[:200]}") from None
    finally:
        model.train()
    if not isinstance(out, Tensor) or out.dim() < 2 or not out.is_floating_point():
        raise UsageError("the model's output is not a [batch, classes, ...] tensor; bench needs "
                         "one to train on with cross-entropy")
    return tuple(int(d) for d in out.shape[1:])


def _step(form: _Form, batches: Sequence[tuple[Tensor, Tensor]]) -> None:
    from wsconvert.ws import accumulate

    form.optimizer.zero_grad(set_to_none=True)
    k = len(batches)

    def run() -> None:
        for x, t in batches:
            out = form.model(x)
            loss = F.cross_entropy(out, t)
            (loss / k if k > 1 else loss).backward()  # type: ignore[no-untyped-call]

    if form.use_accumulate:
        with accumulate(form.model):
            run()
    else:
        run()
    form.optimizer.step()


def _row(form: _Form, plain: list[float], passes: int | None) -> BenchRow:
    times = form.times
    med, base = statistics.median(times), statistics.median(plain)
    paired = statistics.median(t / p for t, p in zip(times, plain, strict=True) if p > 0)
    return BenchRow(form.name, med * 1e3, min(times) * 1e3, max(times) * 1e3,
                    med / base if base > 0 else math.nan, paired,
                    min(times) / min(plain) if min(plain) > 0 else math.nan, {}, passes)


def _with_reference_ratios(rows: list[BenchRow]) -> tuple[BenchRow, ...]:
    refs = {r.form: r.median_ms for r in rows if r.form in REFERENCE_FORMS}
    return tuple(replace(r, vs_references={k: r.median_ms / v for k, v in refs.items() if v > 0})
                 for r in rows)


def run_bench(model: nn.Module | None = None, config: BenchConfig | None = None, *,
              model_name: str | None = None,
              progress: Callable[[str], None] | None = None) -> BenchReport:
    """Time one training step (and, with ``evaluate``, one eval forward) of plain vs WS vs
    reference formulations.

    Args:
        model: the model to measure, plain or with WS (a WS model is timed as it is, against its
            plain counterpart); ``None`` for :func:`reference_net`. Not modified.
        config: what to measure (defaults: :class:`BenchConfig`).
        model_name: label for the report.
        progress: called with a short message before each setting (the CLI shows it).

    Returns:
        A :class:`BenchReport`; ratios are step times over the plain form's (and over each
        reference formulation's).

    Raises:
        UsageError: bad settings, or a model whose output cannot be trained on.
        ConversionError: ``conventions`` given but the model has no conv layer for WS.

    Example:
        >>> cfg = BenchConfig(batch_sizes=(1,), input_shape=(3, 32, 32), rounds=3,
        ...                   conventions=("timm",), references=())
        >>> report = run_bench(config=cfg)
        >>> [r.form for r in report.settings[0].rows]
        ['plain', 'wsconvert:timm']
    """
    from wsconvert.surgery import apply_ws, ws_layers
    from wsconvert.ws import standardize_ahead

    cfg = config or BenchConfig()
    cfg.validate()
    name = model_name or ("reference net" if model is None else type(model).__name__)
    old_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        torch.manual_seed(cfg.seed)
        base = reference_net(cfg.num_classes or 10, cfg.input_shape[0]) if model is None else model
        own_ws = next(ws_layers(base), None) is not None
        plain = plain_counterpart(base)
        notes: list[str] = []
        with torch.random.fork_rng():
            example = torch.randn(1, *cfg.input_shape)
        target = _target_shape(plain, example)
        if cfg.num_classes is not None:
            target = (cfg.num_classes, *target[1:])

        variants: list[tuple[str, nn.Module, bool]] = [("plain", plain, False)]
        n_ws = 0
        if own_ws:
            ws_model = copy.deepcopy(base)
            n_ws = sum(1 for _ in ws_layers(ws_model))
            conv_names = sorted({p.convention for _, _, p in ws_layers(ws_model)})
            variants.append((f"wsconvert:{'+'.join(conv_names)} (model's own)", ws_model,
                             cfg.accumulate > 1))
            conventions = tuple(c for c in cfg.conventions if c not in conv_names)
        else:
            conventions = cfg.conventions
        for conv_name in conventions:
            report = apply_ws(plain, conv_name)
            n_ws = max(n_ws, len(report.converted))
            variants.append((f"wsconvert:{conv_name}", report.model, cfg.accumulate > 1))
        if cfg.ahead:
            for form, ws_model, use_acc in [v for v in variants if v[0].startswith("wsconvert")]:
                ahead_model = copy.deepcopy(ws_model)
                standardize_ahead(ahead_model)
                variants.append((form.replace("wsconvert", "wsconvert-ahead", 1), ahead_model,
                                 use_acc))
            if cfg.accumulate > 1:
                notes.append("wsconvert-ahead rows: accumulate already standardizes ahead, "
                             "once per step")
        for ref in cfg.references:
            m = copy.deepcopy(plain)
            if _with_formula(m, _FORMULAS[ref]) == 0:
                notes.append(f"{ref}: the model has no Conv1d/2d/3d layer; row left out")
                continue
            variants.append((ref, m, False))
        if cfg.accumulate > 1:
            notes.append(f"{cfg.accumulate} micro-batches per step; wsconvert rows use "
                         "wsconvert.accumulate, the others standardize per micro-batch")

        settings: list[BenchSetting] = []
        for batch in cfg.batch_sizes:
            if progress is not None:
                progress(f"batch {batch}: {len(variants)} forms x {cfg.rounds} rounds")
            settings.extend(_measure(variants, cfg, batch, target))
        return BenchReport(name, tuple(cfg.input_shape), cfg.accumulate, cfg.rounds,
                           torch.get_num_threads(), cfg.clock, torch.__version__, cfg.optimizer,
                           _conv_parameters(plain), n_ws, settings, notes)
    finally:
        torch.set_num_threads(old_threads)


def _rounds(forms: list[_Form], cfg: BenchConfig, step: Callable[[_Form], None]) -> None:
    for _ in range(cfg.warmup):
        for f in forms:
            step(f)
    clock = CLOCKS[cfg.clock]
    for r in range(cfg.rounds):
        order = forms[r % len(forms):] + forms[:r % len(forms)]
        for f in order:
            t0 = clock()
            step(f)
            f.times.append(clock() - t0)


def _measure(variants: list[tuple[str, nn.Module, bool]], cfg: BenchConfig, batch: int,
             target: tuple[int, ...]) -> list[BenchSetting]:
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    batches = [(torch.randn(batch, *cfg.input_shape, generator=gen),
                torch.randint(0, target[0], (batch, *target[1:]), generator=gen))
               for _ in range(cfg.accumulate)]
    forms = []
    for name, model, use_acc in variants:
        m = copy.deepcopy(model).train()
        forms.append(_Form(name, m, _make_optimizer(cfg.optimizer, m.parameters()), use_acc))
    _rounds(forms, cfg, lambda f: _step(f, batches))
    plain = forms[0].times
    rows = []
    for f in forms:
        gain, shift = _affine(f.model)
        rows.append(_row(f, plain, estimated_passes(
            f.name.split(" ")[0], optimizer=cfg.optimizer, accumulate=cfg.accumulate,
            gain=gain, shift=shift)))
    settings = [BenchSetting(batch, _with_reference_ratios(rows), "train")]
    if cfg.evaluate:
        x = batches[0][0]
        for f in forms:
            f.model.eval()
            f.times = []

        def forward(f: _Form) -> None:
            with torch.no_grad():
                f.model(x)

        _rounds(forms, cfg, forward)
        plain = forms[0].times
        rows = [_row(f, plain, estimated_passes(f.name.split(" ")[0], mode="eval"))
                for f in forms]
        settings.append(BenchSetting(batch, _with_reference_ratios(rows), "eval"))
    return settings
