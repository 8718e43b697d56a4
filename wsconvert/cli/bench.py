"""``wsconvert bench``: the WS training-step overhead, plain vs WS vs reference formulations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsconvert.cli._common import (
    AllowClassOpt,
    AllowNonfiniteOpt,
    JsonOpt,
    ModelKwargsOpt,
    ModelOpt,
    Output,
    TrustOpt,
    escape,
    guarded,
)


def _ints(text: str, what: str) -> tuple[int, ...]:
    from wsconvert.errors import UsageError

    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise UsageError(f"{what} must be integers separated by commas, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


def _table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    shape = "x".join(str(s) for s in report["input_shape"])
    acc = f", {report['accumulate']} micro-batches/step" if report["accumulate"] > 1 else ""
    table = Table(title=f"{escape(report['optimizer'])} step of {escape(report['model'])}, "
                        f"input {shape}{acc}, {report['threads']} thread(s), "
                        f"{report['rounds']} rounds ({report['clock']} clock); eval rows: "
                        "forward only, eval mode, no_grad", title_justify="left")
    refs = sorted({k for s in report["settings"] for r in s["rows"] for k in r["vs_references"]})
    widest = max((len(r["form"]) for s in report["settings"] for r in s["rows"]), default=4)
    for col in ("batch", "mode", "form", "median ms", "min ms", "x plain", "x plain (min)",
                "x plain (paired)", *(f"x {ref}" for ref in refs), "passes (est.)"):
        # The form names whole (other columns wrap their headers first).
        table.add_column(escape(col), justify="left" if col in ("form", "mode") else "right",
                         no_wrap=col == "form", min_width=widest if col == "form" else None)
    for setting in report["settings"]:
        for i, r in enumerate(setting["rows"]):
            style = "green" if r["form"].startswith("wsconvert") else ""
            form = f"[{style}]{escape(r['form'])}[/]" if style else escape(r["form"])
            vs = [f"{r['vs_references'][ref]:.3f}" if ref in r["vs_references"] else ""
                  for ref in refs]
            passes = "" if r["passes"] is None else str(r["passes"])
            table.add_row(str(setting["batch_size"]) if i == 0 else "",
                          setting["mode"] if i == 0 else "", form,
                          f"{r['median_ms']:.2f}", f"{r['min_ms']:.2f}", f"{r['ratio']:.3f}",
                          f"{r['min_ratio']:.3f}", f"{r['paired_ratio']:.3f}", *vs, passes,
                          end_section=i == len(setting["rows"]) - 1)
    return table


@guarded
def bench_cmd(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="Checkpoint to measure [default: the built-in reference net].",
        show_default=False)] = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    trust: TrustOpt = False,
    allow_class: AllowClassOpt = None,
    allow_nonfinite: AllowNonfiniteOpt = False,
    input_shape: Annotated[str, typer.Option(
        "--input-shape", metavar="C,H,W", help="One sample's shape (batch excluded).")
    ] = "3,64,64",
    batch_sizes: Annotated[str, typer.Option(
        "--batch-sizes", metavar="B1,B2", help="Batch sizes to measure (micro-batch size with "
        "--accumulate).")] = "1,8",
    accumulate: Annotated[int, typer.Option(
        "--accumulate", metavar="K", help="Micro-batches per optimizer step; the WS rows use "
        "wsconvert.accumulate.")] = 1,
    convention: Annotated[list[str] | None, typer.Option(
        "--convention", metavar="NAME", help="WS convention to time (repeatable) [default: "
        "all; a WS checkpoint is timed with its own].", show_default=False)] = None,
    no_references: Annotated[bool, typer.Option(
        "--no-references", help="Leave out the seed-formula and batch_norm-trick rows.")
    ] = False,
    rounds: Annotated[int, typer.Option(help="Measured rounds (one step of each form each).")
                      ] = 20,
    warmup: Annotated[int, typer.Option(help="Unmeasured steps of each form first.")] = 3,
    threads: Annotated[int | None, typer.Option(
        help="torch threads for the run [default: torch's].", show_default=False)] = None,
    clock: Annotated[str, typer.Option(
        help="wall, or cpu (process CPU time: steadier on a shared machine).")] = "wall",
    optimizer: Annotated[str, typer.Option(
        "--optimizer", metavar="sgd|sgd-momentum|adamw", help="Optimizer of the timed step "
        "(plain SGD is the leanest step, so it shows the most of the WS cost).")] = "sgd",
    evaluate: Annotated[bool, typer.Option(
        "--eval", help="Also time a forward pass in eval mode under no_grad per batch size.")
    ] = False,
    ahead: Annotated[bool, typer.Option(
        "--ahead", help="Also time each convention with wsconvert.standardize_ahead (all "
        "weights standardized before the first layer, WS backward after the others).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure what WS costs per training step: plain vs WS, with reference formulations.

    Every form (plain convs, each WS convention, the paper's seed formula, timm's batch_norm
    trick) runs one optimizer step per round, in rotating order; the table gives median and
    fastest steps, ratios to plain and to the reference formulations, and the estimated
    weight-size memory passes per conv layer per step.

    \b
    Example:
      wsconvert bench --batch-sizes 1,8 --threads 2 --eval
      wsconvert bench --input-shape 3,224,224 --batch-sizes 2 --ahead
      wsconvert bench model.ws.pt --input-shape 3,224,224 --batch-sizes 2 --accumulate 4
    """
    from wsconvert.bench import REFERENCE_FORMS, BenchConfig, run_bench
    from wsconvert.conventions import CONVENTIONS
    from wsconvert.errors import UsageError

    out = Output(as_json)
    if checkpoint is None and (model or model_kwargs):
        raise UsageError("--model / --model-kwargs need a CHECKPOINT; without one the built-in "
                         "reference net is measured")
    net = None
    name = None
    if checkpoint is not None:
        from wsconvert.io.wsfile import load_model

        loaded = load_model(checkpoint, model, model_kwargs, trust=trust,
                            allow_classes=allow_class or (), allow_nonfinite=allow_nonfinite)
        for note in loaded.notes:
            out.note(f"[yellow]note:[/] {escape(note)}")
        net, name = loaded.model, str(checkpoint)
        conventions = tuple(convention or (() if loaded.has_ws else CONVENTIONS))
    else:
        conventions = tuple(convention or CONVENTIONS)
    config = BenchConfig(batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                         input_shape=_ints(input_shape, "--input-shape"), accumulate=accumulate,
                         conventions=conventions,
                         references=() if no_references else REFERENCE_FORMS, rounds=rounds,
                         warmup=warmup, threads=threads, clock=clock, optimizer=optimizer,
                         evaluate=evaluate, ahead=ahead)
    with out.status("measuring..."):
        report = run_bench(net, config, model_name=name)
    payload = report.to_dict()
    out.data(payload)
    out.result(_table(payload))
    for note in report.notes:
        out.result(f"note: {escape(note)}")
