#!/usr/bin/env bash
# VGG-16 and VGG-19 dense multi-scale evaluation on this CPU: PyTorch eager, ONNX Runtime fp32
# and int8, OpenVINO fp32, bf16 and int8, as ratios measured in one run (bench/cpu.sh --help).
# Defaults (Q = 256,384,512 with flips, 3 images per model after one warm-up image) take about
# 4-5 minutes on 2 cores (3.6 min with 2 images at load average 2-5), a third of it exporting
# and quantising the full-size models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
exec "$PYTHON" -m bench.cpu "$@"
