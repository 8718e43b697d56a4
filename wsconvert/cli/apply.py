"""``wsconvert apply``: put WS on a checkpoint's convolutions and write a WS checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsconvert import defaults
from wsconvert.cli._common import (
    AllowClassOpt,
    AllowLargeOpt,
    AllowNonfiniteOpt,
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
from wsconvert.cli._render import drift_lines, layer_table, norm_table, translated

_STAGES = {"load": "loading the checkpoint...", "apply": "applying WS...",
           "norm": "swapping BatchNorm for GroupNorm...",
           "drift": "measuring drift on probe inputs...", "save": "writing the WS checkpoint..."}


@guarded
def apply_cmd(
    checkpoint: CheckpointArg,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="WS checkpoint to write [default: <stem>.ws.pt beside the input].",
        show_default=False)] = None,
    convention: Annotated[str, typer.Option(
        help="WS formula: paper, tf, bit, timm, scaled or aws.")] = defaults.CONVENTION,
    eps: Annotated[float | None, typer.Option(
        help="Override the convention's eps.", show_default=False)] = None,
    init: Annotated[str, typer.Option(
        help="plain (pure WS), scale (learnable gain keeping filter magnitude) or exact (same "
             "function as the input model at step 0).")] = defaults.INIT,
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
             "count when it does not divide it).")] = defaults.GROUPS,
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
    allow_nonfinite: AllowNonfiniteOpt = False,
    allow_large_inputs: AllowLargeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Rewrite a checkpoint's convolutions into Weight Standardization form.

    \b
    Example:
      wsconvert apply resnet.pt --model torchvision.models:resnet50 --init exact
    """
    from wsconvert.pipeline import convert  # imports torch: not on the --help path

    out = Output(as_json)
    result = convert(
        checkpoint, output, model=model, model_kwargs=model_kwargs, convention=convention,
        eps=eps, init=init, include=include or (), exclude=exclude or (), transposed=transposed,
        linear=linear, norm=norm, groups=groups, convert_frozen=convert_frozen,
        input_shape=input_shape, inputs=inputs, calibrate=calibrate, drift=drift, trust=trust,
        allow_classes=allow_class or (), force=force, allow_nonfinite=allow_nonfinite,
        allow_large_inputs=allow_large_inputs, progress=lambda stage: out.status(_STAGES[stage]))
    for note in result.loaded.notes:
        out.warn(note)
    if result.drift_skipped and drift:
        out.warn(f"drift report skipped: {result.drift_skipped}")
    payload = translated(result.to_dict())
    out.data(payload)
    out.result(layer_table(payload["layers"], f"WS layers of {escape(checkpoint)}"))
    if result.norm is not None:
        out.result(norm_table(payload["norm"]["norms"], "BatchNorm -> GroupNorm"))
    if result.drift is not None:
        for line in drift_lines(payload["drift"]):
            out.result(line)
    out.result(f"[green]✓[/] {escape(result.apply.summary())}; wrote {escape(result.output)}")
    if result.norm is not None:
        out.result(f"[green]✓[/] {escape(result.norm.summary())}")
