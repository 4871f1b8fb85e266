#!/usr/bin/env bash
# Load test of the vggserve HTTP API with Locust, headless; every flag: loadtest/run.sh --help.
#   loadtest/run.sh                       # 30 s against two small models (embedded ONNX Runtime)
#   loadtest/run.sh --backend triton      # through the real tritonserver on CPU
#   loadtest/run.sh --soak                # 10 minutes; RSS and open files must stay flat
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
exec "$PYTHON" -m loadtest.run "$@"
