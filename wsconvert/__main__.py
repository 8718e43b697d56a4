import os
import sys

# `python -m wsconvert` puts the working directory first on sys.path, where a file named like a
# standard or installed module (onnx.py, numpy.py) would shadow it; user model code stays
# importable (wsconvert.io.safe.cwd_importable appends the directory when a factory runs).
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from wsconvert.cli.app import main

main()
