"""Start, watch and stop the real ``tritonserver`` on 127.0.0.1, serving a repository's twin."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tritonlocal.install import ServerInstall, prepare
from tritonlocal.twin import write_twin

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
# SIGTERM takes ~4 s (Triton waits for in-flight requests, then unloads the models).
EXIT_TIMEOUT_S = 5


class TritonStartError(RuntimeError):
    """The server did not become ready; the message carries the end of its log."""


def port_is_free(port: int, host: str = DEFAULT_HOST) -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, like Triton's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the launching thread dies, so no server is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalTriton:
    """The bundled ``tritonserver`` serving the Python-backend twin of ``repository``.

    Usable as a context manager. ``kill()`` and ``start()`` again reuse the same ports, which is
    how tests simulate an outage.

    Args:
        repository: the production model repository (``onnxruntime_onnx`` configs).
        http_port, grpc_port, metrics_port: where to listen (always 127.0.0.1 by default).
        models: serve only these models (default: all).
        instance_count: instances per model in the twin (default: as the production config).
        work_dir: holds the twin and the server log (default: a temporary folder, removed on
            stop).
        log_to_console: stream Triton's log to our stdout/stderr instead of the log file.
        environment: extra environment variables for the server and its Python stubs.
    """

    def __init__(
        self,
        repository: Path | str,
        http_port: int = DEFAULT_PORTS["http"],
        grpc_port: int = DEFAULT_PORTS["grpc"],
        metrics_port: int = DEFAULT_PORTS["metrics"],
        host: str = DEFAULT_HOST,
        models: list[str] | None = None,
        instance_count: int | None = None,
        work_dir: Path | str | None = None,
        log_to_console: bool = False,
        install: ServerInstall | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.repository = Path(repository)
        self.host = host
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.models = models
        self.instance_count = instance_count
        self._own_work_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else None
        self.log_to_console = log_to_console
        self._install = install
        self.environment = dict(environment or {})
        self.process: subprocess.Popen | None = None
        self._log = None
        self._shm_prefix = ""

    @property
    def grpc_url(self) -> str:
        """``host:port`` for ``tritonclient.grpc``."""
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def http_url(self) -> str:
        """``host:port`` for ``tritonclient.http``."""
        return f"{self.host}:{self.ports['http']}"

    @property
    def log_path(self) -> Path | None:
        return self.work_dir / "tritonserver.log" if self.work_dir else None

    def command(self, install: ServerInstall, twin: Path) -> list[str]:
        """The ``tritonserver`` command line."""
        return [
            str(install.binary),
            f"--model-repository={twin}",
            f"--backend-directory={install.backend_directory}",
            f"--cache-directory={install.cache_directory}",
            f"--http-address={self.host}",
            f"--http-port={self.ports['http']}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports['grpc']}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports['metrics']}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--disable-auto-complete-config",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            # Our own prefix for the stubs' shared memory, so a killed server's regions can be
            # found and removed (they would otherwise stay in /dev/shm until reboot).
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
        ]

    def start(self, timeout: float = 60.0) -> LocalTriton:
        """Write the twin, start the server and wait until it and every model are ready.

        On failure nothing is left behind: no process, and no temporary work folder.
        """
        if self.running():
            raise RuntimeError(f"Triton is already running (pid {self.process.pid})")
        try:
            self._launch(timeout)
        except BaseException:
            self.kill()
            if self._log:
                self._log.close()
                self._log = None
            if self._own_work_dir and self.work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
                self.work_dir = None
            raise
        return self

    def _launch(self, timeout: float) -> None:
        install = self._install or prepare()
        self._install = install
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="vggserve-triton-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        twin = self.work_dir / "repository"
        write_twin(self.repository, twin, self.models, self.instance_count)
        busy = [f"{name} {port}" for name, port in self.ports.items() if not port_is_free(port)]
        if busy:
            raise TritonStartError(
                f"port(s) {', '.join(busy)} on {self.host} are in use (another Triton?); stop "
                "it or choose other ports (TRITON_HTTP_PORT, TRITON_GRPC_PORT, "
                "TRITON_METRICS_PORT)"
            )
        self._shm_prefix = f"vggserve_{os.getpid()}_{secrets.token_hex(4)}_"
        if self.log_to_console:
            output = None
        else:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
            output = self._log
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            self.command(install, twin),
            env={**install.environment(), **self.environment},
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            # Its own process group: kill() takes the Python stubs with it; Ctrl-C in a
            # terminal reaches us, and we stop the server cleanly.
            start_new_session=True,
            # PDEATHSIG fires when the launching *thread* exits: only safe from the main thread.
            preexec_fn=_die_with_parent if in_main_thread else None,
        )
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        url = f"http://{self.host}:{self.ports['http']}/v2/health/ready"
        # Straight to the server: an http_proxy in the environment must not intercept 127.0.0.1.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                raise TritonStartError(
                    f"tritonserver exited with code {code} while starting:\n{self.log_tail()}"
                )
            try:
                with opener.open(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver was not ready after {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server log (empty when it goes to the console)."""
        if self.log_to_console or not self.log_path or not self.log_path.is_file():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        return self.process.wait() if self.process else 0

    def stop(self, timeout: float = EXIT_TIMEOUT_S + 10) -> int | None:
        """SIGTERM, wait for the clean exit (~4 s), then make sure nothing of it is left."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        return self._reap()

    def kill(self) -> int | None:
        """SIGKILL the server and its stubs at once (a crash, as far as clients can tell)."""
        if self.process is None:
            return None
        return self._reap()

    def _reap(self) -> int | None:
        process = self.process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the server's group: it and its stubs
        code = process.wait()
        # The stubs are not our children: wait until the kernel has actually ended them.
        deadline = time.monotonic() + 5
        while _group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.process = None
        if self._log:
            self._log.close()
            self._log = None
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*") if self._shm_prefix else ():
            region.unlink(missing_ok=True)
        return code

    def close(self) -> None:
        """Stop the server and remove the temporary work folder."""
        self.stop()
        if self._own_work_dir and self.work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    def __enter__(self) -> LocalTriton:
        return self.start() if not self.running() else self

    def __exit__(self, *exc) -> None:
        self.close()
