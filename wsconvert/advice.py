"""The advice prose of the drift report: what to do about a large drift.

The wording names the ``apply`` command's flags: it is advice for the person at the command line,
shown by ``apply`` and stored in its JSON report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # drift imports this module; the type is only needed for annotations
    from wsconvert.drift import DriftCheck

__all__ = ["drift_advice"]


def drift_advice(check: DriftCheck, init: str, norm: str, *, real: bool) -> str:
    """What to do about the drift ``check`` found (empty when nothing to say).

    Args:
        check: the measurement.
        init: the ``init`` the conversion used.
        norm: ``keep`` or ``gn``.
        real: the probes were real samples, not random inputs.
    """
    notes = []
    if check.large:
        if init != "exact":
            notes.append(
                "--init exact keeps each converted conv's function at step 0 (fixed per-filter "
                "gain and offset restore the pretrained filter, as DetectoRS's AWS); it trades "
                "away standardized filters at the start: the effective weights keep their "
                "pretrained mean and scale, so the smoother optimization WS is for only comes "
                "through the projected gradient")
        if norm == "gn":
            notes.append(
                "part of this drift is the GroupNorm swap itself (per-sample group statistics "
                "instead of running batch statistics); no --init removes it, fine-tuning does")
        elif check.calibration is None and init != "exact":
            notes.append("--calibrate N re-estimates the BatchNorm running statistics for the "
                         "standardized weights (best with --inputs of real samples)")
    if check.calibration is not None and not real:
        notes.append("calibrated on random probe inputs: the running statistics now describe "
                     "noise, not your data; pass --inputs with real samples")
    return "; ".join(notes)
