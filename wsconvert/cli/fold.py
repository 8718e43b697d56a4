"""``wsconvert fold``: bake WS into static weights, optionally export ONNX and gate on parity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsconvert import defaults
from wsconvert.cli._common import (
    AllowClassOpt,
    AllowLargeOpt,
    AllowNonfiniteOpt,
    AtolOpt,
    BatchSizesOpt,
    CheckpointArg,
    ForceOpt,
    ImageSizeOpt,
    InputShapeOpt,
    InputsOpt,
    JsonOpt,
    JunitOpt,
    LocateOpt,
    MeanOpt,
    MinTop1Opt,
    ModelKwargsOpt,
    ModelOpt,
    Output,
    ReportOpt,
    RtolOpt,
    SaveFailingOpt,
    SeedsOpt,
    StdOpt,
    TrustOpt,
    escape,
    floats,
    guarded,
    quiet_onnxruntime,
)
from wsconvert.cli._render import op_line, parity_lines, verdict


@guarded
def fold_cmd(
    checkpoint: CheckpointArg,
    from_ws: Annotated[Path | None, typer.Option(
        "--from", metavar="WS_CKPT",
        help="The `apply` output this state dict was trained from (architecture + WS settings).",
        show_default=False)] = None,
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folded checkpoint, safetensors if it ends in .safetensors "
                               "[default: <stem>.folded.pt].",
        show_default=False)] = None,
    whole_module: Annotated[bool, typer.Option(
        "--whole-module", help="Save the pickled module instead of a state dict.")] = False,
    bake_unknown: Annotated[bool, typer.Option(
        "--bake-unknown", help="Bake the current value of parametrizations that are not known "
                               "WS (see `inspect`).")] = False,
    fuse_bn: Annotated[bool, typer.Option(
        "--fuse-bn", help="Also fuse eval-mode BatchNorm into the preceding conv.")] = False,
    onnx: Annotated[Path | None, typer.Option(
        "--onnx", help="Export the folded model to this ONNX file.", show_default=False)] = None,
    input_shape: InputShapeOpt = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Export with a dynamic batch dimension.")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = defaults.OPSET,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the parity check.")] = False,
    seeds: SeedsOpt = defaults.GATE_SEEDS,
    batch_sizes: BatchSizesOpt = None,
    inputs: InputsOpt = None,
    atol: AtolOpt = defaults.GATE_ATOL,
    rtol: RtolOpt = defaults.GATE_RTOL,
    report: ReportOpt = None,
    junit: JunitOpt = None,
    save_failing: SaveFailingOpt = None,
    min_top1_agreement: MinTop1Opt = None,
    locate: LocateOpt = False,
    image_size: ImageSizeOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    trust: TrustOpt = False,
    allow_class: AllowClassOpt = None,
    force: ForceOpt = False,
    allow_nonfinite: AllowNonfiniteOpt = False,
    allow_large_inputs: AllowLargeOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold WS into plain static weights; with --onnx, export and check parity.

    \b
    Example:
      wsconvert fold model.ws.pt -m pkg.nets:build --onnx model.onnx --dynamic-batch
      wsconvert fold finetuned_state.pt --from model.ws.pt -m pkg.nets:build -o final.pt
    """
    from wsconvert.pipeline import fold_and_export  # imports torch: not on the --help path

    out = Output(as_json)
    if onnx is not None:
        quiet_onnxruntime()
    stages = {"load": "loading the checkpoint...", "fold": "folding WS...",
              "export": f"exporting {escape(onnx.name) if onnx else ''} (torch.onnx, opset "
                        f"{opset})...",
              "gate": "checking parity with onnxruntime...", "save": "writing outputs..."}
    result = fold_and_export(
        checkpoint, output, from_ws=from_ws, model=model, model_kwargs=model_kwargs,
        whole_module=whole_module, bake_unknown=bake_unknown, fuse_bn=fuse_bn, onnx=onnx,
        input_shape=input_shape, dynamic_batch=dynamic_batch, opset=opset, check=not no_check,
        seeds=seeds, batch_sizes=batch_sizes, inputs=inputs, atol=atol, rtol=rtol, report=report,
        junit=junit, save_failing=save_failing, min_top1_agreement=min_top1_agreement,
        locate="always" if locate else "on_failure", image_size=image_size,
        mean=floats(mean, "--mean"), std=floats(std, "--std"), trust=trust,
        allow_classes=allow_class or (), force=force, allow_nonfinite=allow_nonfinite,
        allow_large_inputs=allow_large_inputs,
        progress=lambda stage: out.status(stages[stage]))
    out.result(f"[green]✓[/] {escape(result.fold.summary())}; wrote {escape(result.output)}")
    out.result(f"  {escape(result.output)} is {escape(result.architecture['summary'])}")
    if result.onnx is not None:
        out.result(f"[green]✓[/] exported {escape(onnx)} (opset {opset}, checker passed, no WS "
                   f"residue): {escape(op_line(result.onnx.op_histogram))}")
    if result.parity is not None:
        parity_lines(out, result.parity)
    out.data(result.to_dict())
    if result.parity is not None:
        verdict(out, result.parity)
