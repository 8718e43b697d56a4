"""The bundled end-to-end demo: the whole wsconvert pipeline on a tiny task, offline.

Stages, each timed: fine-tune a short BatchNorm baseline at batch 32 from the bundled pretrained
TinyNet; ``apply`` (WS + GroupNorm swap, ``--init exact``, recovered on unlabeled training
images as ``--calib-data`` does; step-0 accuracy before and after recovery); fine-tune at batch
2 (the paper's micro-batch regime); ``fold`` from the saved WS checkpoint; ONNX export; parity
with onnxruntime. Every file goes into one directory. Apply and fold-export-parity are
:mod:`wsconvert.pipeline` calls, as the commands make them. The library computes;
``wsconvert demo`` renders.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wsconvert.examples import EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY, EXAMPLE_INPUT_SHAPE
from wsconvert.examples.shapes import make_dataset
from wsconvert.examples.training import accuracy, fine_tune
from wsconvert.io.atomic import check_output, save_state_dict
from wsconvert.io.wsfile import load, load_model, save
from wsconvert.norms import swap_norm
from wsconvert.pipeline import convert, fold_and_export
from wsconvert.surgery import apply_ws

__all__ = ["FILES", "STAGES", "DemoConfig", "DemoResult", "check_outputs", "run_demo"]

STAGES = ("baseline", "apply", "fine-tune", "fold", "export", "parity")
_STAGED = ("tinynet.pt", "baseline.pt", "calib.pt", "baseline.ws.pt", "tuned.ws.pt")
"""Written by the demo's own stages into a staging folder, moved into place at the end."""
FILES = (*_STAGED, "tuned.folded.pt", "tuned.onnx", "parity.json", "parity.xml")
"""The files the demo writes in its directory (the rest by ``fold_and_export``'s commit)."""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick()`` is the reduced mode the test suite runs."""

    out_dir: Path
    train_samples: int = 1024
    test_samples: int = 1024
    noise: float = 1.2
    baseline_epochs: int = 1
    finetune_epochs: int = 2
    groups: int = 8
    seed: int = 0
    threads: int = 1  # a 25k-parameter net: one thread is fastest, and immune to contention
    force: bool = False  # replace files of an earlier run in ``out_dir``
    recover_samples: int = 512
    recover_steps: int = 100

    @classmethod
    def quick(cls, out_dir: Path, force: bool = False) -> DemoConfig:
        return cls(out_dir, train_samples=128, test_samples=128, baseline_epochs=1,
                   finetune_epochs=1, force=force, recover_samples=128, recover_steps=10)


@dataclass
class DemoResult:
    """Accuracies, reports, files and stage timings of one demo run."""

    out_dir: Path
    accuracy: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    parity: Any = None
    op_histogram: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "accuracy": self.accuracy,
                "files": {k: str(v) for k, v in self.files.items()}, "seconds": self.seconds,
                "summaries": self.summaries, "op_histogram": self.op_histogram,
                "parity": self.parity.to_dict() if self.parity is not None else None}


def check_outputs(config: DemoConfig) -> None:
    """Refuse, before anything is written, to replace a file of :data:`FILES` in
    ``config.out_dir`` without ``config.force`` (or any non-regular file there).

    Raises:
        OutputExistsError, UsageError: naming the file.
    """
    for name in FILES:
        # The bundled example is the demo's input: never replaced, even with ``force``.
        check_output(config.out_dir / name, force=config.force, name="out_dir",
                     protect=[EXAMPLE_CHECKPOINT],
                     parent_may_be_missing=True)


def run_demo(config: DemoConfig,
             on_stage: Callable[[str, str], None] | None = None) -> DemoResult:
    """Run every stage; ``on_stage(stage, "start" | "done")`` reports progress.

    Raises:
        OutputExistsError: a file of :data:`FILES` already exists in ``out_dir`` and not
            ``config.force`` (checked before anything is written).
        WsconvertError: any stage failing (the demo uses the same checks as the commands).
    """
    notify = on_stage or (lambda stage, event: None)
    out = config.out_dir
    check_outputs(config)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    # The files of the stages before the fold are staged here and moved into place only after
    # the fold and export (which commit their own files all or nothing) succeeded: an error or
    # an interrupt at any stage leaves an earlier run's files as they were.
    staging = Path(tempfile.mkdtemp(prefix=".wsconvert-demo-", dir=out))
    try:
        x, y = make_dataset(config.train_samples, seed=1000 + config.seed, noise=config.noise)
        xt, yt = make_dataset(config.test_samples, seed=2000 + config.seed, noise=config.noise)

        @contextlib.contextmanager
        def stage(name: str) -> Iterator[None]:
            notify(name, "start")
            t0 = time.perf_counter()
            yield
            result.seconds[name] = round(time.perf_counter() - t0, 2)
            notify(name, "done")

        pretrained_path = staging / "tinynet.pt"
        shutil.copyfile(EXAMPLE_CHECKPOINT, pretrained_path)

        with stage("baseline"):
            model = load_model(pretrained_path, EXAMPLE_FACTORY).model
            result.accuracy["pretrained"] = accuracy(model, xt, yt)
            torch.manual_seed(config.seed)
            fine_tune(model, x, y, batch=32, lr=0.05, epochs=config.baseline_epochs,
                      seed=config.seed)
            result.accuracy["bn_baseline_b32"] = accuracy(model, xt, yt)
            result.files["baseline"] = save_state_dict(model.state_dict(),
                                                       staging / "baseline.pt", force=True)

        with stage("apply"):
            # Step-0 accuracy of the plain conversion, then the same conversion recovered on
            # unlabeled training images (as `apply --calib-data`).
            plain = swap_norm(apply_ws(load_model(result.files["baseline"], EXAMPLE_FACTORY)
                                       .model, init="exact").model, config.groups).model
            result.accuracy["converted"] = accuracy(plain, xt, yt)
            calib = save_state_dict((x[:config.recover_samples],), staging / "calib.pt",
                                    force=True)
            converted = convert(result.files["baseline"], staging / "baseline.ws.pt",
                                model=EXAMPLE_FACTORY, init="exact", norm="gn",
                                groups=config.groups, drift=False, force=True,
                                calib_data=calib, recover_steps=config.recover_steps,
                                recover_seed=config.seed)
            result.summaries["apply"] = converted.apply.summary()
            result.summaries["norm"] = converted.norm.summary() if converted.norm else ""
            if converted.recovery is not None:
                result.summaries["recovery"] = converted.recovery.summary()
            result.accuracy["recovered"] = accuracy(converted.model, xt, yt)
            result.files["ws"] = converted.output
            result.files["calib"] = calib

        with stage("fine-tune"):
            model = load(result.files["ws"])
            torch.manual_seed(config.seed)
            fine_tune(model, x, y, batch=2, lr=0.0125, epochs=config.finetune_epochs,
                      seed=config.seed)
            result.accuracy["ws_gn_b2"] = accuracy(model, xt, yt)
            result.files["tuned"] = save(model, staging / "tuned.ws.pt", force=True)

        # From the saved file, as a user's later `wsconvert fold --onnx` would. The pipeline's
        # stages map onto the demo's: load + fold, export, gate + the commit of every file.
        timed = {"load": "fold", "fold": "fold", "export": "export", "gate": "parity",
                 "save": "parity"}
        current: list[str] = []

        @contextlib.contextmanager
        def pipeline_stage(name: str) -> Iterator[None]:
            demo_stage = timed[name]
            if not current or current[-1] != demo_stage:
                if current:
                    notify(current[-1], "done")
                current.append(demo_stage)
                notify(demo_stage, "start")
            t0 = time.perf_counter()
            yield
            result.seconds[demo_stage] = round(result.seconds.get(demo_stage, 0.0)
                                               + time.perf_counter() - t0, 2)

        shape = ",".join(map(str, EXAMPLE_INPUT_SHAPE))
        folded = fold_and_export(
            result.files["tuned"], out / "tuned.folded.pt", onnx=out / "tuned.onnx",
            input_shape=shape, dynamic_batch=True, report=out / "parity.json",
            junit=out / "parity.xml", force=True, progress=pipeline_stage)
        notify(current[-1], "done")
        result.summaries["fold"] = folded.fold.summary()
        result.accuracy["folded"] = accuracy(folded.model, xt, yt)
        result.files["folded"] = folded.output
        if folded.onnx is not None:
            result.op_histogram = folded.onnx.op_histogram
            result.files["onnx"] = folded.onnx.path
        result.parity = folded.parity
        result.files["parity_json"] = out / "parity.json"
        result.files["parity_junit"] = out / "parity.xml"
        for name in _STAGED:
            os.replace(staging / name, out / name)
        result.files.update(baseline=out / "baseline.pt", calib=out / "calib.pt",
                            ws=out / "baseline.ws.pt", tuned=out / "tuned.ws.pt")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(threads)
    return result
