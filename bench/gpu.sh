#!/usr/bin/env bash
# The GPU benchmark in one run of at most 5 minutes (see bench/gpu.py):
#
#   bench/gpu.sh OUT_DIR                 # on a CUDA machine: results.json, results.md, logs
#   bench/gpu.sh OUT_DIR --dry-run       # the same code path, tiny models, on the CPU
#   bench/gpu.sh --check-deps [--dry-run]   # what the run needs and lacks, one line each
#   bench/gpu.sh --fetch-wheels [--python-version 3.12]
#                                        # where there is internet: the front end's wheels for
#                                        # the GPU machine's Python, into bench/wheels/cpXY
#
# A GPU machine with only PyTorch, ONNX and ONNX Runtime lacks the front end's dependencies
# (FastAPI, uvicorn, tritonclient, ...): if bench/wheels/cpXY (XY: this Python's version) holds
# wheels, they are installed from it, offline, into a virtual environment that sees this
# Python's packages. bench/wheels is ignored by git (the wheels are large): a copy of the
# working tree to the GPU machine must take it along explicitly.
set -euo pipefail

# The whole run's deadline starts here: installing wheels, importing torch and every step count.
export VGGSERVE_BENCH_DEADLINE=${VGGSERVE_BENCH_DEADLINE:-$(($(date +%s) + ${VGGSERVE_BENCH_TIMEOUT:-300}))}
cd "$(dirname "$0")/.."

# The front end's runtime dependencies (pyproject.toml) that a bare PyTorch machine lacks.
SERVING_DEPS=("fastapi>=0.115,<1" "fastapi-offline>=1.7,<2" "uvicorn>=0.30,<1"
              "python-multipart>=0.0.18" "pydantic>=2.7,<3" "prometheus-client>=0.20,<1"
              "tritonclient[grpc]>=2.50,<3" "pillow>=10.3,<14" "protobuf>=4.25,<7")
# manylinux tags pip accepts for a Linux x86-64 target; pip matches each manylinux_2_N exactly.
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64
           manylinux_2_27_x86_64 manylinux_2_28_x86_64 manylinux_2_34_x86_64)

usage() {
    echo "usage: bench/gpu.sh OUT_DIR [--dry-run] [--models vgg16,vgg19] [--budget-s S]" >&2
    echo "       bench/gpu.sh --check-deps [--dry-run]" >&2
    echo "       bench/gpu.sh --fetch-wheels [--python-version X.Y]" >&2
    exit 2
}

CHOSEN_PYTHON=${PYTHON:-}
if [ -n "$CHOSEN_PYTHON" ]; then :
elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
else PYTHON=python3
fi
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])'; }

if [ "${1:-}" = "--fetch-wheels" ]; then
    shift
    TARGET=$(python_version "$PYTHON")
    if [ "${1:-}" = "--python-version" ] && [ -n "${2:-}" ]; then TARGET=$2; shift 2; fi
    [ $# -eq 0 ] || usage
    DEST=${VGGSERVE_WHEELS:-bench/wheels/cp${TARGET/./}}
    platform_flags=()
    for tag in "${PLATFORMS[@]}"; do platform_flags+=(--platform "$tag"); done
    echo "downloading the front end's wheels for CPython $TARGET on Linux x86-64 into $DEST" >&2
    "$PYTHON" -m pip download --quiet --dest "$DEST" --only-binary=:all: \
        --python-version "$TARGET" --implementation cp "${platform_flags[@]}" "${SERVING_DEPS[@]}"
    echo "$(find "$DEST" -name '*.whl' | wc -l) wheels, $(du -sh "$DEST" | cut -f1), in $DEST" >&2
    exit 0
fi

dry_run=()
for arg in "$@"; do
    if [ "$arg" = "--dry-run" ]; then dry_run=(--dry-run); fi
done
VERSION=$(python_version "$PYTHON")
WHEELS=${VGGSERVE_WHEELS:-bench/wheels/cp${VERSION/./}}
GPU_VENV=bench/results/venv-cp${VERSION/./}
if [ -z "$CHOSEN_PYTHON" ] && [ -x "$GPU_VENV/bin/python" ]; then
    PYTHON=$GPU_VENV/bin/python  # the venv the offline wheels were installed into
fi
if [ "${1:-}" = "--check-deps" ]; then
    exec "$PYTHON" -m bench.gpu "$@"
fi
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then usage; fi

# Exit status 3: Python modules are missing (wheels can bring them); 2: something else is.
status=0
"$PYTHON" -m bench.gpu --check-deps ${dry_run[@]+"${dry_run[@]}"} || status=$?
if [ "$status" -eq 3 ] && [ -d "$WHEELS" ]; then
    echo "installing the front end's dependencies from $WHEELS into $GPU_VENV (offline)" >&2
    # A virtual environment made from one (PyTorch often lives in one) would not see the outer
    # one's packages through --system-site-packages: this Python's site folders are added with
    # a .pth file instead, so its PyTorch is used and only what is missing is installed.
    site_dirs=$("$PYTHON" -c 'import site; print(repr(site.getsitepackages()))')
    # No pip of its own (ensurepip is not everywhere): this Python's pip installs into it.
    "$PYTHON" -m venv --without-pip "$GPU_VENV"
    venv_site=$("$GPU_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "import site; list(map(site.addsitedir, $site_dirs))" > "$venv_site/vggserve-base.pth"
    "$PYTHON" -m pip --python "$GPU_VENV/bin/python" install --quiet --no-index \
        --find-links "$WHEELS" "${SERVING_DEPS[@]}"
    PYTHON=$GPU_VENV/bin/python
    status=0
    "$PYTHON" -m bench.gpu --check-deps ${dry_run[@]+"${dry_run[@]}"} || status=$?
elif [ "$status" -eq 3 ]; then
    echo "no wheels in $WHEELS for Python $VERSION: fill it with bench/gpu.sh --fetch-wheels" \
         "--python-version $VERSION where there is internet, or install the modules above" >&2
fi
if [ "$status" -ne 0 ]; then exit 2; fi

# A hard stop at the deadline: SIGINT lets the run stop its servers and keep what it measured
# (the results of every finished step are already on disk); SIGKILL 15 s later. --foreground
# keeps the run in this process group, so Ctrl-C reaches it too.
remaining=$((VGGSERVE_BENCH_DEADLINE - $(date +%s)))
if [ "$remaining" -lt 1 ]; then remaining=1; fi
export VGGSERVE_BENCH_DEPS_CHECKED=1
exec timeout --foreground --signal=INT --kill-after=15 "$remaining" "$PYTHON" -m bench.gpu "$@"
