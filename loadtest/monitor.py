"""Resident memory and open file descriptors of the served processes, sampled during a run.

A leak shows as growth after warm-up: caches, pools and arenas fill during the first minute,
then a healthy server stays flat. :func:`growth` compares the median of the first window after
warm-up with the median of the last window, so one noisy sample does not decide.
"""

from __future__ import annotations

import csv
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from testkit.processes import sample_resources


@dataclass(frozen=True)
class Sample:
    """One sample of one watched process (tree)."""

    elapsed_s: float
    process: str
    rss_mb: float
    open_fds: int
    threads: int


class ResourceMonitor:
    """A thread sampling ``{name: (pid, with_children)}`` every ``interval_s``; a context manager."""

    def __init__(self, processes: dict[str, tuple[int, bool]], interval_s: float = 5.0) -> None:
        self.processes = processes
        self.interval_s = interval_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resource-monitor", daemon=True)
        self._started = 0.0

    def __enter__(self) -> ResourceMonitor:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            elapsed = time.monotonic() - self._started
            for name, (pid, children) in self.processes.items():
                try:
                    found = sample_resources(pid, children)
                except psutil.NoSuchProcess:
                    continue  # it died: the run's checks report that, not the monitor
                self.samples.append(
                    Sample(
                        round(elapsed, 1),
                        name,
                        found.rss_bytes / 2**20,
                        found.open_fds,
                        found.threads,
                    )
                )
            if self._stop.wait(self.interval_s):
                return

    def write_csv(self, path: Path) -> None:
        """``elapsed_s,process,rss_mb,open_fds,threads``, one row per sample."""
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["elapsed_s", "process", "rss_mb", "open_fds", "threads"])
            for s in self.samples:
                writer.writerow([s.elapsed_s, s.process, f"{s.rss_mb:.1f}", s.open_fds, s.threads])


@dataclass(frozen=True)
class Growth:
    """Growth of one measure of one process after warm-up (``after`` vs ``baseline``)."""

    process: str
    measure: str
    baseline: float
    after: float
    peak: float

    @property
    def ratio(self) -> float:
        """Relative growth: 0.05 means +5 %."""
        return (self.after - self.baseline) / self.baseline if self.baseline else 0.0


def growth(samples: list[Sample], warmup_s: float, window_s: float = 60.0) -> list[Growth]:
    """RSS and open-FD growth per process: median of ``[warmup, warmup + window]`` against the
    median of the last ``window_s``; raises ``ValueError`` if the run is shorter than that."""
    results = []
    for name in dict.fromkeys(s.process for s in samples):
        mine = [s for s in samples if s.process == name]
        end = mine[-1].elapsed_s
        if end < warmup_s + 2 * window_s:
            raise ValueError(
                f"{name}: {end:.0f} s of samples, need warm-up {warmup_s:.0f} s + 2 windows of "
                f"{window_s:.0f} s"
            )
        first = [s for s in mine if warmup_s <= s.elapsed_s <= warmup_s + window_s]
        last = [s for s in mine if s.elapsed_s >= end - window_s]
        after_warmup = [s for s in mine if s.elapsed_s >= warmup_s]
        for measure in ("rss_mb", "open_fds"):
            results.append(
                Growth(
                    process=name,
                    measure=measure,
                    baseline=statistics.median(getattr(s, measure) for s in first),
                    after=statistics.median(getattr(s, measure) for s in last),
                    peak=max(getattr(s, measure) for s in after_warmup),
                )
            )
    return results
