"""Hostile-review findings: edited wsconvert files and odd flag values are refused as bad input
(exit 2, one line naming the file), never an "unexpected" error, a flag the user did not pass, or
a silently different model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from wsconvert.errors import CheckpointError
from wsconvert.io.wsfile import load_model
from wsconvert.validate import check_gate_options

DATA = Path(__file__).with_name("data")


def _edited(tmp_path: Path, edit: Any) -> Path:
    """A format-2 save of the bundled GroupNorm example, its raw record changed by ``edit``."""
    import wsconvert

    folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    wsconvert.save(wsconvert.load(DATA / "tinynet_gn_v1.ws.pt"), folder / "v2.ws.pt")
    raw = copy.deepcopy(torch.load(folder / "v2.ws.pt", weights_only=True))
    edit(raw)
    path = folder / "edited.ws.pt"
    torch.save(raw, path)
    return path


def _gn(**values: Any) -> Any:
    def edit(raw: dict[str, Any]) -> None:
        raw["arch"]["transforms"][0]["layers"]["features.0.1"].update(values)
    return edit


EDITS = {
    "kwargs a list": lambda r: r["arch"].__setitem__("kwargs", [1]),
    "transforms a string": lambda r: r["arch"].__setitem__("transforms", "group_norm"),
    "transform not a mapping": lambda r: r["arch"].__setitem__("transforms", [1]),
    "layers a list": lambda r: r["arch"]["transforms"][0].__setitem__("layers", [1, 2]),
    "layer record a list": lambda r: r["arch"]["transforms"][0]["layers"].__setitem__(
        "features.0.1", [8]),
    "state dict a list": lambda r: r.__setitem__("state_dict", [1]),
    "state dict value not a tensor": lambda r: r["state_dict"].__setitem__(
        next(iter(r["state_dict"])), "x"),
    "ws layer record a list": lambda r: r["ws_layers"].__setitem__("features.0.0", [1]),
    "format negative": lambda r: r.__setitem__("wsconvert_format", -1),
    "format zero": lambda r: r.__setitem__("wsconvert_format", 0),
    "format a bool": lambda r: r.__setitem__("wsconvert_format", True),
    "groups 0": _gn(groups=0),
    "groups negative": _gn(groups=-8),
    "groups not dividing the channels": _gn(groups=3),
    "groups above the channels": _gn(groups=10**30),
    "groups a float": _gn(groups=2.5),
    "groups a bool": _gn(groups=True),
    "groups a string": _gn(groups="8"),
    "gn eps NaN": _gn(eps=float("nan")),
    "gn eps negative": _gn(eps=-1.0),
    "gn eps a string": _gn(eps="x"),
    "factory kwargs rejected by the factory": lambda r: r["arch"].__setitem__(
        "kwargs", {"num_classes": -3}),
}


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_edited_records_are_refused_naming_the_file(tmp_path: Path, edit: str) -> None:
    path = _edited(tmp_path, EDITS[edit])
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    assert "`model`" not in message and "`groups`" not in message  # never a flag not passed


def test_edited_record_through_the_cli_is_one_line_exit_2(cli: Any, tmp_path: Path) -> None:
    path = _edited(tmp_path, EDITS["layers a list"])
    cli.one_line_error(cli.run("inspect", path, in_process=True), 2, str(path))
    path = _edited(tmp_path, _gn(groups=0))
    proc = cli.run("inspect", path, in_process=True)
    cli.one_line_error(proc, 2, str(path))
    assert "--groups" not in proc.stderr
    path = _edited(tmp_path, lambda r: r["arch"].__setitem__("kwargs", {"num_classes": -3}))
    proc = cli.run("inspect", path, in_process=True)
    cli.one_line_error(proc, 2, str(path))
    assert "--model" not in proc.stderr.split("consent")[0]


def test_unedited_record_still_loads(tmp_path: Path) -> None:
    path = _edited(tmp_path, lambda r: None)
    assert load_model(path).has_ws


@pytest.mark.parametrize("atol, rtol", [(float("inf"), 1e-3), (1e-4, float("inf")),
                                        (float("nan"), 1e-3), (-1e-12, 0.0)])
def test_tolerances_must_be_finite(atol: float, rtol: float) -> None:
    from wsconvert.errors import UsageError

    with pytest.raises(UsageError, match="finite"):
        check_gate_options(1, atol, rtol)


def test_tolerance_edges_pass() -> None:
    check_gate_options(1, 0.0, 0.0)
    check_gate_options(1, 1e300, 1e300)


def test_infinite_atol_through_the_cli(cli: Any, tmp_path: Path) -> None:
    proc = cli.run("check", tmp_path / "m.onnx", "--against", tmp_path / "m.ws.pt",
                   "--atol", "inf", in_process=True)
    cli.one_line_error(proc, 2, "--atol")


def test_demo_failing_late_keeps_every_earlier_file(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure at the fold (after the baseline, apply and fine-tune stages wrote their files)
    leaves the files of an earlier run untouched and no staging directory behind."""
    from wsconvert import demo
    from wsconvert.errors import ConversionError

    out = tmp_path / "run"
    out.mkdir()
    for name in demo.FILES:
        (out / name).write_bytes(b"earlier run " + name.encode())
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir()}

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise ConversionError("injected failure at the fold")

    monkeypatch.setattr(demo, "fold_and_export", failing)
    with pytest.raises(ConversionError, match="injected"):
        demo.run_demo(demo.DemoConfig.quick(out, force=True))
    assert {p.name: (p.read_bytes(), p.stat().st_ino) for p in out.iterdir()} == before


@pytest.mark.parametrize("args, needle", [
    (["--threads", "100000000000"], "threads"),
    (["--threads", "1025"], "threads"),
    (["--batch-sizes", "100000000000000000"], "--batch-sizes"),
    (["--batch-sizes", "1", "--input-shape", "3,100000,100000"], "limit"),
])
def test_bench_huge_values_are_bad_input(cli: Any, args: list[str], needle: str) -> None:
    cli.one_line_error(cli.run("bench", *args, in_process=True), 2, needle)


def test_bench_limits_edges() -> None:
    from wsconvert.bench import MAX_THREADS, BenchConfig
    from wsconvert.errors import UsageError
    from wsconvert.io.inputs import MAX_INPUT_ELEMENTS

    BenchConfig(threads=MAX_THREADS).validate()
    BenchConfig(batch_sizes=(MAX_INPUT_ELEMENTS // 3,), input_shape=(3, 1, 1)).validate()
    with pytest.raises(UsageError):
        BenchConfig(batch_sizes=(MAX_INPUT_ELEMENTS // 3 + 1,), input_shape=(3, 1, 1)).validate()
