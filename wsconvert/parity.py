"""Numerical parity between a PyTorch reference and its ONNX export, as a CI gate.

Two stages, reported separately: ``fold`` (the folded PyTorch model against the WS reference) and
``export`` (onnxruntime against the folded PyTorch model). Every output of every input set is
compared elementwise with ``|got - ref| <= atol + rtol * |ref|``; a case passes when every element
does (a NaN or inf never does). The report carries max abs / max rel / mean abs error, the share of
elements out of tolerance, the cosine similarity, the smallest atol and rtol that would have
passed and, for classifier-like outputs, top-1 / top-5 agreement, per output; on failure (or when
asked) the first diverging module of each failing stage (:mod:`wsconvert.locate`). It renders as
plain text, JSON or JUnit XML.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from xml.etree import ElementTree as ET

import torch
from torch import Tensor, nn

from wsconvert._json import dumps
from wsconvert.defaults import GATE_ATOL, GATE_RTOL
from wsconvert.errors import CheckpointError, UsageError, WsconvertError
from wsconvert.io.atomic import save_state_dict, write_text
from wsconvert.io.inputs import InputSet
from wsconvert.io.inputs import load_inputs as _load_input_sets
from wsconvert.validate import check_gate_options, parse_batch_sizes

if TYPE_CHECKING:
    from wsconvert.locate import Localization

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "LOCATE_MODES",
    "InputSet",
    "OutputComparison",
    "ParityReport",
    "check_parity",
    "compare",
    "graph_input_shapes",
    "load_inputs",
    "make_inputs",
    "onnx_inputs",
    "save_failing_inputs",
]

# fp32 defaults (wsconvert.defaults); see docs/parity.md for the measurements behind them.
DEFAULT_ATOL = GATE_ATOL
DEFAULT_RTOL = GATE_RTOL
LOCATE_MODES = ("on_failure", "always", "never")
LocateMode = Literal["on_failure", "always", "never"]


@dataclass(frozen=True)
class OutputComparison:
    """One output of one input set at one stage.

    ``min_atol`` is the smallest atol that passes this case at the report's rtol, ``min_rtol`` the
    smallest rtol at the report's atol (``inf``: none does, e.g. a NaN or inf, or a non-zero error
    on a zero reference with atol 0). ``top1`` / ``top5``: for a classifier-like output (2-D,
    more than one class), the share of samples whose top-1 class (whose set of top-5 classes,
    with more than 5 classes) matches the reference's; NaN otherwise.
    """

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
    min_atol: float = math.nan
    min_rtol: float = math.nan
    top1: float = math.nan
    top5: float = math.nan

    @property
    def classifier(self) -> bool:
        return not math.isnan(self.top1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref_shape"], d["got_shape"] = list(self.ref_shape), list(self.got_shape)
        return {k: _json_float(v) for k, v in d.items()}


def _json_float(v: Any) -> Any:
    """NaN (no value) as ``None``, infinities as ``"inf"`` / ``"-inf"``: strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


@dataclass
class ParityReport:
    """Every comparison, the tolerances, and the gate decision (:meth:`passed`)."""

    atol: float
    rtol: float
    comparisons: list[OutputComparison] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    min_top1_agreement: float | None = None
    localizations: list[Localization] = field(default_factory=list)

    def passed(self) -> bool:
        """The gate: every output of every input set within tolerance (and, with
        ``min_top1_agreement``, top-1 agreement at least that) at every stage."""
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
            tops = [c.top1 for c in cs if c.classifier]
            out[stage] = {
                "cases": len(cs), "failed": sum(not c.passed for c in cs),
                "max_abs": max((c.max_abs for c in finite), default=None),
                "max_rel": max((c.max_rel for c in finite), default=None),
                "min_cosine": min((c.cosine for c in finite), default=None),
                "min_atol": max((c.min_atol for c in cs if not math.isnan(c.min_atol)),
                                default=None),
                "min_rtol": max((c.min_rtol for c in cs if not math.isnan(c.min_rtol)),
                                default=None),
                "min_top1": min(tops, default=None),
            }
        return out

    def located(self, stage: str, input_set: str | None = None) -> Localization | None:
        """The localization of ``stage`` (on ``input_set``, if given), if one was run."""
        for loc in self.localizations:
            if loc.stage == stage and input_set in (None, loc.input_set):
                return loc
        return None

    def to_dict(self) -> dict[str, Any]:
        stages = {k: {kk: _json_float(vv) for kk, vv in v.items()}
                  for k, v in self.stage_summary().items()}
        return {"passed": self.passed(), "atol": self.atol, "rtol": self.rtol,
                "min_top1_agreement": self.min_top1_agreement, "stages": stages, **self.meta,
                "comparisons": [c.to_dict() for c in self.comparisons],
                "located": [loc.to_dict() for loc in self.localizations]}

    def to_text(self) -> str:
        """The readable plain-text report: verdict, one line per case, located divergences."""
        verdict = "holds" if self.passed() else "FAILS"
        lines = [f"parity {verdict}: {len(self.comparisons) - len(self.failures)} of "
                 f"{len(self.comparisons)} case(s) pass (|got - ref| <= {self.atol:g} + "
                 f"{self.rtol:g} * |ref|"
                 + (f", top-1 agreement >= {self.min_top1_agreement:g}"
                    if self.min_top1_agreement is not None else "") + ")"]
        header = ("stage", "inputs", "output", "max abs", "max rel", "out of tol", "cosine",
                  "min atol", "min rtol", "top-1", "result")
        rows = [header, *([c.stage, c.input_set, c.output, fmt(c.max_abs), fmt(c.max_rel),
                           fmt(100 * c.frac_out) + "%", fmt(c.cosine, ".7f"),
                           fmt_up(c.min_atol), fmt_up(c.min_rtol), fmt(c.top1, ".3f"),
                           "pass" if c.passed else f"FAIL {c.reason}"]
                          for c in self.comparisons)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1]
                  for r in rows]
        if self.localizations:
            lines.append("where it diverges:")
            lines += ["  " + loc.describe().replace("\n", "\n  ") for loc in self.localizations]
        return "\n".join(lines)

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def to_junit(self) -> str:
        """JUnit XML: one test case per output per input set per stage."""
        suite = ET.Element("testsuite", name="wsconvert.parity", tests=str(len(self.comparisons)),
                           failures=str(len(self.failures)), errors="0")
        for c in self.comparisons:
            case = ET.SubElement(suite, "testcase", classname=f"parity.{c.stage}.{c.input_set}",
                                 name=c.output, time="0")
            detail = (f"max_abs={c.max_abs:.3g} max_rel={c.max_rel:.3g} mean_abs={c.mean_abs:.3g} "
                      f"frac_out={c.frac_out:.3g} cosine={c.cosine:.8f} atol={self.atol:g} "
                      f"rtol={self.rtol:g} min_atol={fmt_up(c.min_atol)} "
                      f"min_rtol={fmt_up(c.min_rtol)}")
            if c.classifier:
                detail += f" top1={c.top1:.4g}" + ("" if math.isnan(c.top5) else
                                                   f" top5={c.top5:.4g}")
            loc = self.located(c.stage, c.input_set)
            if loc is not None:
                detail += "\n" + loc.describe()
                if loc.divergence is not None:
                    props = ET.SubElement(case, "properties")
                    ET.SubElement(props, "property", name="diverges_at",
                                  value=loc.divergence.module or loc.divergence.where)
                    ET.SubElement(props, "property", name="diverges_at_onnx_ops", value=",".join(
                        sorted({op for _, op in loc.divergence.nodes})))
            if c.passed:
                ET.SubElement(case, "system-out").text = detail
            else:
                message = c.reason or "out of tolerance"
                if loc is not None and loc.divergence is not None:
                    message += f"; first divergence at {loc.divergence.where}"
                fail = ET.SubElement(case, "failure", message=message, type="ParityFailure")
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


def fmt(value: float | None, spec: str = ".3g") -> str:
    """A metric, or ``n/a`` where none exists (shape or output-count mismatch, not a classifier)."""
    return "n/a" if value is None or value != value else format(value, spec)


def fmt_up(value: float | None) -> str:
    """A tolerance to 3 significant digits, rounded up: setting the printed value passes."""
    if value is None or value != value:
        return "n/a"
    if value <= 0 or math.isinf(value):
        return format(value, "g")
    text = format(value, ".3g")
    while float(text) < value:
        step = 10.0 ** (math.floor(math.log10(float(text))) - 2)
        text = format(float(text) + step, ".3g")
    return text


def _within(diff: Tensor, scale: Tensor, same: Tensor, finite: Tensor, atol: float,
            rtol: float) -> Tensor:
    """The gate's elementwise test: equal non-finite values pass; otherwise both finite and
    ``|got - ref| <= atol + rtol * |ref|``."""
    return same | (finite & (diff <= atol + rtol * scale))


def _smallest(passes: Any, estimate: float) -> float:
    """The smallest float that ``passes`` (monotone), from an estimate within a few ulps."""
    if math.isinf(estimate):
        return estimate
    value = max(estimate, 0.0)
    for _ in range(64):
        if passes(value):
            break
        value = math.nextafter(value, math.inf)
    else:
        return math.inf
    for _ in range(64):
        lower = math.nextafter(value, 0.0)
        if value == 0.0 or not passes(lower):
            break
        value = lower
    return value


def _min_tolerances(diff: Tensor, scale: Tensor, finite: Tensor, atol: float,
                    rtol: float) -> tuple[float, float]:
    """The smallest atol passing at ``rtol`` and the smallest rtol passing at ``atol``.

    The float64 estimate (``max(diff - rtol * |ref|)``, ``max((diff - atol) / |ref|)``) is exact up
    to rounding; it is settled ulp by ulp with the gate's own test, on the elements within a
    relative 1e-9 of the estimate only (every other element passes with a margin far above
    float64 rounding). Equal infinities pass at any tolerance and are left out.
    """
    if not bool(finite.all()):
        diff, scale = diff[finite], scale[finite]
    if diff.numel() == 0:
        return 0.0, 0.0
    need = diff - rtol * scale
    est_a = max(0.0, float(need.max()))
    margin = 1e-9 * (float(diff.max()) + rtol * float(scale.max()) + est_a)
    keep = need >= est_a - margin
    d_a, s_a = diff[keep], scale[keep]
    min_atol = _smallest(lambda a: bool((d_a <= a + rtol * s_a).all()), est_a)
    over = diff - atol
    need = torch.where(over > 0, over / scale, torch.zeros_like(over))  # the rest pass at any rtol
    est_r = float(need.max())
    keep = (need >= est_r * (1 - 1e-9)) & (over > 0)
    d_r, s_r = diff[keep], scale[keep]
    min_rtol = _smallest(lambda t: bool((d_r <= atol + t * s_r).all()), est_r)
    return min_atol, min_rtol


def _agreement(r: Tensor, g: Tensor) -> tuple[float, float]:
    """Top-1 and top-5 agreement over the rows of a ``(samples, classes)`` pair; a row with a
    NaN never agrees. Top-5 (NaN with 5 classes or fewer) compares the sets of five classes."""
    bad = r.isnan().any(-1) | g.isnan().any(-1)
    top1 = (r.argmax(-1) == g.argmax(-1)) & ~bad
    top5 = math.nan
    if r.shape[-1] > 5:
        rk = r.topk(5, -1).indices.sort(-1).values
        gk = g.topk(5, -1).indices.sort(-1).values
        top5 = float(((rk == gk).all(-1) & ~bad).double().mean())
    return float(top1.double().mean()), top5


def within_tolerance(ref: Tensor, got: Tensor, atol: float, rtol: float) -> bool:
    """Whether :func:`compare` passes ``got`` against ``ref`` on tolerance alone; a few float64
    passes instead of all the metrics. Only decides "passes" on its own: a ``False`` (which
    includes equal infinities, that :func:`compare` passes) needs :func:`compare` for the rest."""
    if ref.shape != got.shape:
        return False
    if ref.numel() == 0:
        return True
    r, g = ref.detach().double(), got.detach().double()
    diff = (r - g).abs()
    # A finite diff means both values are finite; NaN fails the comparison itself.
    return bool((diff <= atol + rtol * r.abs()).all()) and float(diff.max()) < math.inf


def compare(stage: str, input_set: str, name: str, ref: Tensor, got: Tensor, atol: float,
            rtol: float, *, min_top1: float | None = None) -> OutputComparison:
    """Elementwise comparison of one output, in float64.

    A NaN or inf anywhere (reference or candidate, even at the same place on both) fails the
    case, with ``min_atol`` / ``min_rtol`` of ``inf``. With ``min_top1``, a classifier-like
    output (2-D, more than one class) also needs top-1 agreement of at least that.
    """
    base: dict[str, Any] = {"stage": stage, "input_set": input_set, "output": name,
            "ref_shape": tuple(ref.shape), "got_shape": tuple(got.shape),
            "ref_dtype": str(ref.dtype).replace("torch.", ""),
            "got_dtype": str(got.dtype).replace("torch.", "")}
    if ref.shape != got.shape:
        return OutputComparison(passed=False, reason="shape mismatch", min_atol=math.inf,
                                min_rtol=math.inf, **base)
    if ref.numel() == 0:
        return OutputComparison(passed=True, max_abs=0.0, max_rel=0.0, mean_abs=0.0, frac_out=0.0,
                                cosine=1.0, min_atol=0.0, min_rtol=0.0, **base)
    r, g = ref.detach().double(), got.detach().double()
    nonfinite = [side for side, t in (("reference", r), ("candidate", g))
                 if not bool(torch.isfinite(t).all())]
    same = (r == g) & r.isinf()
    finite = r.isfinite() & g.isfinite()
    diff = torch.where(same, torch.zeros_like(r), (r - g).abs())
    scale = r.abs()
    ok = _within(diff, scale, same, finite, atol, rtol)
    rel = torch.where(diff == 0, torch.zeros_like(diff), diff / scale)
    rf, gf = r.nan_to_num(0.0, 0.0, 0.0).flatten(), g.nan_to_num(0.0, 0.0, 0.0).flatten()
    norms = rf.norm() * gf.norm()
    cosine = float((rf @ gf) / norms) if norms > 0 else float(torch.equal(rf, gf))
    if nonfinite:
        min_atol = min_rtol = math.inf
    else:
        min_atol, min_rtol = _min_tolerances(diff, scale, finite, atol, rtol)
    passed = bool(ok.all()) and not nonfinite
    reason = "" if passed else f"{int((~ok).sum())} of {ok.numel()} elements out of tolerance"
    if nonfinite:  # NaN equal to NaN is no evidence the model works
        reason = (f"non-finite values (NaN or inf) in the {' and '.join(nonfinite)} output; "
                  "they never pass")
    top1 = top5 = math.nan
    if r.dim() == 2 and r.shape[-1] > 1:
        top1, top5 = _agreement(r, g)
        if min_top1 is not None and top1 < min_top1:
            passed = False
            reason = "; ".join(filter(None, [reason, f"top-1 agreement {top1:.4g} < "
                                                     f"{min_top1:g}"]))
    return OutputComparison(
        passed=passed, max_abs=float(diff.nan_to_num(math.inf, math.inf).max()),
        max_rel=float(rel.nan_to_num(math.inf, math.inf).max()), mean_abs=float(diff.mean()),
        frac_out=float((~ok).double().mean()), cosine=cosine, reason=reason,
        min_atol=min_atol, min_rtol=min_rtol, top1=top1, top5=top5, **base)


def _compare_all(report: ParityReport, stage: str, input_set: str, ref: list[tuple[str, Tensor]],
                 got: list[Tensor]) -> None:
    top1 = report.min_top1_agreement
    if len(ref) != len(got):
        for name, r in ref:
            report.comparisons.append(OutputComparison(
                stage, input_set, name, False, tuple(r.shape), (), str(r.dtype), "",
                reason=f"output count differs: reference {len(ref)}, candidate {len(got)}",
                min_atol=math.inf, min_rtol=math.inf))
        return
    for (name, r), g in zip(ref, got, strict=True):
        report.comparisons.append(compare(stage, input_set, name, r, g, report.atol, report.rtol,
                                          min_top1=top1))


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


def graph_input_shapes(onnx_path: str | os.PathLike[str],
                       input_shape: str | Sequence[str] | None = None, *,
                       graph_inputs: list[tuple[str, list[int | str]]] | None = None
                       ) -> tuple[list[tuple[int, ...]], bool]:
    """The shapes to check (``input_shape`` parsed, else the graph's with a symbolic batch as 1)
    and whether the graph's batch is dynamic. ``graph_inputs``: :func:`onnx_inputs` of the file,
    when the caller has read it already.

    Raises:
        CheckpointError: not a readable ONNX file.
        UsageError: a malformed ``input_shape``, or a symbolic dimension other than the batch.
    """
    from wsconvert.io.inputs import parse_shapes

    if graph_inputs is None:
        graph_inputs = onnx_inputs(onnx_path)
    dynamic = bool(graph_inputs) and all(isinstance(dims[0], str) for _, dims in graph_inputs
                                         if dims)
    if input_shape:
        return list(parse_shapes(input_shape)), dynamic
    shapes = []
    for name, dims in graph_inputs:
        concrete = [1 if i == 0 and isinstance(d, str) else d for i, d in enumerate(dims)]
        if any(isinstance(d, str) for d in concrete):
            raise UsageError(f"{onnx_path}: input {name} has symbolic dims {dims}; pass "
                             "`input_shape`")
        shapes.append(tuple(int(d) for d in concrete))
    return shapes, dynamic


def _ort_message(exc: BaseException, limit: int = 400) -> str:
    """onnxruntime's message as one line: it puts what is wrong on its second line ("index: 2
    Got: 16 Expected: 8"), so every line is kept, joined."""
    text = " ".join(str(exc).split())
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _onnx_session(path: Path) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({_ort_message(exc)})"
                              ) from None


def check_parity(onnx_path: str | os.PathLike[str], reference: nn.Module,
                 inputs: Sequence[InputSet], *, folded: nn.Module | None = None,
                 atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
                 min_top1_agreement: float | None = None,
                 locate: LocateMode = "on_failure") -> ParityReport:
    """Run the reference, the folded model (if given) and onnxruntime on every input set.

    Args:
        onnx_path: the exported file.
        reference: the WS model (or the plain model, for a plain checkpoint); run in eval mode.
        inputs: input sets; see :func:`make_inputs` / :func:`load_inputs`.
        folded: the folded PyTorch model; adds the ``fold`` stage and makes it the ``export``
            stage's reference.
        atol, rtol: elementwise tolerance ``|got - ref| <= atol + rtol * |ref|``.
        min_top1_agreement: also require, of every classifier-like output (2-D, more than one
            class), at least this share of samples with the reference's top-1 class.
        locate: find the first diverging module of each failing stage (``"on_failure"``), of
            every stage (``"always"``), or not at all (``"never"``); see :mod:`wsconvert.locate`.
            It runs on the first failing input set (the first set when the stage passes).

    Returns:
        A :class:`ParityReport`; ``report.passed()`` is the gate, ``report.localizations`` where
        it diverges.

    Raises:
        UsageError: negative tolerances, ``min_top1_agreement`` outside [0, 1] or no
            classifier-like output to apply it to, inputs that do not match the graph's inputs,
            ``locate="always"`` on a graph that cannot be mapped to modules while parity holds
            (when parity fails, why it could not be located is in the report instead).
        CheckpointError: the ONNX file cannot be loaded by onnxruntime.

    Example:
        >>> report = check_parity("model.onnx", ws_model, make_inputs([(1, 3, 224, 224)], 3))
        ... # doctest: +SKIP
        >>> sys.exit(0 if report.passed() else 1)                   # doctest: +SKIP
    """
    check_gate_options(1, atol, rtol)
    check_locate_options(min_top1_agreement, locate)
    path = Path(onnx_path)
    graph_inputs = onnx_inputs(path)
    session = _onnx_session(path)
    report = ParityReport(atol, rtol, meta={"onnx": str(path),
                                            "input_sets": [s.name for s in inputs]},
                          min_top1_agreement=min_top1_agreement)
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
            raise UsageError(f"onnxruntime rejected input set {s.name}: {_ort_message(exc)}"
                             ) from None
        _compare_all(report, "export", s.name, base, [torch.from_numpy(o) for o in outs])
    if min_top1_agreement is not None and not any(c.classifier for c in report.comparisons):
        raise UsageError("`min_top1_agreement`: no output is classifier-like (2-D, more than one "
                         "class)")
    if locate == "always" or (locate == "on_failure" and not report.passed()):
        report.localizations = locate_stages(report, path, reference, inputs, folded,
                                             strict=report.passed())
    return report


def check_locate_options(min_top1_agreement: float | None, locate: str) -> None:
    """Raises:
        UsageError: ``min_top1_agreement`` outside [0, 1], or an unknown ``locate`` mode.
    """
    if min_top1_agreement is not None and not 0 <= min_top1_agreement <= 1:
        raise UsageError(f"`min_top1_agreement` {min_top1_agreement:g}: want a share in [0, 1]")
    if locate not in LOCATE_MODES:
        raise UsageError(f"`locate` {locate!r}: want one of {', '.join(LOCATE_MODES)}")


def locate_stages(report: ParityReport, onnx_path: Path, reference: nn.Module,
                  inputs: Sequence[InputSet], folded: nn.Module | None, *,
                  strict: bool) -> list[Localization]:
    """Locate every failing stage of ``report`` (every stage when it passes), each on its first
    failing input set. A stage that cannot be located gets a note saying why; with ``strict``
    (parity holds, so there is nothing else to report) that is an error instead."""
    from wsconvert.locate import Localization, locate_export, locate_fold

    by_name = {s.name: s for s in inputs}
    result = []
    for stage in report.stages:
        cases = [c for c in report.comparisons if c.stage == stage]
        if report.failures and all(c.passed for c in cases):
            continue
        failing = [c.input_set for c in cases if not c.passed]
        inputs_set = by_name[failing[0] if failing else cases[0].input_set]
        try:
            if stage == "fold" and folded is not None:
                loc = locate_fold(reference, folded, inputs_set, atol=report.atol,
                                  rtol=report.rtol)
            else:
                loc = locate_export(onnx_path, folded if folded is not None else reference,
                                    inputs_set, atol=report.atol, rtol=report.rtol)
        except WsconvertError as exc:
            if strict:
                raise
            loc = Localization(stage, inputs_set.name, None, note=f"not located: {exc}")
        result.append(loc)
    return result
