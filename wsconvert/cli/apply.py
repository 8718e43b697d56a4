"""``wsconvert apply``: put WS on a checkpoint's convolutions and write a WS checkpoint."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wsconvert import defaults
from wsconvert.cli._common import (
    AllowClassOpt,
    AllowLargeOpt,
    AllowNonfiniteOpt,
    CheckpointArg,
    ForceOpt,
    ImageSizeOpt,
    JsonOpt,
    MeanOpt,
    ModelKwargsOpt,
    ModelOpt,
    Output,
    StdOpt,
    TrustOpt,
    escape,
    floats,
    guarded,
)
from wsconvert.cli._render import drift_lines, layer_table, norm_table, translated

if TYPE_CHECKING:
    from wsconvert.recovery import RecoveryProgress

_STAGES = {"load": "loading the checkpoint...", "apply": "applying WS...",
           "norm": "swapping BatchNorm for GroupNorm...",
           "drift": "measuring drift on probe inputs...", "save": "writing the WS checkpoint...",
           "data": "reading --calib-data..."}
_STAGE_LABELS = {"calibrate": "BatchNorm statistics", "closed-form": "closed-form norm refit",
                 "distill": "distillation"}


class _RecoveryView:
    """A progress bar per recovery stage (with ETA) and Ctrl-C as a cooperative stop: the first
    Ctrl-C asks the library to stop after the current step (it then restores the model and nothing
    is written); a second one interrupts at once."""

    def __init__(self, out: Output) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), console=out.err, transient=True)
        self.tasks: dict[str, Any] = {}
        self.stop = False
        self.previous: Any = None

    def __enter__(self) -> _RecoveryView:
        if self.bar.console.is_terminal:  # in a log (CI) a live bar only leaves a blank line
            self.bar.start()
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar.live.is_started:
            self.bar.stop()
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def _interrupt(self, signum: int, frame: Any) -> None:
        self.stop = True
        signal.signal(signal.SIGINT, self.previous)

    def should_stop(self) -> bool:
        return self.stop

    def update(self, event: RecoveryProgress) -> None:
        task = self.tasks.get(event.stage)
        if task is None:
            task = self.tasks[event.stage] = self.bar.add_task(
                _STAGE_LABELS.get(event.stage, event.stage), total=event.total, info="")
        info = "" if event.loss is None else f"loss {event.loss:.4g}"
        if event.detail:
            info = f"{info}  {escape(event.detail)}" if info else escape(event.detail)
        self.bar.update(task, completed=event.done, total=event.total, info=info)


def recovery_lines(rec: dict[str, Any]) -> list[Any]:
    """The recovery report: held-out figures per stage, then what was done."""
    from rich.table import Table

    table = Table(title=f"recovery (held out: {rec['samples_holdout']} of "
                  f"{rec['samples_holdout'] + rec['samples_fit']} samples)", title_justify="left")
    for col in ("stage", "output error", "top-1 agreement", "time"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for s in rec["stages"]:
        agree = "n/a" if s["agreement"] is None else f"{100 * s['agreement']:.1f}%"
        table.add_row(s["stage"], f"{100 * s['relative_error']:.3g}%", agree,
                      f"{s['seconds']:.1f} s")
    done = f"refitted {len(rec['fitted'])} norm(s)"
    if rec["kept"] == "converted":
        done += " (undone: it measured worse than the conversion on the held-out slice)"
    if rec["calibrated"]:
        done += f" after re-estimating {len(rec['calibrated'])} BatchNorm(s)"
    if rec["steps"]:
        best = (f"the {rec['kept']} state kept (no step improved on it)" if rec["best_step"] == 0
                else f"best held-out state at step {rec['best_step']}")
        done += (f"; distilled {rec['steps_run']} step(s) ({rec['loss']} loss, batch "
                 f"{rec['batch_size']}, lr {rec['lr']:g}, "
                 f"{'flipped and shifted inputs, ' if rec.get('augment') else ''}"
                 f"{1000 * rec['seconds_per_step']:.0f} ms/step), {best}")
    return [table, f"[green]✓[/] {escape(done)}"]


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
    calib_data: Annotated[Path | None, typer.Option(
        "--calib-data", metavar="PATH", help="Unlabeled samples of the model's domain: a folder "
        "of .png/.jpg/.jpeg images or a .pt/.npy/.npz tensor [N, C, ...]. The converted model "
        "is fitted to reproduce the original on them (closed-form norm refit, then "
        "distillation), measured on a held-out slice.", show_default=False)] = None,
    recover_steps: Annotated[int | None, typer.Option(
        metavar="N", help="Distillation steps after the closed form (0: closed form only) "
        f"[default: {defaults.RECOVER_STEPS}].", show_default=False)] = None,
    recover_batch_size: Annotated[int | None, typer.Option(
        metavar="N", help="Distillation batch size "
        f"[default: {defaults.RECOVER_BATCH_SIZE}].", show_default=False)] = None,
    recover_lr: Annotated[float | None, typer.Option(
        metavar="LR", help=f"Distillation Adam learning rate [default: "
        f"{defaults.RECOVER_LR:g}].", show_default=False)] = None,
    recover_holdout: Annotated[float | None, typer.Option(
        metavar="F", help="Held-out share of --calib-data (a count when >= 1) [default: "
        f"{defaults.RECOVER_HOLDOUT:g}].", show_default=False)] = None,
    recover_seed: Annotated[int | None, typer.Option(
        metavar="N", help="Seed of the held-out split and the batch order [default: 0].",
        show_default=False)] = None,
    recover_augment: Annotated[bool | None, typer.Option(
        "--recover-augment/--no-recover-augment", help="Distill on randomly flipped (last "
        "dimension) and shifted copies of the samples too, labelled by the original model; "
        "applies to inputs [N, C, *spatial] with 1-3 spatial dimensions, the same for every "
        f"input [default: {'on' if defaults.RECOVER_AUGMENT else 'off'}].",
        show_default=False)] = None,
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
    """Rewrite a checkpoint's convolutions into Weight Standardization form.

    \b
    Example:
      wsconvert apply resnet.pt --model torchvision.models:resnet50 --init exact
    """
    from wsconvert.pipeline import convert  # imports torch: not on the --help path

    out = Output(as_json)
    view = _RecoveryView(out)

    def progress(stage: str) -> Any:
        return view if stage == "recover" else out.status(_STAGES[stage])

    result = convert(
        checkpoint, output, model=model, model_kwargs=model_kwargs, convention=convention,
        eps=eps, init=init, include=include or (), exclude=exclude or (), transposed=transposed,
        linear=linear, norm=norm, groups=groups, convert_frozen=convert_frozen,
        input_shape=input_shape, inputs=inputs, calibrate=calibrate, drift=drift, trust=trust,
        allow_classes=allow_class or (), force=force, allow_nonfinite=allow_nonfinite,
        allow_large_inputs=allow_large_inputs, calib_data=calib_data,
        recover_steps=recover_steps, recover_batch_size=recover_batch_size,
        recover_lr=recover_lr, recover_holdout=recover_holdout, recover_seed=recover_seed,
        recover_augment=recover_augment,
        image_size=image_size, mean=floats(mean, "--mean"), std=floats(std, "--std"),
        recover_progress=view.update, should_stop=view.should_stop, progress=progress)
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
    if result.recovery is not None:
        for note in result.recovery.notes:
            out.warn(note)
        for line in recovery_lines(payload["recovery"]):
            out.result(line)
    out.result(f"[green]✓[/] {escape(result.apply.summary())}; wrote {escape(result.output)}")
    if result.norm is not None:
        out.result(f"[green]✓[/] {escape(result.norm.summary())}")
