"""Checkpoint forms, key reporting, trust, save/load round trips (also in a fresh process)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import wsconvert
from wsconvert.errors import (
    CheckpointError,
    ModelSpecError,
    OutputExistsError,
    UntrustedCheckpointError,
    UsageError,
)
from wsconvert.io.atomic import save_state_dict
from wsconvert.io.wsfile import load_model


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model", "lightning", "ddp", "compiled"])
def test_state_dict_forms(net_state: Path, wrap: str) -> None:
    sd = torch.load(net_state, weights_only=True)
    form = {
        "bare": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd, "optimizer": {}},
        "lightning": {"state_dict": {f"model.{k}": v for k, v in sd.items()}},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compiled": {f"_orig_mod.module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = net_state.with_name(f"{wrap}.pt")
    torch.save(form, path)
    loaded = load_model(path, "wsnets:build")
    assert loaded.source == "state_dict"
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, sd[k])


def test_key_mismatches_are_listed(net_state: Path) -> None:
    sd = torch.load(net_state, weights_only=True)
    sd.pop("stem.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["head.bias"] = torch.zeros(7)
    torch.save(sd, net_state)
    with pytest.raises(CheckpointError) as info:
        load_model(net_state, "wsnets:build")
    msg = str(info.value)
    assert "1 missing (stem.weight)" in msg and "1 unexpected (extra.weight)" in msg
    assert "head.bias [7] vs model [3]" in msg


def test_factory_errors(net_state: Path) -> None:
    with pytest.raises(UsageError, match="`model` MODULE:FACTORY"):
        load_model(net_state)
    with pytest.raises(ModelSpecError, match="MODULE:FACTORY"):
        load_model(net_state, "wsnets")
    with pytest.raises(ModelSpecError, match="cannot import"):
        load_model(net_state, "no_such_mod:build")
    with pytest.raises(ModelSpecError, match="factory exploded"):
        load_model(net_state, "wsnets:broken")
    with pytest.raises(UsageError, match="JSON"):
        load_model(net_state, "wsnets:build", "{bad")
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_model(net_state, "wsnets:build", '{"width": 4}')


def test_pickled_module_needs_trust(nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    path = nets_dir / "whole.pt"
    torch.save(wsnets.build(), path)
    with pytest.raises(UntrustedCheckpointError, match=r"wsnets\.Net.*`trust=True`"):
        load_model(path)
    loaded = load_model(path, trust=True)
    assert loaded.source == "module"
    allowed = load_model(path, allow_classes=["wsnets.Net", "torch.nn.modules.conv.Conv2d",
                                              "torch.nn.modules.batchnorm.BatchNorm2d",
                                              "torch.nn.modules.linear.Linear"])
    assert allowed.source == "module"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="directory"):
        load_model(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(tmp_path / "empty.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "junk.pt")


def test_save_load_round_trip_in_fresh_process(net_state: Path) -> None:
    report = wsconvert.apply_ws(load_model(net_state, "wsnets:build").model, "scaled",
                                init="exact")
    out = net_state.with_name("net.ws.pt")
    wsconvert.save(report.model, out)
    expected = report.model.eval()(_x())
    with pytest.raises(OutputExistsError):
        wsconvert.save(report.model, out)
    script = (
        "import torch, wsconvert, sys\n"
        "m = wsconvert.load(sys.argv[1], model='wsnets:build').eval()\n"
        "x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))\n"
        "torch.save(m(x), sys.argv[2])\n"
        "assert m.training is False\n"
    )
    got_path = net_state.with_name("got.pt")
    subprocess.run([sys.executable, "-c", script, str(out), str(got_path)], check=True,
                   cwd=net_state.parent)
    assert torch.equal(torch.load(got_path, weights_only=True), expected)


def test_finetuned_model_saved_and_reloaded(net_state: Path) -> None:
    model = wsconvert.apply_ws(load_model(net_state, "wsnets:build").model).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(_x()).sum().backward()
    opt.step()
    path = net_state.with_name("tuned.ws.pt")
    wsconvert.save(model, path)
    again = wsconvert.load(path, model="wsnets:build")
    assert again.training
    model.eval()
    again.eval()
    assert torch.equal(again(_x()), model(_x()))
    assert wsconvert.load_model(path, "wsnets:build").source == "wsconvert"


def test_pickle_kind_round_trip(nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    path = nets_dir / "whole.pt"
    torch.save(wsnets.build(), path)
    model = wsconvert.apply_ws(load_model(path, trust=True).model, init="scale").model.eval()
    out = nets_dir / "whole.ws.pt"
    wsconvert.save(model, out)
    with pytest.raises(UntrustedCheckpointError):
        wsconvert.load(out)
    again = wsconvert.load(out, trust=True).eval()
    assert torch.equal(again(_x()), model(_x()))
    # No duplicated weights: the pickled base holds them, the state dict only the WS extras.
    raw = torch.load(out, weights_only=False)
    assert all(".parametrizations.weight.0." in k for k in raw["state_dict"])


def test_load_rejects_non_ws(net_state: Path) -> None:
    with pytest.raises(CheckpointError, match="not a wsconvert checkpoint"):
        wsconvert.load(net_state)


def test_atomic_save_is_deterministic(tmp_path: Path) -> None:
    sd = {"w": torch.arange(6.0)}
    a, b = save_state_dict(sd, tmp_path / "a.pt"), save_state_dict(sd, tmp_path / "b.pt")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_float8_values_load_into_float8_tensors() -> None:
    """8-bit floats are refused only for wider floating-point tensors (a quantized file)."""
    from wsconvert.errors import CheckpointError
    from wsconvert.io.state import load_state_dict_strict

    net = nn.Linear(2, 2)
    net.register_buffer("scale8", torch.zeros(2, dtype=torch.float8_e4m3fn))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    load_state_dict_strict(net, state, "f.pt")
    state["weight"] = state["weight"].to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"not floating point \(weight float8_e4m3fn for"):
        load_state_dict_strict(net, state, "f.pt")
