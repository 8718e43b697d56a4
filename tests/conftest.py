"""Shared fixtures: a user's model module on disk (``nets_dir``, ``net_state``) and the one CLI
harness (``cli``)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wsconvert.cli.app import app

# A user's model file: importable by MODULE:FACTORY from the directory the CLI runs in.
NETS_SOURCE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, width=8, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.dw1 = nn.Conv2d(width, width, 1, groups=width)  # fan-in 1
        self.grouped = nn.Conv2d(width, 2 * width, 3, padding=2, dilation=2, groups=2,
                                 padding_mode="reflect")
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = self.dw1(self.dw(x))
        x = torch.relu(self.grouped(x))
        return self.head(x.mean((2, 3)))


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3)
        self.c3 = nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1))
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
        self.fc = nn.Linear(6, 5)

    def forward(self, a, b):
        y1 = self.c1(a).mean(-1)
        y3 = self.c3(b).mean((2, 3, 4))
        u = self.up(y3[:, :, None, None].expand(-1, -1, 3, 3)).mean((2, 3))
        return self.fc(y1 + u)


def build(width=8, classes=3):
    torch.manual_seed(0)
    return Net(width, classes)


def mixed():
    torch.manual_seed(1)
    return Mixed()


def broken():
    raise RuntimeError("factory exploded")


def exits():
    import sys
    sys.exit(0)


class ExitNet(Net):
    def forward(self, x):
        raise SystemExit(0)


class BufferNet(Net):
    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.full((3,), 1.5), persistent=False)

    def forward(self, x):
        return super().forward(x) * self.gain


def with_buffer():
    torch.manual_seed(0)
    return BufferNet()


def with_f64_buffer():
    net = with_buffer()
    net.gain = net.gain.double()  # a table built in float64 in a float32 model
    return net


def exits_in_forward():
    torch.manual_seed(0)
    return ExitNet()


def linear_only():
    return nn.Sequential(nn.Linear(3, 3))
'''


@pytest.fixture
def nets_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding ``wsnets.py``, made the working directory and importable."""
    (tmp_path / "wsnets.py").write_text(NETS_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("wsnets", None)
    yield tmp_path
    sys.modules.pop("wsnets", None)


@pytest.fixture
def net_state(nets_dir: Path) -> Path:
    """A trained-looking state dict of ``wsnets:build`` on disk."""
    import wsnets  # type: ignore[import-not-found]

    model = wsnets.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = nets_dir / "net.pt"
    torch.save(model.state_dict(), path)
    return path


class Cli:
    """The one CLI harness.

    ``run`` goes through the installed ``wsconvert`` entry point in a subprocess, as a user types
    it; ``in_process=True`` runs the same Typer app in this process (for the hundreds of quick
    bad-input cases of the hardening tests). Both return a ``CompletedProcess``.
    """

    exe = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"

    def run(self, *args: str | Path, cwd: Path | None = None,
            in_process: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [str(a) for a in args]
        if in_process:
            result = CliRunner().invoke(app, argv, env={"COLUMNS": "200"})
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                raise AssertionError(f"uncaught {type(result.exception).__name__}: "
                                     f"{result.exception}")
            return subprocess.CompletedProcess(argv, result.exit_code, result.stdout,
                                               result.stderr)
        env = {k: v for k, v in os.environ.items() if k != "WSCONVERT_DEBUG"}
        env["COLUMNS"] = "200"
        return subprocess.run([self.exe, *argv], capture_output=True, text=True, cwd=cwd,
                              env=env, timeout=300)

    def invoke(self, *args: str | Path) -> tuple[int, str, str]:
        """In process: ``(exit code, stdout, stderr)``."""
        proc = self.run(*args, in_process=True)
        return proc.returncode, proc.stdout, proc.stderr

    @staticmethod
    def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
        """Exit ``code`` with one ``error:`` line on stderr holding every needle."""
        assert proc.returncode == code, (proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("error: ")
        assert "Traceback" not in proc.stderr
        for needle in needles:
            assert needle in lines[0], lines[0]

    def assert_bad(self, args: list[str | Path], *needles: str, cwd: Path) -> None:
        """In process: exit 2, one error line holding the needles, nothing written in ``cwd``."""
        before = {p.name for p in cwd.iterdir()}
        self.one_line_error(self.run(*args, in_process=True), 2, *needles)
        assert {p.name for p in cwd.iterdir()} == before, "an output file was written"

    @staticmethod
    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()
