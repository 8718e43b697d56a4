"""ONNX export of a plain (folded) model, and the check that no WS is left in the graph."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wsconvert.defaults import EXPORT_SPATIAL
from wsconvert.errors import (
    OutputExistsError,
    ParityFailure,
    UsageError,
    WsconvertError,
    strip_ansi,
)
from wsconvert.io.inputs import infer_input_shape, parse_shape, parse_shapes

__all__ = [
    "DEFAULT_SPATIAL",
    "ExportConfig",
    "ExportResult",
    "export_onnx",
    "graph_residue",
    "infer_input_shape",
    "parse_shape",
    "parse_shapes",
    "strip_ansi",
]

DEFAULT_SPATIAL = EXPORT_SPATIAL
MAX_PROTO_BYTES = 2 * 1024**3
# Ops that, between an initializer and a conv / matmul weight, mean WS (or a norm) is still being
# computed at run time.
_WEIGHT_MATH = {"ReduceMean", "ReduceSumSquare", "ReduceSum", "Sqrt", "Div", "Sub", "Pow", "Mul",
                "Add", "Reciprocal", "BatchNormalization", "InstanceNormalization",
                "LayerNormalization", "GroupNormalization", "ReduceL2", "Var"}
_WEIGHT_CONSUMERS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
# The batch a dynamic-batch export is traced at: torch.export specializes a size-1 dimension to
# the constant 1 (and some graphs then fail with "Invalid ranges [2:1]"), so never trace at 1.
DYNAMIC_TRACE_BATCH = 2
# Loggers of the exporter stack; their records (E-level tracebacks included) never reach the user
# during an export: the failure comes back as one exception, turned into one line.
_DEPENDENCY_LOGGERS = ("torch", "onnxscript", "onnx_ir", "onnx", "onnxruntime")
_NEXT_STEPS = re.compile(r"\s*Next steps:.*$")


def dependency_reason(exc: BaseException, limit: int = 300) -> str:
    """One line saying why a dependency (exporter, checker) failed, without colour codes.

    Exporters wrap the real failure ("Failed to export the model with torch.export. This is step
    1/3...") around the exception that says what went wrong; the innermost cause is named too.
    """
    chain: list[BaseException] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__

    def first_line(e: BaseException) -> str:
        lines = [ln.strip() for ln in strip_ansi(str(e)).splitlines() if ln.strip()]
        return lines[0] if lines else type(e).__name__

    outer, inner = _NEXT_STEPS.sub("", first_line(chain[0])), chain[-1]
    reason = outer
    if inner is not chain[0]:
        reason = f"{outer} ({type(inner).__name__}: {first_line(inner)})"
    reason = " ".join(reason.split())
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


@dataclass(frozen=True)
class ExportConfig:
    """How to export: one shape per model input, dynamic batch, opset, external data.

    ``external_data`` ``None`` means: only when the weights pass protobuf's 2 GB limit.
    """

    input_shapes: tuple[tuple[int, ...], ...]
    dynamic_batch: bool = False
    opset: int = 18
    external_data: bool | None = None
    input_dtype: torch.dtype = torch.float32

    def example_inputs(self, batch: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return tuple(torch.randn((batch or s[0], *s[1:]), generator=g, dtype=self.input_dtype)
                     for s in self.input_shapes)


@dataclass
class ExportResult:
    """What was written and what the graph holds."""

    path: Path
    opset: int
    input_names: list[str]
    output_names: list[str]
    op_histogram: dict[str, int]
    external_data: bool
    files: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "opset": self.opset, "inputs": self.input_names,
                "outputs": self.output_names, "op_histogram": self.op_histogram,
                "external_data": self.external_data, "files": [str(f) for f in self.files]}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter logs and prints progress, warnings and (on failure) E-level tracebacks; keep
    them all out of the user's terminal. Every logger of the exporter stack, and each of its
    children that sets its own level, is raised above CRITICAL for the duration."""
    manager = logging.Logger.manager
    names = [n for n in (*_DEPENDENCY_LOGGERS, *list(manager.loggerDict))
             if n.split(".")[0] in _DEPENDENCY_LOGGERS]
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            if lg.level != logging.NOTSET or "." not in lg.name:
                lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _model_name(model: nn.Module) -> str:
    """``ConvNeXt (torchvision.models.convnext)``: the class and the module defining it."""
    cls = type(model)
    return f"{cls.__name__} ({cls.__module__})"


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def graph_residue(model_proto: Any) -> list[str]:
    """Nodes still computing conv / matmul weights at run time, and training-mode BatchNorms.

    A folded graph feeds every Conv / Gemm / MatMul weight straight from an initializer. Only
    weight computations that depend on constants alone count: a MatMul of two activations
    (attention's ``q @ k.T``) reaches a graph input and is not residue.
    """
    producers = {out: node for node in model_proto.graph.node for out in node.output}
    graph_inputs = {i.name for i in model_proto.graph.input} - {
        i.name for i in model_proto.graph.initializer}
    problems: list[str] = []
    for node in model_proto.graph.node:
        if node.op_type == "BatchNormalization":
            for attr in node.attribute:
                if attr.name == "training_mode" and attr.i == 1:
                    problems.append(f"{node.name or node.op_type}: training-mode "
                                    "BatchNormalization")
        idx = _WEIGHT_CONSUMERS.get(node.op_type)
        if idx is None or len(node.input) <= idx:
            continue
        seen: set[str] = set()
        stack = [node.input[idx]]
        math_node = None
        from_input = False
        while stack and not from_input:
            name = stack.pop()
            if name in graph_inputs:
                from_input = True
            src = producers.get(name)
            if src is None or name in seen:
                continue
            seen.add(name)
            if src.op_type in _WEIGHT_MATH and math_node is None:
                math_node = src
            stack.extend(src.input)
        if math_node is not None and not from_input:
            problems.append(f"{node.name or node.op_type}: weight computed by "
                            f"{math_node.op_type} ({math_node.name or math_node.output[0]})")
    return problems


def trace_batch(config: ExportConfig) -> int | None:
    """The batch size the exporter traces at: the shapes' own batch, except that a dynamic batch
    is never traced at 1 (:data:`DYNAMIC_TRACE_BATCH` instead). ``None``: the shapes' batch."""
    if config.dynamic_batch and any(s[0] == 1 for s in config.input_shapes):
        return max(DYNAMIC_TRACE_BATCH, *(s[0] for s in config.input_shapes))
    return None


def _run_at(model: nn.Module, config: ExportConfig, batch: int | None) -> None:
    """Run the model once on the example inputs at ``batch`` (``None``: the shapes' own batch);
    a failure becomes a one-line :class:`UsageError` naming the shapes."""
    try:
        with torch.no_grad():
            model(*config.example_inputs(batch))
    except Exception as exc:  # noqa: BLE001 - any failure means the shapes do not fit
        reason = dependency_reason(exc, 200)
        shapes = " ".join(",".join(map(str, s)) for s in config.input_shapes)
        if batch is None:
            raise UsageError(f"`input_shape` {shapes} does not fit the model "
                             f"{_model_name(model)}: {reason}") from None
        raise UsageError(f"`dynamic_batch=True`: the model {_model_name(model)} does not run at "
                         f"batch {batch} (`input_shape` {shapes} with that batch): {reason}"
                         ) from None


def export_onnx(model: nn.Module, path: str | os.PathLike[str], config: ExportConfig, *,
                force: bool = False, allow_residue: bool = False) -> ExportResult:
    """Export a plain model with ``torch.onnx.export`` and check the file.

    The file is written to a temporary directory beside ``path`` and moved into place only after
    ``onnx.checker`` (full check) passes and the graph holds no WS residue. With a dynamic batch
    the model is traced at batch :data:`DYNAMIC_TRACE_BATCH` when the shapes say 1 (the exporter
    would specialize a size-1 batch); check parity at the batch sizes you serve. The exporter's
    log output is silenced and its errors come back as one line without colour codes.

    Args:
        model: the folded model (export runs it in eval mode).
        path: the ``.onnx`` file to write (external data beside it as ``<name>.data``).
        config: shapes, dynamic batch, opset, external data.
        force: allow replacing an existing file.
        allow_residue: write even if weights are still computed in the graph.

    Returns:
        An :class:`ExportResult` with the op histogram.

    Raises:
        UsageError: shapes that do not fit, unwritable target.
        OutputExistsError: ``path`` exists and not ``force``.
        ParityFailure: the graph still computes weights (WS residue).
        WsconvertError: the exporter or the checker failed.
    """
    import onnx

    target = Path(path)
    if target.exists() and not force:
        raise OutputExistsError(f"{target}: already exists (pass `force=True` to overwrite)")
    if not target.parent.is_dir():
        raise UsageError(f"{target}: output directory {target.parent} does not exist")
    model = model.eval()
    _run_at(model, config, None)  # shapes that do not fit say so before any file is made
    inputs = config.example_inputs(trace_batch(config))
    n_inputs = len(inputs)
    input_names = [f"input_{i}" for i in range(n_inputs)] if n_inputs > 1 else ["input"]
    external = (config.external_data if config.external_data is not None
                else _param_bytes(model) > MAX_PROTO_BYTES * 0.9)
    dynamic_shapes = None
    if config.dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise UsageError(f"{target}: cannot write to {target.parent} ({exc.strerror})") from None
    try:
        tmp = tmp_dir / target.name
        failure = None
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(model, inputs, str(tmp), dynamo=True,
                                  opset_version=config.opset, input_names=input_names,
                                  dynamic_shapes=dynamic_shapes, external_data=external)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types
            failure = dependency_reason(exc)
        if failure is not None:
            # Outside the handler, so that the probe's own error does not chain the exporter's.
            # The exporter ran the model at the trace batch: one that cannot run there says so.
            if trace_batch(config) is not None:
                _run_at(model, config, trace_batch(config))
            raise WsconvertError(f"{_model_name(model)}: ONNX export failed: {failure}")
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:  # noqa: BLE001 - checker errors are several types
            raise WsconvertError(f"{_model_name(model)}: exported graph fails onnx.checker: "
                                 f"{dependency_reason(exc)}") from None
        proto = onnx.load(str(tmp), load_external_data=False)
        residue = graph_residue(proto)
        if residue and not allow_residue:
            raise ParityFailure("exported graph still computes weights (WS residue): "
                                + "; ".join(residue[:3]))
        hist = dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))
        files = []
        for f in sorted(tmp_dir.iterdir()):
            final = target.parent / f.name
            if final != target and final.exists() and not force:
                raise OutputExistsError(f"{final}: already exists (pass `force=True` to overwrite)")
            files.append(final)
        for f in sorted(tmp_dir.iterdir()):
            os.replace(f, target.parent / f.name)
        return ExportResult(target, config.opset, [i.name for i in proto.graph.input],
                            [o.name for o in proto.graph.output], hist, external, files)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
