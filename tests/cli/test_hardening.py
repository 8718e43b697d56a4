"""Bad input on every command: one line, exit 2, nothing written, input untouched; fuzzing;
untrusted pickles never run code; deterministic outputs."""

from __future__ import annotations

import io
import os
import random
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn

import wsconvert
from wsconvert.errors import UntrustedCheckpointError

if TYPE_CHECKING:
    from conftest import Cli

class RunsCode:
    """Unpickling this writes a marker file: the attack an untrusted checkpoint can carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _bad_files(d: Path, net_state: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    files["missing"] = d / "missing.pt"
    files["directory"] = d / "adir"
    files["directory"].mkdir()
    files["empty"] = d / "empty.pt"
    files["empty"].write_bytes(b"")
    data = net_state.read_bytes()
    files["truncated"] = d / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["random"] = d / "random.pt"
    files["random"].write_bytes(random.Random(0).randbytes(4096))
    files["zip"] = d / "notes.pt"
    with zipfile.ZipFile(files["zip"], "w") as zf:
        zf.writestr("notes.txt", "not a checkpoint")
    files["torchscript"] = d / "scripted.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))).save(str(files["torchscript"]))
    files["onnx"] = d / "model.onnx"
    files["onnx"].write_bytes(b"\x08\x08\x12\x07pytorch" + b"\x00" * 64)
    return files


CASES = ["missing", "directory", "empty", "truncated", "random", "zip", "torchscript", "onnx"]
NEEDLES = {"missing": "no such file", "directory": "directory", "empty": "empty",
           "truncated": "not a readable", "random": "not a readable", "zip": "zip",
           "torchscript": "TorchScript", "onnx": "ONNX"}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["apply", "inspect", "fold", "check"])
def test_unreadable_checkpoint_matrix(cli: Cli, net_state: Path, case: str, command: str) -> None:
    d = net_state.parent
    files = _bad_files(d, net_state)
    path = files[case]
    if command == "check":
        if case == "onnx":  # a checkpoint where an ONNX file is expected
            cli.assert_bad(["check", net_state, "--against", net_state, "-m", "wsnets:build"],
                           "net.pt", "ONNX", cwd=d)
            return
        args: list[str | Path] = ["check", _good_onnx(d), "--against", path, "-m", "wsnets:build"]
    else:
        args = [command, path, "-m", "wsnets:build"]
    cli.assert_bad(args, path.name, NEEDLES[case], cwd=d)


_ONNX_CACHE: dict[str, bytes] = {}


def _good_onnx(d: Path) -> Path:
    path = d / "good.onnx"
    if path.exists():
        return path
    if "bytes" not in _ONNX_CACHE:
        import wsnets  # type: ignore[import-not-found]

        from wsconvert.export import ExportConfig, export_onnx

        export_onnx(wsnets.build(), d / "tmp.onnx", ExportConfig(((1, 3, 8, 8),)))
        _ONNX_CACHE["bytes"] = (d / "tmp.onnx").read_bytes()
        (d / "tmp.onnx").unlink()
    path.write_bytes(_ONNX_CACHE["bytes"])
    return path


def test_state_dict_and_model_problems(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    sd = torch.load(net_state, weights_only=True)
    bad = dict(sd)
    bad.pop("stem.weight")
    bad["bogus"] = torch.zeros(2)
    bad["head.weight"] = torch.zeros(9, 9)
    torch.save(bad, d / "bad.pt")
    for cmd in ("apply", "inspect", "fold"):
        cli.assert_bad([cmd, "bad.pt", "-m", "wsnets:build"], "bad.pt", "missing (stem.weight)",
                       "unexpected (bogus)", "mis-shaped", cwd=d)
        cli.assert_bad([cmd, net_state, "-m", "nope_mod:build"], "cannot import", cwd=d)
        cli.assert_bad([cmd, net_state, "-m", "wsnets:broken"], "factory exploded", cwd=d)
        cli.assert_bad([cmd, net_state, "-m", "wsnets:build", "--model-kwargs", "[1]"], "JSON",
                       cwd=d)
    torch.save(nn.Sequential(nn.Linear(3, 3)).state_dict(), d / "lin.pt")
    cli.assert_bad(["apply", "lin.pt", "-m", "wsnets:linear_only"], "lin.pt", "no convolution",
                   cwd=d)
    nan = dict(sd)
    nan["stem.weight"] = sd["stem.weight"].clone().fill_(float("nan"))
    torch.save(nan, d / "nan.pt")
    cli.assert_bad(["apply", "nan.pt", "-m", "wsnets:build"], "nan.pt", "NaN", cwd=d)
    assert cli.invoke("apply", net_state, "-m", "wsnets:build")[0] == 0
    ws = d / "net.ws.pt"
    m = ["-m", "wsnets:build"]  # consent to run the factory net.ws.pt records
    cli.assert_bad(["apply", ws, *m, "-o", "again.pt"], "net.ws.pt", "already has Weight", cwd=d)
    cli.assert_bad(["fold", ws, *m, "--onnx", "o.onnx", "--input-shape", "1,3,x"],
                   "--input-shape", cwd=d)
    cli.assert_bad(["fold", ws, *m, "--onnx", "o.onnx", "--input-shape", "1,7,8,8"],
                   "does not fit", cwd=d)
    cli.assert_bad(["check", _good_onnx(d), "--against", ws, *m, "--input-shape", "1,7,8,8"],
                   "does not fit", cwd=d)
    target = "/proc/wsconvert-out.pt" if os.geteuid() == 0 else str(d / "ro" / "x.pt")
    if os.geteuid() != 0:
        (d / "ro").mkdir()
        (d / "ro").chmod(0o500)
    cli.assert_bad(["apply", net_state, "-m", "wsnets:build", "-o", target, "--force"], "x.pt"
                   if os.geteuid() != 0 else "wsconvert-out.pt", cwd=d)


def test_sys_exit_in_model_code_never_decides_the_exit_code(cli: Cli, net_state: Path) -> None:
    """A factory or a forward that calls sys.exit(0) would make the gate pass unchecked."""
    d = net_state.parent
    onnx = _good_onnx(d)
    cli.assert_bad(["check", onnx, "--against", net_state, "-m", "wsnets:exits"],
                   "wsnets:exits called sys.exit(0)", cwd=d)
    cli.assert_bad(["check", onnx, "--against", net_state, "-m", "wsnets:exits_in_forward",
                    "--json"], "called sys.exit(0); nothing was checked", cwd=d)
    cli.assert_bad(["apply", net_state, "-m", "wsnets:exits_in_forward"], "sys.exit(0)", cwd=d)
    (d / "exit_on_import.py").write_text("import sys\nsys.exit(3)\n")
    cli.assert_bad(["inspect", net_state, "-m", "exit_on_import:build"],
                   "called sys.exit(3) on import", cwd=d)


def test_untrusted_pickle_never_runs(cli: Cli, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "marker"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": RunsCode(marker)},
               tmp_path / "evil.pt")
    with pytest.raises(UntrustedCheckpointError, match=r"builtins\.exec"):
        wsconvert.load_model(tmp_path / "evil.pt")
    with pytest.raises(UntrustedCheckpointError):
        wsconvert.load(tmp_path / "evil.pt")
    for cmd in ("apply", "inspect", "fold"):
        cli.one_line_error(cli.run(cmd, "evil.pt", cwd=tmp_path), 2, "builtins.exec", "--trust")
    assert not marker.exists()
    # The payload is real: trusting the file does run it.
    with pytest.raises(Exception):  # noqa: B017 - whatever follows, the code has run
        wsconvert.load_model(tmp_path / "evil.pt", trust=True)
    assert marker.read_text() == "pwned"


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(3)
    buf = bytearray(data)
    if kind == 0:  # flipped bytes
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 1:  # truncation
        return bytes(buf[: rng.randrange(1, len(buf))])
    # spliced zip members: swap the contents of two members, or drop one
    src = zipfile.ZipFile(io.BytesIO(data))
    names = src.namelist()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        a, b = rng.sample(names, 2)
        drop = rng.random() < 0.3
        for n in names:
            if drop and n == a:
                continue
            payload = src.read(b if n == a else a if n == b else n)
            dst.writestr(n, payload)
    return out.getvalue()


def test_fuzz_corrupted_checkpoints(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    assert cli.invoke("apply", net_state, "-m", "wsnets:build")[0] == 0
    sources = {"state": net_state.read_bytes(), "ws": (d / "net.ws.pt").read_bytes()}
    rng = random.Random(1234)
    outcomes: dict[int, int] = {}
    for i in range(210):
        src = rng.choice(sorted(sources))
        bad = d / f"fuzz{i}.pt"
        bad.write_bytes(_corrupt(sources[src], rng))
        before = cli.sha(bad)
        for cmd in ("apply", "inspect", "fold"):
            out = d / f"fuzz{i}.{cmd}.out"
            args: list[str | Path] = [cmd, bad, "-m", "wsnets:build"]
            if cmd != "inspect":
                args += ["-o", out]
            t0 = time.perf_counter()
            code, _, err = cli.invoke(*args)  # raises on any uncaught exception
            assert time.perf_counter() - t0 < 60, f"case {i} {cmd} took too long"
            assert code in (0, 2), (i, cmd, err)
            assert "Traceback" not in err
            if code == 2:
                assert len(err.strip().splitlines()) == 1, err
                assert not out.exists()
            outcomes[code] = outcomes.get(code, 0) + 1
        assert cli.sha(bad) == before
        assert not [p for p in d.iterdir() if p.name.startswith(".")], "temp file left behind"
    assert outcomes.get(2, 0) > 300  # most corruptions must be caught, not silently accepted


def test_outputs_are_deterministic(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    for name in ("a.ws.pt", "b.ws.pt"):
        assert cli.invoke("apply", net_state, "-m", "wsnets:build", "-o", name)[0] == 0
    assert cli.sha(d / "a.ws.pt") == cli.sha(d / "b.ws.pt")
    for name in ("a.f.pt", "b.f.pt"):
        assert cli.invoke("fold", net_state, "-m", "wsnets:build", "-o", name)[0] == 0
    assert cli.sha(d / "a.f.pt") == cli.sha(d / "b.f.pt")
    code, _, err = cli.invoke("fold", net_state, "-m", "wsnets:build", "-o", "c.f.pt", "--onnx",
                              "n.onnx", "--input-shape", "1,3,8,8", "--no-check")
    assert code == 0, err
    onnx_file = d / "n.onnx"
    reports = []
    for name in ("r1.json", "r2.json"):
        code, _, err = cli.invoke("check", onnx_file, "--against", net_state, "-m", "wsnets:build",
                                  "--report", name)
        assert code == 0, err
        reports.append((d / name).read_bytes())
    assert reports[0] == reports[1]


def test_existing_output_not_overwritten(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    (d / "net.ws.pt").write_bytes(b"precious")
    cli.assert_bad(["apply", net_state, "-m", "wsnets:build"], "already exists", cwd=d)
    assert (d / "net.ws.pt").read_bytes() == b"precious"
    cli.assert_bad(["apply", net_state, "-m", "wsnets:build", "-o", net_state, "--force"],
                   "overwrite the input", cwd=d)


def test_torchscript_refused_even_with_trust(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3))).save(str(path))
    with pytest.raises(wsconvert.WsconvertError, match="TorchScript"):
        wsconvert.load_model(path, trust=True)


def test_fold_gate_options_checked_before_writing(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    assert cli.invoke("apply", net_state, "-m", "wsnets:build", "--no-drift")[0] == 0
    ws = d / "net.ws.pt"
    base = ["fold", ws, "-m", "wsnets:build", "-o", "f.pt", "--onnx", "f.onnx", "--input-shape",
            "1,3,8,8"]
    cli.assert_bad([*base, "--batch-sizes", "1,4"], "--dynamic-batch", cwd=d)
    cli.assert_bad([*base, "--seeds", "0"], "--seeds", cwd=d)
    cli.assert_bad([*base, "--report", "nodir/r.json"], "nodir", cwd=d)
    cli.assert_bad([*base, "--inputs", "missing.npz"], "missing.npz", cwd=d)
    cli.assert_bad([*base, "--no-check", "--junit", "j.xml"], "--junit", cwd=d)
    # With --from, --model is the consent to run the factory the WS checkpoint records: it must
    # be that factory.
    cli.assert_bad(["fold", net_state, "--from", ws, "-m", "wsnets:mixed"], "wsnets:build",
                   "wsnets:mixed", cwd=d)


def test_error_names_the_file_it_is_about(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    cli.assert_bad(["check", "missing.onnx", "--against", net_state, "-m", "wsnets:build"],
                   cwd=d)
    _, _, err = cli.invoke("check", "missing.onnx", "--against", net_state, "-m", "wsnets:build")
    assert err.startswith("error: missing.onnx: ")


def test_json_output_is_strict_json(cli: Cli, net_state: Path) -> None:
    """Overflowing drift figures (finite weights, infinite relative change) and NaN statistics
    come out as "inf" / null, never the bare Infinity / NaN that strict parsers reject."""
    import json

    d = net_state.parent
    sd = torch.load(net_state, weights_only=True)
    sd["head.weight"] = sd["head.weight"] * 1e38
    sd["bn.weight"] = sd["bn.weight"] * 1e38
    torch.save(sd, d / "huge.pt")

    def refuse(token: str) -> None:
        raise AssertionError(f"non-strict JSON constant {token}")

    code, out, err = cli.invoke("apply", "huge.pt", "-m", "wsnets:build", "-o", "huge.ws.pt",
                                "--json")
    assert code == 0, err
    assert '"inf"' in out
    json.loads(out, parse_constant=refuse)
    nan = dict(torch.load(net_state, weights_only=True))
    nan["head.weight"] = nan["head.weight"].clone()
    nan["head.weight"][0, 0] = float("nan")
    torch.save(nan, d / "nanhead.pt")
    code, out, err = cli.invoke("inspect", "nanhead.pt", "-m", "wsnets:build",
                                "--allow-nonfinite", "--json")
    assert code == 0, err
    json.loads(out, parse_constant=refuse)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int32, torch.float8_e4m3fn])
def test_integer_or_8_bit_weights_are_refused_not_cast(cli: Cli, net_state: Path,
                                                       dtype: torch.dtype) -> None:
    d = net_state.parent
    sd = torch.load(net_state, weights_only=True)
    sd["stem.weight"] = sd["stem.weight"].to(dtype)
    torch.save(sd, d / "typed.pt")
    name = str(dtype).replace("torch.", "")
    cli.assert_bad(["apply", "typed.pt", "-m", "wsnets:build"], "typed.pt",
                   f"not floating point (stem.weight {name} for float32)", cwd=d)
    half = torch.load(net_state, weights_only=True)
    half["stem.weight"] = half["stem.weight"].half()  # another float width: cast, as torch does
    torch.save(half, d / "half.pt")
    assert cli.invoke("apply", "half.pt", "-m", "wsnets:build", "--force")[0] == 0


def test_bench_takes_the_flag_its_error_suggests(cli: Cli, net_state: Path) -> None:
    d = net_state.parent
    sd = torch.load(net_state, weights_only=True)
    sd["head.weight"] = sd["head.weight"].clone().fill_(float("nan"))
    torch.save(sd, d / "nanhead.pt")
    args = ["bench", "nanhead.pt", "-m", "wsnets:build", "--input-shape", "3,8,8",
            "--batch-sizes", "1", "--rounds", "1", "--warmup", "0", "--convention", "paper",
            "--no-references"]
    cli.assert_bad(args, "nanhead.pt", "--allow-nonfinite", cwd=d)
    code, _, err = cli.invoke(*args, "--allow-nonfinite")
    assert code == 0, err


def test_onnxruntime_errors_keep_the_line_that_says_what_is_wrong(cli: Cli,
                                                                  net_state: Path) -> None:
    d = net_state.parent
    proc = cli.run("check", _good_onnx(d), "--against", net_state, "-m", "wsnets:build",
                   "--input-shape", "1,3,16,16", in_process=True)
    cli.one_line_error(proc, 2, "onnxruntime rejected input set", "Got: 16 Expected: 8")


def test_interrupt_message_names_only_outputs_that_are_there(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo commits into a staging folder it later removes: such files are not outputs."""
    import typer

    from wsconvert.cli._common import guarded
    from wsconvert.io import atomic

    kept = tmp_path / "kept.pt"
    kept.write_text("x")

    @guarded
    def command(paths: list[Path]) -> None:
        atomic.COMMITTED.extend(paths)
        raise KeyboardInterrupt

    for paths, needle in (([tmp_path / "gone" / "staged.pt"], "before any output was written"),
                          ([tmp_path / "gone.pt", kept], f"after its outputs were written "
                                                         f"({kept})")):
        with pytest.raises(typer.Exit) as info:
            command(paths)
        assert info.value.exit_code == 130
        assert needle in capsys.readouterr().err
