"""The ``wsconvert`` command line: wiring and rendering only; the math is in the library."""
