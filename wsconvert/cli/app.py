"""The Typer app: wires the commands, nothing else."""

from __future__ import annotations

from typing import Annotated

import typer

from wsconvert import __version__
from wsconvert.cli import apply, bench, check, demo, fold, inspect

HELP = """Weight Standardization for models you already have (arXiv:1903.10520).

\b
Examples:
  wsconvert demo                                     # whole pipeline on the bundled example
  wsconvert apply model.pt --model pkg.nets:build    # WS on a state dict's convs
  wsconvert inspect model.ws.pt -m pkg.nets:build    # per-layer WS status and filter stats
  wsconvert bench --batch-sizes 1,8                  # WS training-step overhead vs plain
  wsconvert fold model.ws.pt -m pkg.nets:build --onnx model.onnx   # static weights, ONNX, parity
  wsconvert check model.onnx --against model.ws.pt -m pkg.nets:build   # CI gate: exit 0 / 1 / 2
"""

app = typer.Typer(name="wsconvert", help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wsconvert {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False
          ) -> None:
    """Weight Standardization for models you already have."""


app.command("apply", no_args_is_help=True)(apply.apply_cmd)
app.command("inspect", no_args_is_help=True)(inspect.inspect_cmd)
app.command("fold", no_args_is_help=True)(fold.fold_cmd)
app.command("check", no_args_is_help=True)(check.check_cmd)
app.command("demo")(demo.demo_cmd)
app.command("bench")(bench.bench_cmd)


def main() -> None:
    """The console script: the app, with usage errors (an unknown option, a value that does not
    parse, a missing argument) as one ``error:`` line and exit 2, like every other bad input."""
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        show = getattr(exc, "show", None)
        message = getattr(exc, "format_message", None)
        exit_code = getattr(exc, "exit_code", None)
        if not (callable(show) and callable(message) and isinstance(exit_code, int)):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":
            show()  # a bare subcommand: its help, as before
        else:
            ctx = getattr(exc, "ctx", None)
            where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            typer.echo(f"error: {' '.join(str(message()).split())}{where}", err=True)
        raise SystemExit(exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
