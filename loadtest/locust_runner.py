"""Locust, headless, as a subprocess; and its CSV statistics read back as numbers.

The same way a user runs it (``locust -f loadtest/locustfile.py --headless ...``), so what the
tests measure is what ``loadtest/run.sh`` reports.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from testkit import REPOSITORY_ROOT

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def start_locust(
    host: str,
    csv_prefix: Path,
    users: int,
    spawn_rate: float,
    duration: str,
    think_time: str = "0.05,0.5",
    events_file: Path | None = None,
    log_path: Path | None = None,
    expected_posteriors: Path | None = None,
    stop_after: tuple[int, int] = (0, 0),
) -> subprocess.Popen:
    """Start a headless Locust run against ``host``; it stops by itself after ``duration``, or
    once ``stop_after`` = (classify, batch) requests have completed (0: no count), whichever
    comes first.

    ``duration`` is Locust's ``--run-time`` (``30s``, ``10m``). Its exit code is 0 when no request
    failed, 1 otherwise. The CSV files are ``<csv_prefix>_stats.csv`` etc. With
    ``expected_posteriors`` (:mod:`testkit.expected_posteriors`) every answer's probabilities
    are checked too.
    """
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(spawn_rate),
        "--run-time",
        duration,
        # Requests in flight when the time is up are let finish: a cut-off is not a failure.
        "--stop-timeout",
        "60",
        "--csv",
        str(csv_prefix),
        "--csv-full-history",
        "--only-summary",
        "--think-time",
        think_time,
    ]
    if events_file is not None:
        command += ["--events-file", str(events_file)]
    if expected_posteriors is not None:
        command += ["--expected-posteriors", str(expected_posteriors)]
    classify, batch = stop_after
    command += ["--stop-after-classify", str(classify), "--stop-after-batch", str(batch)]
    output = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            command,
            cwd=REPOSITORY_ROOT,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        if log_path:
            output.close()


@dataclass(frozen=True)
class RequestEvent:
    """One completed request of ``--events-file``: when it ended (unix time), when it started,
    its endpoint, HTTP status (0: no answer), whether it passed the checks, and why not."""

    t: float
    start: float
    name: str
    status: int
    ok: bool
    error: str | None


class RequestEvents:
    """The requests a Locust run has completed so far, read from its ``--events-file``.

    :meth:`wait_until` is how a test waits for an event of the load (so many successes, a
    failure) instead of sleeping for a time that a loaded machine may not keep.
    """

    def __init__(self, path: Path, locust: subprocess.Popen | None = None) -> None:
        self.path = Path(path)
        self.locust = locust
        self.records: list[RequestEvent] = []
        self._offset = 0

    def read(self) -> list[RequestEvent]:
        """Every request completed so far (the file is read on from where it was left)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.records
        whole = data[: data.rfind(b"\n") + 1]  # a line still being written waits for later
        self._offset += len(whole)
        for line in whole.decode().splitlines():
            if line.strip():
                record = json.loads(line)
                self.records.append(
                    RequestEvent(
                        t=record["t"],
                        start=record["t"] - record["ms"] / 1000,
                        name=record["name"],
                        status=record["status"],
                        ok=record["ok"],
                        error=record["error"],
                    )
                )
        return self.records

    def wait_until(
        self,
        condition: Callable[[list[RequestEvent]], bool],
        what: str,
        timeout: float = 300,
        poll_s: float = 0.05,
    ) -> list[RequestEvent]:
        """Poll until ``condition(records)`` holds; raises ``TimeoutError`` (saying ``what``)
        after ``timeout`` seconds, which only bounds a hang, or ``RuntimeError`` if Locust
        exits first."""
        deadline = time.monotonic() + timeout
        while not condition(self.read()):
            if self.locust is not None and self.locust.poll() is not None:
                raise RuntimeError(
                    f"Locust exited (code {self.locust.returncode}) before {what}: "
                    f"{len(self.records)} requests completed"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {what} within {timeout:.0f} s: {len(self.records)} requests completed"
                )
            time.sleep(poll_s)
        return self.records


@dataclass(frozen=True)
class EndpointStats:
    """One row of Locust's ``_stats.csv`` (times in milliseconds)."""

    name: str
    requests: int
    failures: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True)
class LoadSummary:
    """A finished Locust run: every endpoint and the aggregate."""

    total: EndpointStats
    endpoints: tuple[EndpointStats, ...]

    def as_dict(self) -> dict:
        return {"total": asdict(self.total), "endpoints": [asdict(e) for e in self.endpoints]}


def _number(text: str) -> float:
    return float(text) if text not in ("", "N/A") else float("nan")


def read_stats(csv_prefix: Path) -> LoadSummary:
    """Parse ``<csv_prefix>_stats.csv``; raises ``FileNotFoundError`` if Locust wrote none."""
    rows = []
    with open(f"{csv_prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            rows.append(
                EndpointStats(
                    name=row["Name"] if row["Type"] else "Aggregated",
                    requests=int(row["Request Count"]),
                    failures=int(row["Failure Count"]),
                    requests_per_s=_number(row["Requests/s"]),
                    p50_ms=_number(row["50%"]),
                    p95_ms=_number(row["95%"]),
                    p99_ms=_number(row["99%"]),
                    max_ms=_number(row["Max Response Time"]),
                )
            )
    total = [r for r in rows if r.name == "Aggregated"]
    if not total:
        raise ValueError(f"{csv_prefix}_stats.csv has no Aggregated row")
    return LoadSummary(total=total[0], endpoints=tuple(r for r in rows if r.name != "Aggregated"))


def read_failures(csv_prefix: Path) -> list[dict[str, str]]:
    """Rows of ``<csv_prefix>_failures.csv``: method, name, error message, occurrences."""
    try:
        with open(f"{csv_prefix}_failures.csv", newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []


def read_history(csv_prefix: Path) -> list[tuple[float, int, int]]:
    """``(unix time, requests so far, failures so far)`` per second, from the history CSV."""
    rows = []
    try:
        with open(f"{csv_prefix}_stats_history.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["Name"] == "Aggregated":
                    rows.append(
                        (
                            float(row["Timestamp"]),
                            int(row["Total Request Count"]),
                            int(row["Total Failure Count"]),
                        )
                    )
    except FileNotFoundError:
        pass
    return rows


def format_summary(summary: LoadSummary) -> str:
    """A small table: requests, failures, requests/s and p50/p95/p99 per endpoint."""
    lines = [
        f"{'endpoint':<22} {'requests':>8} {'failures':>8} {'req/s':>7} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7}"
    ]
    for row in (*summary.endpoints, summary.total):
        lines.append(
            f"{row.name:<22} {row.requests:>8} {row.failures:>8} {row.requests_per_s:>7.2f} "
            f"{row.p50_ms:>7.0f} {row.p95_ms:>7.0f} {row.p99_ms:>7.0f}"
        )
    return "\n".join(lines)
