"""``wsconvert inspect``: per-layer WS status and how far filters are from standardized."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from wsconvert.cli._common import (
    AllowClassOpt,
    AllowNonfiniteOpt,
    CheckpointArg,
    JsonOpt,
    ModelKwargsOpt,
    ModelOpt,
    Output,
    TrustOpt,
    escape,
    guarded,
)


def _table(layers: list[dict[str, Any]], title: str) -> Any:
    table = Table(title=title, title_justify="left")
    for col in ("layer", "kind", "shape", "fan-in", "WS", "max |mean|", "std range"):
        table.add_column(col, justify="right" if col in ("fan-in", "max |mean|") else "left")
    for r in layers:
        if r["ws"] == "wsconvert":
            ws = f"[green]{r['convention']} eps={r['eps']:g} init={r['init']}[/]"
        elif r["ws"] in ("foreign", "parametrization") and r["convention"]:
            ws = f"[cyan]{escape(r['source'])}: {r['convention']} eps={r['eps']:g}[/]"
        elif r["ws"] in ("foreign", "unknown"):
            ws = f"[yellow]{r['ws']}: {escape(r['source'])}[/]"
        else:
            ws = "-"

        table.add_row(escape(r["name"] or "<root>"), r["kind"],
                      "x".join(str(s) for s in r["shape"]), str(r["fan_in"]), ws,
                      f"{r['mean_abs_max']:.3g}", f"{r['std_min']:.3g} .. {r['std_max']:.3g}")
    return table


@guarded
def inspect_cmd(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    trust: TrustOpt = False,
    allow_class: AllowClassOpt = None,
    allow_nonfinite: AllowNonfiniteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Show each conv / linear layer: kind, shape, fan-in, WS status, filter mean and std.

    \b
    Example:
      wsconvert inspect model.ws.pt --model pkg.nets:build
    """
    from wsconvert.pipeline import inspect_checkpoint  # imports torch: not on the --help path

    out = Output(as_json)
    result = inspect_checkpoint(checkpoint, model=model, model_kwargs=model_kwargs, trust=trust,
                                allow_classes=allow_class or (), allow_nonfinite=allow_nonfinite)
    payload = result.to_dict()
    out.data(payload)
    out.result(_table(payload["layers"],
                      f"Layers of {escape(checkpoint)} ({result.loaded.source})"))
    out.result(f"{len(result.layers)} conv/linear layer(s), {result.ws_layers} with WS")
    if result.unknown_parametrizations:
        out.result(f"[yellow]{result.unknown_parametrizations} layer(s) carry a parametrization "
                   "that is not known WS: `wsconvert fold` bakes them only with --bake-unknown[/]")
