"""Library wording -> command-line wording, in one table.

Library messages name parameters in backticks (`` `input_shape` ``, `` `force=True` ``); the CLI
shows the flag a user types instead. Tokens not in the table are left as they are.
"""

from __future__ import annotations

import re

__all__ = ["FLAGS", "cli_text"]

FLAGS = {
    "allow_classes": "--allow-class",
    "allow_classes=[MODULE.CLASS]": "--allow-class MODULE.CLASS",
    "allow_large_inputs=True": "--allow-large-inputs",
    "allow_nonfinite=True": "--allow-nonfinite",
    "against": "--against",
    "eps": "--eps",
    "output": "--output",
    "out_dir": "--out-dir",
    "atol": "--atol",
    "augment=True": "--recover-augment",  # recovery's own notes
    "bake_unknown": "--bake-unknown",
    "bake_unknown=True": "--bake-unknown",
    "batch_sizes": "--batch-sizes",
    "calib_data": "--calib-data",
    "calibrate": "--calibrate",
    "check=False": "--no-check",
    "drift=False": "--no-drift",
    "dynamic_batch=True": "--dynamic-batch",
    "force=True": "--force",
    "from_ws": "--from",
    "groups": "--groups",
    "exclude": "--exclude",
    "image_size": "--image-size",
    "include": "--include",
    "input_shape": "--input-shape",
    "inputs": "--inputs",
    "junit": "--junit",
    "linear=True": "--linear",
    "locate": "--locate",
    "locate=always": "--locate",
    "mean": "--mean",
    "min_top1_agreement": "--min-top1-agreement",
    "model": "--model",
    "model_kwargs": "--model-kwargs",
    "norm": "--norm",
    "norm=keep": "--norm keep",
    "onnx": "--onnx",
    "recover_augment=True": "--recover-augment",
    "recover_augment=False": "--no-recover-augment",
    "recover_batch_size": "--recover-batch-size",
    "recover_holdout": "--recover-holdout",
    "recover_lr": "--recover-lr",
    "recover_seed": "--recover-seed",
    "recover_steps": "--recover-steps",
    "report": "--report",
    "rtol": "--rtol",
    "save_failing": "--save-failing",
    "seeds": "--seeds",
    "std": "--std",
    "transposed=True": "--transposed",
    "trust=True": "--trust",
    "whole_module=True": "--whole-module",
}
"""Backticked library token -> what the command line shows."""

_TOKEN = re.compile(r"`([^`\s]+)`")


def _flag(token: str) -> str | None:
    """A table entry, or ``name='value'`` for a flag taking a value (``--model value``)."""
    if token in FLAGS:
        return FLAGS[token]
    name, eq, value = token.partition("=")
    flag = FLAGS.get(name)
    if eq and flag is not None and flag.startswith("--") and value:
        return f"{flag} {value.strip(chr(39) + chr(34))}"
    return None


def cli_text(message: str) -> str:
    """``message`` with every known parameter token replaced by its flag."""
    return _TOKEN.sub(lambda m: _flag(m.group(1)) or m.group(0), message)
