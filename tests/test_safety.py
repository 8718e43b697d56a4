"""Safety round 2 (issue #11): recorded factories need consent, the working directory never
shadows imports, outputs never land on inputs or on each other, failed runs keep every previous
file, non-finite values never pass, user-supplied strings are never markup, non-regular files are
refused, interrupts clean up, probe inputs have a size limit.

Exit codes are checked through the installed entry point (``run``) where the process matters
(signals, tracebacks, umask, hangs) and in-process (``invoke``) elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import wsconvert
from wsconvert.cli.app import app
from wsconvert.errors import (
    CheckpointError,
    UntrustedCheckpointError,
    UsageError,
    WsconvertError,
)

EXE = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"
RUNNER = CliRunner()
SHAPE = "1,3,8,8"

# Extra factories a user could write: a lazy model, a half-precision model, a linear layer, and
# one whose error message carries colour codes and several lines.
EXTRA_SOURCE = '''
import torch
from torch import nn


def lazy():
    return nn.Sequential(nn.LazyConv2d(4, 3))


def half():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).half()


def lin():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3))


def ansi():
    raise RuntimeError("\\x1b[1;31mboom\\x1b[0m\\n  second line\\n\\x1b[m")
'''


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300,
        umask: int = -1) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
    full["COLUMNS"] = "200"
    full.update(env or {})
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=full, timeout=timeout, umask=umask)


def invoke(*args: object) -> tuple[int, str, str]:
    result = RUNNER.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stdout, result.stderr


def error_line(code: int, err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    assert "Traceback" not in err and "unexpected" not in line, line
    assert "\x1b" not in err, repr(err)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(d: Path) -> dict[str, str]:
    """Every regular file under ``d`` (links followed) with its hash; a changed, added or removed
    file shows as a difference."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(d))] = sha(p)
    return out


def bad(args: list[Any], d: Path, *needles: str, code: int = 2) -> str:
    """The command fails with ``code`` and one line, and no file in ``d`` changes."""
    before = snapshot(d)
    got, _, err = invoke(*args)
    assert got == code, (args, err)
    line = error_line(got, err, *needles)
    assert snapshot(d) == before, f"{args}: a file changed"
    return line


@pytest.fixture
def extra(nets_dir: Path) -> Iterator[Path]:
    (nets_dir / "wsextra.py").write_text(EXTRA_SOURCE)
    sys.modules.pop("wsextra", None)
    yield nets_dir
    sys.modules.pop("wsextra", None)


@pytest.fixture
def files(net_state: Path) -> dict[str, Path]:
    """net.pt (state dict), net.ws.pt (apply), net.onnx (fold --onnx), in.pt (inputs)."""
    d = net_state.parent
    code, _, err = invoke("apply", net_state, "-m", "wsnets:build", "--no-drift")
    assert code == 0, err
    code, _, err = invoke("fold", "net.ws.pt", "-m", "wsnets:build", "--onnx", "net.onnx",
                          "-o", "fixture.folded.pt", "--input-shape", SHAPE, "--no-check")
    assert code == 0, err
    torch.save({"x": torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))},
               d / "in.pt")
    return {"state": net_state, "ws": d / "net.ws.pt", "onnx": d / "net.onnx",
            "folded": d / "fixture.folded.pt", "inputs": d / "in.pt"}


def _rewrite_ws(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    obj = torch.load(src, weights_only=True)
    edit(obj)
    torch.save(obj, dst)
    return dst


# ------------------------------------------------------------------ 1. recorded factories: consent


@pytest.fixture
def evil_ws(files: dict[str, Path]) -> tuple[Path, Path]:
    """A real WS checkpoint whose recorded factory was edited to ``os:system``."""
    d = files["ws"].parent
    marker = d / "MARKER"

    def edit(obj: dict[str, Any]) -> None:
        obj["arch"] = {"kind": "factory", "factory": "os:system",
                       "kwargs": {"command": f"echo PWNED > {marker}"}}

    return _rewrite_ws(files["ws"], d / "evil.ws.pt", edit), marker


def test_recorded_factory_never_runs_without_consent_cli(evil_ws: tuple[Path, Path],
                                                         files: dict[str, Path]) -> None:
    evil, marker = evil_ws
    d = evil.parent
    cases: list[list[Any]] = [
        ["inspect", evil], ["fold", evil], ["apply", evil, "-o", "x.ws.pt"],
        ["fold", evil, "--onnx", "e.onnx", "--input-shape", SHAPE],
        ["check", files["onnx"], "--against", evil],
        ["fold", files["state"], "--from", evil, "-o", "x.pt"]]
    for args in cases:
        line = bad(args, d, "evil.ws.pt", "os:system", "--model os:system", "--trust")
        assert not marker.exists(), args
        assert "wsnets" not in line
    # The refusal goes through the real entry point too.
    proc = run("inspect", evil, cwd=d)
    assert proc.returncode == 2
    error_line(2, proc.stderr, "os:system", "--trust")
    assert not marker.exists()


def test_recorded_factory_never_runs_without_consent_python(evil_ws: tuple[Path, Path]) -> None:
    evil, marker = evil_ws
    with pytest.raises(UntrustedCheckpointError, match=r"os:system.*model='os:system'.*trust=True"):
        wsconvert.load(evil)
    with pytest.raises(UntrustedCheckpointError, match="os:system") as info:
        wsconvert.load_model(evil)
    assert "--" not in str(info.value)  # the library names parameters, not flags
    assert not marker.exists()
    # A different model= is no consent: it is refused, and nothing runs.
    with pytest.raises(WsconvertError, match="os:system"):
        wsconvert.load(evil, model="wsnets:build")
    assert not marker.exists()
    # Consent is real: the payload runs when asked to (the factory then fails to be a model).
    with pytest.raises(WsconvertError):
        wsconvert.load(evil, model="os:system")
    assert marker.read_text().strip() == "PWNED"


def test_model_flag_must_match_the_record(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    # The same factory is consent: everything works.
    assert invoke("inspect", files["ws"], "-m", "wsnets:build")[0] == 0
    assert isinstance(wsconvert.load(files["ws"], model="wsnets:build"), nn.Module)
    assert isinstance(wsconvert.load(files["ws"], trust=True), nn.Module)
    # No consent: refused, naming the recorded factory.
    bad(["inspect", files["ws"]], d, "wsnets:build", "--model wsnets:build", "--trust")
    # Another factory is refused, never silently ignored.
    line = bad(["inspect", files["ws"], "-m", "wsnets:mixed"], d, "wsnets:build")
    assert "wsnets:mixed" in line
    bad(["fold", files["ws"], "-m", "wsnets:mixed"], d, "wsnets:build", "wsnets:mixed")
    bad(["inspect", files["ws"], "-m", "wsnets:build", "--model-kwargs", '{"width": 4}'], d,
        "model-kwargs")
    with pytest.raises(WsconvertError, match="wsnets:build"):
        wsconvert.load(files["ws"], model="wsnets:mixed")
    # --from: the WS checkpoint's recorded factory needs the same consent.
    torch.save(wsconvert.load(files["ws"], model="wsnets:build").state_dict(), d / "tuned.pt")
    bad(["fold", "tuned.pt", "--from", files["ws"]], d, "wsnets:build", "--trust")
    assert invoke("fold", "tuned.pt", "--from", files["ws"], "-m", "wsnets:build")[0] == 0


def test_group_norm_record_needs_consent_for_the_inner_factory(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    code, _, err = invoke("apply", files["state"], "-m", "wsnets:build", "--norm", "gn",
                          "--groups", "4", "--no-drift", "-o", "gn.ws.pt")
    assert code == 0, err
    bad(["inspect", "gn.ws.pt"], d, "wsnets:build", "--model wsnets:build")
    assert invoke("inspect", "gn.ws.pt", "-m", "wsnets:build")[0] == 0
    # wsconvert's own GroupNorm wrapper does not launder a hostile inner factory.
    marker = d / "MARKER"

    def edit(obj: dict[str, Any]) -> None:
        obj["arch"] = {"kind": "factory", "factory": "wsconvert.norms:build_with_group_norm",
                       "kwargs": {"factory": "os:system",
                                  "kwargs": {"command": f"echo PWNED > {marker}"}, "norms": {}}}

    _rewrite_ws(files["ws"], d / "wrapped.ws.pt", edit)
    bad(["inspect", "wrapped.ws.pt"], d, "os:system", "--trust")
    with pytest.raises(UntrustedCheckpointError, match="os:system"):
        wsconvert.load(d / "wrapped.ws.pt")
    assert not marker.exists()


def test_only_wsconvert_builders_are_trusted(files: dict[str, Path]) -> None:
    """Any other function of the wsconvert package is not a builder: a record naming one (here,
    one that writes files) needs consent like any user factory."""
    d = files["ws"].parent
    target = d / "WRITTEN"

    def edit(obj: dict[str, Any]) -> None:
        obj["arch"] = {"kind": "factory", "factory": "wsconvert.cli.app:main", "kwargs": {}}

    _rewrite_ws(files["ws"], d / "own.ws.pt", edit)
    bad(["inspect", "own.ws.pt"], d, "wsconvert.cli.app:main", "--trust")

    def edit2(obj: dict[str, Any]) -> None:
        obj["arch"] = {"kind": "factory", "factory": "pathlib:Path.write_text",
                       "kwargs": {"self": str(target), "data": "x"}}

    _rewrite_ws(files["ws"], d / "own2.ws.pt", edit2)
    bad(["inspect", "own2.ws.pt"], d, "pathlib:Path.write_text")
    assert not target.exists()


def test_bundled_builders_need_no_consent(nets_dir: Path) -> None:
    from wsconvert.examples import EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY

    for norm in ("keep", "gn"):
        out = f"tiny-{norm}.ws.pt"
        code, _, err = invoke("apply", EXAMPLE_CHECKPOINT, "-m", EXAMPLE_FACTORY, "--norm", norm,
                              "--no-drift", "-o", out)
        assert code == 0, err
        code, _, err = invoke("inspect", out)
        assert code == 0, err
        assert isinstance(wsconvert.load(nets_dir / out), nn.Module)
        assert invoke("inspect", out, "-m", EXAMPLE_FACTORY)[0] == 0
        code, _, err = invoke("inspect", out, "-m", "wsnets:build")
        assert code == 2 and EXAMPLE_FACTORY in err


# ------------------------------------------------------------------ 2. the cwd never shadows


SHADOW = 'open({marker!r}, "w").write("ran")\nraise ImportError("shadowed")\n'


def test_working_directory_never_shadows_imports(files: dict[str, Path]) -> None:
    from wsconvert.examples import EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY

    d = files["ws"].parent
    code, _, err = invoke("apply", EXAMPLE_CHECKPOINT, "-m", EXAMPLE_FACTORY, "--no-drift",
                          "-o", "tiny.ws.pt")
    assert code == 0, err
    names = ("onnx", "numpy", "profile", "onnxruntime")
    for name in names:
        (d / f"{name}.py").write_text(SHADOW.format(marker=str(d / f"SHADOW_{name}")))
    for args in (["fold", "tiny.ws.pt", "--onnx", "t.onnx", "-o", "t.pt", "--input-shape",
                  "1,3,24,24"],
                 ["fold", "net.ws.pt", "-m", "wsnets:build", "--onnx", "n2.onnx", "-o", "n2.pt",
                  "--input-shape", SHAPE],
                 ["check", "n2.onnx", "--against", "net.ws.pt", "-m", "wsnets:build"],
                 ["inspect", "net.pt", "-m", "wsnets:build"]):
        proc = run(*args, cwd=d)
        assert proc.returncode == 0, (args, proc.stderr)
        ran = [n for n in names if (d / f"SHADOW_{n}").exists()]
        assert not ran, (args, ran)
    # `python -m wsconvert` puts the directory first on sys.path; wsconvert takes it off.
    env = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "wsconvert", "fold", "tiny.ws.pt", "--onnx",
                           "t3.onnx", "-o", "t3.pt", "--input-shape", "1,3,24,24"],
                          capture_output=True, text=True, cwd=d, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not [n for n in names if (d / f"SHADOW_{n}").exists()]


# ------------------------------------------------------------------ 3. outputs never land on inputs


def _links(d: Path, target: Path, stem: str) -> tuple[Path, Path]:
    sym, hard = d / f"sym-{stem}", d / f"hard-{stem}"
    sym.symlink_to(target.name)
    os.link(target, hard)
    return sym, hard


def test_report_flags_never_overwrite_inputs(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    ws, onnx_file, inputs = files["ws"], files["onnx"], files["inputs"]
    m = ["-m", "wsnets:build"]
    check = ["check", onnx_file, "--against", ws, *m]
    bad([*check, "--report", ws], d, "net.ws.pt", "--report")
    bad([*check, "--junit", onnx_file], d, "net.onnx", "--junit")
    bad([*check, "--report", "r.json", "--junit", "r.json"], d, "r.json", "--report", "--junit")
    bad([*check, "--inputs", inputs, "--report", inputs], d, "in.pt")
    # --save-failing DIR would write DIR/<input set>.pt and DIR/report.json.
    bad([*check, "--inputs", inputs, "--save-failing", "."], d, "in.pt", "--save-failing")
    (d / "report.json").write_text("{\"mine\": 1}")
    bad([*check, "--save-failing", "."], d, "report.json", "--force")
    # ... and DIR itself, or a directory it would be made in, is never a file of the run.
    bad([*check, "--report", "outx", "--save-failing", "outx"], d, "--save-failing outx",
        "--report outx")
    bad([*check, "--junit", "outy", "--save-failing", "outy/sub"], d, "--junit outy")
    (d / "plain.txt").write_text("x")
    bad([*check, "--save-failing", "plain.txt/sub"], d, "plain.txt", "not a directory")
    for alias in _links(d, ws, "ws.pt"):
        bad([*check, "--report", alias], d, "--report")
    _links(d, files["state"], "state.pt")
    for alias in _links(d, onnx_file, "m.onnx"):
        bad([*check, "--junit", alias], d, "--junit")
    fold = ["fold", ws, *m, "--onnx", "f.onnx", "--input-shape", SHAPE]
    bad([*fold, "--report", ws], d, "net.ws.pt", "--report")
    bad([*fold, "--report", "x.json", "--junit", "x.json"], d, "x.json")
    bad([*fold, "--junit", "f.onnx"], d, "f.onnx", "--onnx", "--junit")
    bad([*fold, "-o", "f.onnx", "--force"], d, "f.onnx")
    bad([*fold, "--report", "net.folded.pt", "--force"], d, "net.folded.pt")
    bad(["apply", files["state"], *m, "-o", d / "hard-state.pt", "--force"], d, "hard-state.pt")
    bad(["apply", files["state"], *m, "-o", d / "sym-ws.pt", "--force", "--inputs",
         d / "sym-ws.pt"], d, "sym-ws.pt")
    bad(["fold", "net.pt", *m, "-o", d / "hard-ws.pt", "--from", ws, "--force"], d, "hard-ws.pt")
    # The same run without collisions succeeds and writes every file.
    code, _, err = invoke(*check, "--report", "r.json", "--junit", "r.xml", "--inputs", inputs,
                          "--save-failing", "failing")
    assert code == 0, err
    assert (d / "r.json").exists() and (d / "r.xml").exists()


def test_save_failing_is_named_in_the_report_file_too(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    code, out, err = invoke("check", files["onnx"], "--against", files["ws"], "-m",
                            "wsnets:build", "--atol", "0", "--rtol", "0", "--report", "r0.json",
                            "--save-failing", "sf", "--json")
    assert code == 1, err  # a parity failure stays exit 1
    assert json.loads((d / "r0.json").read_text())["failing_inputs_saved_to"] == "sf"
    assert '"failing_inputs_saved_to": "sf"' in out
    assert (d / "sf" / "report.json").exists()


def test_an_unwritable_output_directory_is_found_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsconvert.io.atomic import check_output

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path
                        else real(p, mode))
    with pytest.raises(UsageError, match=r"cannot write to .* \(permission denied\)"):
        check_output(tmp_path / "out.pt")
    with pytest.raises(UsageError, match="permission denied"):  # made later, under tmp_path
        check_output(tmp_path / "new" / "sub" / "x.pt", parent_may_be_missing=True)


def test_demo_never_overwrites_without_force(nets_dir: Path) -> None:
    d = nets_dir / "demo"
    d.mkdir()
    (d / "baseline.pt").write_bytes(b"precious")
    (d / "parity.json").write_bytes(b"mine")
    bad(["demo", "--quick", "--out-dir", d], nets_dir, "baseline.pt", "--force")


# ------------------------------------------------------------------ 4. failed runs keep old files


def test_failed_fold_force_keeps_previous_files(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    ws = files["ws"]
    m = ["-m", "wsnets:build"]
    (d / "keep.onnx").write_bytes(b"previous onnx")
    (d / "keep.pt").write_bytes(b"previous checkpoint")
    (d / "adir").mkdir()
    base = ["fold", ws, *m, "--onnx", "keep.onnx", "--input-shape", SHAPE, "--force"]
    bad([*base, "-o", "adir"], d, "adir", "directory")
    bad([*base, "-o", ws], d, "net.ws.pt")
    bad(["fold", ws, *m, "-o", "keep.onnx", "--onnx", "keep.onnx", "--force",
         "--input-shape", SHAPE], d, "keep.onnx")
    # A failure after the export (inputs that do not fit the model): both old files intact.
    torch.save(torch.randn(1, 7, 8, 8), d / "wrong.pt")
    bad([*base, "-o", "keep.pt", "--inputs", "wrong.pt"], d, "does not fit")
    # A failing shape: the export fails, nothing is replaced.
    bad(["fold", ws, *m, "--onnx", "keep.onnx", "-o", "keep.pt", "--input-shape", "1,7,8,8",
         "--force"], d, "does not fit")
    assert (d / "keep.onnx").read_bytes() == b"previous onnx"
    assert (d / "keep.pt").read_bytes() == b"previous checkpoint"
    assert not [p for p in d.iterdir() if p.name.startswith(".")]
    # And a successful --force run does replace both.
    code, _, err = invoke(*base, "-o", "keep.pt")
    assert code == 0, err
    assert (d / "keep.onnx").read_bytes() != b"previous onnx"
    assert (d / "keep.pt").read_bytes() != b"previous checkpoint"


# ------------------------------------------------------------------ 5. non-finite never passes


def _nan_ws(files: dict[str, Path], name: str = "nan.ws.pt") -> Path:
    def edit(obj: dict[str, Any]) -> None:
        w = obj["state_dict"]["stem.parametrizations.weight.original"]
        w.view(-1)[5] = float("nan")

    return _rewrite_ws(files["ws"], files["ws"].parent / name, edit)


def test_nonfinite_weights_refused_and_never_pass_the_gate(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    nan = _nan_ws(files)
    m = ["-m", "wsnets:build"]
    fold = ["fold", nan, *m, "--onnx", "nan.onnx", "--input-shape", SHAPE]
    bad(fold, d, "nan.ws.pt", "non-finite", "stem", "--allow-nonfinite")
    bad(["check", files["onnx"], "--against", nan, *m], d, "non-finite", "--allow-nonfinite")
    bad(["inspect", nan, *m], d, "non-finite")
    with pytest.raises(CheckpointError, match="non-finite"):
        wsconvert.load(nan, model="wsnets:build")
    # Allowed through: the gate runs and fails, saying why.
    code, out, err = invoke(*fold, "--allow-nonfinite")
    assert code == 1, err
    line = error_line(code, err, "non-finite")
    assert "parity holds" not in out, line
    code, out, err = invoke("check", files["onnx"], "--against", nan, *m, "--allow-nonfinite",
                            "--json")
    assert code == 1, err
    payload = json.loads(out)
    assert payload["parity"]["passed"] is False
    assert any("non-finite" in c["reason"] for c in payload["parity"]["comparisons"])


def test_compare_fails_on_nonfinite_outputs() -> None:
    from wsconvert.parity import compare

    finite = torch.tensor([1.0, 2.0, 3.0])
    for value in (float("nan"), float("inf"), float("-inf")):
        bad_t = finite.clone()
        bad_t[1] = value
        same = compare("export", "s", "out", bad_t, bad_t.clone(), 1e-4, 1e-3)
        assert not same.passed and "non-finite" in same.reason, same
        got = compare("export", "s", "out", finite, bad_t, 1e-4, 1e-3)
        assert not got.passed and "non-finite" in got.reason, got
    assert compare("export", "s", "out", finite, finite.clone(), 1e-4, 1e-3).passed


def test_nonfinite_batchnorm_statistics_refused(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    sd = torch.load(files["state"], weights_only=True)
    sd["bn.running_var"][2] = float("inf")
    torch.save(sd, d / "nanbn.pt")
    m = ["-m", "wsnets:build"]
    for args in (["apply", "nanbn.pt", *m], ["fold", "nanbn.pt", *m, "--onnx", "b.onnx",
                                              "--input-shape", SHAPE],
                 ["check", files["onnx"], "--against", "nanbn.pt", *m]):
        bad(args, d, "nanbn.pt", "non-finite", "bn.running_var", "--allow-nonfinite")
    code, _, err = invoke("apply", "nanbn.pt", *m, "--no-drift", "--allow-nonfinite")
    assert code == 0, err


def test_apply_never_writes_nonfinite_weights(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    sd = torch.load(files["state"], weights_only=True)
    sd["stem.weight"][3].fill_(0.25)  # one constant filter: std 0
    torch.save(sd, d / "const.pt")
    m = ["-m", "wsnets:build"]
    for drift in ("--no-drift", "--drift"):
        bad(["apply", "const.pt", *m, "--eps", "0", drift], d, "const.pt", "stem",
            "non-finite", "eps")
    # With the default eps the constant filter standardizes to zeros: fine.
    code, _, err = invoke("apply", "const.pt", *m, "--no-drift")
    assert code == 0, err
    model = wsconvert.load(d / "const.ws.pt", model="wsnets:build")
    assert all(bool(torch.isfinite(p).all()) for p in model.state_dict().values())


# ------------------------------------------------------------------ 6. file names are not markup


def test_file_names_are_never_markup(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    proc = run("inspect", "x[/].pt", "-m", "wsnets:build", cwd=d)
    assert proc.returncode == 2, proc.stderr
    error_line(2, proc.stderr, "x[/].pt", "no such file")
    (d / "x[").mkdir()
    shutil.copy(files["state"], d / "x[" / "].pt")
    shutil.copy(files["state"], d / "ckpt[ep3].pt")
    proc = run("inspect", "x[/].pt", "-m", "wsnets:build", cwd=d)
    assert proc.returncode == 0 and "x[/].pt" in proc.stdout, proc.stderr
    proc = run("inspect", "ckpt[ep3].pt", "-m", "wsnets:build", cwd=d)
    assert proc.returncode == 0 and "ckpt[ep3].pt" in proc.stdout, proc.stderr
    proc = run("apply", "ckpt[ep3].pt", "-m", "wsnets:build", "--no-drift", cwd=d)
    assert proc.returncode == 0 and "wrote ckpt[ep3].ws.pt" in proc.stdout, proc.stderr
    proc = run("fold", "ckpt[ep3].ws.pt", "-m", "wsnets:build", "--onnx", "m[bold].onnx",
               "--input-shape", SHAPE, cwd=d)
    assert proc.returncode == 0, proc.stderr
    assert "m[bold].onnx" in proc.stdout and "ckpt[ep3].folded.pt" in proc.stdout
    proc = run("apply", "ckpt[ep3].pt", "-m", "[/]:x", "-o", "m2.ws.pt", cwd=d)
    assert proc.returncode == 2
    error_line(2, proc.stderr, "[/]:x")
    proc = run("apply", "ckpt[ep3].pt", "-m", "wsnets:build", "-o", "[red]x[/red]/o.pt", cwd=d)
    assert proc.returncode == 2
    error_line(2, proc.stderr, "[red]x[/red]")


# ------------------------------------------------------------------ 7. non-regular targets


def _device(path: Path) -> bool:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        return False
    return True


def test_non_regular_output_targets_refused(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    m = ["-m", "wsnets:build"]
    os.mkfifo(d / "fifo.pt")
    (d / "adir").mkdir()
    targets = ["fifo.pt", "adir"]
    if _device(d / "null"):
        targets.append("null")
    (d / "devlink").symlink_to("null" if "null" in targets else "fifo.pt")
    targets.append("devlink")
    for t in targets:
        bad(["apply", files["state"], *m, "--no-drift", "-o", t, "--force"], d, t)
        bad(["check", files["onnx"], "--against", files["ws"], *m, "--report", t, "--force"], d,
            t, "--report")
        bad(["fold", files["ws"], *m, "--onnx", "x.onnx", "--input-shape", SHAPE, "--junit", t,
             "--force"], d, t, "--junit")
    assert stat.S_ISFIFO((d / "fifo.pt").stat().st_mode)
    if "null" in targets:
        assert stat.S_ISCHR((d / "null").stat().st_mode)


def test_symlink_output_rules(files: dict[str, Path]) -> None:
    """A symlink at an output path is refused without --force; with --force wsconvert writes the
    file it points to (the link stays). A dangling link is never followed without --force."""
    d = files["ws"].parent
    m = ["-m", "wsnets:build"]
    (d / "real.pt").write_bytes(b"old")
    (d / "link.pt").symlink_to("real.pt")
    (d / "dangling.pt").symlink_to("elsewhere.pt")
    apply = ["apply", files["state"], *m, "--no-drift"]
    bad([*apply, "-o", "link.pt"], d, "link.pt", "symbolic link", "--force")
    bad([*apply, "-o", "dangling.pt"], d, "dangling.pt", "symbolic link", "--force")
    bad(["check", files["onnx"], "--against", files["ws"], *m, "--report", "link.pt"], d,
        "link.pt", "--force")
    code, _, err = invoke(*apply, "-o", "link.pt", "--force")
    assert code == 0, err
    assert (d / "link.pt").is_symlink() and os.readlink(d / "link.pt") == "real.pt"
    assert (d / "real.pt").read_bytes() != b"old"
    assert isinstance(wsconvert.load(d / "real.pt", model="wsnets:build"), nn.Module)
    code, _, err = invoke(*apply, "-o", "dangling.pt", "--force")
    assert code == 0, err
    assert (d / "dangling.pt").is_symlink() and (d / "elsewhere.pt").is_file()


# ------------------------------------------------------------------ 8. folding a --norm gn model


def test_folded_group_norm_model_records_its_architecture(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    m = ["-m", "wsnets:build"]
    code, _, err = invoke("apply", files["state"], *m, "--norm", "gn", "--groups", "4",
                          "--no-drift", "-o", "gn.ws.pt")
    assert code == 0, err
    code, out, err = invoke("fold", "gn.ws.pt", *m, "--onnx", "gn.onnx", "--input-shape", SHAPE,
                            "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert "GroupNorm" in json.dumps(payload["architecture"])
    folded = wsconvert.load(d / "gn.folded.pt", model="wsnets:build").eval()
    assert isinstance(folded.bn, nn.GroupNorm)
    assert not any(parametrize_names(folded))
    ws_model = wsconvert.load(d / "gn.ws.pt", model="wsnets:build").eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ws_model(x), atol=1e-5, rtol=1e-4)
    bad(["inspect", "gn.folded.pt"], d, "wsnets:build")  # consent, like any recorded factory
    torch.load(d / "gn.folded.pt", weights_only=True)  # never needs unpickling
    code, _, err = invoke("check", "gn.onnx", "--against", "gn.folded.pt", *m)
    assert code == 0, err
    code, out, _ = invoke("fold", "gn.ws.pt", *m, "-o", "gn2.pt", "--force")
    assert "GroupNorm" in out
    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert "state dict for the original architecture;" not in docs
    assert "--norm gn" in docs[docs.index("## `wsconvert fold"):]


def parametrize_names(model: nn.Module) -> Iterator[str]:
    from torch.nn.utils import parametrize

    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            yield name


# ------------------------------------------------------------------ should-fix items


SIGNAL_HOOK = '''
import os, signal, time
import torch

_orig = torch.save


def save(obj, f, *args, **kwargs):
    _orig(obj, f, *args, **kwargs)
    try:
        os.kill(os.getpid(), signal.{name})
        time.sleep(30)
    except BaseException as exc:
        # torch's C++ writer turns an interrupt inside it into a RuntimeError.
        raise RuntimeError(f"writer failed: {{exc!r}}") from None


torch.save = save
'''


@pytest.mark.parametrize(("name", "code"), [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_interrupt_while_writing_cleans_up(net_state: Path,
                                           tmp_path_factory: pytest.TempPathFactory, name: str,
                                           code: int) -> None:
    d = net_state.parent
    hook = tmp_path_factory.mktemp("hook")
    (hook / "sitecustomize.py").write_text(SIGNAL_HOOK.format(name=name))
    before = sha(net_state)
    proc = run("apply", net_state, "-m", "wsnets:build", "--no-drift", cwd=d,
               env={"PYTHONPATH": str(hook)}, timeout=120)
    assert proc.returncode == code, proc.stderr
    error_line(code, proc.stderr, "interrupted", "before any output was written")
    assert not (d / "net.ws.pt").exists()
    assert not [p.name for p in d.iterdir() if p.name.startswith(".")]
    assert sha(net_state) == before
    assert getattr(signal, name)  # the signal exists on this platform


COMMIT_HOOK = '''
import os, signal

_replace = os.replace


def replace(src, dst):
    _replace(src, dst)
    if os.fspath(dst).endswith(".folded.pt"):  # the first of the outputs moved into place
        os.kill(os.getpid(), signal.SIGTERM)


os.replace = replace
'''


def test_a_signal_while_outputs_move_into_place_waits_for_all(
        files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    """SIGTERM after the first output is in place: the others follow (all old or all new), and
    the error line says they were written instead of claiming nothing was."""
    d = files["ws"].parent
    hook = tmp_path_factory.mktemp("commit-hook")
    (hook / "sitecustomize.py").write_text(COMMIT_HOOK)
    proc = run("fold", files["ws"], "-m", "wsnets:build", "-o", "t.folded.pt", "--onnx",
               "t.onnx", "--input-shape", SHAPE, "--report", "t.json", cwd=d,
               env={"PYTHONPATH": str(hook)}, timeout=300)
    assert proc.returncode == 143, proc.stderr
    line = error_line(143, proc.stderr, "interrupted (SIGTERM) after its outputs were written")
    for name in ("t.folded.pt", "t.onnx", "t.json"):
        assert (d / name).exists() and name in line, name
    assert json.loads((d / "t.json").read_text())["passed"] is True
    assert not [p.name for p in d.iterdir() if p.name.startswith(".wsconvert-")]


def test_probe_input_size_guard(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    m = ["-m", "wsnets:build"]
    huge = "1,3,20000,20000"
    bad(["apply", files["state"], *m, "--input-shape", huge], d, "--allow-large-inputs",
        "elements")
    bad(["fold", files["ws"], *m, "--onnx", "h.onnx", "--input-shape", huge], d,
        "--allow-large-inputs")
    bad(["check", files["onnx"], "--against", files["ws"], *m, "--input-shape",
         "100000000000000000000,3,8,8"], d, "--allow-large-inputs")
    bad(["fold", files["ws"], *m, "--onnx", "h.onnx", "--input-shape", SHAPE, "--dynamic-batch",
         "--batch-sizes", "1,100000000000000000000"], d, "--allow-large-inputs")
    bad(["check", files["onnx"], "--against", files["ws"], *m, "--seeds", "100000000000"], d,
        "--allow-large-inputs")


def test_probe_input_size_limit_edge() -> None:
    from wsconvert.errors import UsageError
    from wsconvert.io.inputs import MAX_INPUT_ELEMENTS, check_input_size

    check_input_size([(1, MAX_INPUT_ELEMENTS)])
    check_input_size([(1, MAX_INPUT_ELEMENTS // 2), (1, MAX_INPUT_ELEMENTS // 2)])
    with pytest.raises(UsageError, match="allow_large"):
        check_input_size([(1, MAX_INPUT_ELEMENTS + 1)])
    with pytest.raises(UsageError):
        check_input_size([(1, MAX_INPUT_ELEMENTS // 2), (1, MAX_INPUT_ELEMENTS // 2 + 1)])
    with pytest.raises(UsageError):
        check_input_size([(1, MAX_INPUT_ELEMENTS // 2)], copies=3)
    check_input_size([(10**20, 3)], allow_large=True)


def test_fifo_inputs_refused_without_hanging(files: dict[str, Path]) -> None:
    d = files["ws"].parent
    os.mkfifo(d / "pipe.pt")
    os.mkfifo(d / "pipe.npz")
    m = ["-m", "wsnets:build"]
    for args in (["inspect", "pipe.pt", *m],
                 ["apply", "net.pt", *m, "--inputs", "pipe.npz", "-o", "p.ws.pt"],
                 ["fold", "net.ws.pt", *m, "--onnx", "p.onnx", "--inputs", "pipe.pt"],
                 ["check", "net.onnx", "--against", "net.ws.pt", *m, "--inputs", "pipe.npz"],
                 ["check", "pipe.pt", "--against", "net.ws.pt", *m]):
        proc = run(*args, cwd=d, timeout=90)
        assert proc.returncode == 2, (args, proc.stderr)
        error_line(2, proc.stderr, "pipe", "not a regular file")


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_honour_umask(files: dict[str, Path], mask: int) -> None:
    d = files["ws"].parent
    proc = run("fold", "net.ws.pt", "-m", "wsnets:build", "-o", "u.pt", "--onnx", "u.onnx",
               "--input-shape", SHAPE, "--report", "u.json", "--junit", "u.xml", cwd=d,
               umask=mask)
    assert proc.returncode == 0, proc.stderr
    for name in ("u.pt", "u.onnx", "u.json", "u.xml"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o666 & ~mask, name


def test_debug_variable(net_state: Path) -> None:
    d = net_state.parent
    for value in ("0", "", "false", "no", "off"):
        proc = run("apply", "nope.pt", "-m", "wsnets:build", cwd=d,
                   env={"WSCONVERT_DEBUG": value})
        assert proc.returncode == 2, (value, proc.stderr)
        error_line(2, proc.stderr, "nope.pt")
    for value in ("1", "true", "yes"):
        proc = run("apply", "nope.pt", "-m", "wsnets:build", cwd=d,
                   env={"WSCONVERT_DEBUG": value})
        assert proc.returncode == 2, (value, proc.stderr)
        assert "Traceback" in proc.stderr and "nope.pt" in proc.stderr


class Runs:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.system, (f"echo pwned > {self.marker}",))


def test_legacy_and_raw_pickles_list_their_globals(nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    d = nets_dir
    marker = d / "marker"
    torch.save(wsnets.build(), d / "legacy-module.pt", _use_new_zipfile_serialization=False)
    torch.save({"w": Runs(marker)}, d / "legacy-exec.pt", _use_new_zipfile_serialization=False)
    with (d / "raw.pkl").open("wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "x": Runs(marker)}, f)
    with (d / "raw-module.pkl").open("wb") as f:
        pickle.dump(wsnets.build(), f)
    torch.save({"w": Shell(marker)}, d / "shell.pt")
    for name in ("legacy-module.pt", "raw-module.pkl"):
        line = bad(["inspect", name], d, name, "wsnets.Net", "--trust", "--allow-class")
        assert "torch.nn.modules" in line
    for name, needle in (("legacy-exec.pt", "builtins.exec"), ("raw.pkl", "builtins.exec"),
                         ("shell.pt", "system")):
        line = bad(["inspect", name], d, name, needle)
        assert "--allow-class" not in line, line
        with pytest.raises(UntrustedCheckpointError, match=needle) as info:
            wsconvert.load_model(d / name)
        assert "allow_classes" not in str(info.value)
    # A known-dangerous global is never allowed by name.
    for cls in ("posix.system", "os.system", "builtins.exec", "subprocess.Popen"):
        bad(["inspect", "shell.pt", "--allow-class", cls], d, cls)
    assert not marker.exists()


class Profiled:
    """Runs code through a standard-library function that is not an obvious command runner."""

    def __init__(self, func: Callable[..., object], marker: Path) -> None:
        self.func, self.marker = func, marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (self.func, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_allow_class_accepts_classes_only_and_names_code_runners(nets_dir: Path) -> None:
    """cProfile.run, timeit.timeit, pdb.run ... run code as surely as exec: named as such, never
    suggested for --allow-class, refused by it; and --allow-class takes classes, not functions
    (a list of dangerous names can never be complete)."""
    import cProfile
    import pdb
    import timeit

    d = nets_dir
    marker = d / "marker"
    for i, func in enumerate((cProfile.run, timeit.timeit, pdb.run)):
        name = f"runs{i}.pt"
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Profiled(func, marker)}, d / name)
        qual = f"{func.__module__}.{func.__qualname__}"
        line = bad(["inspect", name], d, name, qual, "runs commands or code")
        assert "--allow-class" not in line, line
        bad(["inspect", name, "--allow-class", qual], d, "refused")
    # torch.save writes Python 2 names (subprocess.getoutput as commands.getoutput).
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Profiled(subprocess.getoutput,
                                                                   marker)}, d / "py2.pt")
    line = bad(["inspect", "py2.pt"], d, "subprocess.getoutput", "runs commands or code")
    assert "commands.getoutput" not in line
    for cls in ("numpy.memmap", "torch.PyTorchFileWriter", "wave.Wave_write", "mailbox.mbox"):
        bad(["inspect", "py2.pt", "--allow-class", cls], d, "refused")  # they write files
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Profiled(json.loads, marker)},
               d / "func.pt")
    bad(["inspect", "func.pt", "--allow-class", "json.loads"], d, "json.loads",
        "not a class")
    assert not marker.exists()


def test_onnxruntime_logs_and_colours_never_reach_the_error(extra: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    d = extra
    torch.save(nn.Sequential(nn.Linear(3, 3)).state_dict(), d / "lin.pt")
    reshape = helper.make_node("Reshape", ["x", "s"], ["y"])
    graph = helper.make_graph(
        [reshape], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
        initializer=[helper.make_tensor("s", TensorProto.INT64, [2], [1, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]),
              str(d / "reshape.onnx"))
    proc = run("check", "reshape.onnx", "--against", "lin.pt", "-m", "wsextra:lin",
               "--batch-sizes", "1,4", cwd=d)
    assert proc.returncode == 2, proc.stderr
    error_line(2, proc.stderr, "onnxruntime", "Reshape")
    assert "[E:onnxruntime" not in proc.stderr
    proc = run("inspect", "lin.pt", "-m", "wsextra:ansi", cwd=d)
    assert proc.returncode == 2
    error_line(2, proc.stderr, "boom second line")


def test_lazy_and_half_models_get_clear_messages(extra: Path) -> None:
    d = extra
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3)).state_dict(), d / "lazy.pt")
    for cmd in ("inspect", "apply", "fold"):
        bad([cmd, "lazy.pt", "-m", "wsextra:lazy"], d, "wsextra:lazy", "lazy")
    import wsextra  # type: ignore[import-not-found]

    torch.save(wsextra.half().state_dict(), d / "half.pt")
    line = bad(["fold", "half.pt", "-m", "wsextra:half", "--onnx", "h.onnx", "--input-shape",
                SHAPE], d, "float16")
    assert "--input-shape" not in line


# ------------------------------------------------------------------ fuzz: output-path collisions


def _identity(path: Path) -> tuple[Any, ...]:
    """The file a path names: its inode when it exists (links followed), else its real path."""
    real = os.path.realpath(path)
    if os.path.exists(real):
        st = os.stat(real)
        return ("inode", st.st_dev, st.st_ino)
    return ("path", real)


def test_fuzz_output_path_collisions(files: dict[str, Path]) -> None:
    """Seeded random assignments of output flags over the inputs, links to them and each other:
    every collision is refused (exit 2) before any work with every file intact; every other
    assignment succeeds."""
    src = files["ws"].parent
    blobs = {p.name: p.read_bytes() for p in (files["ws"], files["onnx"], files["inputs"])}
    rng = random.Random(11)
    refused = succeeded = 0
    for case in range(36):
        d = src / f"case{case}"
        d.mkdir()
        for name, data in blobs.items():
            (d / name).write_bytes(data)
        for name in blobs:
            (d / f"sym-{name}").symlink_to(name)
            os.link(d / name, d / f"hard-{name}")
        command = rng.choice(["fold", "check"])
        inputs = ["net.ws.pt"] + (["net.onnx", "in.pt"] if command == "check" else [])
        pool = [*blobs, *(f"sym-{n}" for n in blobs), *(f"hard-{n}" for n in blobs),
                "shared.json", "report.json"]
        slots = ["--report", "--junit"] + (["-o", "--onnx"] if command == "fold" else [])

        def pick(slot: str, pool: list[str] = pool) -> str:
            if rng.random() < 0.55:
                return {"-o": "out.pt", "--onnx": "out.onnx"}.get(slot, f"out{slot}.x")
            if slot == "--onnx":
                return rng.choice(["net.onnx", "sym-net.onnx", "hard-net.onnx", "out.onnx"])
            return rng.choice(pool)

        chosen = {slot: pick(slot) for slot in slots}
        save_failing = rng.choice([None, ".", "sf"])
        if command == "fold":
            args = ["fold", str(d / "net.ws.pt"), "-m", "wsnets:build", "--input-shape", SHAPE]
        else:
            args = ["check", str(d / "net.onnx"), "--against", str(d / "net.ws.pt"), "-m",
                    "wsnets:build", "--inputs", str(d / "in.pt")]
        for slot, name in chosen.items():
            args += [slot, str(d / name)]
        written = [d / name for name in chosen.values()]
        if save_failing is not None:
            sf = d / save_failing
            args += ["--save-failing", str(sf)]
            written += [sf / "report.json"] + ([sf / "in.pt"] if command == "check" else [])
        args.append("--force")
        ids = [_identity(p) for p in written]
        input_ids = {_identity(d / n) for n in inputs}
        collides = len(set(ids)) < len(ids) or any(i in input_ids for i in ids)
        before = snapshot(d)
        code, _, err = invoke(*args)
        if collides:
            assert code == 2, (case, args, err)
            error_line(code, err)
            assert snapshot(d) == before, (case, args)
            refused += 1
        else:
            assert code == 0, (case, args, err)
            for name in ("net.ws.pt", "net.onnx", "in.pt"):
                if name in inputs:
                    assert (d / name).read_bytes() == blobs[name], (case, name)
            succeeded += 1
        assert not [p for p in d.iterdir() if p.name.startswith(".")], case
    assert refused >= 10 and succeeded >= 5, (refused, succeeded)


def test_outputs_never_replace_the_model_code(files: dict[str, Path]) -> None:
    """--model wsnets:build reads wsnets.py: a report, JUnit file or checkpoint written over it
    (a typo, or --force) would destroy the code that builds the model."""
    d = files["ws"].parent
    code_file = d / "wsnets.py"
    before = code_file.read_text()
    m = ["-m", "wsnets:build"]
    check = ["check", files["onnx"], "--against", files["ws"], *m]
    bad([*check, "--junit", "wsnets.py"], d, "wsnets.py", "never replaces an input")
    bad([*check, "--report", "./wsnets.py"], d, "wsnets.py")
    bad(["apply", files["state"], *m, "-o", "wsnets.py", "--force"], d, "wsnets.py")
    bad(["fold", files["ws"], *m, "-o", "wsnets.py", "--force"], d, "wsnets.py")
    assert code_file.read_text() == before


def test_input_files_and_source_files_get_their_own_message(tmp_path: Path) -> None:
    import fractions

    from wsconvert.errors import InputsError
    from wsconvert.io.inputs import load_inputs

    torch.save({"x": torch.zeros(2, 3, 8, 8), "c": fractions.Fraction(1, 3)}, tmp_path / "in.pt")
    with pytest.raises(InputsError, match="input files hold tensors only") as info:
        load_inputs(tmp_path / "in.pt")
    assert "trust" not in str(info.value)  # --trust is for the model, never for inputs
    (tmp_path / "nets.py").write_text("import torch\nfrom torch import nn\n")
    with pytest.raises(CheckpointError, match="looks like Python source") as err:
        wsconvert.load_model(tmp_path / "nets.py", "nets:build")
    assert "mport" not in str(err.value)  # no 'globals' read from text


def test_factory_source_found_through_an_import_finder(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Editable installs put a finder on sys.meta_path instead of a folder on sys.path."""
    import importlib.abc
    import importlib.util

    from wsconvert.io.spec import factory_source

    source = tmp_path / "elsewhere" / "finder_nets.py"
    source.parent.mkdir()
    source.write_text("def build(): pass\n")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> object:
            if name == "finder_nets":
                return importlib.util.spec_from_file_location(name, source)
            return None

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert factory_source("finder_nets:build") == source
    assert factory_source("timm:resnet18") is None and factory_source(None) is None


def test_ctrl_c_delivered_to_another_thread_waits_for_the_whole_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch and onnxruntime start threads; the system may hand Ctrl-C to any of them."""
    import threading
    import time

    from wsconvert.io.atomic import OutputSet

    worker = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    worker.start()
    real = os.replace

    def replace(src: str, dst: str) -> None:
        real(src, dst)
        if str(dst).endswith("a.txt"):
            assert worker.ident is not None
            signal.pthread_kill(worker.ident, signal.SIGINT)
            time.sleep(0.2)  # the handler gets its chance before the next file

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), OutputSet() as out:
        for name in "abcde":
            out.add(tmp_path / f"{name}.txt")
            out.stage(tmp_path / f"{name}.txt").write_text(name)
        out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n}.txt" for n in "abcde"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_allow_class_judges_what_a_name_is_and_keeps_value_types(nets_dir: Path) -> None:
    """A re-export of subprocess.Popen under another module is still Popen; a Python 2 name
    in a legacy pickle (commands.Popen) is read as Python 3 reads it; value types such as
    slice stay allowed by name."""
    from wsconvert.io.safe import _pickle_globals, is_dangerous, read_checkpoint

    d = nets_dir
    (d / "alias_mod.py").write_text("from subprocess import Popen\n")
    torch.save({"w": torch.zeros(1)}, d / "plain.pt")
    bad(["inspect", "plain.pt", "--allow-class", "alias_mod.Popen"], d, "subprocess.Popen",
        "refused")
    assert _pickle_globals(b"\x80\x02ccommands\nPopen\nq\x00.") == ["subprocess.Popen"]
    assert is_dangerous("subprocess.Popen") and not is_dangerous("builtins.slice")
    torch.save({"w": torch.zeros(1), "s": slice(1, 2)}, d / "slice.pt")
    assert read_checkpoint(d / "slice.pt", allow_classes=["builtins.slice"])["s"] == slice(1, 2)


def test_factory_source_of_a_package_submodule_and_package_precedence(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.abc
    import importlib.util

    from wsconvert.io.spec import factory_source

    pkg = tmp_path / "src" / "finder_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("def build(): pass\n")

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: object = None, target: object = None) -> object:
            if name == "finder_pkg":
                return importlib.util.spec_from_file_location(
                    name, pkg / "__init__.py", submodule_search_locations=[str(pkg)])
            return None

    monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
    assert factory_source("finder_pkg.nets:build") == pkg / "nets.py"
    # dup.py beside dup/__init__.py: Python imports the package, so that is the source.
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "__init__.py").write_text("")
    (tmp_path / "dup.py").write_text("")
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert factory_source("dup:build") == tmp_path / "dup" / "__init__.py"


def test_factory_source_of_a_compiled_only_module(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import py_compile

    from wsconvert.io.spec import factory_source

    (tmp_path / "src.py").write_text("def build(): pass\n")
    py_compile.compile(str(tmp_path / "src.py"), cfile=str(tmp_path / "pyconly.pyc"))
    (tmp_path / "src.py").unlink()
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    assert factory_source("pyconly:build") == tmp_path / "pyconly.pyc"
    from wsconvert.io.safe import is_dangerous

    assert is_dangerous("_pyio.FileIO")  # the pure-Python io: opens files like io does
