"""Typed errors raised by the library; the CLI maps each to a one-line message and an exit code.

Messages name the library's parameters in backticks (`` `input_shape` ``, `` `force=True` ``);
the CLI shows the matching flag instead (``wsconvert/cli/_errors.py``).
"""

from __future__ import annotations

import re

__all__ = [
    "CheckpointError",
    "ConversionError",
    "InputsError",
    "ModelSpecError",
    "OutputExistsError",
    "ParityFailure",
    "UntrustedCheckpointError",
    "UsageError",
    "WsconvertError",
    "strip_ansi",
]

_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour / cursor escape sequences (dependencies such as the ONNX
    exporter colour their messages; a one-line error must not carry them)."""
    return _ANSI.sub("", text)


class WsconvertError(Exception):
    """Base of every error the library raises on purpose.

    ``exit_code`` is what the CLI exits with: 2 for bad input or usage, 1 for a check that ran and
    failed.
    """

    exit_code: int = 2


class UsageError(WsconvertError):
    """An argument value that cannot work (unknown convention, malformed shape, bad glob...)."""


class CheckpointError(WsconvertError):
    """A checkpoint that cannot be read, or whose contents do not fit the model."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint that would run code when loaded, and ``trust`` was not given.

    ``finding`` is what loading would do, without the advice on how to allow it (a caller that
    never loads with trust, such as the input-file reader, gives its own)."""

    def __init__(self, finding: str, advice: str) -> None:
        super().__init__(f"{finding}; {advice}")
        self.finding = finding


class InputsError(CheckpointError, UsageError):
    """A sample-inputs file that cannot be read or does not hold usable inputs."""


class ModelSpecError(WsconvertError):
    """A ``MODULE:FACTORY`` model spec that cannot be imported or called."""


class ConversionError(WsconvertError):
    """A model that cannot be converted as asked (already standardized, nothing to convert...)."""


class OutputExistsError(WsconvertError):
    """An output path exists and overwriting was not allowed."""


class ParityFailure(WsconvertError):
    """A parity or graph check ran and failed."""

    exit_code = 1
