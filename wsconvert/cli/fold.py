"""``wsconvert fold``: bake WS into static weights, optionally export ONNX and gate on parity."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from wsconvert.cli import _gate
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
from wsconvert.cli.apply import default_output


def _op_line(hist: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(hist.items(), key=lambda kv: -kv[1]))


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
        "--output", "-o", help="Folded checkpoint [default: <stem>.folded.pt].",
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
    input_shape: _gate.InputShapeOpt = None,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch", help="Export with a dynamic batch dimension.")] = False,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = 18,
    no_check: Annotated[bool, typer.Option("--no-check", help="Skip the parity check.")] = False,
    seeds: _gate.SeedsOpt = _gate.DEFAULT_SEEDS,
    batch_sizes: _gate.BatchSizesOpt = None,
    inputs: _gate.InputsOpt = None,
    atol: _gate.AtolOpt = _gate.DEFAULT_ATOL,
    rtol: _gate.RtolOpt = _gate.DEFAULT_RTOL,
    report: _gate.ReportOpt = None,
    junit: _gate.JunitOpt = None,
    save_failing: _gate.SaveFailingOpt = None,
    trust: TrustOpt = False,
    allow_class: AllowClassOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fold WS into plain static weights; with --onnx, export and check parity.

    \b
    Example:
      wsconvert fold model.ws.pt --onnx model.onnx --dynamic-batch --junit parity.xml
      wsconvert fold finetuned_state.pt --from model.ws.pt -o final.pt
    """
    import copy

    from wsconvert.checkpoint import (
        load_model,
        load_weights_into,
        save_state_dict,
    )
    from wsconvert.errors import OutputExistsError, UsageError
    from wsconvert.export import ExportConfig, export_onnx, infer_input_shape, parse_shapes
    from wsconvert.fold import fold_ws

    out = Output(as_json)
    target = output or default_output(checkpoint, ".folded.pt")
    for path in (target, onnx):
        if path is not None and path.exists() and not force:
            raise OutputExistsError(f"{path}: already exists (pass --force to overwrite)")
    if onnx is not None and onnx.suffix != ".onnx":
        raise UsageError(f"--onnx {onnx}: the file name should end in .onnx")
    if from_ws is not None and (model or model_kwargs):
        raise UsageError("--model / --model-kwargs do not apply with --from: the architecture "
                         "comes from the WS checkpoint")
    gate_flags = {"--report": report, "--junit": junit, "--save-failing": save_failing,
                  "--inputs": inputs, "--batch-sizes": batch_sizes}
    unused = [flag for flag, value in gate_flags.items() if value is not None]
    if unused and (onnx is None or no_check):
        raise UsageError(f"{', '.join(unused)} need the parity check (--onnx without --no-check)")
    if onnx is not None and not no_check:
        _gate.check_gate_options(seeds, atol, rtol, report, junit, save_failing)
    shapes = parse_shapes(input_shape or [])
    if from_ws is not None:
        ws_model = load_model(from_ws, trust=trust, allow_classes=allow_class or ()).model
        load_weights_into(ws_model, checkpoint, trust=trust, allow_classes=allow_class or ())
    else:
        ws_model = load_model(checkpoint, model, model_kwargs, trust=trust,
                              allow_classes=allow_class or ()).model
    ws_model.eval()
    result = fold_ws(ws_model, fuse_bn=fuse_bn, bake_unknown=bake_unknown)
    folded = result.model
    payload: dict[str, Any] = {"input": str(checkpoint), "output": str(target),
                               "fold": result.to_dict()}
    exported = None
    sets = None
    if onnx is not None:
        # Inputs, export, then files: a bad option, shape or export leaves no file behind.
        config = ExportConfig(tuple(shapes) or (infer_input_shape(folded),),
                              dynamic_batch=dynamic_batch, opset=opset)
        if not no_check:
            sets = _gate.build_inputs(list(config.input_shapes), dynamic_batch, seeds,
                                      batch_sizes, inputs)
        with out.status(f"exporting {onnx.name} (torch.onnx, opset {opset})..."):
            exported = export_onnx(copy.deepcopy(folded), onnx, config, force=force)
        payload["onnx"] = exported.to_dict()
    try:
        save_state_dict(folded if whole_module else folded.state_dict(), target, force=force,
                        protect=[checkpoint, *([from_ws] if from_ws else [])])
    except BaseException:
        for f in exported.files if exported else []:
            f.unlink(missing_ok=True)
        raise
    out.result(f"[green]✓[/] {escape(result.summary())}; wrote {escape(target)}")
    parity = None
    if exported is not None and onnx is not None:
        out.result(f"[green]✓[/] exported {escape(onnx)} (opset {opset}, checker passed, no WS "
                   f"residue): {escape(_op_line(exported.op_histogram))}")
        if sets is not None:
            parity = _gate.run_gate(out, onnx, ws_model, folded, sets, atol, rtol, report,
                                    junit, save_failing)
            payload["parity"] = parity.to_dict()
    out.data(payload)
    if parity is not None:
        _gate.gate_exit(out, parity)
