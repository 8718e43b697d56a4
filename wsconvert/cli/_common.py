"""Every option shared by several commands (declared once), the output object, and the
error-to-exit-code mapping."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape as rich_escape

from wsconvert import defaults
from wsconvert._json import dumps
from wsconvert.cli._errors import cli_text
from wsconvert.errors import ConversionError, WsconvertError, strip_ansi

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "WSCONVERT_DEBUG"

CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint file (.pt / .pth / .ckpt / "
                                                    ".safetensors).",
                                               show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="MODULE:FACTORY",
    help="Callable building the architecture, for state-dict checkpoints (runs that module's "
         "code; the current directory is importable); or timm:NAME / torchvision:NAME "
         "(random weights, nothing downloaded).")]
ModelKwargsOpt = Annotated[str | None, typer.Option(
    "--model-kwargs", metavar="JSON", help="JSON object of keyword arguments for --model.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", help="Allow unpickling a whole module: this runs code from the file.")]
AllowClassOpt = Annotated[list[str] | None, typer.Option(
    "--allow-class", metavar="MODULE.CLASS",
    help="Allow just this class when unpickling (repeatable); everything else stays refused.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option(
    "--force", help="Overwrite existing output files (never an input); write through a symlink "
                    "at an output path to the file it points to.")]
AllowNonfiniteOpt = Annotated[bool, typer.Option(
    "--allow-nonfinite", help="Accept NaN / inf weights and statistics in the checkpoint.")]
AllowLargeOpt = Annotated[bool, typer.Option(
    "--allow-large-inputs", help="Accept probe / check inputs above the size limit "
                                 "(2**27 elements in all).")]

# The parity gate's options (``fold --onnx`` and ``check``); defaults from wsconvert.defaults.
InputShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", metavar="N,C,H,W",
    help="Shape of one model input; repeat the flag, or separate shapes with ';', for several.")]
SeedsOpt = Annotated[int, typer.Option("--seeds", help="Random input sets per batch size.")]
BatchSizesOpt = Annotated[str | None, typer.Option(
    "--batch-sizes", metavar="1,4",
    help="Batch sizes to check when the batch is dynamic [default: "
         f"{','.join(map(str, defaults.GATE_BATCH_SIZES))}].", show_default=False)]
InputsOpt = Annotated[Path | None, typer.Option(
    "--inputs", help="Real samples instead of random inputs: a tensor file (.pt / .npy / .npz) "
    "or a folder of images (.png / .jpg / .jpeg; see --image-size, --mean, --std).",
    show_default=False)]
AtolOpt = Annotated[float, typer.Option("--atol", help="Absolute tolerance.")]
RtolOpt = Annotated[float, typer.Option("--rtol", help="Relative tolerance.")]
ReportOpt = Annotated[Path | None, typer.Option(
    "--report", help="Write the parity report as JSON.", show_default=False)]
JunitOpt = Annotated[Path | None, typer.Option(
    "--junit", help="Write JUnit XML (one case per output per input set).", show_default=False)]
SaveFailingOpt = Annotated[Path | None, typer.Option(
    "--save-failing", metavar="DIR", help="On failure, save the failing inputs here.",
    show_default=False)]
LocateOpt = Annotated[bool, typer.Option(
    "--locate", help="Name the first diverging module even when parity holds (it is always "
                     "located when parity fails).")]
MinTop1Opt = Annotated[float | None, typer.Option(
    "--min-top1-agreement", metavar="SHARE",
    help="Also require this share of samples with the reference's top-1 class on classifier "
         "outputs (2-D, more than one class), e.g. 0.99.", show_default=False)]


class Output:
    """Results to stdout (human or JSON), diagnostics to stderr."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        probe = Console()
        # Piped output (CI logs) gets room for the tables instead of rich's 80-column default.
        width = None if probe.is_terminal or os.environ.get("COLUMNS") else 140
        self.out = Console(highlight=False, soft_wrap=False, width=width)
        self.err = Console(stderr=True, highlight=False)

    def result(self, renderable: Any) -> None:
        if not self.as_json:
            self.out.print(renderable)

    def data(self, payload: dict[str, Any]) -> None:
        if self.as_json:
            sys.stdout.write(dumps(payload) + "\n")

    def note(self, message: str) -> None:
        self.err.print(message)

    def warn(self, message: str) -> None:
        """A non-fatal library observation, in command-line wording."""
        self.note(f"[yellow]note:[/] {escape(cli_text(message))}")

    def status(self, message: str) -> Any:
        return self.err.status(message)


def quiet_onnxruntime() -> None:
    """onnxruntime logs its own errors to stderr (several lines, colour codes) before raising
    them; the command reports each as its one-line error instead."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)


def debug_enabled() -> bool:
    """``WSCONVERT_DEBUG`` set to anything but empty, ``0``, ``false``, ``no`` or ``off``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


class _Signals:
    """The catchable termination signals, turned into an exception so that every ``finally``
    (staged outputs, temporary files) runs; remembers which one arrived."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.received: int | None = None

    def _handler(self, signum: int, frame: object) -> None:
        self.received = signum
        raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        for name in self.NAMES:
            sig = getattr(signal, name, None)
            if sig is not None:
                previous[sig] = signal.signal(sig, self._handler)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def guarded(func: F) -> F:
    """Turn library errors into one line on stderr and an exit code (traceback only in debug).

    Exit codes: the error's own (2 bad input, 1 a failed check), 128 + N for signal N (130 for
    Ctrl-C), 2 for anything unexpected, a ``sys.exit`` in code the command ran included. Debug
    mode adds the traceback and keeps the code.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        signals = _Signals()
        atomic = sys.modules.get("wsconvert.io.atomic")  # never imported here (torch)
        mark = 0 if atomic is None else len(atomic.COMMITTED)
        try:
            with signals.installed():
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except BaseException as exc:
            if signals.received is not None or isinstance(exc, KeyboardInterrupt):
                signum = signals.received or signal.SIGINT
                atomic = sys.modules.get("wsconvert.io.atomic")
                # Outputs that are there now (the demo stages into a folder it then removes).
                done = [] if atomic is None else [p for p in atomic.COMMITTED[mark:]
                                                  if os.path.exists(p)]
                what = (f"after its outputs were written ({', '.join(map(str, done))})" if done
                        else "before any output was written")
                _error_line(f"interrupted ({signal.Signals(signum).name}) {what}")
                raise typer.Exit(128 + signum) from None
            if isinstance(exc, SystemExit):
                # wsconvert itself exits through typer.Exit: this came from code it ran (a model
                # factory, a model's forward, a trusted pickle), which must not pick the exit code.
                _error_line(f"code run for this command (the model's own) called "
                            f"sys.exit({exc.code!r}); nothing was checked or written")
                raise typer.Exit(2) from None
            if not isinstance(exc, Exception):
                raise
            if debug_enabled():
                traceback.print_exc()
            if isinstance(exc, WsconvertError):
                _error_line(cli_text(_naming_input(exc, kwargs)))
                raise typer.Exit(exc.exit_code) from None
            _error_line(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the "
                        "traceback)")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _naming_input(exc: Exception, kwargs: dict[str, Any]) -> str:
    """Errors name the file they are about. Errors about the model itself (nothing to convert,
    NaN weights, already WS) come from the library without a path: prefix the command's input.
    Every other error already names its file or flag."""
    message = str(exc)
    path = kwargs.get("checkpoint") or kwargs.get("against")
    if path is None or not isinstance(exc, ConversionError) or str(path) in message:
        return message
    return f"{path}: {message}"


def one_line(message: str) -> str:
    """A message as one plain line: colour and other terminal escapes removed, every run of
    whitespace (newlines of multi-line tool output included) one space."""
    return " ".join(strip_ansi(message).split())


def _error_line(message: str) -> None:
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(one_line(message))}", markup=True, emoji=False)


def escape(text: object) -> str:
    return rich_escape(str(text))


ImageSizeOpt = Annotated[int | None, typer.Option(
    "--image-size", metavar="PX", help="Resize images of a folder input to cover PX x PX and crop "
    "the centre [default: images must share one size].", show_default=False)]
MeanOpt = Annotated[str | None, typer.Option(
    "--mean", metavar="R,G,B", help="Per-channel mean for images of a folder input, in [0, 1] "
    "[default: ImageNet's 0.485,0.456,0.406].", show_default=False)]
StdOpt = Annotated[str | None, typer.Option(
    "--std", metavar="R,G,B", help="Per-channel std for images of a folder input "
    "[default: ImageNet's 0.229,0.224,0.225].", show_default=False)]


def floats(text: str | None, flag: str) -> list[float] | None:
    """``"0.5,0.5,0.5"`` to floats (``None`` stays ``None``); a malformed list names ``flag``."""
    if text is None:
        return None
    from wsconvert.errors import UsageError

    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"{flag} wants comma-separated numbers, got {text!r}") from None
