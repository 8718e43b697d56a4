"""The library's three operations, stage by stage: what the commands and the demo call.

* :func:`convert` (``apply``): load -> WS -> optional GroupNorm swap -> drift check -> save.
* :func:`fold_and_export` (``fold``): load -> fold -> optional ONNX export -> parity gate -> save.
* :func:`gate` (``check``): an ONNX file against its checkpoint.
* :func:`inspect_checkpoint` (``inspect``): load -> per-layer WS status.

Each first plans: every option is checked and every output path claimed in an
:class:`~wsconvert.io.atomic.OutputSet` before any model is loaded. The stages then write to
staging paths, and the outputs are committed together only when every stage succeeded (a failed
parity check is a result, not an error: its outputs and reports are committed). ``progress(stage)``
is entered around every stage, for spinners and timings.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from wsconvert._gate import fold_reference, gate_inputs, plan_gate, run_gate
from wsconvert._gate import save_failing as save_failing_stage
from wsconvert.calibration import check_calibrate
from wsconvert.defaults import (
    CONVENTION,
    GATE_ATOL,
    GATE_RTOL,
    GATE_SEEDS,
    GROUPS,
    INIT,
    OPSET,
)
from wsconvert.drift import DriftCheck, check_drift
from wsconvert.errors import UsageError
from wsconvert.export import ExportConfig, ExportResult, export_onnx
from wsconvert.fold import FoldReport, fold_ws
from wsconvert.inspection import LayerInfo, inspect_model
from wsconvert.io.arch import arch_of
from wsconvert.io.atomic import (
    OutputSet,
    Protected,
    check_weights_output,
    save_bytes,
    save_weights,
)
from wsconvert.io.inputs import check_input_size, infer_input_shape, load_samples, parse_shapes
from wsconvert.io.safe import check_file
from wsconvert.io.spec import factory_source
from wsconvert.io.state import load_weights_into
from wsconvert.io.wsfile import LoadedModel, check_finite, load_model, ws_payload
from wsconvert.norms import NormSwapReport, check_groups, swap_norm
from wsconvert.parity import LocateMode, ParityReport, graph_input_shapes, onnx_inputs
from wsconvert.probes import ProbeSource, check_probe_options
from wsconvert.recovery import (
    RecoveryProgress,
    RecoveryReport,
    check_options,
    recover,
)
from wsconvert.surgery import ApplyReport, apply_ws

__all__ = [
    "ConvertResult",
    "FoldResult",
    "GateResult",
    "Progress",
    "convert",
    "default_output",
    "fold_and_export",
    "gate",
    "inspect_checkpoint",
]

PathLike = str | os.PathLike[str]
Progress = Callable[[str], AbstractContextManager[Any]]
"""``progress(stage)``: a context manager entered around each stage."""
NORM_MODES = ("keep", "gn")


def _no_progress(stage: str) -> AbstractContextManager[Any]:
    return contextlib.nullcontext()


def default_output(checkpoint: PathLike, suffix: str) -> Path:
    """``m.pt`` -> ``m<suffix>``; a ``.ws`` stem loses it (``m.ws.pt`` -> ``m.folded.pt``)."""
    path = Path(checkpoint)
    stem = path.stem
    if suffix != ".ws.pt" and stem.endswith(".ws"):
        stem = stem[:-3]
    return path.with_name(f"{stem}{suffix}")


def _inputs(model: str | None = None, **paths: PathLike | None) -> list[Protected]:
    """The run's input files, by parameter name (not for the positional ones), for the output
    checks; with ``model``, the file defining its factory too (an output never replaces the
    code that builds the model)."""
    source = factory_source(model)
    return [path if name in ("checkpoint", "onnx_file") else (name, path)
            for name, path in paths.items() if path is not None] + (
        [] if source is None else [source])


def _check_float32(model: nn.Module, where: PathLike) -> None:
    """Export and the parity check feed float32 inputs: refuse other parameter dtypes clearly.

    Raises:
        UsageError: a floating-point parameter or buffer that is not float32.
    """
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in
                     [*model.parameters(), *model.buffers()] if t.is_floating_point()}
                    - {"float32"})
    if dtypes:
        raise UsageError(f"{where}: the model's parameters are {', '.join(dtypes)}; export and "
                         "the parity check run in float32: build the model in float32 (call "
                         ".float() on it in the factory)")


# ---------------------------------------------------------------------------- inspect


@dataclass
class InspectResult:
    """What :func:`inspect_checkpoint` found; ``to_dict()`` is ``inspect --json``."""

    input: Path
    loaded: LoadedModel
    layers: list[LayerInfo]

    @property
    def ws_layers(self) -> int:
        """Layers standardized by wsconvert, another library, or a known parametrization."""
        return sum(1 for r in self.layers if r.ws in ("wsconvert", "foreign", "parametrization"))

    @property
    def unknown_parametrizations(self) -> int:
        return sum(1 for r in self.layers if r.ws == "unknown")

    def to_dict(self) -> dict[str, Any]:
        return {"input": str(self.input), "source": self.loaded.source,
                "layers": [info.to_dict() for info in self.layers],
                "ws_layers": self.ws_layers,
                "unknown_parametrizations": self.unknown_parametrizations}


def inspect_checkpoint(checkpoint: PathLike, *, model: str | None = None,
                       model_kwargs: Any = None, trust: bool = False,
                       allow_classes: Sequence[str] = (),
                       allow_nonfinite: bool = False) -> InspectResult:
    """Load a checkpoint and report every conv / linear layer (``wsconvert inspect``).

    Raises:
        WsconvertError: the checkpoint cannot be loaded.
    """
    loaded = load_model(checkpoint, model, model_kwargs, trust=trust,
                        allow_classes=allow_classes, allow_nonfinite=allow_nonfinite)
    return InspectResult(Path(checkpoint), loaded, inspect_model(loaded.model))


# ---------------------------------------------------------------------------- convert


@dataclass
class ConvertResult:
    """What :func:`convert` did; ``to_dict()`` is ``apply --json``.

    Attributes:
        input, output: the checkpoint read and the WS checkpoint written.
        loaded: the model as loaded (the original, unchanged when the drift check ran).
        apply: the WS conversion report; ``apply.model`` is the converted model.
        norm: the GroupNorm swap (``None`` with ``norm="keep"``).
        drift: the drift check (``None`` when skipped), measured before recovery.
        drift_skipped: why the drift check was skipped (``""`` when it ran).
        recovery: the recovery on ``calib_data`` (``None`` without it).
    """

    input: Path
    output: Path
    loaded: LoadedModel
    apply: ApplyReport
    norm: NormSwapReport | None = None
    drift: DriftCheck | None = None
    drift_skipped: str = ""
    recovery: RecoveryReport | None = None

    @property
    def model(self) -> nn.Module:
        return self.apply.model

    def to_dict(self) -> dict[str, Any]:
        norm = ({"mode": "gn", **self.norm.to_dict()} if self.norm is not None
                else {"mode": "keep"})
        drift = self.drift.to_dict() if self.drift is not None else {"skipped": self.drift_skipped}
        return {"input": str(self.input), "output": str(self.output), **self.apply.to_dict(),
                "norm": norm, "drift": drift,
                "recovery": self.recovery.to_dict() if self.recovery is not None else None}


def convert(checkpoint: PathLike, output: PathLike | None = None, *, model: str | None = None,
            model_kwargs: Any = None, convention: str = CONVENTION, eps: float | None = None,
            init: str = INIT, include: Sequence[str] = (), exclude: Sequence[str] = (),
            transposed: bool = False, linear: bool = False, norm: str = "keep",
            groups: int = GROUPS, convert_frozen: bool = False,
            input_shape: str | Sequence[Sequence[int]] | None = None,
            inputs: PathLike | None = None, calibrate: int = 0, drift: bool = True,
            trust: bool = False, allow_classes: Sequence[str] = (), force: bool = False,
            allow_nonfinite: bool = False, allow_large_inputs: bool = False,
            calib_data: PathLike | None = None, recover_steps: int | None = None,
            recover_batch_size: int | None = None, recover_lr: float | None = None,
            recover_holdout: float | None = None, recover_seed: int | None = None,
            recover_augment: bool | None = None,
            image_size: int | Sequence[int] | None = None, mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None,
            recover_progress: Callable[[RecoveryProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            progress: Progress = _no_progress) -> ConvertResult:
    """Put WS on a checkpoint's layers and write a WS checkpoint (``wsconvert apply``).

    Stages: load, ``apply`` (:func:`~wsconvert.surgery.apply_ws`), ``norm`` (with ``norm="gn"``,
    :func:`~wsconvert.norms.swap_norm`), ``drift`` (with ``drift``,
    :func:`~wsconvert.drift.check_drift` on probes of ``input_shape`` / ``inputs``; an inferred
    probe shape the model rejects only skips the check), ``recover`` (with ``calib_data``:
    :func:`~wsconvert.recovery.recover` on the samples read by
    :func:`~wsconvert.io.inputs.load_samples`; ``recover_*`` are its ``steps``, ``batch_size``,
    ``lr``, ``holdout``, ``seed`` and ``augment``, ``recover_progress`` / ``should_stop`` its
    ``progress`` / ``should_stop``), ``save``. A stopped recovery writes nothing.

    Args:
        checkpoint: the input checkpoint (any form :func:`~wsconvert.io.wsfile.load_model` reads).
        output: the WS checkpoint [default: ``<stem>.ws.pt`` beside the input].
        norm: ``keep`` or ``gn``; the other arguments are those of the stages' functions.
        allow_nonfinite: accept NaN / inf weights and statistics in the checkpoint.
        allow_large_inputs: lift the size limit on probe inputs
            (:data:`~wsconvert.io.inputs.MAX_INPUT_ELEMENTS`).

    Raises:
        WsconvertError: any stage failing; nothing is written then.
    """
    if norm not in NORM_MODES:
        raise UsageError(f"`norm` must be keep or gn, got {norm!r}")
    if calibrate and norm != "keep":
        raise UsageError("`calibrate` re-estimates BatchNorm statistics: use it with "
                         "`norm=keep`")
    check_calibrate(calibrate)
    if calibrate and not drift:
        raise UsageError("`calibrate` needs the probe inputs of the drift report; drop "
                         "`drift=False`")
    check_groups(groups)
    check_probe_options(input_shape, inputs)
    if input_shape is not None:
        shapes = (parse_shapes(input_shape) if isinstance(input_shape, str)
                  else [tuple(s) for s in input_shape])
        check_input_size(shapes, allow_large=allow_large_inputs)
    recover_options = _recover_options(calib_data, calibrate, recover_steps, recover_batch_size,
                                       recover_lr, recover_holdout, image_size, mean, std,
                                       recover_augment, recover_seed)
    with OutputSet(force=force, protect=_inputs(model, checkpoint=checkpoint, inputs=inputs,
                                                calib_data=calib_data)) as outputs:
        target = outputs.add(output if output is not None else default_output(checkpoint,
                                                                              ".ws.pt"),
                             name="output")
        if target.suffix == ".safetensors":
            raise UsageError(f"`output` {target}: a WS checkpoint records how to rebuild the "
                             "model and is a torch file (.ws.pt); fold writes .safetensors")
        samples = None
        if calib_data is not None:
            with progress("data"):
                samples = load_samples(calib_data, image_size=image_size, mean=mean, std=std,
                                       name="calib_data")
        with progress("load"):
            loaded = load_model(checkpoint, model, model_kwargs, trust=trust,
                                allow_classes=allow_classes, allow_nonfinite=allow_nonfinite)

        def conversion(with_init: str) -> nn.Module:
            converted = apply_ws(loaded.model, convention, eps, with_init, include, exclude,
                                 transposed=transposed, linear=linear).model
            if norm == "gn":
                swap_norm(converted, groups, convert_frozen=convert_frozen, inplace=True)
            return converted

        with progress("apply"):
            report = apply_ws(loaded.model, convention, eps, init, include, exclude,
                              transposed=transposed, linear=linear,
                              inplace=not drift and samples is None)
        result = ConvertResult(Path(checkpoint), target, loaded, report)
        if norm == "gn":
            with progress("norm"):
                result.norm = swap_norm(report.model, groups, convert_frozen=convert_frozen,
                                        inplace=True)
        if not drift:
            result.drift_skipped = "`drift=False`"
        else:
            with progress("drift"):
                try:
                    source = ProbeSource.for_model(loaded.model, input_shape, inputs)
                    result.drift = check_drift(loaded.model, report.model, source,
                                               calibrate=calibrate, init=init, norm=norm,
                                               alternatives=conversion,
                                               recovering=samples is not None)
                except UsageError as exc:
                    if input_shape is not None or inputs is not None or calibrate:
                        raise
                    result.drift_skipped = str(exc)
        if samples is not None:
            with progress("recover"):
                result.recovery = recover(
                    report.model, loaded.model, samples, seed=recover_seed or 0,
                    name=f"`calib_data` {calib_data}", progress=recover_progress,
                    should_stop=should_stop, **recover_options)
        with progress("save"):
            save_bytes(ws_payload(report.model), outputs.stage(target))
            outputs.commit()
    return result


def _recover_options(calib_data: PathLike | None, calibrate: int, steps: int | None,
                     batch_size: int | None, lr: float | None, holdout: float | None,
                     image_size: int | Sequence[int] | None, mean: Sequence[float] | None,
                     std: Sequence[float] | None, augment: bool | None = None,
                     seed: int | None = None) -> dict[str, Any]:
    """The :func:`~wsconvert.recovery.recover` keywords given, checked before anything runs."""
    given = {"steps": steps, "batch_size": batch_size, "lr": lr, "holdout": holdout,
             "augment": augment}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if calib_data is None:
        named = [f"`recover_{k}={v}`" if k == "augment" else f"`recover_{k}`"
                 for k, v in options.items()] + [
            f"`{k}`" for k, v in (("image_size", image_size), ("mean", mean), ("std", std))
            if v is not None] + (["`recover_seed`"] if seed is not None else [])
        if named:
            raise UsageError(f"{', '.join(named)} need `calib_data`")
        return options
    if calibrate:
        raise UsageError("`calib_data` re-estimates the norms itself: drop `calibrate`")
    check_options(**{k: v for k, v in options.items() if k != "augment"},
                  **({} if seed is None else {"seed": seed}), prefix="recover_")
    return options


# ---------------------------------------------------------------------------- the parity gate


@dataclass
class GateResult:
    """What :func:`gate` found; ``to_dict()`` is ``check --json``."""

    onnx: Path
    against: Path
    parity: ParityReport

    def to_dict(self) -> dict[str, Any]:
        return {"onnx": str(self.onnx), "against": str(self.against),
                "parity": self.parity.to_dict()}


def gate(onnx_file: PathLike, against: PathLike, *, model: str | None = None,
         model_kwargs: Any = None, input_shape: str | Sequence[str] | None = None,
         seeds: int = GATE_SEEDS, batch_sizes: str | Sequence[int] | None = None,
         inputs: PathLike | None = None, atol: float = GATE_ATOL, rtol: float = GATE_RTOL,
         report: PathLike | None = None, junit: PathLike | None = None,
         save_failing: PathLike | None = None, min_top1_agreement: float | None = None,
         locate: LocateMode = "on_failure", image_size: int | None = None,
         mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
         trust: bool = False, allow_classes: Sequence[str] = (), force: bool = False,
         allow_nonfinite: bool = False, allow_large_inputs: bool = False,
         progress: Progress = _no_progress) -> GateResult:
    """Gate an ONNX file on parity with its checkpoint (``wsconvert check``).

    A WS reference (ours or another library's) is folded first so both stages are reported;
    shapes come from ``input_shape`` or the graph (a symbolic batch becomes 1, a dynamic batch
    is checked at :data:`~wsconvert.defaults.GATE_BATCH_SIZES`). ``result.parity.passed()`` is the
    gate; the report files are written either way. Every output (reports, and the files
    ``save_failing`` would write) is checked against every input and every other output before
    the model is loaded; ``force`` allows replacing files in ``save_failing`` and writing through
    symlinks. ``min_top1_agreement`` and ``locate`` are :func:`~wsconvert.parity.check_parity`'s.

    Raises:
        WsconvertError: bad options or files (nothing is written then).
    """
    onnx_path = Path(onnx_file)
    with OutputSet(force=force, protect=_inputs(model, onnx_file=onnx_file, against=against,
                                                inputs=inputs)) as outputs:
        plan = plan_gate(outputs, seeds, batch_sizes, inputs, atol, rtol, report, junit,
                         save_failing, min_top1_agreement, locate, image_size, mean, std)
        check_file(onnx_path)
        graph_inputs = onnx_inputs(onnx_path)
        shapes, dynamic = graph_input_shapes(onnx_path, input_shape, graph_inputs=graph_inputs)
        if len(shapes) != len(graph_inputs) and inputs is None:
            raise UsageError(f"{onnx_path} takes {len(graph_inputs)} input(s), got {len(shapes)} "
                             "`input_shape`")
        sets = gate_inputs(plan, outputs, shapes, dynamic, allow_large_inputs)
        with progress("load"):
            loaded = load_model(against, model, model_kwargs, trust=trust,
                                allow_classes=allow_classes, allow_nonfinite=allow_nonfinite)
        reference = loaded.model.eval()
        _check_float32(reference, against)
        with progress("fold"):
            folded = fold_reference(reference)
        with progress("gate"):
            parity = run_gate(plan, outputs, onnx_path, onnx_path, reference, folded, sets)
        outputs.commit()
    save_failing_stage(plan, parity, sets)
    return GateResult(onnx_path, Path(against), parity)


# ---------------------------------------------------------------------------- fold


@dataclass
class FoldResult:
    """What :func:`fold_and_export` did; ``to_dict()`` is ``fold --json``.

    Attributes:
        input, output: the checkpoint read and the folded checkpoint written.
        reference: the WS model as loaded (eval mode).
        fold: the fold report; ``fold.model`` is the plain model.
        onnx: the export (``None`` without ``onnx``).
        parity: the parity gate (``None`` without ``onnx`` or with ``check=False``).
    """

    input: Path
    output: Path
    reference: nn.Module
    fold: FoldReport
    onnx: ExportResult | None = None
    parity: ParityReport | None = None
    architecture: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.fold.model

    def to_dict(self) -> dict[str, Any]:
        payload: dict[str, Any] = {"input": str(self.input), "output": str(self.output),
                                   "fold": self.fold.to_dict(),
                                   "architecture": self.architecture}
        if self.onnx is not None:
            payload["onnx"] = self.onnx.to_dict()
        if self.parity is not None:
            payload["parity"] = self.parity.to_dict()
        return payload


def fold_and_export(checkpoint: PathLike, output: PathLike | None = None, *,
                    from_ws: PathLike | None = None, model: str | None = None,
                    model_kwargs: Any = None, whole_module: bool = False,
                    bake_unknown: bool = False, fuse_bn: bool = False,
                    onnx: PathLike | None = None, input_shape: str | Sequence[str] | None = None,
                    dynamic_batch: bool = False, opset: int = OPSET, check: bool = True,
                    seeds: int = GATE_SEEDS, batch_sizes: str | Sequence[int] | None = None,
                    inputs: PathLike | None = None, atol: float = GATE_ATOL,
                    rtol: float = GATE_RTOL, report: PathLike | None = None,
                    junit: PathLike | None = None, save_failing: PathLike | None = None,
                    min_top1_agreement: float | None = None,
                    locate: LocateMode = "on_failure", image_size: int | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    trust: bool = False, allow_classes: Sequence[str] = (), force: bool = False,
                    allow_nonfinite: bool = False, allow_large_inputs: bool = False,
                    progress: Progress = _no_progress) -> FoldResult:
    """Fold WS into plain weights; with ``onnx``, export and gate on parity (``wsconvert fold``).

    Stages: load (``checkpoint``, or ``from_ws``'s architecture with ``checkpoint``'s weights;
    ``model`` is then the consent to run the factory ``from_ws`` records), ``fold``
    (:func:`~wsconvert.fold.fold_ws`), ``export`` (:func:`~wsconvert.export.export_onnx`; the
    shape is ``input_shape`` or inferred from the first conv), ``gate`` (unless ``check=False``),
    then the folded checkpoint, the ONNX file and the reports are committed together. Every
    output is checked against every input and every other output before any work, and nothing
    is replaced unless every stage succeeded (a parity failure is a result: its files are
    committed).

    The folded checkpoint is a plain state dict of the architecture the model was built with
    (``torch.load(weights_only=True)`` then ``load_state_dict``). When that architecture is not
    the factory's own (a ``norm="gn"`` model has GroupNorms where the factory builds
    BatchNorms), it is a wsconvert checkpoint with no WS layer instead, recording the factory
    and the transforms, so that :func:`~wsconvert.io.wsfile.load` rebuilds it. ``whole_module``
    writes the pickled module. A plain state dict is written as safetensors when ``output``
    ends in ``.safetensors``.

    Raises:
        WsconvertError: any stage failing; nothing is written then.
    """
    gate_args = {"report": report, "junit": junit, "save_failing": save_failing,
                 "inputs": inputs, "batch_sizes": batch_sizes,
                 "min_top1_agreement": min_top1_agreement,
                 "locate": None if locate == "on_failure" else locate,
                 "image_size": image_size, "mean": mean, "std": std}
    protect = _inputs(model, checkpoint=checkpoint, from_ws=from_ws, inputs=inputs)
    with OutputSet(force=force, protect=protect) as outputs:
        target = Path(output) if output is not None else default_output(checkpoint, ".folded.pt")
        check_weights_output(target, whole_module=whole_module)
        onnx_path = None if onnx is None else Path(onnx)
        outputs.add(target, name="output")
        if onnx_path is not None:
            outputs.add(onnx_path, name="onnx")
            if onnx_path.suffix != ".onnx":
                raise UsageError(f"`onnx` {onnx_path}: the file name should end in .onnx")
        unused = [f"`{name}`" for name, value in gate_args.items() if value is not None]
        if unused and (onnx_path is None or not check):
            raise UsageError(f"{', '.join(unused)} need the parity check (`onnx` without "
                             "`check=False`)")
        plan = (plan_gate(outputs, seeds, batch_sizes, inputs, atol, rtol, report, junit,
                          save_failing, min_top1_agreement, locate, image_size, mean, std)
                if onnx_path is not None and check else None)
        shapes = parse_shapes(input_shape or [])
        check_input_size(shapes, allow_large=allow_large_inputs)
        with progress("load"):
            if from_ws is not None:
                ws_model = load_model(from_ws, model, model_kwargs, trust=trust,
                                      allow_classes=allow_classes,
                                      allow_nonfinite=allow_nonfinite).model
                load_weights_into(ws_model, checkpoint, trust=trust,
                                  allow_classes=allow_classes)
                check_finite(ws_model, str(checkpoint), allow_nonfinite=allow_nonfinite)
            else:
                ws_model = load_model(checkpoint, model, model_kwargs, trust=trust,
                                      allow_classes=allow_classes,
                                      allow_nonfinite=allow_nonfinite).model
        ws_model.eval()
        with progress("fold"):
            folded = fold_ws(ws_model, fuse_bn=fuse_bn, bake_unknown=bake_unknown)
        result = FoldResult(Path(checkpoint), target, ws_model, folded)
        arch = arch_of(folded.model) or arch_of(ws_model)
        record = not whole_module and bool(arch and arch.get("transforms"))
        if record and target.suffix == ".safetensors":
            raise UsageError(f"`output` {target}: this folded model is not the factory's "
                             "architecture (it records transforms) and is written as a wsconvert "
                             "checkpoint (.pt), not safetensors")
        result.architecture = _architecture(arch, whole_module, record)
        sets = None
        if onnx_path is not None:
            _check_float32(folded.model, checkpoint)
            config = ExportConfig(tuple(shapes) or (infer_input_shape(folded.model),),
                                  dynamic_batch=dynamic_batch, opset=opset)
            if plan is not None:
                sets = gate_inputs(plan, outputs, list(config.input_shapes), dynamic_batch,
                                    allow_large_inputs)
            with progress("export"):
                staged = outputs.stage(onnx_path)
                exported = export_onnx(copy.deepcopy(folded.model), staged, config, force=force)
            if plan is not None and sets is not None:
                with progress("gate"):
                    result.parity = run_gate(plan, outputs, onnx_path, staged, ws_model,
                                              folded.model, sets)
            exported.path = onnx_path
            exported.files = [outputs.final(f) for f in exported.files]
            result.onnx = exported
        with progress("save"):
            model_out = folded.model
            if record:
                save_bytes(ws_payload(model_out), outputs.stage(target))
            else:
                save_weights(model_out if whole_module else model_out.state_dict(),
                             outputs.stage(target))
            outputs.commit()
    if plan is not None and result.parity is not None and sets is not None:
        save_failing_stage(plan, result.parity, sets)
    return result


def _architecture(arch: dict[str, Any] | None, whole_module: bool,
                  record: bool) -> dict[str, Any]:
    """What the folded file holds and which architecture it fits (``fold --json``)."""
    if whole_module:
        return {"file": "module", "summary": "the pickled module (loading needs trust)"}
    if arch is None or arch.get("kind") != "factory":
        return {"file": "state_dict", "summary": "a state dict of the loaded model's "
                "architecture"}
    factory = str(arch.get("factory"))
    if not record:
        return {"file": "state_dict", "factory": factory,
                "summary": f"a state dict for {factory}"}
    swapped = sum(len(t.get("layers") or {}) for t in arch.get("transforms", [])
                  if t.get("transform") == "group_norm")
    transforms = [dict(t) for t in arch.get("transforms", [])]
    return {"file": "wsconvert", "factory": factory, "transforms": transforms,
            "summary": f"a wsconvert checkpoint for {factory} with {swapped} BatchNorm(s) as "
                       "GroupNorm (not the factory's own architecture); rebuild it with "
                       "wsconvert.load"}
