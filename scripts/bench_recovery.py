"""Recovery figures: step-0 accuracy of converted models before and after ``wsconvert.recover``.

Three cases (docs/recovery.md has the results and the machine they ran on):

* ``tiny``: the bundled BatchNorm-pretrained TinyNet, 512 unlabeled samples of its pretraining
  distribution (``make_dataset(512, seed=3, noise=0.6)``), accuracy on 2048 fresh samples
  (``make_dataset(2048, seed=1, noise=0.6)``), ``--norm gn --groups 8``, init plain and exact.
* ``residual``: a ResNet-style BatchNorm network with projection shortcuts (24-96 channels,
  scripts/recovery_models.py), pretrained here on a ten-class synthetic task (or loaded from
  ``--cache``), same settings.
* ``resnet50``: the ResNet-50 of scripts/resnet.py (seeded random weights, BatchNorm statistics
  estimated on the random inputs), 224x224 inputs: runs, with progress, the time per step and the
  agreement.

Run: ``python scripts/bench_recovery.py [--only tiny residual resnet50] [--seeds 3] [--json F]``.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recovery_models import ResidualNet, accuracy, make_task, pretrain

from wsconvert.norms import swap_norm
from wsconvert.recovery import RecoveryProgress, recover
from wsconvert.surgery import apply_ws


def _convert(model: nn.Module, init: str, groups: int) -> nn.Module:
    return swap_norm(apply_ws(model, "paper", init=init).model, groups, inplace=True).model


def _printer(label: str, every: int) -> Any:
    def show(e: RecoveryProgress) -> None:
        if e.stage != "distill" or e.done % every == 0 or e.done == e.total or e.detail:
            loss = "" if e.loss is None else f" loss {e.loss:.4f}"
            eta = ""
            if e.stage == "distill" and e.done:
                eta = f" eta {e.seconds / e.done * (e.total - e.done):.0f}s"
            print(f"  [{label}] {e.stage} {e.done}/{e.total} {e.seconds:.1f}s{eta}{loss} "
                  f"{e.detail}", file=sys.stderr, flush=True)
    return show


def _case(name: str, original: nn.Module, make_calib: Any, xt: torch.Tensor,
          yt: torch.Tensor, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per init and per seed k (``--seeds``): calibration samples ``make_calib(k)``, split and
    batch-order seed ``--seed + k``."""
    rows = []
    acc0 = accuracy(original, xt, yt)
    for init in args.inits:
        # The conversion and its step-0 accuracy do not depend on the seed: made once per init.
        template = _convert(original, init, args.groups)
        step0 = accuracy(template, xt, yt)
        for k in range(args.seeds):
            calib, seed = make_calib(k), args.seed + k
            converted = copy.deepcopy(template)
            t0 = time.perf_counter()
            closed = copy.deepcopy(template)
            recover(closed, original, calib, steps=0, seed=seed)
            t_closed = time.perf_counter() - t0
            t1 = time.perf_counter()
            report = recover(converted, original, calib, steps=args.steps, seed=seed,
                             **_kwargs(args), progress=_printer(f"{name} {init}", 50))
            seconds = time.perf_counter() - t1
            row = {"case": name, "init": init, "seed": seed, "original": acc0,
                   "converted": step0, "closed_form": accuracy(closed, xt, yt),
                   "recovered": accuracy(converted, xt, yt), "seconds_closed_form": t_closed,
                   "seconds": seconds, "report": report.to_dict()}
            rows.append(row)
            print(f"{name} {init} seed {seed}: original {100 * acc0:.2f}%, converted "
                  f"{100 * step0:.2f}%, closed form {100 * row['closed_form']:.2f}%, recovered "
                  f"{100 * row['recovered']:.2f}% ({seconds:.1f} s, "
                  f"{report.seconds_per_step * 1000:.0f} ms/step)", file=sys.stderr, flush=True)
    return rows


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("lr", "batch_size", "features", "temperature"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    if args.mixup:
        out["mixup"] = True
    if args.no_augment:
        out["augment"] = False
    return out


def tiny(args: argparse.Namespace) -> list[dict[str, Any]]:
    from wsconvert.examples import EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY
    from wsconvert.examples.shapes import make_dataset
    from wsconvert.io.wsfile import load_model

    original = load_model(EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY).model.eval()
    xt, yt = make_dataset(2048, seed=1, noise=0.6)
    return _case("tinynet", original, lambda k: make_dataset(args.samples, seed=3 + k,
                                                             noise=0.6)[0], xt, yt, args)


def residual(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    original = ResidualNet()
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.exists():
        original.load_state_dict(torch.load(cache, weights_only=True))
    else:
        t0 = time.perf_counter()
        x, y = make_task(4096, seed=0)
        pretrain(original, x, y, epochs=4)
        print(f"  [residual] pretrained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if cache is not None:
            torch.save(original.state_dict(), cache)
    original.eval()
    xt, yt = make_task(2048, seed=1)
    return _case("residual", original, lambda k: make_task(args.samples, seed=7 + k)[0], xt, yt,
                 args)


def resnet50(args: argparse.Namespace) -> list[dict[str, Any]]:
    from resnet import resnet50 as build  # scripts/resnet.py

    from wsconvert.calibration import calibrate_bn

    original = build(seed=0)
    g = torch.Generator().manual_seed(0)
    data = torch.randn(args.resnet_samples, 3, 224, 224, generator=g)
    calibrate_bn(original, [(data[:8],)])
    original.eval()
    rows = []
    for init in args.inits:
        converted = _convert(original, init, 32)
        t0 = time.perf_counter()
        report = recover(converted, original, data, steps=args.resnet_steps, batch_size=4,
                         holdout=4, seed=args.seed, eval_every=max(args.resnet_steps, 1),
                         **{k: v for k, v in _kwargs(args).items() if k != "batch_size"},
                         progress=_printer(f"resnet50 {init}", 1))
        seconds = time.perf_counter() - t0
        rows.append({"case": "resnet50", "init": init, "seconds": seconds,
                     "report": report.to_dict()})
        print(f"resnet50 {init}: {report.summary()}; {seconds:.0f} s, "
              f"{report.seconds_per_step:.1f} s/step", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=("tiny", "residual", "resnet50"),
                        default=["tiny", "residual", "resnet50"])
    parser.add_argument("--inits", nargs="+", default=["plain", "exact"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1, help="runs per case and init: calibration "
                        "samples and split seed differ per run; the table gives mean and max gap")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--features", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--mixup", action="store_true")
    parser.add_argument("--no-augment", action="store_true", help="distill without flips/shifts")
    parser.add_argument("--resnet-samples", type=int, default=16)
    parser.add_argument("--resnet-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", help="residual net state dict: loaded when present, else "
                        "written after pretraining")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.steps is None:
        from wsconvert.recovery import DEFAULT_STEPS

        args.steps = DEFAULT_STEPS
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for case in args.only:
        rows += {"tiny": tiny, "residual": residual, "resnet50": resnet50}[case](args)
    print("| case | init | original | converted (step 0) | closed form | recovered | gap | time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["case"] == "resnet50":
            rep = r["report"]
            before, after = rep["stages"][0], rep["stages"][-1]
            print(f"| resnet50 | {r['init']} | agreement | {100 * before['agreement']:.0f}% | "
                  f"{100 * rep['stages'][1]['agreement']:.0f}% | {100 * after['agreement']:.0f}%"
                  f" | | {r['seconds']:.0f} s ({rep['seconds_per_step']:.1f} s/step) |")
            continue
        print(f"| {r['case']} (seed {r['seed']}) | {r['init']} | {100 * r['original']:.2f}% | "
              f"{100 * r['converted']:.2f}% | {100 * r['closed_form']:.2f}% | "
              f"{100 * r['recovered']:.2f}% | {100 * (r['original'] - r['recovered']):.2f} | "
              f"{r['seconds']:.1f} s |")
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["case"] != "resnet50":
            groups.setdefault((r["case"], r["init"]), []).append(
                100 * (r["original"] - r["recovered"]))
    for (case, init), gaps in groups.items():
        print(f"{case} {init}: gap mean {statistics.mean(gaps):.2f}, max {max(gaps):.2f} point(s) "
              f"over {len(gaps)} seed(s)")
    machine = (f"{platform.system()} {platform.machine()}, torch {torch.__version__}, "
               f"{args.threads} thread(s)")
    print(f"\n{machine}; steps {args.steps}; recover settings {_kwargs(args) or 'defaults'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
