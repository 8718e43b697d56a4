"""The parity gate as a test assertion, for CI suites written in pytest (or unittest).

    from wsconvert.testing import assert_parity

    def test_export_matches_checkpoint():
        assert_parity("model.onnx", "checkpoints/model.ws.pt", seeds=3)

On failure the ``AssertionError`` carries the readable report (every case, the tolerances that
would have passed, and where the export diverges); on success the report is returned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from wsconvert._gate import fold_reference, gate_inputs, plan_gate
from wsconvert.defaults import GATE_ATOL, GATE_RTOL, GATE_SEEDS
from wsconvert.errors import UsageError
from wsconvert.io.atomic import OutputSet
from wsconvert.io.inputs import InputSet
from wsconvert.parity import (
    LocateMode,
    ParityReport,
    check_parity,
    graph_input_shapes,
)

__all__ = ["assert_parity"]

Shape = Sequence[int]


def _shape_texts(input_shape: Shape | Sequence[Shape]) -> list[str]:
    items: list[Any] = list(input_shape)
    if items and all(isinstance(d, int) for d in items):
        items = [items]
    return [",".join(str(int(d)) for d in s) for s in items]


def _input_sets(inputs: Any) -> list[InputSet] | None:
    """Input sets given in memory; ``None`` for a path (read by the gate's own loader)."""
    if isinstance(inputs, str | os.PathLike):
        return None
    if isinstance(inputs, Tensor):
        return [InputSet("inputs", (inputs,))]
    if isinstance(inputs, tuple) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return [InputSet("inputs", inputs)]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(s, InputSet) for s in inputs):
        return list(inputs)
    raise UsageError("`inputs`: want a file path, a tensor, a tuple of tensors (one per model "
                     "input) or a list of InputSet")


def _reference(reference: nn.Module | str | os.PathLike[str], model: str | None,
               model_kwargs: dict[str, Any] | str | None) -> nn.Module:
    if isinstance(reference, nn.Module):
        return reference
    if isinstance(reference, str | os.PathLike):
        from wsconvert.io.wsfile import load_model

        return load_model(reference, model, model_kwargs).model
    raise UsageError(f"`reference`: want an nn.Module or a checkpoint path, got "
                     f"{type(reference).__name__}")


def assert_parity(onnx_path: str | os.PathLike[str],
                  reference: nn.Module | str | os.PathLike[str], *,
                  input_shape: Shape | Sequence[Shape] | None = None,
                  inputs: Any = None, atol: float = GATE_ATOL, rtol: float = GATE_RTOL,
                  seeds: int = GATE_SEEDS, batch_sizes: Sequence[int] | None = None,
                  min_top1_agreement: float | None = None, model: str | None = None,
                  model_kwargs: dict[str, Any] | str | None = None,
                  locate: LocateMode = "on_failure") -> ParityReport:
    """Assert that ``onnx_path`` computes what ``reference`` computes, within tolerance.

    The same gate as ``wsconvert check``: a WS reference (wsconvert's own or another library's)
    is folded in memory and both stages (``fold``, ``export``) are checked; a plain reference
    is compared with onnxruntime directly.

    Args:
        onnx_path: the exported model.
        reference: an ``nn.Module`` or a checkpoint path (loaded with
            :func:`wsconvert.load_model`; a state dict needs ``model="MODULE:FACTORY"``).
        input_shape: one shape, or one per model input; default: read from the graph (a
            symbolic batch becomes 1).
        inputs: real samples instead of random ones: an inputs file (see
            :func:`wsconvert.io.inputs.load_inputs`), a tensor, a tuple of tensors (one per
            model input), or a list of :class:`~wsconvert.io.inputs.InputSet`.
        atol, rtol: elementwise tolerance ``|got - ref| <= atol + rtol * |ref|``.
        seeds: random input sets per batch size.
        batch_sizes: batch sizes to check; default ``(1, 4)`` when the graph's batch is
            dynamic, else the graph's.
        min_top1_agreement: also require this share of top-1 agreement on classifier outputs.
        model, model_kwargs: architecture for a state-dict ``reference``.
        locate: see :func:`~wsconvert.parity.check_parity`.

    Returns:
        The :class:`~wsconvert.parity.ParityReport`, when parity holds.

    Raises:
        AssertionError: parity fails; the message is :meth:`ParityReport.to_text`.
        WsconvertError: bad input (unreadable files, shapes that do not fit, bad options).

    Example:
        >>> report = assert_parity("model.onnx", "model.ws.pt", atol=1e-5)  # doctest: +SKIP
    """
    given = None if inputs is None else _input_sets(inputs)
    with OutputSet() as nothing_written:  # assert_parity writes no file
        plan = plan_gate(nothing_written, seeds, batch_sizes,
                         None if inputs is None or given is not None else Path(inputs), atol,
                         rtol, None, None, None, min_top1_agreement, locate)
        shapes, dynamic = graph_input_shapes(
            onnx_path, None if input_shape is None else _shape_texts(input_shape))
        net = _reference(reference, model, model_kwargs).eval()
        folded = fold_reference(net)
        sets = given if given is not None else gate_inputs(plan, nothing_written, shapes, dynamic)
    report = check_parity(onnx_path, net, sets, folded=folded, atol=atol, rtol=rtol,
                          min_top1_agreement=min_top1_agreement, locate=locate)
    if not report.passed():
        raise AssertionError("\n" + report.to_text())
    return report
