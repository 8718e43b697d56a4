"""``wsconvert demo``: the pipeline on the bundled example, offline, in a directory it names."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from wsconvert.cli._common import Output, escape, guarded


@guarded
def demo_cmd(
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", help="Directory for the demo's files [default: a fresh temp dir].",
        show_default=False)] = None,
) -> None:
    """Run apply on the bundled example checkpoint, offline.

    \b
    Example:
      wsconvert demo --out-dir /tmp/wsdemo
    """
    from wsconvert.checkpoint import load_model, save
    from wsconvert.examples import EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY
    from wsconvert.surgery import apply_ws

    out = Output()
    work = out_dir or Path(tempfile.mkdtemp(prefix="wsconvert-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "tinynet.pt"
    shutil.copyfile(EXAMPLE_CHECKPOINT, ckpt)
    loaded = load_model(ckpt, EXAMPLE_FACTORY)
    report = apply_ws(loaded.model, "paper", init="exact", inplace=True)
    ws_path = save(report.model, work / "tinynet.ws.pt", force=True)
    out.result(f"[green]✓[/] apply: {escape(report.summary())} -> {escape(ws_path)}")
