"""How much a conversion changed a model's function, where, and BatchNorm re-calibration.

Weight Standardization (arXiv:1903.10520) changes every converted filter's mean and scale, and a
GroupNorm swap changes what the norms normalize over, so a converted model computes a different
function until it is fine-tuned (``init="exact"`` keeps it, see :mod:`wsconvert.ws`). This module
measures that change on probe inputs:

* overall: ``||y_conv - y_orig||_2 / ||y_orig||_2`` over all outputs of all probe samples;
* per layer: the same relative L2 on the output of every leaf module of the original model that
  has the same dotted name in the converted one (forward hooks; a module called several times is
  compared call by call and summed), in the order the original first calls them;
* the layer where the drift jumps most: the largest increase of the per-layer figure over the
  previous layer in call order (with branches, "previous" is the previous call, an approximation).

Probe inputs are seeded random normal tensors of a given or inferred shape (see
:func:`infer_input_shape` for the default spatial sizes), or real samples from a file.

:func:`calibrate_bn` re-estimates BatchNorm running statistics after a conversion: reset, momentum
``None`` (a cumulative average over the batches), forward in ``no_grad`` with only the BatchNorms
in train mode, then every module back to its previous mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from wsconvert.errors import ConversionError, UsageError

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SPATIAL",
    "DRIFT_THRESHOLD",
    "CalibrationReport",
    "DriftCheck",
    "DriftReport",
    "LayerDrift",
    "ProbeSource",
    "calibrate_bn",
    "check_drift",
    "infer_input_shape",
    "load_inputs",
    "measure_drift",
    "parse_input_shape",
    "relative_l2",
]

DEFAULT_BATCH = 8
"""Batch size of random probes when the shape is inferred."""
DEFAULT_SPATIAL = {1: 256, 2: 64, 3: 16}
"""Spatial size per conv dimension used when the input shape is inferred from the first conv."""
DRIFT_THRESHOLD = 0.05
"""Overall relative output change above which the report calls the drift large."""
_CALIBRATION_SEED_OFFSET = 1000  # calibration batches never reuse the drift batches' seeds


def relative_l2(diff_sq: float, ref_sq: float) -> float:
    """``sqrt(diff_sq / ref_sq)``, with 0/0 = 0 and x/0 = inf."""
    if ref_sq > 0:
        return math.sqrt(diff_sq / ref_sq)
    return 0.0 if diff_sq == 0 else math.inf


# ---------------------------------------------------------------------------- probe inputs


def parse_input_shape(text: str) -> tuple[tuple[int, ...], ...]:
    """Parse ``1,3,224,224`` (one input) or ``8,4,32;8,2,3,8,8`` (several, ``;``-separated).

    Raises:
        UsageError: empty, non-integer or non-positive sizes.
    """
    from wsconvert.export import parse_shapes

    return parse_shapes([text])


def infer_input_shape(model: nn.Module, batch: int = DEFAULT_BATCH) -> tuple[int, ...]:
    """``(batch, C_in, *spatial)`` from the model's first conv in module order.

    The spatial size is :data:`DEFAULT_SPATIAL` (256 for 1-d, 64x64 for 2-d, 16x16x16 for 3-d
    convs): small enough to run fast on a CPU, large enough for a few stride-2 stages. Models that
    need a fixed size (a Linear after a flatten) want an explicit shape.

    Raises:
        UsageError: no conv layer to infer from.
    """
    from wsconvert.export import infer_input_shape as infer

    return infer(model, batch, {d: (size,) * d for d, size in DEFAULT_SPATIAL.items()})


def _pick(obj: Mapping[str, Any]) -> Any:
    for key in ("inputs", "input", "x", "images", "data"):
        if key in obj:
            return obj[key]
    return list(obj.values())


def load_inputs(path: str | Path) -> tuple[Tensor, ...]:
    """Real probe samples from a file; the first dimension of each tensor indexes samples.

    ``.npz`` / ``.npy`` are read with numpy (no pickles). Anything else goes through
    :func:`wsconvert.checkpoint.read_checkpoint` (``weights_only``). A tensor is one model input; a
    list or tuple of tensors are positional inputs; a mapping uses its ``inputs`` / ``input`` /
    ``x`` / ``images`` / ``data`` entry, else its values in order.

    Raises:
        UsageError: unreadable file, no tensors, or inputs with different sample counts.
    """
    from wsconvert.checkpoint import read_inputs_file
    from wsconvert.errors import CheckpointError

    p = Path(path)
    try:
        obj: Any = read_inputs_file(p)
    except CheckpointError as exc:
        raise UsageError(f"--inputs {exc}") from None
    if isinstance(obj, Mapping):
        obj = _pick(obj)
    items = list(obj) if isinstance(obj, list | tuple) else [obj]
    tensors = []
    for item in items:
        t: Tensor = item if isinstance(item, Tensor) else torch.as_tensor(item)
        if t.dim() < 1 or t.shape[0] < 1:
            raise UsageError(f"--inputs {p}: each input needs a leading sample dimension")
        tensors.append(t.detach().cpu())
    if not tensors:
        raise UsageError(f"--inputs {p}: holds no tensors")
    if len({t.shape[0] for t in tensors}) != 1:
        raise UsageError(f"--inputs {p}: inputs disagree on the number of samples")
    return tuple(tensors)


@dataclass
class ProbeSource:
    """Where probe batches come from: seeded random shapes, or real samples.

    Attributes:
        shapes: per positional input, the full shape of a random batch (batch dim first).
        samples: per positional input, real samples (first dim indexes samples).
        seed: base seed of random batches; batch ``k`` uses ``seed + k``.
        batch_size: batch size when slicing real samples.
        inferred: the shape was inferred, not given.
    """

    shapes: tuple[tuple[int, ...], ...] = ()
    samples: tuple[Tensor, ...] = ()
    seed: int = 0
    batch_size: int = DEFAULT_BATCH
    inferred: bool = False
    origin: str = ""

    @classmethod
    def for_model(cls, model: nn.Module, input_shape: str | Sequence[Sequence[int]] | None = None,
                  inputs: str | Path | None = None, *, seed: int = 0) -> ProbeSource:
        """Random probes of ``input_shape`` (inferred when ``None``), or the samples in ``inputs``.

        Raises:
            UsageError: both given, a malformed shape or file, or no shape can be inferred.
        """
        if inputs is not None and input_shape is not None:
            raise UsageError("pass either --input-shape or --inputs, not both")
        if inputs is not None:
            samples = load_inputs(inputs)
            return cls(samples=samples, seed=seed, origin=str(inputs),
                       batch_size=min(DEFAULT_BATCH, int(samples[0].shape[0])))
        if input_shape is None:
            return cls(shapes=(infer_input_shape(model),), seed=seed, inferred=True)
        shapes = (parse_input_shape(input_shape) if isinstance(input_shape, str)
                  else tuple(tuple(int(d) for d in s) for s in input_shape))
        return cls(shapes=shapes, seed=seed)

    @property
    def real(self) -> bool:
        return bool(self.samples)

    def describe(self) -> str:
        if self.real:
            shape = "x".join(str(d) for d in self.samples[0].shape)
            return f"{self.samples[0].shape[0]} real sample(s) from {self.origin} ({shape})"
        shapes = "; ".join("x".join(str(d) for d in s) for s in self.shapes)
        how = "inferred" if self.inferred else "given"
        return f"seeded random normal inputs of {how} shape {shapes} (seed {self.seed})"

    def batch(self, k: int, like: Tensor | None = None) -> tuple[Tensor, ...]:
        """Probe batch number ``k`` (real samples cycle), cast to ``like``'s device and float
        dtype."""
        if self.real:
            n = int(self.samples[0].shape[0])
            idx = torch.arange(k * self.batch_size, (k + 1) * self.batch_size) % n
            out = tuple(s[idx] for s in self.samples)
        else:
            g = torch.Generator().manual_seed(self.seed + k)
            out = tuple(torch.randn(s, generator=g) for s in self.shapes)
        if like is None:
            return out
        return tuple(t.to(like.device, like.dtype if t.is_floating_point() else t.dtype)
                     for t in out)

    def drift_batches(self, max_batches: int = 2) -> int:
        """How many batches the drift measurement uses: all real samples (up to 64 batches), or
        ``max_batches`` random ones."""
        if self.real:
            n = int(self.samples[0].shape[0])
            return min(64, -(-n // self.batch_size))
        return max_batches


def _reference(model: nn.Module) -> Tensor | None:
    for p in model.parameters():
        return p
    for b in model.buffers():
        return b
    return None


def _forward(model: nn.Module, inputs: tuple[Tensor, ...], what: str) -> Any:
    try:
        return model(*inputs)
    except Exception as exc:  # noqa: BLE001 - user models raise anything on a bad input
        shapes = ", ".join("x".join(str(d) for d in t.shape) for t in inputs)
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UsageError(f"{what}: model forward failed on probe inputs of shape {shapes} "
                         f"({type(exc).__name__}: {msg}); pass --input-shape or --inputs"
                         ) from None


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            yield from _tensors(v)


# ---------------------------------------------------------------------------- drift


@dataclass(frozen=True)
class LayerDrift:
    """Relative L2 change of one module's output.

    Attributes:
        name: dotted module name (same in both models).
        kind: class in the original model.
        converted_kind: class in the converted one (``GroupNorm`` after a swap...).
        relative: ``||out_conv - out_orig|| / ||out_orig||`` over all calls and probe samples.
        jump: ``relative`` minus the previous layer's in call order (the first layer's from 0).
        calls: how many calls were compared.
    """

    name: str
    kind: str
    converted_kind: str
    relative: float
    jump: float
    calls: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DriftReport:
    """Result of :func:`measure_drift`.

    Attributes:
        output_relative: relative L2 change of all outputs.
        output_max_abs: largest absolute change of any output element.
        layers: per-layer drift in the original model's call order.
        samples: probe samples compared.
        source: description of the probe inputs.
    """

    output_relative: float
    output_max_abs: float
    layers: list[LayerDrift] = field(default_factory=list)
    samples: int = 0
    source: str = ""

    @property
    def worst_layer(self) -> LayerDrift | None:
        """The first layer (call order) with the largest relative drift."""
        if not self.layers:
            return None
        top = max(r.relative for r in self.layers)
        return next(r for r in self.layers if r.relative == top)

    @property
    def divergence_layer(self) -> LayerDrift | None:
        """The first layer where the drift jumps most over the previous layer."""
        if not self.layers:
            return None
        top = max(r.jump for r in self.layers)
        return next(r for r in self.layers if r.jump == top)

    def to_dict(self) -> dict[str, Any]:
        worst, jump = self.worst_layer, self.divergence_layer
        return {"output_relative": self.output_relative, "output_max_abs": self.output_max_abs,
                "samples": self.samples, "source": self.source,
                "worst_layer": worst.to_dict() if worst else None,
                "divergence_layer": jump.to_dict() if jump else None,
                "layers": [r.to_dict() for r in self.layers]}


def _leaf_names(original: nn.Module,
                converted: nn.Module) -> dict[str, tuple[nn.Module, nn.Module]]:
    conv_modules = dict(converted.named_modules())
    pairs = {}
    for name, module in original.named_modules():
        if name and not any(True for _ in module.children()) and name in conv_modules:
            pairs[name] = (module, conv_modules[name])
    return pairs


def _kind(module: nn.Module) -> str:
    from torch.nn.utils import parametrize

    return parametrize.type_before_parametrizations(module).__name__


class _Modes:
    """Put models in eval mode for the block; restore every module's mode after."""

    def __init__(self, *models: nn.Module) -> None:
        self.models = models
        self.saved: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> None:
        self.saved = [(m, m.training) for model in self.models for m in model.modules()]
        for model in self.models:
            model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, training in self.saved:
            m.training = training


def measure_drift(original: nn.Module, converted: nn.Module,
                  batches: Sequence[tuple[Tensor, ...]] | Callable[[int], tuple[Tensor, ...]],
                  n_batches: int | None = None, *, source: str = "") -> DriftReport:
    """Run both models (eval mode, no grad) on the same probe batches and compare outputs.

    Args:
        original: the model before conversion.
        converted: the converted model (same dotted names for the layers to compare).
        batches: a sequence of positional-input tuples, or a function from batch index to one.
        n_batches: how many batches when ``batches`` is a function.
        source: description of the inputs, for the report.

    Returns:
        A :class:`DriftReport`. Module modes are restored afterwards.

    Raises:
        UsageError: a model's forward fails on the probe inputs.
        ConversionError: the two models' outputs do not have the same shapes.
    """
    if callable(batches):
        count = n_batches or 1
        get = batches
    else:
        seq = list(batches)
        count, get = len(seq), seq.__getitem__
    pairs = _leaf_names(original, converted)
    order: list[str] = []
    stored: dict[str, list[list[Tensor]]] = {}
    diff_sq: dict[str, float] = dict.fromkeys(pairs, 0.0)
    ref_sq: dict[str, float] = dict.fromkeys(pairs, 0.0)
    calls: dict[str, int] = dict.fromkeys(pairs, 0)
    cursor: dict[str, int] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if name not in stored:
                stored[name] = []
                if name not in order:
                    order.append(name)
            # Clone: an in-place op after this module (ReLU(inplace=True)) would change it.
            stored[name].append([t.detach().double().clone() for t in _tensors(out)
                                 if t.is_floating_point()])
        return hook

    def compare(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            k = cursor.get(name, 0)
            cursor[name] = k + 1
            refs = stored.get(name, [])
            if k >= len(refs):
                return
            outs = [t.detach().double() for t in _tensors(out) if t.is_floating_point()]
            if len(outs) != len(refs[k]) or any(a.shape != b.shape
                                                for a, b in zip(outs, refs[k], strict=True)):
                return
            for a, b in zip(outs, refs[k], strict=True):
                diff_sq[name] += float((a - b).square().sum())
                ref_sq[name] += float(b.square().sum())
            calls[name] += 1
        return hook

    out_diff = out_ref = 0.0
    max_abs = 0.0
    samples = 0
    handles = []
    try:
        for name, (a, b) in pairs.items():
            handles.append(a.register_forward_hook(keep(name)))
            handles.append(b.register_forward_hook(compare(name)))
        like = _reference(original)
        with _Modes(original, converted), torch.no_grad():
            for k in range(count):
                inputs = get(k)
                if like is not None:
                    inputs = tuple(t.to(like.device, like.dtype if t.is_floating_point()
                                        else t.dtype) for t in inputs)
                stored.clear()
                cursor.clear()
                ref = [t.double() for t in _tensors(_forward(original, inputs, "original"))]
                got = [t.double() for t in _tensors(_forward(converted, inputs, "converted"))]
                if len(ref) != len(got) or any(x.shape != y.shape
                                               for x, y in zip(ref, got, strict=True)):
                    raise ConversionError("the converted model's outputs differ in number or "
                                          "shape from the original's")
                for x, y in zip(ref, got, strict=True):
                    d = y - x
                    out_diff += float(d.square().sum())
                    out_ref += float(x.square().sum())
                    if d.numel():
                        max_abs = max(max_abs, float(d.abs().max()))
                samples += int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
    finally:
        for h in handles:
            h.remove()
        stored.clear()
    layers = []
    previous = 0.0
    for name in order:
        if calls[name] == 0:
            continue
        rel = relative_l2(diff_sq[name], ref_sq[name])
        a, b = pairs[name]
        layers.append(LayerDrift(name, _kind(a), _kind(b), rel, rel - previous, calls[name]))
        previous = rel
    return DriftReport(relative_l2(out_diff, out_ref), max_abs, layers, samples, source)


# ---------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class CalibrationReport:
    """Result of :func:`calibrate_bn`.

    Attributes:
        layers: dotted names of the BatchNorms re-estimated.
        batches: number of batches run.
        samples: number of samples seen.
        source: description of the inputs.
        mean_shift: per layer, ``||new_mean - old_mean|| / sqrt(C)`` (RMS change of the running
            mean).
        var_ratio: per layer, ``mean(new_var) / mean(old_var)``.
    """

    layers: list[str]
    batches: int
    samples: int
    source: str = ""
    mean_shift: dict[str, float] = field(default_factory=dict)
    var_ratio: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_bn(model: nn.Module,
                 batches: Sequence[tuple[Tensor, ...]] | Callable[[int], tuple[Tensor, ...]],
                 n_batches: int | None = None, *, source: str = "") -> CalibrationReport:
    """Re-estimate every BatchNorm's running statistics in place from probe batches.

    Running statistics are reset and momentum set to ``None`` (a cumulative average, so every
    batch weighs the same); the forward passes run under ``no_grad`` with only the BatchNorms in
    train mode (dropout and the rest stay in eval). Momentum and every module's mode are restored.

    Args:
        model: the model to calibrate (modified in place).
        batches: a sequence of positional-input tuples, or a function from batch index to one.
        n_batches: how many batches when ``batches`` is a function.
        source: description of the inputs, for the report.

    Raises:
        UsageError: ``n_batches`` below 1, or the forward fails on the inputs.
        ConversionError: the model has no BatchNorm tracking running statistics.
    """
    if callable(batches):
        count = n_batches if n_batches is not None else 1
        get = batches
    else:
        seq = list(batches)
        count, get = len(seq), seq.__getitem__
    if count < 1:
        raise UsageError(f"--calibrate needs at least 1 batch, got {count}")
    bns = [(n, m) for n, m in model.named_modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
           and m.running_mean is not None]
    if not bns:
        raise ConversionError("model has no BatchNorm with running statistics to calibrate")
    before = {n: (m.running_mean.detach().clone(), m.running_var.detach().clone())  # type: ignore[union-attr]
              for n, m in bns}
    momenta = {n: m.momentum for n, m in bns}
    like = _reference(model)
    samples = 0
    with _Modes(model), torch.no_grad():
        try:
            for _, m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for k in range(count):
                inputs = get(k)
                if like is not None:
                    inputs = tuple(t.to(like.device, like.dtype if t.is_floating_point()
                                        else t.dtype) for t in inputs)
                _forward(model, inputs, "calibration")
                samples += int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
        except BaseException:
            for n, m in bns:
                m.running_mean.copy_(before[n][0])  # type: ignore[union-attr]
                m.running_var.copy_(before[n][1])  # type: ignore[union-attr]
            raise
        finally:
            for n, m in bns:
                m.momentum = momenta[n]
    shift, ratio = {}, {}
    for n, m in bns:
        old_m, old_v = before[n]
        new_m, new_v = cast(Tensor, m.running_mean), cast(Tensor, m.running_var)
        shift[n] = float((new_m - old_m).double().norm() / math.sqrt(max(new_m.numel(), 1)))
        denom = float(old_v.double().mean())
        ratio[n] = float(new_v.double().mean()) / denom if denom > 0 else math.inf
    return CalibrationReport([n for n, _ in bns], count, samples, source, shift, ratio)


# ---------------------------------------------------------------------------- the apply check


@dataclass
class DriftCheck:
    """What ``wsconvert apply`` reports about the conversion's effect.

    Attributes:
        before: drift of the converted model right after conversion.
        calibration: the BatchNorm re-estimation, when asked.
        after: drift after calibration (``None`` without calibration).
        threshold: overall relative change above which the drift counts as large.
        suggestion: what to do about a large drift (empty when small).
    """

    before: DriftReport
    calibration: CalibrationReport | None = None
    after: DriftReport | None = None
    threshold: float = DRIFT_THRESHOLD
    suggestion: str = ""

    @property
    def final(self) -> DriftReport:
        return self.after if self.after is not None else self.before

    @property
    def large(self) -> bool:
        return not self.final.output_relative <= self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "large": self.large,
                "before": self.before.to_dict(),
                "calibration": self.calibration.to_dict() if self.calibration else None,
                "after": self.after.to_dict() if self.after else None,
                "suggestion": self.suggestion}


def _suggest(check: DriftCheck, init: str, norm: str, source: ProbeSource) -> str:
    notes = []
    if check.large:
        if init != "exact":
            notes.append(
                "--init exact keeps each converted conv's function at step 0 (fixed per-filter "
                "gain and offset restore the pretrained filter, as DetectoRS's AWS); it trades "
                "away standardized filters at the start: the effective weights keep their "
                "pretrained mean and scale, so the smoother optimization WS is for only comes "
                "through the projected gradient")
        if norm == "gn":
            notes.append(
                "part of this drift is the GroupNorm swap itself (per-sample group statistics "
                "instead of running batch statistics); no --init removes it, fine-tuning does")
        elif check.calibration is None and init != "exact":
            notes.append("--calibrate N re-estimates the BatchNorm running statistics for the "
                         "standardized weights (best with --inputs of real samples)")
    if check.calibration is not None and not source.real:
        notes.append("calibrated on random probe inputs: the running statistics now describe "
                     "noise, not your data; pass --inputs with real samples")
    return "; ".join(notes)


def check_drift(original: nn.Module, converted: nn.Module, source: ProbeSource, *,
                calibrate: int = 0, init: str = "plain", norm: str = "keep",
                threshold: float = DRIFT_THRESHOLD, max_batches: int = 2) -> DriftCheck:
    """Measure the conversion's drift, optionally calibrate BatchNorms, measure again, advise.

    Calibration (``calibrate`` batches) modifies ``converted`` in place. Random calibration batches
    use other seeds than the drift batches, so the "after" figure is not measured on the data the
    statistics were fitted to; real samples from a file are shared by both.

    Args:
        original: the model before conversion.
        converted: the converted model.
        source: the probe inputs.
        calibrate: number of calibration batches (0: none).
        init: the ``init`` the conversion used (for the advice).
        norm: ``keep`` or ``gn`` (for the advice).
        threshold: relative output change above which the drift is large.
        max_batches: random probe batches for the drift measurement.

    Raises:
        UsageError: the forward fails on the probe inputs, or ``calibrate`` is negative.
        ConversionError: calibration asked but no BatchNorm to calibrate.
    """
    if calibrate < 0:
        raise UsageError(f"--calibrate must be >= 0, got {calibrate}")
    like = _reference(original)
    n = source.drift_batches(max_batches)
    before = measure_drift(original, converted, lambda k: source.batch(k, like), n,
                           source=source.describe())
    check = DriftCheck(before, threshold=threshold)
    if calibrate:
        offset = 0 if source.real else _CALIBRATION_SEED_OFFSET
        check.calibration = calibrate_bn(
            converted, lambda k: source.batch(offset + k, like), calibrate,
            source=source.describe())
        check.after = measure_drift(original, converted, lambda k: source.batch(k, like), n,
                                    source=source.describe())
    check.suggestion = _suggest(check, init, norm, source)
    return check
