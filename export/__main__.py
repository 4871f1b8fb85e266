"""``python -m export``: the same command as ``python export/to_onnx.py``."""

import sys

from export.to_onnx import main

sys.exit(main(prog="python -m export"))
