"""Argument checks shared by several library entry points, each stated once, naming parameters.

Torch-free, so a caller can check everything before any model is loaded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from wsconvert.errors import UsageError

__all__ = ["check_gate_options", "parse_batch_sizes"]


def check_gate_options(seeds: int, atol: float, rtol: float) -> None:
    """Raises:
        UsageError: ``seeds`` below 1, or a tolerance that is negative, NaN or infinite (an
            infinite one would pass every finite output: no gate at all).
    """
    if seeds < 1:
        raise UsageError("`seeds` must be at least 1")
    if not (atol >= 0 and rtol >= 0 and math.isfinite(atol) and math.isfinite(rtol)):
        raise UsageError("`atol` and `rtol` must be finite numbers >= 0")


def parse_batch_sizes(value: str | Sequence[int] | None) -> list[int] | None:
    """Batch sizes from ``"1,4"`` or a sequence; ``None`` stays ``None``.

    Raises:
        UsageError: not integers, or not positive.
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            sizes = [int(t) for t in value.split(",") if t.strip()]
        except ValueError:
            raise UsageError(f"`batch_sizes` {value!r}: want comma-separated integers") from None
        if not sizes or any(s < 1 for s in sizes):
            raise UsageError(f"`batch_sizes` {value!r}: want positive integers")
        return sizes
    sizes = [int(s) for s in value]
    if any(s < 1 for s in sizes):
        raise UsageError("`batch_sizes` must be positive integers")
    return sizes
