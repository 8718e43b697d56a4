"""Where a parity failure starts: the first module whose output is out of tolerance.

Two stages, located separately, like the gate itself:

- ``export``: the PyTorch model that was exported against onnxruntime. Each ONNX node is mapped to
  the PyTorch module it came from by the scopes the exporter records on it
  (``torch.onnx.export(..., dynamo=True)`` writes ``pkg.torch.onnx.name_scopes`` into every node's
  ``metadata_props``); a node without them falls back to the module whose parameter it reads as an
  initializer (the TorchScript exporter names initializers after parameters). A module's ONNX
  output is the tensor its nodes produce for nodes outside it. Those tensors become extra graph
  outputs of an in-memory copy of the model, run once; the PyTorch side comes from forward hooks.
- ``fold``: the WS model against the folded model, both in PyTorch, module by module with hooks.

Module outputs are compared in execution order with the gate's elementwise test
(``|got - ref| <= atol + rtol * |ref|``); the first one out of tolerance is reported with its
metrics and, for the export stage, the ONNX nodes between it and the last tensors still within
tolerance (by name and op type) and the initializers they read. A divergence in code outside any
module (a function call in a ``forward``) is named by those ONNX nodes.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from wsconvert.errors import CheckpointError, UsageError

if TYPE_CHECKING:
    from wsconvert.parity import InputSet, OutputComparison

__all__ = ["Divergence", "Localization", "locate_export", "locate_fold", "module_scopes"]

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_NAMESPACE_KEY = "namespace"
_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_MAX_PROTO_BYTES = 2 * 1024**3 - 1


@dataclass(frozen=True)
class Divergence:
    """The first module (or, outside any module, the ONNX nodes) whose output is out of tolerance.

    ``module`` is the PyTorch module name (``layer3.1.conv2``), ``""`` when the divergence lies in
    code outside every module; ``nodes`` are ``(ONNX node name, op type)`` pairs (export stage
    only), ``initializers`` the graph constants those nodes read.
    """

    module: str
    module_type: str
    comparison: OutputComparison
    nodes: tuple[tuple[str, str], ...] = ()
    initializers: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        if self.module:
            return f"{self.module} ({self.module_type})"
        names = ", ".join(name for name, _ in self.nodes[:4]) or "?"
        return f"ONNX nodes outside any module: {names}"

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "module_type": self.module_type,
                "onnx_nodes": [{"name": n, "op_type": op} for n, op in self.nodes],
                "onnx_op_types": sorted({op for _, op in self.nodes}),
                "initializers": list(self.initializers),
                "metrics": self.comparison.to_dict()}


@dataclass(frozen=True)
class Localization:
    """The result of locating one stage on one input set."""

    stage: str
    input_set: str
    divergence: Divergence | None
    compared: int = 0
    note: str = ""
    skipped: tuple[str, ...] = field(default=(), repr=False)

    def describe(self) -> str:
        """Plain text, a few lines."""
        head = f"{self.stage} stage, input set {self.input_set}"
        if self.divergence is None:
            return f"{head}: {self.note or 'no module output out of tolerance'}"
        d, c = self.divergence, self.divergence.comparison
        lines = [f"{head}: first divergence at {d.where}",
                 f"  max abs {c.max_abs:.3g}, max rel {c.max_rel:.3g}, "
                 f"{100 * c.frac_out:.3g}% out of tolerance, cosine {c.cosine:.7f}"]
        if d.nodes:
            nodes = ", ".join(f"{n} ({op})" for n, op in d.nodes[:8])
            more = f" and {len(d.nodes) - 8} more" if len(d.nodes) > 8 else ""
            lines.append(f"  ONNX nodes: {nodes}{more}")
        if d.initializers:
            lines.append(f"  initializers: {', '.join(d.initializers[:8])}")
        lines.append(f"  {self.compared} module output(s) compared"
                     + (f"; {self.note}" if self.note else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "input_set": self.input_set,
                "divergence": self.divergence.to_dict() if self.divergence else None,
                "compared": self.compared, "note": self.note, "skipped": list(self.skipped)}


# -- PyTorch side -------------------------------------------------------------------------------

def _tensors(obj: Any) -> list[Tensor]:
    from torch.utils._pytree import tree_leaves

    return [t for t in tree_leaves(obj) if isinstance(t, Tensor)]


@contextmanager
def _recording(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, list[Tensor]]]:
    """Forward hooks on the named modules; yields ``name -> outputs`` (all calls, flattened,
    cloned so later in-place ops cannot change them), in the order the modules finished."""
    record: dict[str, list[Tensor]] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(_module: nn.Module, _args: Any, output: Any) -> None:
            record.setdefault(name, []).extend(t.detach().clone() for t in _tensors(output))
        return fn

    try:
        for name in names:
            handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
        yield record
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, inputs: InputSet, names: Sequence[str]) -> tuple[
        dict[str, list[Tensor]], list[Tensor]]:
    model.eval()
    with _recording(model, names) as record, torch.no_grad():
        out = _tensors(model(*inputs.tensors))
    return record, out


def _first_failure(stage: str, input_set: str, ordered: list[tuple[str, Tensor, Tensor]],
                   atol: float, rtol: float) -> tuple[int, OutputComparison] | None:
    from wsconvert.parity import compare, within_tolerance

    for i, (name, ref, got) in enumerate(ordered):
        if within_tolerance(ref, got, atol, rtol):
            continue  # the full metrics only for the module that is reported
        c = compare(stage, input_set, name or "output", ref, got, atol, rtol)
        if not c.passed:
            return i, c
    return None


def _comparable(ref: list[Tensor], got: list[Tensor]) -> bool:
    return len(ref) == len(got) and all(r.shape == g.shape for r, g in zip(ref, got, strict=True))


def locate_fold(reference: nn.Module, folded: nn.Module, inputs: InputSet, *, atol: float,
                rtol: float) -> Localization:
    """The first module whose output differs between the WS model and the folded model.

    Every module present under the same name in both models is hooked; modules are compared in
    the order the reference finished them. A conv whose BatchNorm was fused into it (the BN
    became ``nn.Identity``) is compared after the BN, where the two models agree again.
    """
    ref_names = dict(reference.named_modules())
    got_names = dict(folded.named_modules())
    names = [n for n in ref_names if n and n in got_names and ".parametrizations" not in n
             and not n.endswith("parametrizations")]
    bn_inputs: dict[str, Tensor] = {}
    handles = []
    for n in names:
        if isinstance(got_names[n], nn.Identity) and not isinstance(ref_names[n], nn.Identity):
            def pre(_m: nn.Module, args: Any, n: str = n) -> None:
                if args and isinstance(args[0], Tensor):
                    bn_inputs[n] = args[0]
            handles.append(ref_names[n].register_forward_pre_hook(pre))
    producers: dict[int, tuple[str, Tensor]] = {}  # the tensor is kept so its id stays unique

    def note_producer(name: str) -> Any:
        def fn(_m: nn.Module, _a: Any, output: Any) -> None:
            for t in _tensors(output):
                producers.setdefault(id(t), (name, t))
        return fn

    handles += [ref_names[n].register_forward_hook(note_producer(n)) for n in names]
    try:
        ref_rec, ref_out = _run(reference, inputs, names)
        fused = {producers[id(t)][0] for t in bn_inputs.values() if id(t) in producers}
    finally:
        for h in handles:
            h.remove()
    got_rec, got_out = _run(folded, inputs, names)
    ordered: list[tuple[str, Tensor, Tensor]] = []
    skipped = []
    for n in ref_rec:  # insertion order: the order the modules finished
        if n in fused:
            skipped.append(n)
            continue
        r, g = ref_rec[n], got_rec.get(n, [])
        if not _comparable(r, g):
            skipped.append(n)
            continue
        ordered.extend((n, a, b) for a, b in zip(r, g, strict=True))
    if _comparable(ref_out, got_out):
        ordered.extend(("", a, b) for a, b in zip(ref_out, got_out, strict=True))
    compared = len({n for n, _, _ in ordered if n})
    found = _first_failure("fold", inputs.name, ordered, atol, rtol)
    if found is None:
        return Localization("fold", inputs.name, None, compared,
                            "no module output out of tolerance", tuple(skipped))
    i, comp = found
    name = ordered[i][0]
    if not name:
        return Localization("fold", inputs.name, Divergence("", "", comp), compared,
                            "every module output is within tolerance; the model's own forward "
                            "code diverges", tuple(skipped))
    return Localization("fold", inputs.name,
                        Divergence(name, type(ref_names[name]).__name__, comp), compared,
                        "", tuple(skipped))


# -- ONNX side ----------------------------------------------------------------------------------

def _node_modules(node: Any) -> list[str] | None:
    """Module scopes recorded by the exporter, outermost first, root and op name dropped."""
    props = {p.key: p.value for p in node.metadata_props}
    text = props.get(_SCOPES_KEY)
    if text is not None:
        try:
            scopes = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            scopes = None
        if isinstance(scopes, list) and all(isinstance(s, str) for s in scopes):
            return [s for s in scopes[:-1] if s]
    text = props.get(_NAMESPACE_KEY)
    if text is not None:  # ": pkg.Net/layer1: pkg.Seq/layer1.0: pkg.Block/relu: aten.relu"
        parts = [p.split(":", 1)[0].strip() for p in text.split("/")]
        return [p for p in parts[:-1] if p]
    return None


def module_scopes(proto: Any, module_names: set[str] | None = None) -> tuple[
        dict[str, list[int]], bool]:
    """``module name -> indices of its ONNX nodes`` (a node counts for every enclosing module).

    Scopes come from the exporter's node metadata; a node without any falls back to the module
    whose parameter it reads (an initializer named ``<module>.<param>``), when ``module_names``
    is given. Returns the map and whether any node carried exporter metadata.
    """
    inits = {i.name for i in proto.graph.initializer}
    scopes: dict[str, list[int]] = {}
    any_meta = False
    for i, node in enumerate(proto.graph.node):
        mods = _node_modules(node)
        if mods is not None:
            any_meta = True
        elif module_names:
            owners = {name.rpartition(".")[0] for name in node.input if name in inits}
            owners &= module_names
            mods = [] if len(owners) != 1 else _with_parents(owners.pop())
        for m in mods or []:
            scopes.setdefault(m, []).append(i)
    return scopes, any_meta


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:k]) for k in range(1, len(parts) + 1)]


def _load_full(path: Path) -> Any:
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # noqa: BLE001 - protobuf / external data raise several types
        raise CheckpointError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if proto.ByteSize() > _MAX_PROTO_BYTES:
        raise UsageError(f"{path}: too large to locate a divergence in memory (over 2 GB)")
    return proto


def locate_export(onnx_path: str | os.PathLike[str], model: nn.Module, inputs: InputSet, *,
                  atol: float, rtol: float) -> Localization:
    """The first module whose output differs between ``model`` (the exported PyTorch model) and
    onnxruntime running ``onnx_path``.

    Raises:
        UsageError: the graph maps no node to a module of ``model`` (no exporter metadata, no
            initializer named after a parameter), or the inputs do not fit.
        CheckpointError: the file cannot be read or run.
    """
    import onnx
    import onnxruntime as ort

    path = Path(onnx_path)
    proto = _load_full(path)
    modules = dict(model.named_modules())
    param_owners = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
    scopes, any_meta = module_scopes(proto, param_owners)
    scopes = {m: idx for m, idx in scopes.items() if m in modules}
    if not scopes:
        raise UsageError(f"{path}: no ONNX node maps to a module of the model (the graph records "
                         "no module scopes: export with torch.onnx.export(..., dynamo=True)); "
                         "cannot locate the divergence")
    graph = proto.graph
    graph_outputs = [o.name for o in graph.output]
    consumers: dict[str, set[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, set()).add(i)
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    float_typed = {v.name for v in [*graph.value_info, *graph.output]
                   if v.type.tensor_type.elem_type in _FLOAT_TYPES}
    typed = {v.name for v in [*graph.value_info, *graph.output]}
    escaping: dict[str, list[str]] = {}
    for m, idx in scopes.items():
        inside = set(idx)
        outs = [out for i in sorted(inside) for out in graph.node[i].output if out and (
            out in graph_outputs or consumers.get(out, set()) - inside)]
        escaping[m] = [o for o in outs if o in float_typed or o not in typed]

    ref_rec, ref_out = _run(model, inputs, list(scopes))
    candidates = {m: outs for m, outs in escaping.items() if outs and m in ref_rec
                  and len(ref_rec[m]) == len(outs)}
    extra = list(dict.fromkeys(o for outs in candidates.values() for o in outs
                               if o not in graph_outputs))
    # The module outputs become graph outputs in place (no second copy of the weights in
    # memory); ``graph_outputs`` above keeps the file's own list.
    for name in extra:
        graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    try:
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({msg[:200]})") from None
    init_names = {i.name for i in graph.initializer}
    feed_names = [i.name for i in graph.input if i.name not in init_names]
    if len(feed_names) != len(inputs.tensors):
        raise UsageError(f"input set {inputs.name} has {len(inputs.tensors)} tensor(s); the "
                         f"graph takes {len(feed_names)}")
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(None, {n: t.numpy() for n, t in zip(feed_names, inputs.tensors,
                                                                 strict=True)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"onnxruntime rejected input set {inputs.name}: {msg[:200]}") from None
    got = {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)
           if hasattr(v, "shape")}

    # (position of the producing node, deeper module first, module, tensor name, ref, got)
    rows: list[tuple[int, int, str, str, Tensor, Tensor]] = []
    skipped = sorted(set(scopes) - set(candidates))
    for m, outs in candidates.items():
        pairs = list(zip(ref_rec[m], outs, strict=True))
        if not all(o in got and got[o].shape == r.shape for r, o in pairs):
            skipped.append(m)
            continue
        rows.extend((producer[o], -m.count(".") - 1, m, o, r, got[o]) for r, o in pairs)
    if len(ref_out) == len(graph_outputs):
        rows.extend((producer.get(o, len(graph.node)), 0, "", o, r, got[o])
                    for r, o in zip(ref_out, graph_outputs, strict=True)
                    if o in got and got[o].shape == r.shape)
    rows.sort(key=lambda row: (row[0], row[1]))
    compared = len({row[2] for row in rows if row[2]})
    ordered = [(m, r, g) for _, _, m, _, r, g in rows]
    found = _first_failure("export", inputs.name, ordered, atol, rtol)
    note = "" if any_meta else "module scopes from initializer names (no exporter metadata)"
    if found is None:
        return Localization("export", inputs.name, None, compared,
                            "no module output out of tolerance", tuple(skipped))
    i, comp = found
    passing = {rows[k][3] for k in range(i)}
    nodes = _upstream(graph, producer, rows[i][3], passing)
    mod = rows[i][2]
    read = tuple(dict.fromkeys(n for k in nodes for n in graph.node[k].input if n in init_names
                               and graph.node[k].op_type != "Constant"))
    divergence = Divergence(mod, type(modules[mod]).__name__ if mod else "", comp,
                            tuple((graph.node[k].name or graph.node[k].output[0],
                                   graph.node[k].op_type) for k in nodes
                                  if graph.node[k].op_type != "Constant"), read)
    if not mod:
        note = "; ".join(filter(None, [note, "every module output is within tolerance"]))
    return Localization("export", inputs.name, divergence, compared, note, tuple(skipped))


def _upstream(graph: Any, producer: dict[str, int], tensor: str, passing: set[str]) -> list[int]:
    """Nodes that compute ``tensor`` from graph inputs, initializers and ``passing`` tensors."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        name = stack.pop()
        k = producer.get(name)
        if k is None or k in seen or (name in passing and name != tensor):
            continue
        seen.add(k)
        stack.extend(graph.node[k].input)
    return sorted(seen)
