"""JSON that strict parsers accept: no bare ``NaN`` / ``Infinity``."""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "strict_json"]


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as JSON allows it: NaN (no value) as ``null``,
    infinities as ``"inf"`` / ``"-inf"``, in nested dicts, lists and tuples too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """Indented strict JSON; objects JSON has no type for are written as their ``str``."""
    return json.dumps(strict_json(value), indent=2, default=str, allow_nan=False)
