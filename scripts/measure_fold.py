"""Figures for the fold / export / parity path on a ResNet-50-sized model.

    python scripts/measure_fold.py [--workdir DIR]

Prints: fold error in ulps (folded float32 weight vs the float64 WS value), parity figures of
`wsconvert fold --onnx` (fold stage and export stage), and the wall time of that command against a
bare `torch.onnx.export` of the same folded model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from resnet import resnet50  # scripts/resnet.py, beside this script

import wsconvert
from wsconvert.export import _quiet
from wsconvert.fold import fold_ws
from wsconvert.surgery import ws_layers
from wsconvert.ws import layer_weight, trainable_weight


def ulps(a: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    spacing = (torch.nextafter(a.abs(), torch.tensor(float("inf"))) - a.abs()).double()
    return (a.double() - exact).abs() / spacing


def _env() -> dict[str, str]:
    # The WS checkpoint records the factory `resnet:resnet50`: make this folder importable.
    here = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (here, os.environ.get("PYTHONPATH", "")) if p)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="wsconvert-measure-"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    torch.save(resnet50(norm="gn").state_dict(), work / "r50.pt")
    plain = wsconvert.load_model(work / "r50.pt", "resnet:resnet50",
                                 '{"norm": "gn"}').model
    ws = wsconvert.apply_ws(plain, "paper", init="scale").model.eval()
    # Move gains off their init, as fine-tuning would.
    with torch.no_grad():
        for _, _, p in ws_layers(ws):
            if p.gain is not None:
                p.gain.mul_(1 + 0.1 * torch.randn_like(p.gain))
    wsconvert.save(ws, work / "r50.ws.pt", force=True)

    folded = fold_ws(ws).model
    worst_fold, worst_direct, n = 0.0, 0.0, 0
    for (_name, module, p), (_, fm) in zip(ws_layers(ws), ((k, m) for k, m in
                                          folded.named_modules() if k in
                                          {nm for nm, _, _ in ws_layers(ws)}), strict=True):
        exact = p.double().reference(trainable_weight(module).detach().double())
        p.float()
        with torch.no_grad():
            worst_fold = max(worst_fold, float(ulps(layer_weight(fm), exact).max()))
            worst_direct = max(worst_direct, float(ulps(layer_weight(module), exact).max()))
        n += 1
    print(f"fold error over {n} layers: max {worst_fold:.3f} ulp "
          f"(float32 WS forward: max {worst_direct:.1f} ulp)")

    exe = str(Path(sys.executable).with_name("wsconvert"))
    t0 = time.perf_counter()
    proc = subprocess.run([exe, "fold", "r50.ws.pt", "--onnx", "r50.onnx", "--input-shape",
                           "1,3,224,224", "--dynamic-batch", "--report", "r50.parity.json",
                           "--force"], cwd=work, capture_output=True, text=True,
                          env=_env())
    t_cli = time.perf_counter() - t0
    print(proc.stdout[-1500:], proc.stderr[-500:])
    import json

    rep = json.loads((work / "r50.parity.json").read_text())
    for stage, s in rep["stages"].items():
        print(f"{stage}: max abs {s['max_abs']:.3g} max rel {s['max_rel']:.3g} "
              f"min cosine {s['min_cosine']:.9f} ({s['cases']} cases)")
    x = torch.randn(1, 3, 224, 224)
    t0 = time.perf_counter()
    with _quiet():
        torch.onnx.export(folded, (x,), str(work / "bare.onnx"), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    t_bare = time.perf_counter() - t0
    print(f"wall time: `wsconvert fold --onnx` (load, fold, save, export, check, 2 seeds x batch "
          f"1,4) {t_cli:.1f} s; bare torch.onnx.export {t_bare:.1f} s; ratio {t_cli / t_bare:.2f}")


if __name__ == "__main__":
    main()
