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

from wsconvert.errors import ConversionError, UsageError
from wsconvert.parity import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    InputSet,
    LocateMode,
    ParityReport,
    check_parity,
    load_inputs,
    make_inputs,
    onnx_inputs,
)

__all__ = ["DEFAULT_SEEDS", "assert_parity", "graph_input_shapes"]

DEFAULT_SEEDS = 2
DEFAULT_BATCH_SIZES = (1, 4)

Shape = Sequence[int]


def graph_input_shapes(onnx_path: str | os.PathLike[str]) -> tuple[list[tuple[int, ...]], bool]:
    """The graph's input shapes (a symbolic batch becomes 1) and whether the batch is dynamic.

    Raises:
        CheckpointError: not a readable ONNX file.
        UsageError: a symbolic dimension other than the batch (pass ``input_shape``).
    """
    graph_inputs = onnx_inputs(onnx_path)
    dynamic = _dynamic(graph_inputs)
    shapes = []
    for name, dims in graph_inputs:
        concrete = [1 if i == 0 and isinstance(d, str) else d for i, d in enumerate(dims)]
        if any(isinstance(d, str) for d in concrete):
            raise UsageError(f"{onnx_path}: input {name} has symbolic dims {dims}; pass "
                             "input_shape")
        shapes.append(tuple(int(d) for d in concrete))
    return shapes, dynamic


def _dynamic(graph_inputs: list[tuple[str, list[int | str]]]) -> bool:
    return bool(graph_inputs) and all(isinstance(dims[0], str) for _, dims in graph_inputs
                                      if dims)


def _shapes(input_shape: Shape | Sequence[Shape]) -> list[tuple[int, ...]]:
    items: list[Any] = list(input_shape)
    if items and all(isinstance(d, int) for d in items):
        return [tuple(items)]
    return [tuple(int(d) for d in s) for s in items]


def _input_sets(inputs: Any) -> list[InputSet]:
    if isinstance(inputs, str | os.PathLike):
        return load_inputs(inputs)
    if isinstance(inputs, Tensor):
        return [InputSet("inputs", (inputs,))]
    if isinstance(inputs, tuple) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return [InputSet("inputs", inputs)]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(s, InputSet) for s in inputs):
        return list(inputs)
    raise UsageError("inputs: want a file path, a tensor, a tuple of tensors (one per model "
                     "input) or a list of InputSet")


def _reference(reference: nn.Module | str | os.PathLike[str], model: str | None,
               model_kwargs: dict[str, Any] | str | None) -> nn.Module:
    if isinstance(reference, nn.Module):
        return reference
    if isinstance(reference, str | os.PathLike):
        from wsconvert.checkpoint import load_model

        return load_model(Path(reference), model, model_kwargs).model
    raise UsageError(f"reference: want an nn.Module or a checkpoint path, got "
                     f"{type(reference).__name__}")


def assert_parity(onnx_path: str | os.PathLike[str],
                  reference: nn.Module | str | os.PathLike[str], *,
                  input_shape: Shape | Sequence[Shape] | None = None,
                  inputs: Any = None, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                  seeds: int = DEFAULT_SEEDS, batch_sizes: Sequence[int] | None = None,
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
        inputs: real samples instead of random ones: an inputs file (``.pt`` / ``.npz`` /
            ``.npy``), a tensor, a tuple of tensors (one per model input), or a list of
            :class:`~wsconvert.parity.InputSet`.
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
    from wsconvert.fold import fold_ws

    net = _reference(reference, model, model_kwargs).eval()
    try:
        fold = fold_ws(net)
        folded = None if fold.noop else fold.model
    except ConversionError:  # an unknown parametrization: compare with the ONNX file directly
        folded = None
    if inputs is not None:
        sets = _input_sets(inputs)
    else:
        if input_shape is None:
            shapes, dynamic = graph_input_shapes(onnx_path)
        else:
            shapes, dynamic = _shapes(input_shape), _dynamic(onnx_inputs(onnx_path))
        sizes = list(batch_sizes) if batch_sizes else (list(DEFAULT_BATCH_SIZES) if dynamic
                                                       else None)
        if sizes and not dynamic:
            raise UsageError("batch_sizes needs a graph with a dynamic batch")
        sets = make_inputs(shapes, seeds, sizes)
    report = check_parity(onnx_path, net, sets, folded=folded, atol=atol, rtol=rtol,
                          min_top1_agreement=min_top1_agreement, locate=locate)
    if not report.passed():
        raise AssertionError("\n" + report.to_text())
    return report

