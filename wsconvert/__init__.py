"""wsconvert: Weight Standardization (Qiao et al., arXiv:1903.10520) for models you already have.

Put WS on a pretrained model's convolutions, fine-tune it, fold it back into plain static weights
and export a clean ONNX file gated on numerical parity.

Heavy modules (torch, onnx) load on first use of the names below, so importing the package (and the
CLI's ``--help``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply_ws": "wsconvert.surgery",
    "ApplyReport": "wsconvert.surgery",
    "LayerRecord": "wsconvert.surgery",
    "WeightStandardization": "wsconvert.ws",
    "accumulate": "wsconvert.ws",
    "CONVENTIONS": "wsconvert.conventions",
    "standardize_weight": "wsconvert.conventions",
    "load": "wsconvert.checkpoint",
    "save": "wsconvert.checkpoint",
    "load_model": "wsconvert.checkpoint",
    "inspect_model": "wsconvert.inspection",
    "WsconvertError": "wsconvert.errors",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from wsconvert.checkpoint import load, load_model, save
    from wsconvert.conventions import CONVENTIONS, standardize_weight
    from wsconvert.errors import WsconvertError
    from wsconvert.inspection import inspect_model
    from wsconvert.surgery import ApplyReport, LayerRecord, apply_ws
    from wsconvert.ws import WeightStandardization, accumulate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wsconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
