"""Sweep wsconvert over 29 real torchvision and timm architectures, as a new user would.

For every architecture, with random weights (``weights=None`` / ``pretrained=False``; nothing is
downloaded) and randomized BatchNorm statistics:

1. ``wsconvert apply model.pt --model SOURCE:NAME --init exact`` (a state dict plus the
   builder: ``torchvision:NAME`` / ``timm:NAME``),
2. ``wsconvert fold model.ws.pt --onnx model.onnx --dynamic-batch --input-shape 1,3,96,96``
   (for a WS-native timm model, BiT / NFNet: ``fold model.pt --model SPEC`` folds its own layers),
3. ``wsconvert check model.onnx --against model.ws.pt``,
4. an independent comparison: onnxruntime on fresh inputs at batch 1 and 3 against the ORIGINAL
   PyTorch model (``--init exact`` keeps its function), relative error = max |ort - ref| /
   max |ref|, and a strict load of the folded state dict into a fresh instance.

Every step runs the CLI through its entry point (``wsconvert`` of this environment), so a failure
is what a user sees: the script records its exit code and its one-line error.

Needs the compatibility environment (torchvision and timm; see README, "Compatibility suite"):

    .venv-compat/bin/python scripts/sweep_compat.py --out sweep.json [--only resnet18,...]

Prints one row per model and a summary (n/29 passed, worst relative error); exits 1 when fewer
than ``--min-pass`` models pass or the worst error reaches ``--max-rel``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SHAPE = (1, 3, 96, 96)

# (source, name, what it covers). WS-native models are folded from their own layers.
MODELS: list[tuple[str, str, str]] = [
    ("torchvision", "resnet18", "residual, basic blocks"),
    ("torchvision", "resnet50", "bottlenecks, strided 1x1 shortcuts"),
    ("torchvision", "resnext50_32x4d", "grouped convs"),
    ("torchvision", "wide_resnet50_2", "wide bottlenecks"),
    ("torchvision", "densenet121", "dense connections"),
    ("torchvision", "googlenet", "multi-branch (Inception v1)"),
    ("torchvision", "inception_v3", "multi-branch, asymmetric kernels"),
    ("torchvision", "mobilenet_v2", "depthwise-separable, inverted residual"),
    ("torchvision", "mobilenet_v3_small", "squeeze-excite, hardswish"),
    ("torchvision", "efficientnet_b0", "MBConv + squeeze-excite"),
    ("torchvision", "efficientnet_v2_s", "fused MBConv"),
    ("torchvision", "mnasnet0_5", "versioned BatchNorm loader (_metadata)"),
    ("torchvision", "shufflenet_v2_x0_5", "channel shuffle"),
    ("torchvision", "squeezenet1_1", "fire modules, no BatchNorm"),
    ("torchvision", "regnet_y_400mf", "grouped + squeeze-excite"),
    ("torchvision", "convnext_tiny", "channels-last LayerNorm, depthwise 7x7"),
    ("timm", "convnext_nano", "channels-last LayerNorm (timm)"),
    ("timm", "resnetv2_50x1_bit", "WS-native: BiT StdConv2d + GroupNorm"),
    ("timm", "nf_resnet26", "WS-native: NFNet ScaledStdConv2d"),
    ("timm", "tf_efficientnet_b0", "dynamic SAME padding"),
    ("timm", "mobilenetv3_large_100", "squeeze-excite (timm)"),
    ("timm", "resnet26d", "deep stem, avg-pool shortcut"),
    ("timm", "cspresnet50", "cross-stage partial"),
    ("timm", "dla34", "deep layer aggregation"),
    ("timm", "ghostnet_100", "ghost modules"),
    ("timm", "res2net50_26w_4s", "hierarchical split"),
    ("timm", "skresnet18", "selective kernel"),
    ("timm", "repvgg_a0", "re-parameterizable branches"),
    ("timm", "mixnet_s", "mixed depthwise kernel sizes"),
]
WS_NATIVE = {"resnetv2_50x1_bit", "nf_resnet26"}


@dataclass
class Row:
    source: str
    name: str
    covers: str
    passed: bool = False
    stage: str = ""
    exit_code: int | None = None
    error: str = ""
    rel_error: float | None = None
    gate_max_rel: float | None = None
    strict_load: bool = False
    params_m: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)


def spec(source: str, name: str) -> str:
    """The ``--model`` short form that builds ``name`` with random weights."""
    return f"{source}:{name}"


def build(source: str, name: str) -> Any:
    from wsconvert.io.spec import build_model

    return build_model(spec(source, name))


def randomize(model: Any, seed: int, shape: tuple[int, ...] = SHAPE, batches: int = 3) -> Any:
    """Give a freshly built model what a trained checkpoint has: random BatchNorm affines, then
    running statistics that match its activations (measured on random inputs, as training would
    leave them). Without them a random-init network's logits reach hundreds, far from what a
    trained model outputs, and an elementwise tolerance then measures float32 noise."""
    import torch

    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for m in norms:
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if m.running_mean is not None:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        if any(m.running_mean is not None for m in norms):
            for m in norms:  # only the norms: no dropout, no auxiliary heads
                m.train()
            for _ in range(batches):
                model(torch.randn(4, *shape[1:], generator=g))
        for m in norms:
            m.momentum = 0.1
    return model.eval()


def cli(args: list[str], cwd: Path, timeout: float) -> tuple[int, str, float]:
    """Run ``wsconvert ARGS`` (this environment's entry point); exit code, last stderr line, s."""
    exe = Path(sys.executable).with_name("wsconvert")
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout:.0f} s", time.perf_counter() - t0
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    line = err[-1] if err and proc.returncode else ""
    if proc.returncode and len([ln for ln in err if ln.startswith("error:")]) != 1:
        line = f"(not one error line: {len(err)} stderr lines) " + " | ".join(err[-3:])
    return proc.returncode, line, time.perf_counter() - t0


def ort_relative_error(onnx_path: Path, model: Any, seed: int) -> float:
    """max |ort - torch| / max |torch| over batches 1 and 3 of fresh random inputs."""
    import numpy as np
    import onnxruntime as ort
    import torch

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(seed + batch))
        with torch.no_grad():
            ref = model(x)
        ref = ref[0] if isinstance(ref, tuple | list) else ref
        got = np.asarray(sess.run(None, {name: x.numpy()})[0])
        r = ref.numpy()
        if got.shape != r.shape:
            raise AssertionError(f"batch {batch}: ONNX output {got.shape} vs torch {r.shape}")
        worst = max(worst, float(np.abs(got - r).max() / max(np.abs(r).max(), 1e-12)))
    return worst


def strict_load(source: str, name: str, folded: Path) -> bool:
    """The folded state dict loads ``strict=True`` into a fresh instance of the architecture (a
    WS-native one folded first: its layers are plain convs after folding)."""
    import torch

    from wsconvert.fold import fold_ws

    state = torch.load(folded, map_location="cpu", weights_only=True)
    fresh = build(source, name)
    if name in WS_NATIVE:
        fresh = fold_ws(fresh).model
    fresh.load_state_dict(state, strict=True)
    return True


def run_one(source: str, name: str, covers: str, work: Path, seed: int,
            timeout: float) -> Row:
    import torch

    row = Row(source, name, covers, stage="build")
    torch.manual_seed(seed)
    try:
        model = build(source, name)
        randomize(model, seed)
    except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
    ckpt = work / "model.pt"
    torch.save(model.state_dict(), ckpt)
    model_args = ["--model", spec(source, name)]
    shape = ",".join(map(str, SHAPE))
    if name in WS_NATIVE:
        reference, fold_in, fold_model = ckpt, ckpt, model_args
    else:
        # The WS checkpoint records the builder; --model again is the consent to run it.
        reference, fold_in, fold_model = work / "model.ws.pt", work / "model.ws.pt", model_args
        row.stage = "apply"
        code, err, s = cli(["apply", str(ckpt), *model_args, "--init", "exact",
                            "--input-shape", shape, "-o", str(reference)], work, timeout)
        row.seconds["apply"] = round(s, 1)
        if code:
            row.exit_code, row.error = code, err
            return row
    row.stage = "fold"
    onnx_path, folded = work / "model.onnx", work / "model.folded.pt"
    code, err, s = cli(["fold", str(fold_in), *fold_model, "--onnx", str(onnx_path),
                        "--dynamic-batch", "--input-shape", shape, "-o", str(folded),
                        "--report", str(work / "fold.json")], work, timeout)
    row.seconds["fold"] = round(s, 1)
    if code:
        row.exit_code, row.error = code, err
        return row
    row.stage = "check"
    code, err, s = cli(["check", str(onnx_path), "--against", str(reference), *fold_model,
                        "--report", str(work / "check.json")], work, timeout)
    row.seconds["check"] = round(s, 1)
    if code:
        row.exit_code, row.error = code, err
        return row
    gate = json.loads((work / "check.json").read_text())
    rels = [c["max_rel"] for c in gate["comparisons"] if c["max_rel"] is not None]
    row.gate_max_rel = max(rels) if rels else None
    row.stage = "independent"
    t0 = time.perf_counter()
    try:
        row.rel_error = ort_relative_error(onnx_path, model, seed)
        row.strict_load = strict_load(source, name, folded)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded, the sweep goes on
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        return row
    row.seconds["independent"] = round(time.perf_counter() - t0, 1)
    row.stage = "done"
    row.passed = True
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("sweep_compat.json"))
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=900.0, help="per CLI step, seconds")
    parser.add_argument("--min-pass", type=int, default=28)
    parser.add_argument("--max-rel", type=float, default=1e-4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # builders' deprecation notices; errors are recorded
    try:
        import timm  # noqa: F401
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - report and stop
        print(f"needs torchvision and timm (the compatibility environment): {exc}",
              file=sys.stderr)
        return 2
    only = {n for n in args.only.split(",") if n}
    models = [m for m in MODELS if not only or m[1] in only]
    rows: list[Row] = []
    for source, name, covers in models:
        work = Path(tempfile.mkdtemp(prefix=f"sweep-{name}-"))
        t0 = time.perf_counter()
        try:
            row = run_one(source, name, covers, work, args.seed, args.timeout)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        rows.append(row)
        total = time.perf_counter() - t0
        status = "pass" if row.passed else f"FAIL at {row.stage} (exit {row.exit_code})"
        rel = "n/a" if row.rel_error is None else f"{row.rel_error:.2e}"
        print(f"{source:11s} {name:22s} {row.params_m:6.1f}M {status:24s} rel {rel:9s} "
              f"{total:6.1f}s {row.error}", flush=True)
        args.out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    passed = [r for r in rows if r.passed]
    worst = max((r.rel_error for r in passed if r.rel_error is not None), default=0.0)
    print(f"\n{len(passed)}/{len(rows)} pass; worst relative error {worst:.2e} "
          f"(onnxruntime vs the original model, batches 1 and 3)")
    for r in rows:
        if not r.passed:
            print(f"  {r.name}: {r.stage}: {r.error}")
    ok = len(passed) >= min(args.min_pass, len(rows)) and worst < args.max_rel
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
