"""Locating the ``tritonserver`` bundled in ``nvidia-pytriton`` and preparing its backend folder.

The wheel ships the server binary, the Python backend and one Python-backend stub per Python
version; the stub must sit in ``backends/python/`` next to the backend. We never touch
site-packages: the backend folder is copied once into a cache folder (with the stub for the
running Python) and the binary runs in place.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "nvidia-pytriton"


class TritonNotInstalled(RuntimeError):
    """The bundled tritonserver is missing; the message says what to install."""


@dataclass(frozen=True)
class ServerInstall:
    """Where everything the local server needs lies."""

    binary: Path
    backend_directory: Path
    cache_directory: Path
    libraries: Path

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for the server and the Python stubs it spawns.

        Python's LIBDIR comes first (the stub links ``libpython3.x.so``; the wheel's own copy
        would break multiprocessing), then the wheel's libraries for the copied backend. The
        stub ignores PYTHONPATH and runs the first ``python3`` on PATH, so this interpreter's
        ``bin`` comes first: the stub then sees our numpy and onnxruntime.
        """
        env = dict(os.environ if base is None else base)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        paths = [p for p in (libdir, str(self.libraries), env.get("LD_LIBRARY_PATH", "")) if p]
        env["LD_LIBRARY_PATH"] = ":".join(paths)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(
            f"the local Triton needs the PyPI package {PACKAGE}==0.7.0; install it with "
            f"{sys.executable} -m pip install -e '.[triton]' (or make venv)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache() -> Path:
    """The folder that holds prepared backend folders: beside the venv, else the user cache."""
    prefix = Path(sys.prefix)
    if prefix != Path(sys.base_prefix) and os.access(prefix, os.W_OK):
        return prefix / "share" / "vggserve-tritonserver"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vggserve" / "tritonserver"


def prepare(cache: Path | None = None) -> ServerInstall:
    """The bundled server with a backend folder ready for this Python (prepared once).

    Preparing is atomic (staging folder + rename), so two processes preparing at once both end
    up with a complete folder.
    """
    root = _wheel_root()
    server = root / "tritonserver"
    binary = server / "bin" / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not binary.is_file() or not stub.is_file():
        raise TritonNotInstalled(
            f"{PACKAGE} at {root} has no tritonserver binary or no Python-backend stub for "
            f"Python {python}; reinstall {PACKAGE}==0.7.0"
        )
    libraries = root.parent / "nvidia_pytriton.libs"
    version = importlib.metadata.version(PACKAGE)
    cache = Path(cache) if cache else default_cache()
    prepared = cache / f"{version}-py{python}" / "backends"
    if not (prepared / "python" / "triton_python_backend_stub").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
        try:
            shutil.copytree(
                server / "backends",
                staging / "backends",
                dirs_exist_ok=True,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
            shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
            prepared.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(staging / "backends", prepared)
            except OSError:
                if not (prepared / "python" / "triton_python_backend_stub").is_file():
                    raise  # not a concurrent preparer winning the race
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return ServerInstall(
        binary=binary,
        backend_directory=prepared,
        cache_directory=server / "caches",
        libraries=libraries,
    )
