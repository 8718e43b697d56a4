"""``.safetensors`` state dicts: read as checkpoints (no pickle, the ``metadata`` header layout of
``model.safetensors`` files, ``_metadata`` restored from the header), and the folded state dict
written as safetensors when the output name ends in ``.safetensors``."""

from __future__ import annotations

import json
import struct
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wsconvert.errors import CheckpointError, UsageError
from wsconvert.io.atomic import save_safetensors, save_state_dict
from wsconvert.io.safe import SAFETENSORS_METADATA_KEY, is_safetensors, read_checkpoint
from wsconvert.io.wsfile import load_model

VERSIONED = '''
import torch
from torch import nn


class Versioned(nn.Module):
    """Loads only with its version in the state dict's _metadata, like torchvision's MNASNet."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)
        self.tied = nn.Linear(4, 2)
        self.tied.weight = self.head.weight  # shares storage

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        if local_metadata.get("version") not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of "
                             f"{local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(y) + self.tied(y)


def build():
    torch.manual_seed(0)
    net = Versioned()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    return net.eval()
'''


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))


def _hf_style(state: dict[str, torch.Tensor], path: Path, prefix: str = "") -> None:
    """As the HF hub / timm write ``model.safetensors``: plain tensors, ``format: pt`` header."""
    tensors = {prefix + k: v.clone().contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def vnets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "vnets.py").write_text(VERSIONED)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("vnets", None)
    import vnets  # type: ignore[import-not-found]

    yield vnets
    sys.modules.pop("vnets", None)


def test_hf_layout_reads_as_state_dict_with_prefix_stripped(net_state: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    state = torch.load(net_state, weights_only=True)
    for name, prefix in (("model.safetensors", ""), ("lightning.safetensors", "model.")):
        path = net_state.with_name(name)
        _hf_style(state, path, prefix)
        loaded = load_model(path, "wsnets:build")
        assert loaded.source == "state_dict" and loaded.stripped_prefix == prefix
        reference = wsnets.build()
        reference.load_state_dict(state)
        torch.testing.assert_close(_outputs(loaded.model), _outputs(reference), rtol=0, atol=0)


def test_detected_by_content_and_never_unpickled(net_state: Path) -> None:
    state = torch.load(net_state, weights_only=True)
    odd = net_state.with_name("weights.bin")
    _hf_style(state, odd)
    assert is_safetensors(odd) and not is_safetensors(net_state)
    read = read_checkpoint(odd, trust=True)
    assert list(read) == sorted(state) or set(read) == set(state)
    for key, value in state.items():
        assert torch.equal(read[key], value)


def test_header_metadata_restored_for_a_versioned_loader(vnets: Any, tmp_path: Path) -> None:
    state = vnets.build().state_dict()
    plain = tmp_path / "plain.safetensors"
    _hf_style(state, plain)
    # Without versions the architecture refuses it, as torch itself would.
    with pytest.raises(CheckpointError) as err:
        load_model(plain, "vnets:build")
    assert str(err.value) == (f"{plain}: <root> (Versioned, vnets) refuses the state dict: "
                              "ValueError: version should be set to 1 or 2 instead of None")
    written = tmp_path / "versioned.safetensors"
    save_safetensors(state, written)
    with safe_open(str(written), framework="pt") as f:  # type: ignore[no-untyped-call]
        header = f.metadata()
    assert header["format"] == "pt"
    assert json.loads(header[SAFETENSORS_METADATA_KEY])[""] == {"version": 2}
    loaded = load_model(written, "vnets:build")
    torch.testing.assert_close(_outputs(loaded.model), _outputs(vnets.build()), rtol=0, atol=0)
    assert read_checkpoint(written)._metadata == state._metadata  # type: ignore[attr-defined]


def test_bad_header_metadata_and_corrupt_files_are_refused(net_state: Path) -> None:
    state = torch.load(net_state, weights_only=True)
    bad = net_state.with_name("bad.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad),
              metadata={SAFETENSORS_METADATA_KEY: "not json"})
    with pytest.raises(CheckpointError, match="is not a JSON object"):
        read_checkpoint(bad)
    good = net_state.with_name("good.safetensors")
    _hf_style(state, good)
    truncated = net_state.with_name("cut.safetensors")
    truncated.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a readable safetensors"):
        read_checkpoint(truncated)
    huge = net_state.with_name("huge.safetensors")
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        read_checkpoint(huge)


def test_save_state_dict_refuses_non_tensors_and_modules(tmp_path: Path) -> None:
    state = OrderedDict(w=torch.ones(2), extra=3)
    with pytest.raises(UsageError, match="tensors only"):
        save_state_dict(state, tmp_path / "x.safetensors")
    with pytest.raises(UsageError, match="not a whole module"):
        save_state_dict(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_cli_apply_from_safetensors_fold_to_safetensors(vnets: Any, tmp_path: Path,
                                                         cli: Any) -> None:
    save_safetensors(vnets.build().state_dict(), tmp_path / "model.safetensors")
    cli.run("apply", "model.safetensors", "--model", "vnets:build", "--init", "exact",
            "--no-drift", cwd=tmp_path).check_returncode()
    assert (tmp_path / "model.ws.pt").exists()
    proc = cli.run("fold", "model.ws.pt", "--model", "vnets:build", "-o", "folded.safetensors",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "folded.safetensors"
    with safe_open(str(out), framework="pt") as f:  # type: ignore[no-untyped-call]
        meta = json.loads(f.metadata()[SAFETENSORS_METADATA_KEY])
        assert meta[""] == meta["bn"] == {"version": 2} and meta["conv"] == {"version": 1}
        assert "tied.weight" in f.keys() and "head.weight" in f.keys()  # noqa: SIM118
    fresh = vnets.Versioned()
    fresh.load_state_dict(read_checkpoint(out), strict=True)
    torch.testing.assert_close(_outputs(fresh), _outputs(vnets.build()), rtol=1e-5, atol=1e-6)
    # The folded safetensors file is a checkpoint for `check` / `fold` like any other.
    again = cli.run("fold", "folded.safetensors", "--model", "vnets:build", "-o", "again.pt",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_cli_refuses_safetensors_for_modules_and_ws_checkpoints(vnets: Any, tmp_path: Path,
                                                                cli: Any) -> None:
    torch.save(vnets.build().state_dict(), tmp_path / "model.pt")
    cli.assert_bad(["apply", "model.pt", "--model", "vnets:build", "-o", "ws.safetensors"],
                   "--output ws.safetensors", "a WS checkpoint", cwd=tmp_path)
    cli.run("apply", "model.pt", "--model", "vnets:build", "--no-drift",
            cwd=tmp_path).check_returncode()
    cli.assert_bad(["fold", "model.ws.pt", "--model", "vnets:build", "-o", "f.safetensors",
                    "--whole-module"],
                   "tensors only", "--whole-module", cwd=tmp_path)
