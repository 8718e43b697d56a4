"""The app itself through the installed entry point: help, version, ``python -m``, debug."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import wsconvert

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Cli


def test_help_and_version(cli: Cli) -> None:
    t0 = time.perf_counter()
    proc = cli.run("--help")
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0
    for cmd in ("apply", "inspect", "demo"):
        assert cmd in proc.stdout
    assert "Examples:" in proc.stdout
    assert elapsed < 5  # generous: the help path must not import torch
    assert cli.run("--version").stdout.strip() == f"wsconvert {wsconvert.__version__}"
    assert "Example:" in cli.run("apply", "--help").stdout
    code = "import sys, wsconvert.cli.app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_python_dash_m() -> None:
    proc = subprocess.run([sys.executable, "-m", "wsconvert", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "wsconvert" in proc.stdout


def test_debug_variable_shows_traceback(cli: Cli, net_state: Path) -> None:
    env = dict(os.environ, WSCONVERT_DEBUG="1")
    proc = subprocess.run([cli.exe, "apply", "nope.pt", "-m", "wsnets:build"], capture_output=True,
                          text=True, cwd=net_state.parent, env=env)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
