"""Bounded work: a few requests classified at once, a bounded queue behind them, 429 beyond.

Never an unbounded queue: a request that finds every slot busy and the queue full is refused at
once with a ``Retry-After`` estimate, instead of waiting behind work the server cannot finish
in time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Overloaded(RuntimeError):
    """Every slot is busy and the queue is full (HTTP 429)."""

    def __init__(self, retry_after_s: int, in_flight: int, waiting: int) -> None:
        super().__init__(
            f"the server is at capacity ({in_flight} requests being classified, {waiting} "
            f"waiting); retry in {retry_after_s} s"
        )
        self.retry_after_s = retry_after_s


class Admission:
    """At most ``max_concurrency`` holders of a slot and ``max_queue`` waiters for one."""

    # Weight of the newest service time in the running estimate used for Retry-After.
    SMOOTHING = 0.2

    def __init__(self, max_concurrency: int, max_queue: int) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.in_flight = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_concurrency)
        self._service_s = 1.0  # running mean of the time a slot is held

    def retry_after_s(self) -> int:
        """Whole seconds until the queue has likely drained by one place (at least 1)."""
        rounds = (self.in_flight + self.waiting) / self.max_concurrency
        return max(1, math.ceil(self._service_s * rounds))

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one slot for the body of the ``async with``; raises :class:`Overloaded`."""
        if self.in_flight + self.waiting >= self.max_concurrency + self.max_queue:
            raise Overloaded(self.retry_after_s(), self.in_flight, self.waiting)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        started = asyncio.get_running_loop().time()
        try:
            yield
        finally:
            self.in_flight -= 1
            self._slots.release()
            held = asyncio.get_running_loop().time() - started
            self._service_s += self.SMOOTHING * (held - self._service_s)
