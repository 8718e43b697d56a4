"""Every default the library and the CLI share, in one torch-free module.

The CLI imports this for its ``--help`` defaults without importing torch; the library functions
use the same names as their keyword defaults, so the two cannot drift apart.
"""

from __future__ import annotations

__all__ = [
    "CONVENTION",
    "DRIFT_BATCHES",
    "DRIFT_THRESHOLD",
    "EXPORT_SPATIAL",
    "GATE_ATOL",
    "GATE_BATCH_SIZES",
    "GATE_RTOL",
    "GATE_SEEDS",
    "GROUPS",
    "INIT",
    "OPSET",
    "PROBE_BATCH",
    "PROBE_SPATIAL",
    "RECOVER_AUGMENT",
    "RECOVER_BATCH_SIZE",
    "RECOVER_FEATURES",
    "RECOVER_HOLDOUT",
    "RECOVER_LR",
    "RECOVER_STEPS",
]

CONVENTION = "paper"
"""WS formula ``apply`` uses unless told otherwise."""
INIT = "plain"
"""``apply``'s init mode: pure WS."""
GROUPS = 32
"""GroupNorm groups of ``--norm gn`` (the paper's value)."""

PROBE_BATCH = 8
"""Batch size of random drift / calibration probes when the shape is inferred."""
PROBE_SPATIAL: dict[int, tuple[int, ...]] = {1: (256,), 2: (64, 64), 3: (16, 16, 16)}
"""Spatial size per conv rank of inferred probe inputs: small enough to run fast on a CPU, large
enough for a few stride-2 stages."""
DRIFT_THRESHOLD = 0.05
"""Overall relative output change above which the drift report calls the drift large."""
DRIFT_BATCHES = 2
"""Random probe batches of a drift measurement."""

EXPORT_SPATIAL: dict[int, tuple[int, ...]] = {1: (256,), 2: (224, 224), 3: (16, 112, 112)}
"""Spatial size per conv rank of an inferred export shape (batch 1): ImageNet-like for 2-D, since
a static-batch ONNX graph keeps this shape."""
OPSET = 18
"""ONNX opset of ``fold --onnx``."""

GATE_ATOL = 1e-4
"""Absolute tolerance of the parity gate (fp32; see docs/parity.md for the measurements)."""
GATE_RTOL = 1e-3
"""Relative tolerance of the parity gate."""
GATE_SEEDS = 1
"""Random input sets per batch size of the parity gate."""
GATE_BATCH_SIZES = (1, 4)
"""Batch sizes the gate checks when the exported batch is dynamic."""

RECOVER_STEPS = 300
"""Distillation steps of recovery (``--recover-steps``); measured in docs/recovery.md."""
RECOVER_BATCH_SIZE = 32
"""Distillation batch size of recovery."""
RECOVER_LR = 3e-3
"""Adam learning rate of recovery's distillation (cosine decay to zero)."""
RECOVER_HOLDOUT = 0.2
"""Share of the recovery samples held out for measuring (a count when >= 1)."""
RECOVER_FEATURES = 2.5
"""Weight of feature matching (the refitted norms' outputs) in recovery's distillation loss."""
RECOVER_AUGMENT = True
"""Recovery distills on randomly flipped and shifted samples (inputs with spatial dimensions)."""
