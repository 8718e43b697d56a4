"""``wsconvert apply``: put WS on a checkpoint's convolutions and write a WS checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsconvert.cli._common import (
    AllowClassOpt,
    CheckpointArg,
    ForceOpt,
    JsonOpt,
    ModelKwargsOpt,
    ModelOpt,
    Output,
    TrustOpt,
    escape,
    guarded,
)


def default_output(checkpoint: Path, suffix: str) -> Path:
    """``m.pt`` -> ``m<suffix>``; a ``.ws`` stem loses it (``m.ws.pt`` -> ``m.folded.pt``)."""
    stem = checkpoint.stem
    if suffix != ".ws.pt" and stem.endswith(".ws"):
        stem = stem[:-3]
    return checkpoint.with_name(f"{stem}{suffix}")


def layer_table(layers: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("layer", "kind", "shape", "fan-in", "status", "detail"):
        table.add_column(col, justify="right" if col == "fan-in" else "left")
    for r in layers:
        detail = (f"{r['convention']} eps={r['eps']:g} init={r['init']}"
                  if r["status"] == "converted" else r["reason"])
        style = "green" if r["status"] == "converted" else "yellow"
        table.add_row(escape(r["name"] or "<root>"), r["kind"],
                      "x".join(str(s) for s in r["shape"]), str(r["fan_in"]),
                      f"[{style}]{r['status']}[/]", escape(detail))
    return table


@guarded
def apply_cmd(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="WS checkpoint to write [default: <stem>.ws.pt beside the input].",
        show_default=False)] = None,
    convention: Annotated[str, typer.Option(
        help="WS formula: paper, tf, bit, timm, scaled or aws.")] = "paper",
    eps: Annotated[float | None, typer.Option(
        help="Override the convention's eps.", show_default=False)] = None,
    init: Annotated[str, typer.Option(
        help="plain (pure WS), scale (learnable gain keeping filter magnitude) or exact (same "
             "function as the input model at step 0).")] = "plain",
    include: Annotated[list[str] | None, typer.Option(
        metavar="GLOB", help="Only convert layers whose dotted name matches (repeatable).")
    ] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        metavar="GLOB", help="Never convert layers whose dotted name matches (repeatable).")
    ] = None,
    transposed: Annotated[bool, typer.Option(help="Also convert transposed convs.")] = False,
    linear: Annotated[bool, typer.Option(help="Also convert Linear layers.")] = False,
    norm: Annotated[str, typer.Option(
        help="keep: leave BatchNorms as they are; gn: turn every BatchNorm that directly "
             "follows a converted layer into GroupNorm (the paper's recipe for batches of 1-2).")
    ] = "keep",
    groups: Annotated[int, typer.Option(
        help="GroupNorm groups for --norm gn (lowered to the largest divisor of the channel "
             "count when it does not divide it).")] = 32,
    convert_frozen: Annotated[bool, typer.Option(
        "--convert-frozen", help="With --norm gn, also swap frozen BatchNorms.")] = False,
    input_shape: Annotated[str | None, typer.Option(
        metavar="SHAPE", help="Probe input shape for the drift report, e.g. 1,3,224,224 "
        "(several inputs: separate with ';') [default: from the first conv, 8xCx64x64 for 2-d].",
        show_default=False)] = None,
    inputs: Annotated[Path | None, typer.Option(
        "--inputs", metavar="FILE", help="Real probe samples (.pt tensor / tuple / dict, .npz, "
        ".npy; first dim = samples) instead of random inputs.", show_default=False)] = None,
    calibrate: Annotated[int, typer.Option(
        metavar="N", help="With --norm keep: re-estimate BatchNorm running statistics on N "
        "probe batches after conversion; the drift report shows before and after.")] = 0,
    drift: Annotated[bool, typer.Option(
        "--drift/--no-drift", help="Run the original and converted models on probe inputs and "
        "report the change.")] = True,
    trust: TrustOpt = False,
    allow_class: AllowClassOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a checkpoint's convolutions into Weight Standardization form.

    \b
    Example:
      wsconvert apply resnet.pt --model torchvision.models:resnet50 --init exact
    """
    from wsconvert.checkpoint import load_model, save
    from wsconvert.errors import OutputExistsError, UsageError
    from wsconvert.surgery import apply_ws

    out = Output(as_json)
    if norm not in ("keep", "gn"):
        raise UsageError(f"--norm must be keep or gn, got {norm!r}")
    if calibrate and norm != "keep":
        raise UsageError("--calibrate re-estimates BatchNorm statistics: use it with --norm keep")
    if calibrate < 0:
        raise UsageError(f"--calibrate must be >= 0, got {calibrate}")
    if calibrate and not drift:
        raise UsageError("--calibrate needs the probe inputs of the drift report; drop --no-drift")
    if groups < 1:
        raise UsageError(f"--groups must be >= 1, got {groups}")
    if input_shape is not None and inputs is not None:
        raise UsageError("pass either --input-shape or --inputs, not both")
    target = output or default_output(checkpoint, ".ws.pt")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists (pass --force to overwrite)")
    loaded = load_model(checkpoint, model, model_kwargs, trust=trust,
                        allow_classes=allow_class or ())
    for note in loaded.notes:
        out.note(f"[yellow]note:[/] {escape(note)}")
    report = apply_ws(loaded.model, convention, eps, init, include or (), exclude or (),
                      transposed=transposed, linear=linear, inplace=not drift)
    payload: dict[str, Any] = {"input": str(checkpoint), "output": str(target),
                               **report.to_dict()}
    converted = report.model
    if norm == "gn":
        from wsconvert.norms import swap_norm

        swap = swap_norm(converted, groups, convert_frozen=convert_frozen, inplace=True)
        payload["norm"] = {"mode": "gn", **swap.to_dict()}
    else:
        payload["norm"] = {"mode": "keep"}
    check = _drift(loaded.model, converted, payload, input_shape, inputs, calibrate, init, norm,
                   drift, out)
    save(converted, target, force=force, protect=[checkpoint])
    out.data(payload)
    out.result(layer_table(payload["layers"], f"WS layers of {escape(checkpoint)}"))
    if norm == "gn":
        out.result(norm_table(payload["norm"]["norms"], "BatchNorm -> GroupNorm"))
    if check is not None:
        for line in drift_lines(check):
            out.result(line)
    out.result(f"[green]✓[/] {escape(report.summary())}; wrote {escape(target)}")
    if norm == "gn":
        out.result(f"[green]✓[/] {escape(swap.summary())}")


def _drift(original: Any, converted: Any, payload: dict[str, Any], input_shape: str | None,
           inputs: Path | None, calibrate: int, init: str, norm: str, enabled: bool,
           out: Output) -> dict[str, Any] | None:
    """Run the drift check; an inferred probe shape the model rejects only skips the report."""
    from wsconvert.drift import ProbeSource, check_drift
    from wsconvert.errors import UsageError

    if not enabled:
        payload["drift"] = {"skipped": "--no-drift"}
        return None
    try:
        source = ProbeSource.for_model(original, input_shape, inputs)
        with out.status("measuring drift on probe inputs..."):
            check = check_drift(original, converted, source, calibrate=calibrate, init=init,
                                norm=norm)
    except UsageError as exc:
        if input_shape is not None or inputs is not None or calibrate:
            raise
        payload["drift"] = {"skipped": str(exc)}
        out.note(f"[yellow]note:[/] drift report skipped: {escape(exc)}")
        return None
    result: dict[str, Any] = check.to_dict()
    payload["drift"] = result
    return result


def _pct(x: float) -> str:
    if x != x or x == float("inf"):
        return str(x)
    return f"{100 * x:.3g}%" if x < 10 else f"{x:.3g}x"


def norm_table(norms: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("norm", "kind", "channels", "groups", "status", "follows", "detail"):
        table.add_column(col, justify="right" if col in ("channels", "groups") else "left")
    for r in norms:
        style = "green" if r["status"] == "swapped" else "yellow"
        table.add_row(escape(r["name"]), r["kind"], str(r["channels"]),
                      "" if r["groups"] is None else str(r["groups"]),
                      f"[{style}]{r['status']}[/]", escape(r["follows"]), escape(r["reason"]))
    return table


def _drift_line(label: str, d: dict[str, Any], threshold: float) -> str:
    line = (f"{label}: output changed by {_pct(d['output_relative'])} (relative L2; max abs "
            f"{d['output_max_abs']:.3g}) on {d['samples']} sample(s)")
    first = next((r for r in d["layers"] if r["relative"] > threshold), None)
    worst, jump = d["worst_layer"], d["divergence_layer"]
    if first is not None:
        line += f"; first layer above {_pct(threshold)}: {escape(first['name'])} " \
                f"({first['converted_kind']}, {_pct(first['relative'])})"
    if jump is not None and jump["jump"] > 0:
        line += f"; largest jump at {escape(jump['name'])} (+{_pct(jump['jump'])})"
    if worst is not None:
        line += f"; largest at {escape(worst['name'])} ({_pct(worst['relative'])})"
    return line


def drift_lines(check: dict[str, Any]) -> list[str]:
    """Human summary of a drift check's JSON form."""
    threshold = check["threshold"]
    before = check["before"]
    lines = [f"[bold]drift[/] on {escape(before['source'])}",
             _drift_line("  after conversion", before, threshold)]
    cal = check["calibration"]
    if cal is not None:
        lines.append(f"  calibrated {len(cal['layers'])} BatchNorm(s) on {cal['batches']} "
                     f"batch(es), {cal['samples']} sample(s)")
        lines.append(_drift_line("  after calibration", check["after"], threshold))
    colour = "yellow" if check["large"] else "green"
    verdict = "large" if check["large"] else "small"
    lines.append(f"  [{colour}]drift is {verdict}[/] (threshold {_pct(threshold)})")
    if check["suggestion"]:
        lines.append(f"  [yellow]suggestion:[/] {escape(check['suggestion'])}")
    return lines
