"""The whole pipeline on real torchvision and timm architectures (random weights, no downloads).

apply (``init="exact"``) -> fold -> ONNX with a dynamic batch -> parity gate at batches 1 and 2,
then an independent onnxruntime comparison against the ORIGINAL model at batch 3 and a strict
load of the folded state dict into a fresh instance of the architecture. Some models go through
the ``wsconvert`` entry point (state dict on disk + ``--model``), the rest through the Python API.

Needs torchvision and timm, which need their own environment (``.venv-compat``; see the README's
"Compatibility suite"). Without them the module is skipped with that reason. The CI run is
``pytest tests/compat -m "not slow"``; the larger models are marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

try:
    import torchvision  # noqa: I001 - torchvision first: its import is the one that breaks
    import timm
except Exception as exc:  # noqa: BLE001 - a broken torchvision raises RuntimeError on import
    pytest.skip(f"compatibility suite: torchvision / timm cannot be imported here "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); run it in its own "
                "environment, see README 'Compatibility suite'", allow_module_level=True)

import wsconvert
from wsconvert.export import ExportConfig, export_onnx
from wsconvert.parity import check_parity, make_inputs

# The sweep script (scripts/sweep_compat.py) builds "checkpoint-like" random models; share it.
_spec = importlib.util.spec_from_file_location(
    "sweep_compat", Path(__file__).parents[2] / "scripts" / "sweep_compat.py")
assert _spec is not None and _spec.loader is not None
sweep = sys.modules.setdefault("sweep_compat", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(sweep)

EXE = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"
SHAPE = (1, 3, 64, 64)
SHAPE_ARG = ",".join(map(str, SHAPE))
# Independent check: max |onnxruntime - original| / max |original| (float32 noise only).
MAX_REL = 1e-4

Builder = Callable[[], nn.Module]


def tv(name: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    return "torchvision.models:get_model", {"name": name, "weights": None, **kwargs}


def tm(name: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    return "timm:create_model", {"model_name": name, "pretrained": False, **kwargs}


def build(spec: tuple[str, dict[str, Any]]) -> nn.Module:
    factory, kwargs = spec
    module, _, attr = factory.partition(":")
    fn = torchvision.models.get_model if module.startswith("torchvision") else timm.create_model
    assert attr in ("get_model", "create_model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # builders' deprecation notices
        return fn(**kwargs).eval()


def checkpoint_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """What a trained checkpoint has and a fresh build lacks: random BatchNorm affines and
    running statistics that match the activations (the sweep script's helper)."""
    return sweep.randomize(model, seed, SHAPE, batches=2)  # type: ignore[no-any-return]


def original(spec: tuple[str, dict[str, Any]]) -> nn.Module:
    torch.manual_seed(0)
    return checkpoint_like(build(spec))


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def std_convs(model: nn.Module) -> int:
    """timm's own WS layers (StdConv2d, ScaledStdConv2d and their Same variants)."""
    return sum("StdConv" in type(m).__name__ for m in model.modules())


def ort_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def independent_check(onnx_path: Path, model: nn.Module) -> float:
    """onnxruntime at batch 3 (neither the traced batch nor a gated one) against ``model``."""
    x = torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        ref = model(x).numpy()
    got = ort_outputs(onnx_path, x)
    assert got.shape == ref.shape
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    assert rel < MAX_REL, rel
    return rel


def reload_strict(spec: tuple[str, dict[str, Any]], state: dict[str, torch.Tensor],
                  ws_native: bool) -> nn.Module:
    """A fresh instance of the architecture (for a WS-native model: folded, i.e. with plain
    convs) with the folded state dict loaded ``strict=True``."""
    fresh = build(spec)
    if ws_native:
        fresh = wsconvert.fold_ws(fresh).model
    fresh.load_state_dict(state, strict=True)
    return fresh.eval()


def relative_error(a: nn.Module, b: nn.Module) -> float:
    x = torch.randn(2, *SHAPE[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = b(x), a(x)
    return float((got - ref).abs().max() / ref.abs().max())


# (id, spec, what it covers)
API_MODELS = [
    ("mobilenet_v2", tv("mobilenet_v2"), "depthwise-separable, inverted residual"),
    ("mobilenet_v3_small", tv("mobilenet_v3_small"), "squeeze-excite, hardswish"),
    ("resnext50_32x4d", tv("resnext50_32x4d"), "grouped (ResNeXt), strided 1x1 shortcuts"),
    ("densenet121", tv("densenet121"), "dense connections"),
    ("googlenet", tv("googlenet", init_weights=True), "multi-branch (Inception v1)"),
    ("shufflenet_v2_x0_5", tv("shufflenet_v2_x0_5"), "channel split and shuffle"),
    ("efficientnet_b0", tv("efficientnet_b0"), "MBConv + squeeze-excite, stochastic depth"),
    ("regnet_y_400mf", tv("regnet_y_400mf"), "grouped + squeeze-excite"),
    ("squeezenet1_1", tv("squeezenet1_1"), "fire modules, no BatchNorm"),
    ("tf_efficientnet_b0", tm("tf_efficientnet_b0"), "timm, dynamic SAME padding"),
    ("nf_regnet_b0", tm("nf_regnet_b0"), "WS-native: NFNet ScaledStdConv2d, folded as is"),
]
SLOW_API_MODELS = [
    ("convnext_tiny", tv("convnext_tiny"), "channels-last LayerNorm (torchvision)"),
    ("efficientnet_v2_s", tv("efficientnet_v2_s"), "fused MBConv + squeeze-excite"),
    ("resnet50", tv("resnet50"), "bottlenecks, strided 1x1 shortcuts"),
    ("convnext_nano", tm("convnext_nano"), "channels-last LayerNorm (timm)"),
]
WS_NATIVE = {"nf_regnet_b0", "resnetv2_50x1_bit"}


def _api_pipeline(name: str, spec: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    model = original(spec)
    ws_native = name in WS_NATIVE
    if ws_native:
        ws = model  # the model standardizes its own weights: fold those layers
    else:
        applied = wsconvert.apply_ws(model, init="exact")
        assert len(applied.converted) == convs(model)
        ws = applied.model
    fold = wsconvert.fold_ws(ws)
    assert len(fold.folded) == (std_convs(model) if ws_native else convs(model)) > 0
    folded = fold.model
    out = tmp_path / f"{name}.onnx"
    export_onnx(folded, out, ExportConfig((SHAPE,), dynamic_batch=True))
    report = check_parity(out, ws, make_inputs([SHAPE], 1, [1, 2]), folded=folded)
    assert report.passed(), [(c.stage, c.input_set, c.max_abs, c.max_rel)
                             for c in report.comparisons]
    independent_check(out, model)
    fresh = reload_strict(spec, folded.state_dict(), ws_native)
    assert relative_error(fresh, folded) == 0.0  # the very same weights and classes


@pytest.mark.parametrize(("name", "spec", "covers"), API_MODELS, ids=[m[0] for m in API_MODELS])
def test_pipeline_python_api(name: str, spec: tuple[str, dict[str, Any]], covers: str,
                             tmp_path: Path) -> None:
    _api_pipeline(name, spec, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "spec", "covers"), SLOW_API_MODELS,
                         ids=[m[0] for m in SLOW_API_MODELS])
def test_pipeline_python_api_larger(name: str, spec: tuple[str, dict[str, Any]], covers: str,
                                    tmp_path: Path) -> None:
    _api_pipeline(name, spec, tmp_path)


# ------------------------------------------------------------------------------ the CLI


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
    env["COLUMNS"] = "200"
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


CLI_MODELS = [
    pytest.param("resnet18", tv("resnet18"), "residual, strided 1x1 shortcuts", id="resnet18"),
    pytest.param("convnext_atto", tm("convnext_atto"),
                 "channels-last LayerNorm + depthwise 7x7 (timm)", id="convnext_atto"),
    pytest.param("mnasnet0_5", tv("mnasnet0_5"), "a loader that needs the state dict's _metadata",
                 id="mnasnet0_5"),
    pytest.param("resnetv2_50x1_bit", tm("resnetv2_50x1_bit"),
                 "WS-native: BiT StdConv2d, folded as is", id="resnetv2_50x1_bit"),
]


@pytest.mark.parametrize(("name", "spec", "covers"), CLI_MODELS)
def test_pipeline_cli(name: str, spec: tuple[str, dict[str, Any]], covers: str,
                      tmp_path: Path) -> None:
    model = original(spec)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    model_args = ["--model", spec[0], "--model-kwargs", json.dumps(spec[1])]
    ws_native = name in WS_NATIVE
    if ws_native:
        reference, fold_args = "model.pt", ["model.pt", *model_args]
    else:
        applied = json.loads(ok(run("apply", "model.pt", *model_args, "--init", "exact",
                                    "--input-shape", SHAPE_ARG, "--json", cwd=tmp_path)).stdout)
        converted = [r for r in applied["layers"] if r["status"] == "converted"]
        assert len(converted) == convs(model)
        assert not applied["drift"]["large"]
        reference, fold_args = "model.ws.pt", ["model.ws.pt", *model_args]  # consent
    folded_json = json.loads(ok(run(
        "fold", *fold_args, "--onnx", "model.onnx", "--dynamic-batch", "--input-shape", SHAPE_ARG,
        "-o", "folded.pt", "--json", cwd=tmp_path)).stdout)
    assert folded_json["parity"]["passed"] is True
    assert len(folded_json["fold"]["folded"]) == (std_convs(model) if ws_native
                                                  else convs(model))
    check = json.loads(ok(run("check", "model.onnx", "--against", reference, *model_args,
                              "--json", cwd=tmp_path)).stdout)
    assert check["parity"]["passed"] is True
    assert {c["input_set"].rsplit("-", 1)[-1] for c in check["parity"]["comparisons"]} == {
        "b1", "b4"}
    independent_check(tmp_path / "model.onnx", model)
    fresh = reload_strict(spec, torch.load(tmp_path / "folded.pt", weights_only=True), ws_native)
    assert relative_error(fresh, model) < MAX_REL
