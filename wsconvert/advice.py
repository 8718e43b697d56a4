"""The advice prose of the drift report: what to do about a large drift.

The wording names the ``apply`` command's flags: it is advice for the person at the command line,
shown by ``apply`` and stored in its JSON report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # drift imports this module; the type is only needed for annotations
    from wsconvert.drift import DriftCheck

__all__ = ["drift_advice"]


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%" if x < 10 else f"{x:.3g}x"


def drift_advice(check: DriftCheck, init: str, norm: str, *, real: bool,
                 recovering: bool = False) -> str:
    """What to do about the drift ``check`` found (empty when nothing to say).

    An ``--init`` is suggested only where ``check.alternatives`` measured it lower on the same
    probes (or, with nothing measured, with a plain statement that it was not); one measured
    higher is reported as not helping, never suggested.

    Args:
        check: the measurement.
        init: the ``init`` the conversion used.
        norm: ``keep`` or ``gn``.
        real: the probes were real samples, not random inputs.
        recovering: ``--calib-data`` recovery runs after this measurement.
    """
    notes = []
    if check.large:
        notes += _init_notes(check, init)
        calib = ("" if recovering else
                 "; --calib-data PATH (unlabeled samples of your data) refits the new norms to "
                 "the original's outputs and distills against it, and reports the effect on a "
                 "held-out slice (not measured here: it needs your data)")
        if norm == "gn":
            notes.append(
                "part of this drift is the GroupNorm swap itself (per-sample group statistics "
                "instead of running batch statistics); no --init removes it" + calib)
        elif check.calibration is None and init != "exact":
            notes.append("--calibrate N re-estimates the BatchNorm running statistics for the "
                         "standardized weights (best with --inputs of real samples)" + calib)
    if check.calibration is not None and not real:
        notes.append("calibrated on random probe inputs: the running statistics now describe "
                     "noise, not your data; pass --inputs with real samples")
    return "; ".join(notes)


def _init_notes(check: DriftCheck, init: str) -> list[str]:
    current = check.before.output_relative
    why = {"exact": "it keeps each converted conv's function at step 0 (fixed per-filter gain "
                    "and offset restore the pretrained filter, as DetectoRS's AWS) and trades "
                    "away standardized filters at the start",
           "plain": "pure WS, standardized filters from the start",
           "scale": "a learnable per-filter gain starts at the pretrained filter's magnitude"}
    if not check.alternatives:
        if init == "exact":
            return []
        return ["--init exact (not measured on these probes) " + why["exact"]]
    notes = []
    for alt, drift in sorted(check.alternatives.items()):
        if drift < current:
            notes.append(f"--init {alt}: measured {_pct(drift)} output drift on these probes "
                         f"instead of {_pct(current)}; " + why.get(alt, ""))
        else:
            notes.append(f"--init {alt} was measured on these probes and does not help "
                         f"({_pct(drift)} output drift instead of {_pct(current)})")
    return notes
