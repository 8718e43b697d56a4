"""``--model timm:NAME`` and ``--model torchvision:NAME`` with the real packages: random-weight
builders (nothing downloaded), recorded in the WS checkpoint so that it rebuilds, and an HF-style
``model.safetensors`` of a timm model through apply and fold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import torchvision  # noqa: I001 - torchvision first: its import is the one that breaks
    import timm
except Exception as exc:  # noqa: BLE001 - a broken torchvision raises RuntimeError on import
    pytest.skip(f"compatibility suite: torchvision / timm cannot be imported here "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); run it in its own "
                "environment, see README 'Compatibility suite'", allow_module_level=True)

from safetensors.torch import save_file

import wsconvert
from wsconvert.errors import ModelSpecError, UsageError
from wsconvert.io.spec import build_model


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x), rtol=1e-5, atol=1e-5)


def test_short_forms_build_random_weight_models() -> None:
    vision = build_model("torchvision:squeezenet1_1", {"num_classes": 10})
    assert type(vision) is torchvision.models.SqueezeNet and not vision.training
    assert vision.classifier[1].out_channels == 10
    zoo = build_model("timm:resnet10t")
    assert type(zoo) is timm.models.resnet.ResNet
    # The generic MODULE:FACTORY form of the same packages still works.
    generic = build_model("timm:create_model", {"model_name": "resnet10t"})
    assert type(generic) is type(zoo)


@pytest.mark.parametrize(("spec", "kwargs", "needle"), [
    ("timm:no_such_net", None, "timm has no model named 'no_such_net' (timm.list_models()"),
    ("torchvision:no_such_net", None, "torchvision has no model named 'no_such_net'"),
    ("timm:resnet10t", {"pretrained": True}, "pretrained=True: the checkpoint holds the weights"),
    ("torchvision:resnet18", {"weights": "DEFAULT"}, "weights='DEFAULT': the checkpoint holds"),
    ("torchvision:resnet18", {"no_such_arg": 1}, "failed to build the model: TypeError"),
])
def test_short_form_errors(spec: str, kwargs: dict[str, Any] | None, needle: str) -> None:
    with pytest.raises((ModelSpecError, UsageError)) as err:
        build_model(spec, kwargs)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_hf_safetensors_of_a_timm_model(tmp_path: Path, cli: Any) -> None:
    torch.manual_seed(0)
    original = timm.create_model("resnet10t", pretrained=False).eval()
    # As the hub stores it: plain tensors, a `format: pt` metadata header, no _metadata.
    save_file({k: v.contiguous() for k, v in original.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    proc = cli.run("apply", "model.safetensors", "--model", "timm:resnet10t", "--init", "exact",
                   "--input-shape", "1,3,64,64", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drift"]["large"] is False
    ws = wsconvert.load(tmp_path / "model.ws.pt", model="timm:resnet10t")  # the recorded form
    proc = cli.run("fold", "model.ws.pt", "--model", "timm:resnet10t", "-o", "folded.safetensors",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fresh = build_model("timm:resnet10t")
    fresh.load_state_dict(wsconvert.io.safe.read_checkpoint(tmp_path / "folded.safetensors"),
                          strict=True)
    _same(fresh, original)
    _same(ws, original)


def test_cli_torchvision_short_form(tmp_path: Path, cli: Any) -> None:
    torch.manual_seed(0)
    original = torchvision.models.get_model("squeezenet1_1", weights=None).eval()
    torch.save(original.state_dict(), tmp_path / "sq.pt")
    proc = cli.run("apply", "sq.pt", "--model", "torchvision:squeezenet1_1", "--init", "exact",
                   "--no-drift", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli.run("fold", "sq.ws.pt", "--model", "torchvision:squeezenet1_1", "-o",
                   "sq.folded.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    fresh = torchvision.models.get_model("squeezenet1_1", weights=None)
    fresh.load_state_dict(torch.load(tmp_path / "sq.folded.pt", weights_only=True), strict=True)
    _same(fresh, original)
    bad = cli.run("apply", "sq.pt", "--model", "torchvision:resnet18", "-o", "r.ws.pt",
                  cwd=tmp_path)
    cli.one_line_error(bad, 2, "sq.pt: state dict does not fit the model")
