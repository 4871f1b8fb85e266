#!/usr/bin/env bash
# The GPU benchmark in one run of under 5 minutes (see bench/gpu.py):
#
#   bench/gpu.sh OUT_DIR                 # on a CUDA machine: results.json, results.md, logs
#   bench/gpu.sh OUT_DIR --dry-run       # the same code path, tiny models, on the CPU
#   bench/gpu.sh --fetch-wheels          # where there is internet: the serving dependencies
#                                        # into bench/results/wheels for a machine without
#
# A GPU machine with only PyTorch, ONNX and ONNX Runtime lacks the front end's dependencies
# (FastAPI, uvicorn, tritonclient, ...): if bench/results/wheels exists, they are installed from
# it, offline, into a virtual environment that sees the system's PyTorch.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${VGGSERVE_WHEELS:-bench/results/wheels}
GPU_VENV=bench/results/venv-gpu
# The front end's runtime dependencies (pyproject.toml) that a bare PyTorch machine lacks.
SERVING_DEPS=("fastapi>=0.115,<1" "uvicorn>=0.30,<1" "python-multipart>=0.0.18" "pydantic>=2.7,<3"
              "prometheus-client>=0.20,<1" "tritonclient[grpc]>=2.50,<3" "pillow>=10.3,<14"
              "protobuf>=4.25,<7")

if [ -n "${PYTHON:-}" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
elif [ -x "$GPU_VENV/bin/python" ]; then PYTHON=$GPU_VENV/bin/python
else PYTHON=python3
fi

if [ "${1:-}" = "--fetch-wheels" ]; then
    # Run with the GPU machine's Python version (or pass pip's --python-version/--platform in
    # PIP_DOWNLOAD_FLAGS) so the binary wheels fit it.
    # shellcheck disable=SC2086
    exec "$PYTHON" -m pip download --dest "$WHEELS" ${PIP_DOWNLOAD_FLAGS:-} "${SERVING_DEPS[@]}"
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: bench/gpu.sh OUT_DIR [--dry-run] [--models vgg16,vgg19] [--budget-s S]" >&2
    echo "       bench/gpu.sh --fetch-wheels" >&2
    exit 2
fi

if ! "$PYTHON" -m bench.gpu --check-deps 2>/dev/null; then
    if [ ! -d "$WHEELS" ]; then
        "$PYTHON" -m bench.gpu --check-deps  # says what is missing
        exit 2
    fi
    echo "installing the front end's dependencies from $WHEELS into $GPU_VENV (offline)" >&2
    "$PYTHON" -m venv --system-site-packages "$GPU_VENV"
    "$GPU_VENV/bin/python" -m pip install --quiet --no-index --find-links "$WHEELS" "${SERVING_DEPS[@]}"
    PYTHON=$GPU_VENV/bin/python
    "$PYTHON" -m bench.gpu --check-deps
fi

# A hard stop at 5 minutes (VGGSERVE_BENCH_TIMEOUT seconds): SIGINT lets the run stop its
# servers and delete its exports; the results of every finished step are already on disk.
exec timeout --signal=INT --kill-after=15 "${VGGSERVE_BENCH_TIMEOUT:-300}" "$PYTHON" -m bench.gpu "$@"
