"""A state dict's ``_metadata`` (per-module versions) survives every wsconvert transform, both
directions: read (wrapper prefixes stripped, nested under ``state_dict``, loaded strictly) and
written (the WS checkpoint, the folded state dict), through the library and the CLI.

``Versioned`` refuses to load without its version, as torchvision's MNASNet does (its
``_load_from_state_dict`` raises "version should be set to 1 or 2 instead of None"); BatchNorm
also reads the version.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

import wsconvert

EXE = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"

NETS = '''
import torch
from torch import nn


class Versioned(nn.Module):
    """Loads only a state dict that carries its version, like torchvision's MNASNet."""

    _version = 2

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Versioned(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def build():
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.block.bn.running_mean.uniform_(-0.2, 0.2)
        net.block.bn.running_var.uniform_(0.5, 1.5)
    return net
'''


@pytest.fixture
def mnets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "mnets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mnets", None)
    import mnets  # type: ignore[import-not-found]

    yield mnets
    sys.modules.pop("mnets", None)


def _metadata(state: Any) -> dict[str, Any]:
    meta = getattr(state, "_metadata", None)
    assert meta is not None, "state dict lost its _metadata"
    return dict(meta)


def _wrapped(net: torch.nn.Module, prefix: str) -> OrderedDict[str, torch.Tensor]:
    """The state dict of ``net`` as a wrapper (DDP ``module.``, Lightning ``model.``) saves it."""
    holder = torch.nn.Module()
    holder.add_module(prefix, net)
    state = holder.state_dict()
    assert all(k.startswith(prefix + ".") for k in state)
    assert _metadata(state)[f"{prefix}.block"] == {"version": 2}
    return state


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_loader_requires_the_version(mnets: Any) -> None:
    """The test module really refuses a state dict without versions (a plain dict copy)."""
    state = mnets.build().state_dict()
    with pytest.raises(ValueError, match="instead of None"):
        mnets.Net().load_state_dict(dict(state))
    mnets.Net().load_state_dict(state)


@pytest.mark.parametrize("form", ["bare", "module.", "model.", "nested"])
def test_read_keeps_metadata_through_prefix_stripping(mnets: Any, tmp_path: Path,
                                                      form: str) -> None:
    from wsconvert.io.wsfile import load_model

    net = mnets.build()
    if form == "bare":
        obj: Any = net.state_dict()
    elif form == "nested":
        obj = {"state_dict": _wrapped(net, "model"), "epoch": 3}
    else:
        obj = _wrapped(net, form[:-1])
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", "mnets:build")
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.model(x), net.eval()(x), rtol=0, atol=0)


def test_ws_checkpoint_and_fold_keep_metadata(mnets: Any, tmp_path: Path) -> None:
    from wsconvert.io.state import load_weights_into
    from wsconvert.io.wsfile import load_model

    torch.save(mnets.build().state_dict(), tmp_path / "net.pt")
    loaded = load_model(tmp_path / "net.pt", "mnets:build")
    ws = wsconvert.apply_ws(loaded.model, init="exact").model
    wsconvert.save(ws, tmp_path / "net.ws.pt")
    payload = torch.load(tmp_path / "net.ws.pt", weights_only=True)
    assert _metadata(payload["state_dict"])["block"] == {"version": 2}  # written
    back = wsconvert.load(tmp_path / "net.ws.pt", model="mnets:build")  # read: Versioned needs it
    # A training loop's DDP-wrapped save of the WS model goes back into the WS architecture.
    torch.save(_wrapped(back, "module"), tmp_path / "tuned.pt")
    load_weights_into(back, tmp_path / "tuned.pt")
    folded = wsconvert.fold_ws(back).model
    state = folded.state_dict()
    torch.save(state, tmp_path / "folded.pt")
    reread = torch.load(tmp_path / "folded.pt", weights_only=True)
    assert _metadata(reread)["block.bn"] == {"version": 2}
    fresh = mnets.Net()
    fresh.load_state_dict(reread, strict=True)


def test_cli_apply_fold_keep_metadata(mnets: Any, tmp_path: Path) -> None:
    torch.save(_wrapped(mnets.build(), "module"), tmp_path / "ddp.pt")
    proc = _run("apply", "ddp.pt", "--model", "mnets:build", "--init", "exact", "--no-drift",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = _run("fold", "ddp.ws.pt", "--model", "mnets:build", "-o", "folded.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    folded = torch.load(tmp_path / "folded.pt", weights_only=True)
    assert _metadata(folded)["block"] == {"version": 2}
    fresh = mnets.Net()
    fresh.load_state_dict(folded, strict=True)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(fresh.eval()(x), mnets.build().eval()(x), rtol=1e-5, atol=1e-6)
