"""Rebuild the bundled example checkpoint (wsconvert/examples/tinynet.pt) reproducibly.

    python scripts/make_example.py

Trains the tiny BatchNorm CNN for a few epochs at batch 32 on the generated texture task, the way a
user's model arrives: pretrained with BatchNorm, no WS.
"""

from __future__ import annotations

import io

import torch

from wsconvert.examples import EXAMPLE_CHECKPOINT
from wsconvert.examples.shapes import make_dataset
from wsconvert.examples.tinynet import build


def main() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    x, y = make_dataset(2048, seed=0)
    model = build()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(32):  # type: ignore[no-untyped-call]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()
    xt, yt = make_dataset(1024, seed=1)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    EXAMPLE_CHECKPOINT.write_bytes(buf.getvalue())
    size = len(buf.getvalue()) // 1024
    print(f"wrote {EXAMPLE_CHECKPOINT} ({size} KiB), test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
