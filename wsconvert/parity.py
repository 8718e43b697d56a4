"""Numerical parity between a PyTorch reference and its ONNX export, as a CI gate.

Two stages, reported separately: ``fold`` (the folded PyTorch model against the WS reference) and
``export`` (onnxruntime against the folded PyTorch model). Every output of every input set is
compared elementwise with ``|got - ref| <= atol + rtol * |ref|``; a case passes when every element
does. The report carries max abs / max rel / mean abs error, the share of elements out of
tolerance and the cosine similarity per output, and renders as JSON or JUnit XML.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import torch
from torch import Tensor, nn

from wsconvert.defaults import GATE_ATOL, GATE_RTOL
from wsconvert.errors import CheckpointError, UsageError
from wsconvert.io.atomic import save_state_dict, write_text
from wsconvert.io.inputs import InputSet
from wsconvert.io.inputs import load_inputs as _load_input_sets
from wsconvert.validate import check_gate_options, parse_batch_sizes

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "InputSet",
    "OutputComparison",
    "ParityReport",
    "check_parity",
    "compare",
    "load_inputs",
    "make_inputs",
    "onnx_inputs",
    "save_failing_inputs",
]

# fp32 defaults (wsconvert.defaults); see docs/parity.md for the measurements behind them.
DEFAULT_ATOL = GATE_ATOL
DEFAULT_RTOL = GATE_RTOL


@dataclass(frozen=True)
class OutputComparison:
    """One output of one input set at one stage."""

    stage: str
    input_set: str
    output: str
    passed: bool
    ref_shape: tuple[int, ...]
    got_shape: tuple[int, ...]
    ref_dtype: str
    got_dtype: str
    max_abs: float = math.nan
    max_rel: float = math.nan
    mean_abs: float = math.nan
    frac_out: float = math.nan
    cosine: float = math.nan
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref_shape"], d["got_shape"] = list(self.ref_shape), list(self.got_shape)
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


@dataclass
class ParityReport:
    """Every comparison, the tolerances, and the gate decision (:meth:`passed`)."""

    atol: float
    rtol: float
    comparisons: list[OutputComparison] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def passed(self) -> bool:
        """The gate: every output of every input set within tolerance at every stage."""
        return bool(self.comparisons) and all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> list[OutputComparison]:
        return [c for c in self.comparisons if not c.passed]

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(c.stage for c in self.comparisons))

    def stage_summary(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for stage in self.stages:
            cs = [c for c in self.comparisons if c.stage == stage]
            finite = [c for c in cs if not math.isnan(c.max_abs)]
            out[stage] = {
                "cases": len(cs), "failed": sum(not c.passed for c in cs),
                "max_abs": max((c.max_abs for c in finite), default=None),
                "max_rel": max((c.max_rel for c in finite), default=None),
                "min_cosine": min((c.cosine for c in finite), default=None),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed(), "atol": self.atol, "rtol": self.rtol,
                "stages": self.stage_summary(), **self.meta,
                "comparisons": [c.to_dict() for c in self.comparisons]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_junit(self) -> str:
        """JUnit XML: one test case per output per input set per stage."""
        suite = ET.Element("testsuite", name="wsconvert.parity", tests=str(len(self.comparisons)),
                           failures=str(len(self.failures)), errors="0")
        for c in self.comparisons:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{c.stage}.{c.input_set}",
                                 name=c.output, time="0")
            detail = (f"max_abs={c.max_abs:.3g} max_rel={c.max_rel:.3g} mean_abs={c.mean_abs:.3g} "
                      f"frac_out={c.frac_out:.3g} cosine={c.cosine:.8f} atol={self.atol:g} "
                      f"rtol={self.rtol:g}")
            if c.passed:
                ET.SubElement(case, "system-out").text = detail
            else:
                fail = ET.SubElement(case, "failure", message=c.reason or "out of tolerance",
                                     type="ParityFailure")
                fail.text = detail
        root = ET.Element("testsuites")
        root.append(suite)
        ET.indent(root)
        return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def make_inputs(shapes: Sequence[tuple[int, ...]], seeds: int = 1,
                batch_sizes: Sequence[int] | None = None,
                dtype: torch.dtype = torch.float32) -> list[InputSet]:
    """Seeded standard-normal inputs: one set per (seed, batch size).

    Raises:
        UsageError: ``seeds`` < 1 or a batch size < 1.
    """
    check_gate_options(seeds, 0.0, 0.0)
    sizes = parse_batch_sizes(batch_sizes)
    batches: list[int | None] = list(sizes) if sizes else [None]
    sets = []
    for seed in range(seeds):
        for b in batches:
            g = torch.Generator().manual_seed(seed)
            tensors = tuple(torch.randn((b or s[0], *s[1:]), generator=g, dtype=dtype)
                            for s in shapes)
            sets.append(InputSet(f"seed{seed}" + (f"-b{b}" if b else ""), tensors))
    return sets


def load_inputs(path: str | os.PathLike[str]) -> list[InputSet]:
    """Real samples from a file: see :func:`wsconvert.io.inputs.load_inputs` for the forms.

    Raises:
        InputsError: unreadable or not tensors.
    """
    return _load_input_sets(path)


def save_failing_inputs(report: ParityReport, inputs: Sequence[InputSet],
                        directory: str | os.PathLike[str]) -> list[Path]:
    """Write each failing input set as ``<name>.pt`` (a tuple of tensors) plus the report."""
    failing = {c.input_set for c in report.failures}
    if not failing:
        return []
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = [save_state_dict(s.tensors, d / f"{s.name}.pt", force=True)
               for s in inputs if s.name in failing]
    return [*written, write_text(d / "report.json", report.to_json())]


def _flatten(out: Any) -> list[tuple[str, Tensor]]:
    from torch.utils._pytree import keystr, tree_flatten_with_path

    leaves, _ = tree_flatten_with_path(out)
    if len(leaves) == 1 and not leaves[0][0]:
        return [("output", leaves[0][1])]
    return [(f"output{keystr(path)}", v) for path, v in leaves if isinstance(v, Tensor)]


def compare(stage: str, input_set: str, name: str, ref: Tensor, got: Tensor, atol: float,
            rtol: float) -> OutputComparison:
    """Elementwise comparison of one output, in float64."""
    base: dict[str, Any] = {"stage": stage, "input_set": input_set, "output": name,
            "ref_shape": tuple(ref.shape), "got_shape": tuple(got.shape),
            "ref_dtype": str(ref.dtype).replace("torch.", ""),
            "got_dtype": str(got.dtype).replace("torch.", "")}
    if ref.shape != got.shape:
        return OutputComparison(passed=False, reason="shape mismatch", **base)
    if ref.numel() == 0:
        return OutputComparison(passed=True, max_abs=0.0, max_rel=0.0, mean_abs=0.0, frac_out=0.0,
                                cosine=1.0, **base)
    r, g = ref.detach().double(), got.detach().double()
    nonfinite = [side for side, t in (("reference", r), ("candidate", g))
                 if not bool(torch.isfinite(t).all())]
    same_nonfinite = (r == g) | (r.isnan() & g.isnan())
    diff = (r - g).abs().where(~same_nonfinite, torch.zeros_like(r))
    ok = (diff <= atol + rtol * r.abs()) | same_nonfinite
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / r.abs())
    rf, gf = r.nan_to_num(0.0, 0.0, 0.0).flatten(), g.nan_to_num(0.0, 0.0, 0.0).flatten()
    norms = rf.norm() * gf.norm()
    cosine = float((rf @ gf) / norms) if norms > 0 else float(torch.equal(rf, gf))
    passed = bool(ok.all()) and not nonfinite
    reason = "" if passed else f"{int((~ok).sum())} of {ok.numel()} elements out of tolerance"
    if nonfinite:  # NaN equal to NaN is no evidence the model works
        reason = f"non-finite values (NaN or inf) in the {' and '.join(nonfinite)} output"
    return OutputComparison(
        passed=passed, max_abs=float(diff.max()), max_rel=float(rel.max()),
        mean_abs=float(diff.mean()), frac_out=float((~ok).double().mean()), cosine=cosine,
        reason=reason, **base)


def _compare_all(report: ParityReport, stage: str, input_set: str, ref: list[tuple[str, Tensor]],
                 got: list[Tensor]) -> None:
    if len(ref) != len(got):
        for name, r in ref:
            report.comparisons.append(OutputComparison(
                stage, input_set, name, False, tuple(r.shape), (), str(r.dtype), "",
                reason=f"output count differs: reference {len(ref)}, candidate {len(got)}"))
        return
    for (name, r), g in zip(ref, got, strict=True):
        report.comparisons.append(compare(stage, input_set, name, r, g, report.atol, report.rtol))


def onnx_inputs(path: str | os.PathLike[str]) -> list[tuple[str, list[int | str]]]:
    """Graph inputs (not initializers) with their dims (``str`` for symbolic ones).

    Raises:
        CheckpointError: not a readable ONNX file.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such ONNX file")
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types
        raise CheckpointError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node:
        raise CheckpointError(f"{p}: not a readable ONNX model (empty graph)")
    init = {i.name for i in proto.graph.initializer}
    result = []
    for i in proto.graph.input:
        if i.name in init:
            continue
        dims: list[int | str] = [d.dim_param or d.dim_value or "?" for d in
                                 i.type.tensor_type.shape.dim]
        result.append((i.name, dims))
    return result


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({msg[:200]})") from None


def check_parity(onnx_path: str | os.PathLike[str], reference: nn.Module,
                 inputs: Sequence[InputSet], *, folded: nn.Module | None = None,
                 atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL) -> ParityReport:
    """Run the reference, the folded model (if given) and onnxruntime on every input set.

    Args:
        onnx_path: the exported file.
        reference: the WS model (or the plain model, for a plain checkpoint); run in eval mode.
        inputs: input sets; see :func:`make_inputs` / :func:`load_inputs`.
        folded: the folded PyTorch model; adds the ``fold`` stage and makes it the ``export``
            stage's reference.
        atol, rtol: elementwise tolerance ``|got - ref| <= atol + rtol * |ref|``.

    Returns:
        A :class:`ParityReport`; ``report.passed()`` is the gate.

    Raises:
        UsageError: negative tolerances, inputs that do not match the graph's inputs.
        CheckpointError: the ONNX file cannot be loaded by onnxruntime.

    Example:
        >>> report = check_parity("model.onnx", ws_model, make_inputs([(1, 3, 224, 224)], 3))
        ... # doctest: +SKIP
        >>> sys.exit(0 if report.passed() else 1)                   # doctest: +SKIP
    """
    check_gate_options(1, atol, rtol)
    path = Path(onnx_path)
    graph_inputs = onnx_inputs(path)
    session = _onnx_session(path)
    report = ParityReport(atol, rtol, meta={"onnx": str(path),
                                            "input_sets": [s.name for s in inputs]})
    reference.eval()
    if folded is not None:
        folded.eval()
    for s in inputs:
        if len(s.tensors) != len(graph_inputs):
            raise UsageError(f"input set {s.name} has {len(s.tensors)} tensor(s); the graph "
                             f"takes {len(graph_inputs)}")
        with torch.no_grad():
            try:
                ref = _flatten(reference(*s.tensors))
            except Exception as exc:  # noqa: BLE001 - shapes that do not fit the model
                raise UsageError(f"input set {s.name} does not fit the model: "
                                 f"{str(exc).splitlines()[0][:200]}") from None
            base = ref
            if folded is not None:
                base = _flatten(folded(*s.tensors))
                _compare_all(report, "fold", s.name, ref, [t for _, t in base])
        feed = {name: t.numpy() for (name, _), t in zip(graph_inputs, s.tensors, strict=True)}
        try:
            outs = session.run(None, feed)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UsageError(f"onnxruntime rejected input set {s.name}: {msg[:200]}") from None
        _compare_all(report, "export", s.name, base, [torch.from_numpy(o) for o in outs])
    return report
