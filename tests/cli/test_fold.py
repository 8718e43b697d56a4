"""``fold`` / ``check`` end to end through the installed entry point."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest
import torch
from onnx import numpy_helper

import wsconvert

if TYPE_CHECKING:
    from conftest import Cli


@pytest.fixture
def ws_ckpt(cli: Cli, net_state: Path) -> Path:
    proc = cli.run("apply", net_state, "-m", "wsnets:build", "--convention", "bit", "--init",
                   "scale",
                   cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    return net_state.with_name("net.ws.pt")


def test_fold_onnx_check_gate(cli: Cli, ws_ckpt: Path) -> None:
    cwd = ws_ckpt.parent
    before = cli.sha(ws_ckpt)
    proc = cli.run("fold", ws_ckpt, "-m", "wsnets:build", "--onnx", "net.onnx", "--input-shape",
                   "1,3,16,16", "--dynamic-batch", "--junit", "fold.xml", "--report", "fold.json",
                   "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["output"] == str(cwd / "net.folded.pt")
    assert len(payload["fold"]["folded"]) == 3
    assert payload["parity"]["passed"] is True
    assert set(payload["parity"]["stages"]) == {"fold", "export"}
    # The default gate: one seeded set per batch size, batch 1 and 4 for a dynamic batch.
    assert {c["input_set"] for c in payload["parity"]["comparisons"]} == {"seed0-b1", "seed0-b4"}
    assert "Conv" in payload["onnx"]["op_histogram"]
    assert json.loads((cwd / "fold.json").read_text())["passed"] is True
    assert len(ET.parse(cwd / "fold.xml").findall(".//testcase")) == 4  # 2 stages x 2 sets
    assert cli.sha(ws_ckpt) == before

    import wsnets  # type: ignore[import-not-found]

    plain = wsnets.build()
    plain.load_state_dict(torch.load(cwd / "net.folded.pt", weights_only=True), strict=True)

    proc = cli.run("check", "net.onnx", "--against", ws_ckpt, "-m", "wsnets:build", "--seeds", "3",
                   "--batch-sizes", "2", "--junit", "check.xml", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "parity holds" in proc.stdout
    proc = cli.run("check", "net.onnx", "--against", "net.folded.pt", "-m", "wsnets:build",
                   "--json",
                   cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert list(json.loads(proc.stdout)["parity"]["stages"]) == ["export"]

    proto = onnx.load(str(cwd / "net.onnx"))
    init = next(i for i in proto.graph.initializer if i.name.endswith("weight")
                and len(i.dims) == 4)
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 0.1
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(cwd / "bad.onnx"))
    proc = cli.run("check", "bad.onnx", "--against", ws_ckpt, "-m", "wsnets:build", "--json",
                   "--junit", "bad.xml", "--save-failing", "failing", cwd=cwd)
    cli.one_line_error(proc, 1, "parity fails")
    assert json.loads(proc.stdout)["parity"]["passed"] is False
    assert ET.parse(cwd / "bad.xml").findall(".//failure")
    assert (cwd / "failing" / "report.json").exists()


def test_fold_from_training_state_dict(cli: Cli, ws_ckpt: Path) -> None:
    cwd = ws_ckpt.parent
    model = wsconvert.load(ws_ckpt, model="wsnets:build")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 3, 12, 12)).sum().backward()
    opt.step()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               cwd / "tuned.pt")
    proc = cli.run("fold", "tuned.pt", "--from", ws_ckpt, "-m", "wsnets:build", "--json",
                   cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    import wsnets  # type: ignore[import-not-found]

    plain = wsnets.build().eval()
    plain.load_state_dict(torch.load(cwd / "tuned.folded.pt", weights_only=True), strict=True)
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(plain(x), model.eval()(x), atol=1e-5, rtol=1e-4)


def test_fold_plain_model_is_noop(cli: Cli, net_state: Path) -> None:
    proc = cli.run("fold", net_state, "-m", "wsnets:build", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    assert "already plain" in proc.stdout


def test_fold_multi_input_model(cli: Cli, nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    torch.save(wsnets.mixed().state_dict(), nets_dir / "mixed.pt")
    assert cli.run("apply", "mixed.pt", "-m", "wsnets:mixed", "--transposed", "--linear",
                   cwd=nets_dir).returncode == 0
    proc = cli.run("fold", "mixed.ws.pt", "-m", "wsnets:mixed", "--onnx", "mixed.onnx",
                   "--input-shape", "2,4,9", "--input-shape", "2,2,3,5,5", "--json", cwd=nets_dir)
    assert proc.returncode == 0, proc.stderr
    payload = json.loads(proc.stdout)
    assert payload["parity"]["passed"] and len(payload["onnx"]["inputs"]) == 2


def test_fold_check_bad_input(cli: Cli, ws_ckpt: Path) -> None:
    cwd = ws_ckpt.parent
    cli.one_line_error(cli.run("check", "missing.onnx", "--against", ws_ckpt, "-m",
                               "wsnets:build", cwd=cwd), 2, "missing.onnx")
    (cwd / "junk.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 3)
    cli.one_line_error(cli.run("check", "junk.onnx", "--against", ws_ckpt, "-m", "wsnets:build",
                               cwd=cwd), 2, "junk.onnx")
    cli.one_line_error(cli.run("apply", "junk.onnx", "-m", "wsnets:build", cwd=cwd), 2,
                       "ONNX model")
    cli.one_line_error(cli.run("fold", ws_ckpt, "-m", "wsnets:build", "--onnx", "x.onnx",
                               "--input-shape", "1,3,a", cwd=cwd), 2, "--input-shape")
    cli.one_line_error(cli.run("fold", ws_ckpt, "-m", "wsnets:build", "--onnx", "x.onnx",
                               "--input-shape", "1,5,8,8", "--force", cwd=cwd), 2, "does not fit")
    assert not (cwd / "x.onnx").exists()
    assert not [p for p in cwd.iterdir() if p.name.startswith(".")]


def test_gate_on_an_image_folder(cli: Cli, ws_ckpt: Path) -> None:
    """``--inputs DIR`` reads images as ``apply --calib-data`` does, in batches of the exported
    batch (static) or of the largest batch checked (dynamic)."""
    import numpy as np
    from PIL import Image

    cwd = ws_ckpt.parent
    (cwd / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            cwd / "imgs" / f"{i}.png")
    proc = cli.run("fold", ws_ckpt, "-m", "wsnets:build", "--onnx", "net.onnx", "--input-shape",
                   "1,3,16,16", "--dynamic-batch", "--inputs", "imgs", "--image-size", "16",
                   "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    parity = json.loads(proc.stdout)["parity"]
    assert parity["passed"] is True
    assert {c["input_set"] for c in parity["comparisons"]} == {"imgs[0:4]", "imgs[4:5]"}

    proc = cli.run("check", "net.onnx", "--against", ws_ckpt, "-m", "wsnets:build", "--inputs",
                   "imgs", "--image-size", "16", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                   "--batch-sizes", "2", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert {c["input_set"] for c in json.loads(proc.stdout)["parity"]["comparisons"]} == {
        "imgs[0:2]", "imgs[2:4]", "imgs[4:5]"}
    # Image options without a folder, a bad mean, mixed sizes without --image-size: exit 2.
    cli.assert_bad(["check", "net.onnx", "--against", ws_ckpt, "-m", "wsnets:build",
                    "--image-size", "16"], "--image-size", cwd=cwd)
    # fold: image options without the gate they feed (no --onnx, or --no-check) are refused.
    cli.assert_bad(["fold", ws_ckpt, "-m", "wsnets:build", "-o", "unused.pt", "--image-size",
                    "16"], "--image-size need the parity check", cwd=cwd)
    cli.assert_bad(["fold", ws_ckpt, "-m", "wsnets:build", "-o", "unused.pt", "--onnx",
                    "unused.onnx", "--no-check", "--mean", "0.5,0.5,0.5"],
                   "--mean need the parity check", cwd=cwd)
    cli.assert_bad(["check", "net.onnx", "--against", ws_ckpt, "-m", "wsnets:build", "--inputs",
                    "imgs", "--image-size", "16", "--mean", "0.5,x"], "--mean", cwd=cwd)
    Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8)).save(cwd / "imgs" / "5.png")
    cli.assert_bad(["check", "net.onnx", "--against", ws_ckpt, "-m", "wsnets:build", "--inputs",
                    "imgs"], "imgs", cwd=cwd)
