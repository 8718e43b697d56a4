"""Library wording -> command-line wording: the table names real flags, translation is exact, and
library messages name parameters, not flags."""

from __future__ import annotations

import re
from pathlib import Path

from typer.main import get_command

import wsconvert
from wsconvert.cli._errors import FLAGS, cli_text
from wsconvert.cli.app import app

PACKAGE = Path(wsconvert.__file__).parent
# Modules of other owners still naming flags in two raise statements each; see their issues.
PENDING: set[str] = set()


def _all_flags() -> set[str]:
    group = get_command(app)
    flags: set[str] = set()
    for command in group.commands.values():  # type: ignore[attr-defined]
        for param in command.params:
            flags.update(param.opts)
            flags.update(param.secondary_opts)
    return flags


def test_every_flag_in_the_table_exists() -> None:
    flags = _all_flags()
    for token, shown in FLAGS.items():
        assert shown.split()[0] in flags, (token, shown)


def test_translation() -> None:
    assert cli_text("`input_shape` '1,a': want integers") == "--input-shape '1,a': want integers"
    assert cli_text("x: already exists (pass `force=True` to overwrite)") == (
        "x: already exists (pass --force to overwrite)")
    assert cli_text("`calibrate` needs the probe inputs; drop `drift=False`") == (
        "--calibrate needs the probe inputs; drop --no-drift")
    for unchanged in ("write one with `wsconvert apply`", "`no_such_parameter` is unknown",
                      "plain text"):
        assert cli_text(unchanged) == unchanged


def test_library_raises_name_parameters_not_flags() -> None:
    raise_with_flag = re.compile(r"raise \w+\(\s*f?\"[^\"]*(?<![\w`])--[a-z]")
    assert raise_with_flag.search('raise UsageError(f"--seeds must be at least 1")')
    assert not raise_with_flag.search('raise UsageError("`seeds` must be at least 1")')
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name in PENDING:
            continue
        text = path.read_text()
        assert not raise_with_flag.search(text), f"{rel} raises an error naming a flag"


def test_usage_errors_are_one_line_through_the_entry_point(tmp_path: Path) -> None:
    """An unknown option, a value that does not parse, a missing option or command: one
    ``error:`` line naming the command's help, exit 2, as for every other bad input."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("wsconvert", path=str(Path(sys.executable).parent)) or "wsconvert"
    cases = [(["check", "m.onnx", "--atol", "abc"], "Invalid value for '--atol'"),
             (["check", "m.onnx", "--nope"], "No such option: --nope"),
             (["check", "m.onnx"], "Missing option '--against'"),
             (["nosuch"], "No such command 'nosuch'")]
    for argv, needle in cases:
        proc = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
        assert "--help')" in lines[0]
    for argv, code in ((["--version"], 0), (["--help"], 0), (["check"], 2)):
        proc = subprocess.run([exe, *argv], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == code, (argv, proc.stderr)
        assert "error:" not in proc.stderr  # versions and help are not errors
