"""WS training overhead on a GroupNorm ResNet-50 (no torchvision, no downloads), with and without
:func:`wsconvert.standardize_ahead`.

    python scripts/bench_resnet50.py [--size 224] [--batch 2] [--rounds 16] [--threads 2]

Runs :func:`wsconvert.bench.run_bench` on ``resnet50(norm="gn")`` (random seeded weights: the
architecture, sizes and op mix are what matter for timing) with plain SGD, rows ``plain``,
``wsconvert:<convention>`` and ``wsconvert-ahead:<convention>``, and prints each row's median
and fastest step and its ratios to plain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from resnet import resnet50

from wsconvert.bench import BenchConfig, run_bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--convention", action="append", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BenchConfig(batch_sizes=(args.batch,), input_shape=(3, args.size, args.size),
                         conventions=tuple(args.convention or ["paper"]), references=(),
                         rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                         ahead=True, num_classes=1000)
    report = run_bench(resnet50(norm="gn"), config, model_name="resnet50-gn")
    print(f"ResNet-50 GN, {args.size}x{args.size} batch {args.batch}, {args.threads} threads, "
          f"{args.rounds} rounds, torch {torch.__version__}")
    for setting in report.settings:
        for r in setting.rows:
            print(f"  {r.form:<24} median {r.median_ms:7.0f} ms  min {r.min_ms:7.0f} ms  "
                  f"x plain {r.ratio:.3f} (min {r.min_ratio:.3f}, paired {r.paired_ratio:.3f})")


if __name__ == "__main__":
    main()
