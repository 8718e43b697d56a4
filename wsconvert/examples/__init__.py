"""The bundled example: a tiny BatchNorm CNN, its pretrained checkpoint, a task made in code.

``EXAMPLE_CHECKPOINT`` is a state dict for :func:`wsconvert.examples.tinynet.build` (factory spec
:data:`EXAMPLE_FACTORY`), made reproducibly by ``python scripts/make_example.py``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EXAMPLE_CHECKPOINT", "EXAMPLE_FACTORY", "EXAMPLE_INPUT_SHAPE"]

EXAMPLE_CHECKPOINT = Path(__file__).with_name("tinynet.pt")
EXAMPLE_FACTORY = "wsconvert.examples.tinynet:build"
EXAMPLE_INPUT_SHAPE = (1, 3, 24, 24)
