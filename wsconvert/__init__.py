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
    "fold_ws": "wsconvert.fold",
    "FoldReport": "wsconvert.fold",
    "export_onnx": "wsconvert.export",
    "ExportConfig": "wsconvert.export",
    "check_parity": "wsconvert.parity",
    "make_inputs": "wsconvert.parity",
    "ParityReport": "wsconvert.parity",
    "swap_norm": "wsconvert.norms",
    "NormSwapReport": "wsconvert.norms",
    "measure_drift": "wsconvert.drift",
    "check_drift": "wsconvert.drift",
    "calibrate_bn": "wsconvert.drift",
    "DriftReport": "wsconvert.drift",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from wsconvert.checkpoint import load as load
    from wsconvert.checkpoint import load_model as load_model
    from wsconvert.checkpoint import save as save
    from wsconvert.conventions import CONVENTIONS as CONVENTIONS
    from wsconvert.conventions import standardize_weight as standardize_weight
    from wsconvert.drift import DriftReport as DriftReport
    from wsconvert.drift import calibrate_bn as calibrate_bn
    from wsconvert.drift import check_drift as check_drift
    from wsconvert.drift import measure_drift as measure_drift
    from wsconvert.errors import WsconvertError as WsconvertError
    from wsconvert.export import ExportConfig as ExportConfig
    from wsconvert.export import export_onnx as export_onnx
    from wsconvert.fold import FoldReport as FoldReport
    from wsconvert.fold import fold_ws as fold_ws
    from wsconvert.inspection import inspect_model as inspect_model
    from wsconvert.norms import NormSwapReport as NormSwapReport
    from wsconvert.norms import swap_norm as swap_norm
    from wsconvert.parity import ParityReport as ParityReport
    from wsconvert.parity import check_parity as check_parity
    from wsconvert.parity import make_inputs as make_inputs
    from wsconvert.surgery import ApplyReport as ApplyReport
    from wsconvert.surgery import LayerRecord as LayerRecord
    from wsconvert.surgery import apply_ws as apply_ws
    from wsconvert.ws import WeightStandardization as WeightStandardization
    from wsconvert.ws import accumulate as accumulate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wsconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
