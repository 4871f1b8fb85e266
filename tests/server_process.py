"""``python -m server`` as a real process on a real port, for the HTTP tests.

Ports come from this test area's range (18000-18999) so parallel test runs of other areas never
collide with ours.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PORT_RANGE = (18000, 18999)


def free_port() -> int:
    """A port of our range that nothing listens on now."""
    candidates = list(range(PORT_RANGE[0], PORT_RANGE[1] + 1))
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def run_server_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m server`` to completion (for --help and start-up failures)."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


class ServerProcess:
    """A running ``python -m server``; use as a context manager.

    ``ready`` waits for ``/healthz`` (the app has finished starting); the log is kept in
    ``log_path`` for failure messages.
    """

    def __init__(self, *args: str, log_dir: Path, start_timeout: float = 60) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "server", "--port", str(self.port), *args]
        self.log_path = log_dir / f"server-{self.port}.log"
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        log = open(self.log_path, "w")  # noqa: SIM115 (kept open for the process's lifetime)
        self.process = subprocess.Popen(
            self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start in {self.start_timeout} s:\n{self.log()}")

    def __exit__(self, *_exc) -> None:
        self.stop()

    def alive(self) -> bool:
        """The process is still running."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if that takes too long."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log(self) -> str:
        """What the server printed so far."""
        try:
            return self.log_path.read_text()
        except OSError:
            return ""
