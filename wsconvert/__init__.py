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

# The public API: the one list. The TYPE_CHECKING imports below say the same for type checkers;
# tests/test_api.py checks that the two agree and that every name imports and is documented.
_API: dict[str, tuple[str, ...]] = {
    "wsconvert.pipeline": ("convert", "fold_and_export", "gate", "inspect_checkpoint"),
    "wsconvert.surgery": ("apply_ws", "ApplyReport", "LayerRecord"),
    "wsconvert.ws": ("WeightStandardization", "accumulate", "standardize_ahead"),
    "wsconvert.conventions": ("CONVENTIONS", "standardize_weight"),
    "wsconvert.io.wsfile": ("load", "save", "load_model"),
    "wsconvert.inspection": ("inspect_model",),
    "wsconvert.errors": ("WsconvertError",),
    "wsconvert.fold": ("fold_ws", "FoldReport"),
    "wsconvert.foreign": ("Adapter", "register_adapter"),
    "wsconvert.export": ("export_onnx", "ExportConfig"),
    "wsconvert.parity": ("check_parity", "make_inputs", "ParityReport"),
    "wsconvert.norms": ("swap_norm", "NormSwapReport"),
    "wsconvert.drift": ("measure_drift", "check_drift", "DriftReport"),
    "wsconvert.calibration": ("calibrate_bn",),
    "wsconvert.recovery": ("recover",),
    "wsconvert.recovery.report": ("RecoveryReport",),
    "wsconvert.probes": ("ProbeSource",),
}
_EXPORTS = {name: module for module, names in _API.items() for name in names}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from wsconvert.calibration import calibrate_bn as calibrate_bn
    from wsconvert.conventions import CONVENTIONS as CONVENTIONS
    from wsconvert.conventions import standardize_weight as standardize_weight
    from wsconvert.drift import DriftReport as DriftReport
    from wsconvert.drift import check_drift as check_drift
    from wsconvert.drift import measure_drift as measure_drift
    from wsconvert.errors import WsconvertError as WsconvertError
    from wsconvert.export import ExportConfig as ExportConfig
    from wsconvert.export import export_onnx as export_onnx
    from wsconvert.fold import FoldReport as FoldReport
    from wsconvert.fold import fold_ws as fold_ws
    from wsconvert.foreign import Adapter as Adapter
    from wsconvert.foreign import register_adapter as register_adapter
    from wsconvert.inspection import inspect_model as inspect_model
    from wsconvert.io.wsfile import load as load
    from wsconvert.io.wsfile import load_model as load_model
    from wsconvert.io.wsfile import save as save
    from wsconvert.norms import NormSwapReport as NormSwapReport
    from wsconvert.norms import swap_norm as swap_norm
    from wsconvert.parity import ParityReport as ParityReport
    from wsconvert.parity import check_parity as check_parity
    from wsconvert.parity import make_inputs as make_inputs
    from wsconvert.pipeline import convert as convert
    from wsconvert.pipeline import fold_and_export as fold_and_export
    from wsconvert.pipeline import gate as gate
    from wsconvert.pipeline import inspect_checkpoint as inspect_checkpoint
    from wsconvert.probes import ProbeSource as ProbeSource
    from wsconvert.recovery import recover as recover
    from wsconvert.recovery.report import RecoveryReport as RecoveryReport
    from wsconvert.surgery import ApplyReport as ApplyReport
    from wsconvert.surgery import LayerRecord as LayerRecord
    from wsconvert.surgery import apply_ws as apply_ws
    from wsconvert.ws import WeightStandardization as WeightStandardization
    from wsconvert.ws import accumulate as accumulate
    from wsconvert.ws import standardize_ahead as standardize_ahead


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'wsconvert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
