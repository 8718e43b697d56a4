"""The CLI end to end, through the installed ``wsconvert`` entry point, as a user types it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import wsconvert

EXE = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
    env["COLUMNS"] = "200"
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_and_version() -> None:
    t0 = time.perf_counter()
    proc = run("--help")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0
    for cmd in ("apply", "inspect", "demo"):
        assert cmd in proc.stdout
    assert "Examples:" in proc.stdout
    assert elapsed < 5  # generous: the help path must not import torch
    assert run("--version").stdout.strip() == f"wsconvert {wsconvert.__version__}"
    assert "Example:" in run("apply", "--help").stdout
    code = "import sys, wsconvert.cli.app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_python_dash_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "wsconvert", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "wsconvert" in proc.stdout


def test_apply_json_and_inspect(net_state: Path) -> None:
    before = sha(net_state)
    proc = run("apply", net_state, "--model", "wsnets:build", "--convention", "timm",
               "--init", "exact", "--json", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    out = net_state.with_name("net.ws.pt")
    assert report["output"] == str(out) and out.exists()
    status = {r["name"]: (r["status"], r["reason"]) for r in report["layers"]}
    assert status["stem"][0] == "converted" and status["grouped"][0] == "converted"
    assert status["dw1"] == ("skipped", "fan-in 1: standardizing would give NaN or a dead layer")
    assert status["head"][0] == "skipped"
    assert report["converted"] == 3 and report["convention"] == "timm"
    assert sha(net_state) == before

    proc = run("inspect", out, "--json", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    info = {r["name"]: r for r in json.loads(proc.stdout)["layers"]}
    assert info["stem"]["ws"] == "wsconvert" and info["stem"]["convention"] == "timm"
    assert info["dw1"]["ws"] == "none" and info["dw1"]["fan_in"] == 1

    model = wsconvert.load(out)
    assert len(list(wsconvert.surgery.ws_layers(model))) == 3


def test_apply_human_table(net_state: Path) -> None:
    proc = run("apply", net_state, "-m", "wsnets:build", "-o", "custom.ws.pt",
               "--exclude", "grouped", cwd=net_state.parent)
    assert proc.returncode == 0, proc.stderr
    assert "matched by --exclude" in proc.stdout and "2 layer(s) converted" in proc.stdout
    assert (net_state.parent / "custom.ws.pt").exists()


def test_apply_errors_one_line_exit_2(net_state: Path) -> None:
    cwd = net_state.parent
    one_line_error(run("apply", cwd / "missing.pt", "-m", "wsnets:build", cwd=cwd), 2,
                   "missing.pt", "no such file")
    one_line_error(run("apply", net_state, cwd=cwd), 2, "--model")
    one_line_error(run("apply", net_state, "-m", "wsnets:build", "--convention", "x", cwd=cwd), 2,
                   "unknown convention")
    assert run("apply", net_state, "-m", "wsnets:build", cwd=cwd).returncode == 0
    one_line_error(run("apply", net_state, "-m", "wsnets:build", cwd=cwd), 2, "already exists")
    one_line_error(run("apply", cwd / "net.ws.pt", "-o", "again.pt", cwd=cwd), 2,
                   "already has Weight Standardization")
    assert not (cwd / "again.pt").exists()
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)).state_dict(), cwd / "lin.pt")
    one_line_error(run("apply", cwd / "lin.pt", "-m", "wsnets:build", cwd=cwd), 2, "missing")


def test_untrusted_pickle_refused(nets_dir: Path) -> None:
    import wsnets  # type: ignore[import-not-found]

    torch.save(wsnets.build(), nets_dir / "whole.pt")
    one_line_error(run("apply", "whole.pt", cwd=nets_dir), 2, "wsnets.Net", "--trust")
    proc = run("apply", "whole.pt", "--trust", "--json", cwd=nets_dir)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["converted"] == 3


def test_debug_variable_shows_traceback(net_state: Path) -> None:
    env = dict(os.environ, WSCONVERT_DEBUG="1")
    proc = subprocess.run([EXE, "apply", "nope.pt", "-m", "wsnets:build"], capture_output=True,
                          text=True, cwd=net_state.parent, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
