"""Shared option aliases, the output object and the error-to-exit-code mapping."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "WSCONVERT_DEBUG"

CheckpointArg = Annotated[Path, typer.Argument(help="Checkpoint file (.pt / .pth / .ckpt).",
                                               show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="MODULE:FACTORY",
    help="Callable building the architecture, for state-dict checkpoints (runs that module's "
         "code; the current directory is importable).")]
ModelKwargsOpt = Annotated[str | None, typer.Option(
    "--model-kwargs", metavar="JSON", help="JSON object of keyword arguments for --model.")]
TrustOpt = Annotated[bool, typer.Option(
    "--trust", help="Allow unpickling a whole module: this runs code from the file.")]
AllowClassOpt = Annotated[list[str] | None, typer.Option(
    "--allow-class", metavar="MODULE.CLASS",
    help="Allow just this class when unpickling (repeatable); everything else stays refused.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")]


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
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")

    def note(self, message: str) -> None:
        self.err.print(message)

    def status(self, message: str) -> Any:
        return self.err.status(message)


def guarded(func: F) -> F:
    """Turn library errors into one line on stderr and an exit code (traceback only in debug)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from wsconvert.errors import WsconvertError

        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except WsconvertError as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            _error_line(_naming_input(exc, kwargs))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _error_line("interrupted; no output was written")
            raise typer.Exit(130) from None
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            _error_line(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for the "
                        "traceback)")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _naming_input(exc: Exception, kwargs: dict[str, Any]) -> str:
    """Errors name the file they are about. Errors about the model itself (nothing to convert,
    NaN weights, already WS) come from the library without a path: prefix the command's input.
    Every other error already names its file or flag."""
    from wsconvert.errors import ConversionError

    message = str(exc)
    path = kwargs.get("checkpoint") or kwargs.get("against")
    if path is None or not isinstance(exc, ConversionError) or str(path) in message:
        return message
    return f"{path}: {message}"


def _error_line(message: str) -> None:
    line = " ".join(message.split())
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {line}", markup=True, emoji=False)


def escape(text: object) -> str:
    from rich.markup import escape as _escape

    return _escape(str(text))
