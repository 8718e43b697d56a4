"""The ``wsconvert`` command line. Only wiring and rendering live here; the math is in the library."""
