"""``wsconvert check``: the standalone parity gate for an ONNX file against its checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsconvert.cli import _gate
from wsconvert.cli._common import (
    AllowClassOpt,
    JsonOpt,
    ModelKwargsOpt,
    ModelOpt,
    Output,
    TrustOpt,
    guarded,
)


@guarded
def check_cmd(
    onnx_file: Annotated[Path, typer.Argument(metavar="MODEL.onnx", help="The exported model.",
                                              show_default=False)],
    against: Annotated[Path, typer.Option(
        "--against", help="Checkpoint to compare with (WS or folded).", show_default=False)],
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    input_shape: _gate.InputShapeOpt = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Gate an ONNX file on parity with its checkpoint: exit 0 holds, 1 fails, 2 bad input.

    \b
    Example:
      wsconvert check model.onnx --against model.ws.pt --junit parity.xml --json
    """
    from wsconvert.checkpoint import load_model
    from wsconvert.errors import ConversionError, UsageError
    from wsconvert.export import parse_shapes
    from wsconvert.fold import fold_ws
    from wsconvert.parity import onnx_inputs

    out = Output(as_json)
    _gate.check_gate_options(seeds, atol, rtol, report, junit, save_failing)
    graph_inputs = onnx_inputs(onnx_file)
    loaded = load_model(against, model, model_kwargs, trust=trust,
                        allow_classes=allow_class or ())
    reference = loaded.model.eval()
    # A WS reference (ours or another library's) gets both stages: fold, then export.
    try:
        fold = fold_ws(reference)
        folded = None if fold.noop else fold.model
    except ConversionError:  # an unknown parametrization: compare the ONNX file directly
        folded = None
    dynamic = bool(graph_inputs) and all(isinstance(dims[0], str) for _, dims in graph_inputs
                                         if dims)
    if input_shape:
        shapes = list(parse_shapes(input_shape))
    else:
        shapes = []
        for name, dims in graph_inputs:
            concrete = [1 if i == 0 and isinstance(d, str) else d for i, d in enumerate(dims)]
            if any(isinstance(d, str) for d in concrete):
                raise UsageError(f"{onnx_file}: input {name} has symbolic dims {dims}; pass "
                                 "--input-shape")
            shapes.append(tuple(int(d) for d in concrete))
    if len(shapes) != len(graph_inputs) and inputs is None:
        raise UsageError(f"{onnx_file} takes {len(graph_inputs)} input(s), got {len(shapes)} "
                         "--input-shape")
    sets = _gate.build_inputs(shapes, dynamic, seeds, batch_sizes, inputs)
    parity = _gate.run_gate(out, onnx_file, reference, folded, sets, atol, rtol, report, junit,
                            save_failing)
    out.data({"onnx": str(onnx_file), "against": str(against), "parity": parity.to_dict()})
    _gate.gate_exit(out, parity)
