"""``wsconvert demo``: the whole pipeline on the bundled example, offline."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from wsconvert.cli._common import ForceOpt, JsonOpt, Output, escape, guarded
from wsconvert.cli._render import stage_lines
from wsconvert.errors import ParityFailure

_LABELS = {
    "baseline": "fine-tune a short BatchNorm baseline (batch 32)",
    "apply": "apply WS + GroupNorm (paper, --init exact, --norm gn, --calib-data)",
    "fine-tune": "fine-tune the WS + GN model at batch 2",
    "fold": "fold WS into static weights",
    "export": "export ONNX (dynamic batch)",
    "parity": "check parity with onnxruntime",
}


@guarded
def demo_cmd(
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", help="Directory for the demo's files [default: a fresh temp dir].",
        show_default=False)] = None,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Smaller data and fewer epochs (a few seconds).")] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole pipeline on the bundled example: baseline, apply, fine-tune, fold, ONNX,
    parity.

    \b
    Example:
      wsconvert demo --out-dir /tmp/wsdemo
    """
    from wsconvert.demo import (  # imports torch: not on --help
        STAGES,
        DemoConfig,
        check_outputs,
        run_demo,
    )

    out = Output(as_json)
    work = out_dir or Path(tempfile.mkdtemp(prefix="wsconvert-demo-"))
    config = DemoConfig.quick(work, force) if quick else DemoConfig(work, force=force)
    check_outputs(config)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=out.err, disable=as_json) as progress:
        tasks = {s: progress.add_task(f"[dim]{_LABELS[s]}", total=1, start=False)
                 for s in STAGES}

        def on_stage(stage: str, event: str) -> None:
            if event == "start":
                progress.start_task(tasks[stage])
                progress.update(tasks[stage], description=_LABELS[stage])
            else:
                progress.update(tasks[stage], completed=1,
                                description=f"[green]✓[/] {_LABELS[stage]}")

        result = run_demo(config, on_stage)
    out.data(result.to_dict())
    acc = result.accuracy
    table = Table(title="wsconvert demo", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("accuracy", f"pretrained {acc['pretrained']:.1%} -> BN baseline (b32) "
                  f"{acc['bn_baseline_b32']:.1%} -> converted {acc['converted']:.1%} -> recovered "
                  f"{acc['recovered']:.1%} -> "
                  f"WS+GN fine-tuned (b2) {acc['ws_gn_b2']:.1%}; folded {acc['folded']:.1%}")
    table.add_row("apply", escape(f"{result.summaries['apply']}; {result.summaries['norm']}"))
    if "recovery" in result.summaries:
        table.add_row("recovery", escape(result.summaries["recovery"]))
    table.add_row("fold", escape(result.summaries["fold"]))
    table.add_row("onnx", escape(", ".join(f"{k} {v}" for k, v in result.op_histogram.items())))
    if result.parity is not None:
        for stage, line in zip(result.parity.stage_summary(), stage_lines(result.parity),
                               strict=True):
            table.add_row(f"parity {stage}", line)
    table.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))
    for key, path in result.files.items():
        table.add_row(key, escape(path))
    out.result(table)
    if result.parity is not None and not result.parity.passed():
        raise ParityFailure("demo parity check failed")
    out.result(f"[green]✓[/] demo complete in {escape(work)}")
