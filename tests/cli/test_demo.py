"""The bundled demo, end to end through the entry point, in its reduced mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

import wsconvert
from wsconvert.examples import EXAMPLE_CHECKPOINT

if TYPE_CHECKING:
    from conftest import Cli


def test_demo_quick_end_to_end(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = cli.run("demo", "--quick", "--out-dir", out, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["parity"]["passed"] is True
    assert set(result["parity"]["stages"]) == {"fold", "export"}
    acc = result["accuracy"]
    assert set(acc) == {"pretrained", "bn_baseline_b32", "converted", "recovered", "ws_gn_b2",
                        "folded"}
    assert acc["recovered"] > acc["converted"]  # --init exact + GroupNorm starts at chance
    assert acc["folded"] == acc["ws_gn_b2"]  # folding keeps the function
    assert set(result["seconds"]) == {"baseline", "apply", "fine-tune", "fold", "export",
                                      "parity"}
    for key in ("baseline", "calib", "ws", "tuned", "folded", "onnx", "parity_json",
                "parity_junit"):
        assert Path(result["files"][key]).parent == out and Path(result["files"][key]).exists()
    # The tuned WS checkpoint rebuilds on its own (GroupNorm swap included).
    model = wsconvert.load(out / "tuned.ws.pt")
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert "Conv" in result["op_histogram"]


def test_demo_never_writes_into_the_package(cli: Cli, tmp_path: Path) -> None:
    before = sorted(p.name for p in EXAMPLE_CHECKPOINT.parent.iterdir())
    proc = cli.run("demo", "--quick", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "demo complete in" in proc.stdout and "wsconvert-demo-" in proc.stdout
    assert sorted(p.name for p in EXAMPLE_CHECKPOINT.parent.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


def test_demo_never_replaces_its_bundled_input(cli: Cli, tmp_path: Path) -> None:
    """--out-dir at the package's examples with --force: the example checkpoint is an input."""
    from wsconvert.demo import DemoConfig, check_outputs
    from wsconvert.errors import UsageError

    before = cli.sha(EXAMPLE_CHECKPOINT)
    with pytest.raises(UsageError, match=r"would overwrite the input .*tinynet\.pt"):
        check_outputs(DemoConfig.quick(EXAMPLE_CHECKPOINT.parent, force=True))
    proc = cli.run("demo", "--quick", "--force", "--out-dir", EXAMPLE_CHECKPOINT.parent,
                   in_process=True)
    cli.one_line_error(proc, 2, "tinynet.pt", "never replaces an input")
    assert cli.sha(EXAMPLE_CHECKPOINT) == before


def test_demo_out_dir_that_is_a_file_is_refused_first(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    proc = cli.run("demo", "--quick", "--out-dir", tmp_path / "afile", in_process=True)
    cli.one_line_error(proc, 2, "afile is not a directory")
    assert (tmp_path / "afile").read_text() == "x"
