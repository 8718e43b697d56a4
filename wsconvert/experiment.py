"""The micro-batch experiment behind docs/evidence.md, at toy scale on the bundled example.

Claim under test (Qiao et al., arXiv:1903.10520, Sec. 5): with one or two images per batch,
WS + GroupNorm trains as well as BatchNorm does at a large batch, while BatchNorm at the small batch
falls behind. Our users start from a BatchNorm-pretrained model, so every arm starts from the
bundled pretrained TinyNet (``wsconvert/examples/tinynet.pt``) and fine-tunes it, for the same
number of epochs, on a harder version of its texture task (more pixel noise, fresh samples):

* ``bn-b32``: BatchNorm, batch 32;
* ``bn-b2``: BatchNorm, batch 2;
* ``ws-gn-b2``: converted as ``wsconvert apply --norm gn`` (:func:`~wsconvert.surgery.apply_ws`,
  init ``plain``, then :func:`~wsconvert.norms.swap_norm`), batch 2;
* ``ws-gn-exact-b2``: the same with ``--init exact``.

Learning rates follow the linear scaling rule (``lr = base_lr * batch / 32``); everything else is
shared. Each seed changes the fine-tuning data, its order and the evaluation set.

Run it (single-threaded torch; about two minutes on two CPU cores with the defaults)::

    python -m wsconvert.experiment --seeds 0 1 2 --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ARMS", "ArmResult", "ExperimentConfig", "ExperimentResult", "accuracy", "fine_tune",
           "run_arm", "run_experiment"]

ARMS = ("bn-b32", "bn-b2", "ws-gn-b2", "ws-gn-exact-b2")


@dataclass(frozen=True)
class ExperimentConfig:
    """Settings shared by every arm.

    Attributes:
        seeds: one fine-tuning run per arm and seed.
        epochs: fine-tuning epochs (the same for every arm).
        train_samples: fine-tuning set size.
        test_samples: evaluation set size.
        noise: pixel noise of the fine-tuning task (the pretraining task used 0.6).
        base_lr: SGD learning rate at batch 32, scaled linearly for smaller batches.
        groups: GroupNorm groups asked for. 8, not the paper's 32: TinyNet has 16-64
            channels, where 32 groups would be (nearly) InstanceNorm; 8 keeps 2-8 channels per
            group, within the 2-64 of the paper's ResNet-50 stages.
        threads: torch intra-op threads per run (1 is fastest for this tiny model).
        arms: which arms to run.
        lr_grid: base learning rates tried per arm on ``sweep_seed`` before the main runs; each
            arm then uses its best (ties: the smaller lr). Empty: ``base_lr`` for every arm.
        sweep_seed: the seed of the lr sweep, kept apart from ``seeds``; ``None``: no sweep.
        workers: runs in parallel processes (each single-threaded); results do not depend on it.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 3
    train_samples: int = 1024
    test_samples: int = 2048
    noise: float = 1.2
    base_lr: float = 0.05
    groups: int = 8
    threads: int = 1
    arms: tuple[str, ...] = ARMS
    lr_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    sweep_seed: int | None = 100
    workers: int = 2

    def lr_for(self, arm: str, chosen: dict[str, float] | None = None) -> float:
        """Base lr (at batch 32) of ``arm``: the swept choice when there is one."""
        return (chosen or {}).get(arm, self.base_lr)


@dataclass(frozen=True)
class ArmResult:
    """Accuracy of one arm on one seed: before fine-tuning (after conversion) and after."""

    arm: str
    seed: int
    batch: int
    lr: float
    acc_start: float
    acc_end: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ExperimentResult:
    """All runs, with per-arm mean and spread."""

    config: ExperimentConfig
    runs: list[ArmResult] = field(default_factory=list)
    pretrained_acc: float = math.nan
    machine: str = ""
    sweep: list[ArmResult] = field(default_factory=list)
    chosen_lr: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        """Per arm: mean, sample std, min and max of the final accuracy (and the start mean)."""
        out = {}
        for arm in self.config.arms:
            ends = [r.acc_end for r in self.runs if r.arm == arm]
            starts = [r.acc_start for r in self.runs if r.arm == arm]
            if not ends:
                continue
            out[arm] = {"mean": statistics.fmean(ends),
                        "std": statistics.stdev(ends) if len(ends) > 1 else 0.0,
                        "min": min(ends), "max": max(ends),
                        "start_mean": statistics.fmean(starts), "n": float(len(ends))}
        return out

    def to_dict(self) -> dict[str, Any]:
        cfg = asdict(self.config)
        return {"config": cfg, "machine": self.machine, "pretrained_acc": self.pretrained_acc,
                "seconds": self.seconds, "chosen_base_lr": self.chosen_lr,
                "summary": self.summary(), "runs": [r.to_dict() for r in self.runs],
                "sweep": [r.to_dict() for r in self.sweep]}

    def markdown(self) -> str:
        """The per-arm table as GitHub markdown (accuracy in percent)."""
        lines = ["| arm | batch | lr | acc. after conversion | final acc. mean ± std | min | max "
                 "| seeds |", "|---|---|---|---|---|---|---|---|"]
        for arm, s in self.summary().items():
            run = next(r for r in self.runs if r.arm == arm)
            lines.append(f"| {arm} | {run.batch} | {run.lr:g} | {100 * s['start_mean']:.1f} | "
                         f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f} | {100 * s['min']:.2f} | "
                         f"{100 * s['max']:.2f} | {int(s['n'])} |")
        return "\n".join(lines)


def _pretrained() -> nn.Module:
    from wsconvert.examples import EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY
    from wsconvert.io.wsfile import load_model

    return load_model(EXAMPLE_CHECKPOINT, EXAMPLE_FACTORY).model


def fine_tune(model: nn.Module, x: Tensor, y: Tensor, *, batch: int, lr: float, epochs: int,
              seed: int, on_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """SGD (momentum 0.9, weight decay 1e-4) over shuffled mini-batches, in place."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        for idx in torch.split(torch.randperm(len(x), generator=order), batch):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in eval mode."""
    return _accuracy(model, x, y)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = 0
        for xb, yb in zip(torch.split(x, 256), torch.split(y, 256), strict=True):
            correct += int((model(xb).argmax(1) == yb).sum())
    return correct / len(y)


def _prepare(arm: str, base: nn.Module, groups: int) -> nn.Module:
    import copy

    from wsconvert.norms import swap_norm
    from wsconvert.surgery import apply_ws

    if arm.startswith("bn"):
        return copy.deepcopy(base)
    init = "exact" if "exact" in arm else "plain"
    converted = apply_ws(base, "paper", init=init).model
    return swap_norm(converted, groups, inplace=True).model


def _data(seed: int, cfg: ExperimentConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from wsconvert.examples.shapes import make_dataset

    # Seeds far from the pretraining data's (0 and 1) so fine-tuning samples are fresh.
    x, y = make_dataset(cfg.train_samples, seed=1000 + 2 * seed, noise=cfg.noise)
    xt, yt = make_dataset(cfg.test_samples, seed=1001 + 2 * seed, noise=cfg.noise)
    return x, y, xt, yt


def run_arm(arm: str, seed: int, cfg: ExperimentConfig, base: nn.Module | None = None,
            base_lr: float | None = None) -> ArmResult:
    """Fine-tune one arm from the pretrained model on one seed and measure test accuracy.

    Raises:
        ValueError: unknown arm.
    """
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(cfg.threads)
    batch = 32 if arm.endswith("b32") else 2
    lr = (cfg.base_lr if base_lr is None else base_lr) * batch / 32
    x, y, xt, yt = _data(seed, cfg)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = _prepare(arm, base if base is not None else _pretrained(), cfg.groups)
    start = _accuracy(model, xt, yt)
    fine_tune(model, x, y, batch=batch, lr=lr, epochs=cfg.epochs, seed=seed)
    end = _accuracy(model, xt, yt)
    return ArmResult(arm, seed, batch, lr, start, end, time.perf_counter() - t0)


def _machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    return (f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU(s), "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def _job(job: tuple[str, int, ExperimentConfig, float]) -> ArmResult:
    arm, seed, cfg, lr = job
    return run_arm(arm, seed, cfg, base_lr=lr)


def _run_all(jobs: list[tuple[str, int, ExperimentConfig, float]], workers: int,
             progress: Callable[[ArmResult], None] | None) -> list[ArmResult]:
    if workers <= 1:
        out = []
        for job in jobs:
            out.append(_job(job))
            if progress is not None:
                progress(out[-1])
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = [pool.submit(_job, job) for job in jobs]
        results = []
        for f in futures:
            results.append(f.result())
            if progress is not None:
                progress(results[-1])
        return results


def run_experiment(cfg: ExperimentConfig,
                   progress: Callable[[ArmResult], None] | None = None) -> ExperimentResult:
    """The lr sweep (when configured), then every arm on every seed.

    Every run is seeded on its own (model init, data, order), so results do not depend on
    ``cfg.workers`` or on the order runs finish in.

    Args:
        cfg: the settings.
        progress: called after each run (the library never prints).
    """
    t0 = time.perf_counter()
    previous = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        from wsconvert.examples.shapes import make_dataset

        base = _pretrained()
        xt, yt = make_dataset(cfg.test_samples, seed=1001, noise=cfg.noise)
        result = ExperimentResult(cfg, pretrained_acc=_accuracy(base, xt, yt),
                                  machine=_machine())
        if cfg.lr_grid and cfg.sweep_seed is not None:
            jobs = [(arm, cfg.sweep_seed, cfg, lr) for arm in cfg.arms for lr in cfg.lr_grid]
            result.sweep = _run_all(jobs, cfg.workers, progress)
            for arm in cfg.arms:
                tried = sorted((-r.acc_end, r.lr) for r in result.sweep if r.arm == arm)
                best = next(r for r in result.sweep if r.arm == arm and r.lr == tried[0][1])
                result.chosen_lr[arm] = best.lr * 32 / best.batch
        jobs = [(arm, seed, cfg, cfg.lr_for(arm, result.chosen_lr))
                for seed in cfg.seeds for arm in cfg.arms]
        result.runs = _run_all(jobs, cfg.workers, progress)
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        torch.set_num_threads(previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m wsconvert.experiment``: run, print the markdown table, optionally save JSON."""
    parser = argparse.ArgumentParser(prog="python -m wsconvert.experiment",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    d = ExperimentConfig()
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--train-samples", type=int, default=d.train_samples)
    parser.add_argument("--test-samples", type=int, default=d.test_samples)
    parser.add_argument("--noise", type=float, default=d.noise)
    parser.add_argument("--base-lr", type=float, default=d.base_lr)
    parser.add_argument("--groups", type=int, default=d.groups)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--lr-grid", type=float, nargs="*", default=list(d.lr_grid),
                        help="base lrs swept per arm on --sweep-seed (none: --base-lr for all)")
    parser.add_argument("--sweep-seed", type=int, default=d.sweep_seed)
    parser.add_argument("--workers", type=int, default=d.workers)
    parser.add_argument("--json", metavar="FILE", help="also write every run as JSON")
    args = parser.parse_args(argv)
    cfg = ExperimentConfig(tuple(args.seeds), args.epochs, args.train_samples, args.test_samples,
                           args.noise, args.base_lr, args.groups, args.threads, tuple(args.arms),
                           tuple(args.lr_grid), args.sweep_seed, args.workers)

    def show(r: ArmResult) -> None:
        print(f"seed {r.seed} {r.arm:15s} batch {r.batch:2d} lr {r.lr:<8g}: "
              f"{100 * r.acc_start:5.1f}% -> {100 * r.acc_end:5.2f}% ({r.seconds:.1f} s)",
              file=sys.stderr, flush=True)

    result = run_experiment(cfg, show)
    print(f"pretrained BN model on the fine-tuning task's test set: "
          f"{100 * result.pretrained_acc:.2f}%")
    if result.chosen_lr:
        chosen = ", ".join(f"{a} {lr:g}" for a, lr in result.chosen_lr.items())
        print(f"base lr chosen on sweep seed {cfg.sweep_seed}: {chosen}")
    print(result.markdown())
    print(f"\n{result.machine}; {cfg.workers} worker(s); total {result.seconds:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
