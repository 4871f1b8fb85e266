"""The processes a load test drives: ``python -m server`` on a free port, and their resources.

Ports come from the load tests' range (17000-17999 by default, ``VGGSERVE_LOADTEST_PORTS`` to
change it) so load tests never collide with other suites running on the same machine.
"""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]


def port_range() -> range:
    """The ports load tests may listen on: ``VGGSERVE_LOADTEST_PORTS=first-last``."""
    text = os.environ.get("VGGSERVE_LOADTEST_PORTS", "17000-17999")
    first, _, last = text.partition("-")
    try:
        return range(int(first), int(last) + 1)
    except ValueError:
        raise ValueError(
            f"VGGSERVE_LOADTEST_PORTS={text!r}: expected two port numbers, e.g. 17000-17999"
        ) from None


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports of :func:`port_range` that nothing listens on now."""
    candidates = list(port_range())
    random.shuffle(candidates)
    found: list[int] = []
    for port in candidates:
        with socket.socket() as probe:
            # SO_REUSEADDR as servers set it: a port in TIME_WAIT is still usable.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise RuntimeError(f"fewer than {count} free ports in {port_range()}")


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, so no server outlives its test."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class FrontEnd:
    """``python -m server ARGS`` on a free port of our range; a context manager.

    Entering waits for ``/healthz``; leaving sends SIGTERM (then SIGKILL after ``stop_timeout``).
    The server's output goes to ``log_path``.
    """

    def __init__(
        self, *args: str, log_dir: Path, port: int | None = None, start_timeout: float = 90
    ) -> None:
        self.port = port or free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "server", "--port", str(self.port), *args]
        self.log_path = Path(log_dir) / f"server-{self.port}.log"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> FrontEnd:
        return self.start()

    def __exit__(self, *_exc) -> None:
        self.stop()

    def start(self) -> FrontEnd:
        """Start the server and wait until it answers ``/healthz``."""
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,  # a Ctrl-C in the terminal reaches us, not it directly
                # If we are killed, so is the server (from the main thread only: PDEATHSIG
                # fires when the launching thread exits).
                preexec_fn=_die_with_parent if in_main_thread() else None,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with code {self.process.returncode} while starting:\n"
                    f"{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"the server did not answer /healthz within {self.start_timeout:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server was not started"
        return self.process.pid

    def alive(self) -> bool:
        """Whether the server process is still running."""
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """SIGTERM: uvicorn stops accepting, lets in-flight requests finish, then exits."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Wait for the exit; raises ``subprocess.TimeoutExpired`` if it takes longer."""
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, and reap."""
        if self.alive():
            self.process.kill()
            self.process.wait()

    def stop(self, stop_timeout: float = 30) -> None:
        """SIGTERM, wait up to ``stop_timeout``, then SIGKILL."""
        if not self.alive():
            return
        self.terminate()
        try:
            self.wait(stop_timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's output."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True)
class Resources:
    """One sample of a process tree: resident memory and open file descriptors."""

    rss_bytes: int
    open_fds: int
    threads: int


def sample_resources(pid: int, children: bool = False) -> Resources:
    """RSS, open file descriptors and threads of ``pid`` (and its descendants if ``children``).

    Raises ``psutil.NoSuchProcess`` when the process is gone.
    """
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
