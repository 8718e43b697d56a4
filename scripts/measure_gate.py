"""Wall time of the parity gate against a bare ``torch.onnx.export``, as whole processes.

    python scripts/measure_gate.py [--models small,r50] [--rounds 2] [--workdir DIR]

For each model (``small``: a 4.7M-parameter BatchNorm CNN, ``r50``: a GroupNorm ResNet-50, both
at 224x224 with WS applied) it times, interleaved over ``--rounds`` rounds so that load on a
shared machine hits every variant alike:

- ``bare``: a process that builds the folded model, loads its weights and runs
  ``torch.onnx.export(dynamo=True)`` with a dynamic batch (what a user would do by hand);
- ``fold``: ``wsconvert fold WS.pt --onnx --dynamic-batch`` (load, fold, export, default gate);
- ``no-check``: the same with ``--no-check``;
- ``locate``: the same with ``--locate`` (localization although parity holds);
- ``fold-base``: ``fold`` with another installation's ``wsconvert`` (``--baseline-exe``, e.g. a
  checkout without this change), to isolate what a change costs on the default path.

Prints each run and the median ratio to ``bare`` per variant, with the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BARE = """
import sys, torch
from wsconvert.export import _quiet
from wsconvert.io.wsfile import load_model
m = load_model(sys.argv[1], sys.argv[2], sys.argv[3]).model.eval()
x = torch.randn(1, 3, 224, 224)
with _quiet(), torch.no_grad():
    torch.onnx.export(m, (x,), sys.argv[4], dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
"""

# A ResNet-18-shaped net at 5/8 width (4.7M parameters, GroupNorm), importable from the workdir.
NETS = """
import torch
from torch import nn


class Basic(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(8, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(8, c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      nn.GroupNorm(8, c_out))

    def forward(self, x):
        y = torch.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class Net(nn.Module):
    def __init__(self, width=40, classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False),
                                  nn.GroupNorm(8, width), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        layers, c = [], width
        for i, mult in enumerate((1, 2, 4, 8)):
            out = width * mult
            layers.append(nn.Sequential(Basic(c, out, 1 if i == 0 else 2), Basic(out, out, 1)))
            c = out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def small(seed=0):
    torch.manual_seed(seed)
    return Net()
"""

MODELS = {
    "small": ("gatenets:small", "{}"),
    "r50": ("resnet:resnet50", '{"norm": "gn"}'),  # scripts/resnet.py, copied to the workdir
}


def prepare(work: Path, name: str) -> tuple[Path, Path]:
    import wsconvert
    from wsconvert.fold import fold_ws

    spec, kwargs = MODELS[name]
    from wsconvert.io.spec import build_model

    plain = build_model(spec, kwargs)
    torch.save(plain.state_dict(), work / f"{name}.pt")
    plain = wsconvert.load_model(work / f"{name}.pt", spec, kwargs).model.eval()
    params = sum(p.numel() for p in plain.parameters())
    ws = wsconvert.apply_ws(plain, "paper", init="scale").model.eval()
    wsconvert.save(ws, work / f"{name}.ws.pt", force=True)
    torch.save(fold_ws(ws).model.state_dict(), work / f"{name}.folded.pt")
    print(f"{name}: {params / 1e6:.1f}M parameters", flush=True)
    return work / f"{name}.ws.pt", work / f"{name}.folded.pt"


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
                         f"{proc.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="small,r50")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default="bare,fold,no-check,locate")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--baseline-exe", default=None,
                    help="another installation's wsconvert, for the fold-base variant")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="wsconvert-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "gatenets.py").write_text(NETS)
    shutil.copy(Path(__file__).with_name("resnet.py"), work / "resnet.py")
    sys.path.insert(0, str(work))
    exe = str(Path(sys.executable).with_name("wsconvert"))
    variants = args.variants.split(",")
    for name in args.models.split(","):
        ws, folded = prepare(work, name)
        spec, kwargs = MODELS[name]
        cmds = {
            "bare": [sys.executable, "-c", BARE, str(folded), spec, kwargs, "bare.onnx"],
            # -m SPEC: consent to rebuild the factory the WS file records.
            "fold": [exe, "fold", str(ws), "-m", spec, "--onnx", "out.onnx", "--dynamic-batch",
                     "--force"],
            "no-check": [exe, "fold", str(ws), "-m", spec, "--onnx", "out.onnx",
                         "--dynamic-batch", "--force", "--no-check"],
            "locate": [exe, "fold", str(ws), "-m", spec, "--onnx", "out.onnx", "--dynamic-batch",
                       "--force", "--locate"],
            "fold-base": [str(args.baseline_exe), "fold", str(ws), "--onnx", "out.onnx",
                          "--dynamic-batch", "--force", "--trust"],
        }
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for v in variants:
                took = timed(cmds[v], work)
                times[v].append(took)
                print(f"{name} round {r} {v}: {took:.1f} s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
        bare = statistics.median(times["bare"])
        for v in variants:
            med = statistics.median(times[v])
            print(f"{name} {v}: median {med:.1f} s, {med / bare:.2f}x bare", flush=True)


if __name__ == "__main__":
    main()
