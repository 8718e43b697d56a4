"""Parity options and rendering shared by ``fold --onnx`` and ``check``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wsconvert.cli._common import Output, escape

if TYPE_CHECKING:
    from torch import nn

    from wsconvert.parity import InputSet, ParityReport

# The library's defaults (wsconvert.parity), restated here so `--help` does not import torch;
# tests/test_cli_fold.py keeps the two in step.
DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
DEFAULT_SEEDS = 2

InputShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", metavar="N,C,H,W",
    help="Shape of one model input; repeat the flag, or separate shapes with ';', for several.")]
SeedsOpt = Annotated[int, typer.Option("--seeds", help="Random input sets per batch size.")]
BatchSizesOpt = Annotated[str | None, typer.Option(
    "--batch-sizes", metavar="1,4",
    help="Batch sizes to check when the batch is dynamic [default: 1,4].", show_default=False)]
InputsOpt = Annotated[Path | None, typer.Option(
    "--inputs", help="Real samples (.pt / .npz) instead of random inputs.", show_default=False)]
AtolOpt = Annotated[float, typer.Option("--atol", help="Absolute tolerance.")]
RtolOpt = Annotated[float, typer.Option("--rtol", help="Relative tolerance.")]
ReportOpt = Annotated[Path | None, typer.Option(
    "--report", help="Write the parity report as JSON.", show_default=False)]
JunitOpt = Annotated[Path | None, typer.Option(
    "--junit", help="Write JUnit XML (one case per output per input set).", show_default=False)]
SaveFailingOpt = Annotated[Path | None, typer.Option(
    "--save-failing", metavar="DIR", help="On failure, save the failing inputs here.",
    show_default=False)]


def parse_batch_sizes(text: str | None) -> list[int] | None:
    from wsconvert.errors import UsageError

    if text is None:
        return None
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--batch-sizes {text!r}: want comma-separated integers") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"--batch-sizes {text!r}: want positive integers")
    return sizes


def build_inputs(shapes: list[tuple[int, ...]], dynamic: bool, seeds: int,
                 batch_sizes: str | None, inputs_file: Path | None) -> list[InputSet]:
    from wsconvert.errors import UsageError
    from wsconvert.parity import load_inputs, make_inputs

    if inputs_file is not None:
        return load_inputs(inputs_file)
    sizes = parse_batch_sizes(batch_sizes)
    if sizes and not dynamic:
        raise UsageError("--batch-sizes needs a dynamic batch (export with --dynamic-batch)")
    if dynamic and not sizes:
        sizes = [1, 4]
    return make_inputs(shapes, seeds, sizes)


def fmt(value: float | None, spec: str = ".3g") -> str:
    """A metric, or ``n/a`` where none exists (shape or output-count mismatch)."""
    return "n/a" if value is None or value != value else format(value, spec)


def check_gate_options(seeds: int, atol: float, rtol: float, report: Path | None,
                       junit: Path | None, save_failing: Path | None) -> None:
    """Refuse bad gate options before anything is exported or written."""
    from wsconvert.errors import UsageError

    if seeds < 1:
        raise UsageError("--seeds must be at least 1")
    if not (atol >= 0 and rtol >= 0):
        raise UsageError("--atol and --rtol must be >= 0")
    for flag, path in (("--report", report), ("--junit", junit)):
        if path is not None and not path.parent.is_dir():
            raise UsageError(f"{flag} {path}: directory {path.parent} does not exist")
    if save_failing is not None and save_failing.exists() and not save_failing.is_dir():
        raise UsageError(f"--save-failing {save_failing}: exists and is not a directory")


def parity_table(report: ParityReport) -> Any:
    from rich.table import Table

    table = Table(title=f"Parity (|got - ref| <= {report.atol:g} + {report.rtol:g} * |ref|)",
                  title_justify="left")
    for col in ("stage", "inputs", "output", "max abs", "max rel", "out of tol", "cosine", ""):
        table.add_column(col, justify="right" if col.startswith(("max", "out", "cos")) else "left")
    for c in report.comparisons:
        mark = "[green]pass[/]" if c.passed else f"[red]FAIL[/] {escape(c.reason)}"
        table.add_row(c.stage, escape(c.input_set), escape(c.output), fmt(c.max_abs),
                      fmt(c.max_rel), fmt(100 * c.frac_out) + "%", fmt(c.cosine, ".7f"), mark)
    return table


def run_gate(out: Output, onnx_path: Path, reference: nn.Module, folded: nn.Module | None,
             inputs: list[InputSet], atol: float, rtol: float, report_path: Path | None,
             junit_path: Path | None, save_failing: Path | None) -> ParityReport:
    """Run the check, write the requested report files, render the human view."""
    from wsconvert.checkpoint import write_text
    from wsconvert.parity import check_parity, save_failing_inputs

    with out.status("checking parity with onnxruntime..."):
        report = check_parity(onnx_path, reference, inputs, folded=folded, atol=atol, rtol=rtol)
    if report_path:
        write_text(report_path, report.to_json())
    if junit_path:
        write_text(junit_path, report.to_junit())
    if save_failing and save_failing_inputs(report, inputs, save_failing):
        report.meta["failing_inputs_saved_to"] = str(save_failing)
    out.result(parity_table(report))
    for stage, s in report.stage_summary().items():
        out.result(f"  {stage}: {s['cases'] - s['failed']}/{s['cases']} within tolerance, "
                   f"max abs {fmt(s['max_abs'])}, max rel {fmt(s['max_rel'])}")
    return report


def gate_exit(out: Output, report: ParityReport) -> None:
    from wsconvert.errors import ParityFailure

    if report.passed():
        out.result("[green]✓ parity holds[/]")
        return
    n = len(report.failures)
    stages = ", ".join(sorted({c.stage for c in report.failures}))
    saved = report.meta.get("failing_inputs_saved_to")
    where = f"; failing inputs saved to {saved}" if saved else ""
    raise ParityFailure(f"parity fails: {n} output(s) out of tolerance ({stages} stage){where}")
