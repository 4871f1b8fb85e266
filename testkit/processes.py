"""Real server processes: ``python -m server`` on a free port, the real tritonserver, and what
they use (resident memory, open files).

Imports only the standard library at module import time (the GPU benchmark runs on machines with
little else); psutil and the Triton launcher are imported when first used.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from testkit import REPOSITORY_ROOT
from testkit.ports import free_port, free_ports

if TYPE_CHECKING:
    from tritonlocal import LocalTriton

# Straight to the server: an http_proxy in the environment must not intercept 127.0.0.1.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _die_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, so no server outlives its test or benchmark."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_server_command(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m server ARGS`` to completion (``--help``, start-up failures)."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPOSITORY_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class ServerProcess:
    """``python -m server ARGS`` on a free loopback port; a context manager.

    Entering starts it and waits until ``health_path`` answers 200 (``/healthz``: the app has
    started; ``/readyz``: its backend is open too); leaving sends SIGTERM, then SIGKILL after
    ``stop_timeout`` seconds. Its output goes to ``log_path`` (in ``log_dir``, or in a temporary
    folder removed when it stops), and failures to start carry the end of it.

    Args:
        args: flags for ``python -m server`` (``--port`` is added).
        log_dir: folder for ``server-PORT.log``; kept after the server stops.
        port: where to listen (default: a free port from :mod:`testkit.ports`).
        start_timeout: seconds to wait for ``health_path``.
        health_path: what must answer 200 before the server counts as started.
        environment: extra environment variables for the server.
    """

    def __init__(
        self,
        *args: str,
        log_dir: Path | str | None = None,
        port: int | None = None,
        start_timeout: float = 90,
        health_path: str = "/healthz",
        environment: dict[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "server", "--port", str(self.port), *args]
        self._own_log_dir = log_dir is None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.start_timeout = start_timeout
        self.health_path = health_path
        self.environment = dict(environment or {})
        self.process: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # from the launch until health_path said 200

    @property
    def log_path(self) -> Path:
        """The server's output (stdout and stderr)."""
        if self.log_dir is None:
            raise RuntimeError("the server has not been started")
        return self.log_dir / f"server-{self.port}.log"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self) -> ServerProcess:
        """Start the server and wait until ``health_path`` answers 200; a server that does not
        start is stopped, and the error carries the end of its log."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> ServerProcess:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="vggserve-server-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        launched = time.monotonic()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPOSITORY_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.environment},
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it directly
                # PDEATHSIG fires when the launching *thread* exits: only safe from the main one.
                preexec_fn=_die_with_parent
                if threading.current_thread() is threading.main_thread()
                else None,
            )
        deadline = launched + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode} while starting "
                    f"({' '.join(self.command)}):\n{self.log_tail()}"
                )
            if self.answers(self.health_path):
                self.start_seconds = time.monotonic() - launched
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"the server did not answer {self.health_path} within "
                    f"{self.start_timeout:.0f} s ({' '.join(self.command)}):\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def answers(self, path: str) -> bool:
        """Whether ``GET path`` answers 200 now."""
        try:
            with _DIRECT.open(f"{self.url}{path}", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    @property
    def pid(self) -> int:
        """The server's process id."""
        if self.process is None:
            raise RuntimeError("the server has not been started")
        return self.process.pid

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM: uvicorn stops accepting, lets in-flight requests finish, then exits."""
        if self.process is None:
            raise RuntimeError("the server has not been started")
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Wait for the exit; raises ``subprocess.TimeoutExpired`` if it takes longer."""
        if self.process is None:
            raise RuntimeError("the server has not been started")
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def stop(self, stop_timeout: float = 30) -> None:
        """SIGTERM, wait up to ``stop_timeout`` seconds, then SIGKILL."""
        if self.alive():
            self.terminate()
            try:
                self.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._own_log_dir and self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def log(self) -> str:
        """What the server printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines the server printed."""
        return "\n".join(self.log().splitlines()[-lines:])

    def resources(self, children: bool = False) -> Resources:
        """The server's resident memory, open files and threads now."""
        return sample_resources(self.pid, children)


@dataclass(frozen=True)
class Resources:
    """One sample of a process (tree): resident memory and open file descriptors."""

    rss_bytes: int
    open_fds: int
    threads: int


def sample_resources(pid: int, children: bool = False) -> Resources:
    """RSS, open file descriptors and threads of ``pid`` (and its descendants if ``children``).

    Raises ``psutil.NoSuchProcess`` when the process is gone.
    """
    import psutil

    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)] if children else [root]
    rss = fds = threads = 0
    for process in processes:
        try:
            with process.oneshot():
                rss += process.memory_info().rss
                fds += process.num_fds()
                threads += process.num_threads()
        except psutil.NoSuchProcess:
            if process is root:
                raise
    return Resources(rss_bytes=rss, open_fds=fds, threads=threads)


def local_triton(repository: Path | str, **options) -> LocalTriton:
    """A :class:`tritonlocal.LocalTriton` for ``repository`` on three free ports, not started.

    ``options`` are LocalTriton's (``models``, ``work_dir``, ``environment``, ...).
    """
    from tritonlocal import LocalTriton

    http, grpc, metrics = free_ports(3)
    return LocalTriton(repository, http, grpc, metrics, **options)


def start_triton(repository: Path | str, **options) -> LocalTriton:
    """The real tritonserver serving ``repository`` on three free ports, ready."""
    return local_triton(repository, **options).start()
