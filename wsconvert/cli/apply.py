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
        help="WS formula: paper, tf, bit, timm or scaled.")] = "paper",
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
    from wsconvert.errors import OutputExistsError
    from wsconvert.surgery import apply_ws

    out = Output(as_json)
    target = output or default_output(checkpoint, ".ws.pt")
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists (pass --force to overwrite)")
    loaded = load_model(checkpoint, model, model_kwargs, trust=trust,
                        allow_classes=allow_class or ())
    for note in loaded.notes:
        out.note(f"[yellow]note:[/] {escape(note)}")
    report = apply_ws(loaded.model, convention, eps, init, include or (), exclude or (),
                      transposed=transposed, linear=linear, inplace=True)
    save(report.model, target, force=force, protect=[checkpoint])
    payload = {"input": str(checkpoint), "output": str(target), **report.to_dict()}
    out.data(payload)
    out.result(layer_table(payload["layers"], f"WS layers of {escape(checkpoint)}"))
    out.result(f"[green]✓[/] {escape(report.summary())}; wrote {escape(target)}")
