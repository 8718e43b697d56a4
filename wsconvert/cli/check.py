"""``wsconvert check``: the standalone parity gate for an ONNX file against its checkpoint."""

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
    floats,
    guarded,
    quiet_onnxruntime,
)
from wsconvert.cli._render import parity_lines, verdict

_STAGES = {"load": "loading the checkpoint...", "fold": "folding WS...",
           "gate": "checking parity with onnxruntime..."}


@guarded
def check_cmd(
    onnx_file: Annotated[Path, typer.Argument(metavar="MODEL.onnx", help="The exported model.",
                                              show_default=False)],
    against: Annotated[Path, typer.Option(
        "--against", help="Checkpoint to compare with (WS or folded).", show_default=False)],
    model: ModelOpt = None,
    model_kwargs: ModelKwargsOpt = None,
    input_shape: InputShapeOpt = None,
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
    """Gate an ONNX file on parity with its checkpoint: exit 0 holds, 1 fails, 2 bad input.

    \b
    Example:
      wsconvert check model.onnx --against model.ws.pt -m pkg.nets:build --junit parity.xml
    """
    from wsconvert.pipeline import gate  # imports torch: not on the --help path

    out = Output(as_json)
    quiet_onnxruntime()
    result = gate(onnx_file, against, model=model, model_kwargs=model_kwargs,
                  input_shape=input_shape, seeds=seeds, batch_sizes=batch_sizes, inputs=inputs,
                  atol=atol, rtol=rtol, report=report, junit=junit, save_failing=save_failing,
                  min_top1_agreement=min_top1_agreement,
                  locate="always" if locate else "on_failure", image_size=image_size,
                  mean=floats(mean, "--mean"), std=floats(std, "--std"), trust=trust,
                  allow_classes=allow_class or (), force=force,
                  allow_nonfinite=allow_nonfinite, allow_large_inputs=allow_large_inputs,
                  progress=lambda stage: out.status(_STAGES[stage]))
    parity_lines(out, result.parity)
    out.data(result.to_dict())
    verdict(out, result.parity)
