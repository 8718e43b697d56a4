"""The parity-gate stage shared by :func:`wsconvert.pipeline.fold_and_export` and
:func:`wsconvert.pipeline.gate`: plan (check options, claim report files), input sets, run (stage
the reports), save failing inputs after the commit."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from wsconvert.defaults import GATE_BATCH_SIZES
from wsconvert.errors import ConversionError, UsageError
from wsconvert.fold import fold_ws
from wsconvert.io.atomic import OutputSet
from wsconvert.io.inputs import InputSet, check_input_size, image_sets, load_inputs
from wsconvert.parity import (
    LocateMode,
    ParityReport,
    check_locate_options,
    check_parity,
    make_inputs,
    save_failing_inputs,
)
from wsconvert.validate import check_gate_options, parse_batch_sizes

PathLike = str | os.PathLike[str]


@dataclass
class GatePlan:
    """The gate's checked options."""

    seeds: int
    batch_sizes: list[int] | None
    inputs: Path | None
    atol: float
    rtol: float
    report: Path | None
    junit: Path | None
    save_failing: Path | None
    min_top1_agreement: float | None = None
    locate: LocateMode = "on_failure"
    image_size: int | None = None  # image-folder ``inputs`` only (as ``apply``'s calib_data)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


def plan_gate(outputs: OutputSet, seeds: int, batch_sizes: str | Sequence[int] | None,
              inputs: PathLike | None, atol: float, rtol: float, report: PathLike | None,
              junit: PathLike | None, save_failing: PathLike | None,
              min_top1_agreement: float | None = None,
              locate: LocateMode = "on_failure", image_size: int | None = None,
              mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None) -> GatePlan:
    """Check the gate's options and claim its report files, before any work."""
    check_gate_options(seeds, atol, rtol)
    check_locate_options(min_top1_agreement, locate)
    files = {}
    for name, path in (("report", report), ("junit", junit)):
        if path is not None and not Path(path).parent.is_dir():
            raise UsageError(f"`{name}` {path}: directory {Path(path).parent} does not exist")
        files[name] = None if path is None else outputs.add(path, replace=True, name=name)
    failing = None if save_failing is None else Path(save_failing)
    image_options = image_size is not None or mean is not None or std is not None
    if image_options and (inputs is None or not Path(inputs).is_dir()):
        raise UsageError("`image_size`, `mean` and `std` apply to a folder of images given as "
                         "`inputs`")
    if failing is not None and failing.exists() and not failing.is_dir():
        raise UsageError(f"`save_failing` {failing}: exists and is not a directory")
    if failing is not None:
        # The directory (or one it would be made in) must not be a file this run writes.
        for d in (failing, *failing.parents):
            if d.exists():
                break
            clash = outputs.claim_of(d)
            if clash is not None:
                raise UsageError(f"`save_failing` {failing}: would be a directory at {clash}'s "
                                 "path; give each output its own place")
    return GatePlan(seeds, parse_batch_sizes(batch_sizes),
                    None if inputs is None else Path(inputs), atol, rtol, files["report"],
                    files["junit"], failing, min_top1_agreement, locate, image_size, mean, std)


def fold_reference(reference: nn.Module) -> nn.Module | None:
    """The folded model of a WS reference (ours or another library's), for the ``fold`` stage;
    ``None`` for a plain reference, or one with an unknown parametrization (the ONNX file is then
    compared with it directly)."""
    try:
        fold = fold_ws(reference)
    except ConversionError:
        return None
    return None if fold.noop else fold.model


def gate_inputs(plan: GatePlan, outputs: OutputSet, shapes: Sequence[tuple[int, ...]],
                dynamic: bool, allow_large: bool = False) -> list[InputSet]:
    """The input sets (random ones checked against the size limit before they are made), and
    the files ``save_failing`` would write claimed against every input and output."""
    if plan.inputs is not None and plan.inputs.is_dir():
        # Batches of the exported batch size (static), or of the largest size checked (dynamic).
        batch = max(plan.batch_sizes or GATE_BATCH_SIZES) if dynamic else shapes[0][0]
        sets = image_sets(plan.inputs, batch, image_size=plan.image_size, mean=plan.mean,
                          std=plan.std)
    elif plan.inputs is not None:
        sets = load_inputs(plan.inputs)
    else:
        sizes = plan.batch_sizes
        if sizes and not dynamic:
            raise UsageError("`batch_sizes` needs a dynamic batch (export with "
                             "`dynamic_batch=True`)")
        if dynamic and not sizes:
            sizes = list(GATE_BATCH_SIZES)
        full = [(b if b else s[0], *s[1:]) for b in (sizes or [0]) for s in shapes]
        check_input_size(full, copies=plan.seeds, allow_large=allow_large,
                         what="`input_shape` x `batch_sizes` x `seeds`")
        sets = make_inputs(shapes, plan.seeds, sizes)
    if plan.save_failing is not None:
        for s in sets:
            outputs.reserve(plan.save_failing / f"{s.name}.pt", name="save_failing")
        outputs.reserve(plan.save_failing / "report.json", name="save_failing")
    return sets


def run_gate(plan: GatePlan, outputs: OutputSet, onnx_path: Path, run_path: Path,
              reference: nn.Module, folded: nn.Module | None,
              sets: list[InputSet]) -> ParityReport:
    """Check parity on ``run_path`` (the ONNX file as written so far), stage the reports."""
    report = check_parity(run_path, reference, sets, folded=folded, atol=plan.atol,
                          rtol=plan.rtol, min_top1_agreement=plan.min_top1_agreement,
                          locate=plan.locate)
    report.meta["onnx"] = str(onnx_path)
    if plan.save_failing is not None and report.failures:
        report.meta["failing_inputs_saved_to"] = str(plan.save_failing)  # in the reports too
    if plan.report is not None:
        outputs.stage(plan.report).write_text(report.to_json())
    if plan.junit is not None:
        outputs.stage(plan.junit).write_text(report.to_junit())
    return report


def save_failing(plan: GatePlan, report: ParityReport, sets: list[InputSet]) -> None:
    if plan.save_failing:
        save_failing_inputs(report, sets, plan.save_failing)
