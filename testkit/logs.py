"""What an app running in this process logs, recorded as text (tracebacks included)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class RecordedLogs(logging.Handler):
    """Keeps every record it handles as a formatted line, with its traceback if it has one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        """Everything recorded so far."""
        return "\n".join(self.lines)


@contextmanager
def recorded_logs(logger: str = "") -> Iterator[RecordedLogs]:
    """Record what ``logger`` (default: the root, so every logger that propagates) handles
    while the block runs, at the levels already configured."""
    recorded = RecordedLogs()
    target = logging.getLogger(logger)
    target.addHandler(recorded)
    try:
        yield recorded
    finally:
        target.removeHandler(recorded)
