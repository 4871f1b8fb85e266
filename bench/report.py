"""What every benchmark prints beside its figures: the machine, and percentiles."""

from __future__ import annotations

import os

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``."""
    return float(np.percentile(np.asarray(values), q))


def machine() -> str:
    """A short description of the CPU this ran on."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. ``1.2/0.8/0.5``."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())
