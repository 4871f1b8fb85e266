"""Micro-batching: same-shape views of concurrent requests run as one batch.

A view batch of one request is small (the image and its flip). On a GPU, running the views of
several requests together fills the device far better, so :class:`MicroBatcher` holds the first
batch of a given (model, shape, outputs) for at most ``max_delay`` seconds, joins whatever else
of that key arrives meanwhile (up to ``max_batch`` views), runs it once and hands each caller
its own rows. Different shapes are never padded together: exact rescaling stays exact.

Joining large batches (tens of MB of views at N = 64, Q = 512) is a copy that would stall every
other request if it ran on the event loop, so it runs in a worker thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from inference.backends.base import Backend
from inference.protocol import MULTICROP_GRID

Key = tuple[str, tuple[int, ...], tuple[str, ...]]

# Below this many bytes joining the views takes less time than handing the copy to a thread.
JOIN_IN_THREAD_BYTES = 1 << 20


@dataclass
class _Pending:
    arrays: list[np.ndarray] = field(default_factory=list)
    futures: list[asyncio.Future] = field(default_factory=list)
    views: int = 0
    timer: asyncio.TimerHandle | None = None


class MicroBatcher:
    """A :class:`~inference.backends.base.Backend` that batches another one's calls.

    Args:
        backend: the engine that runs the joined batches.
        max_delay: seconds the first call of a batch waits for company (bounded latency cost).
        max_batch: views in one joined batch; a call larger than this runs alone.
        on_batch: called with the number of views of every run (e.g. a metrics histogram).
    """

    def __init__(
        self,
        backend: Backend,
        max_delay: float = 0.002,
        max_batch: int = 32,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        if max_delay < 0:
            raise ValueError(f"max_delay must be 0 or more, got {max_delay}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.backend = backend
        self.name = backend.name
        self.max_delay = max_delay
        self.max_batch = max_batch
        self._on_batch = on_batch or (lambda _views: None)
        self._pending: dict[Key, _Pending] = {}
        self._running: set[asyncio.Task] = set()

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        if len(images) >= self.max_batch:
            self._on_batch(len(images))
            return await self.backend.infer(model, images, outputs)
        key: Key = (model, tuple(images.shape[1:]), tuple(sorted(outputs)))
        loop = asyncio.get_running_loop()
        pending = self._pending.get(key)
        if pending is not None and pending.views + len(images) > self.max_batch:
            self._flush(key)  # full: send what waits, this call starts the next batch
            pending = None
        if pending is None:
            pending = self._pending[key] = _Pending()
            pending.timer = loop.call_later(self.max_delay, self._flush, key)
        future = loop.create_future()
        pending.arrays.append(images)
        pending.futures.append(future)
        pending.views += len(images)
        if pending.views >= self.max_batch:
            self._flush(key)
        return await future

    def _flush(self, key: Key) -> None:
        pending = self._pending.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(key, pending))
        self._running.add(task)  # keep a reference until it is done
        task.add_done_callback(self._running.discard)

    async def _run(self, key: Key, pending: _Pending) -> None:
        model, _, outputs = key
        self._on_batch(pending.views)
        try:
            joined = await join_views(pending.arrays)
            result = await self.backend.infer(model, joined, outputs)
        except BaseException as exc:  # every caller of the batch gets the failure
            for future in pending.futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for array, future in zip(pending.arrays, pending.futures, strict=True):
            stop = start + len(array)
            if not future.done():  # the caller may have been cancelled (client gone)
                future.set_result({name: value[start:stop] for name, value in result.items()})
            start = stop

    async def ready(self) -> bool:
        return await self.backend.ready()

    async def close(self) -> None:
        for key in list(self._pending):
            self._flush(key)
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        await self.backend.close()


async def join_views(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``arrays`` concatenated along the batch axis; a large copy runs off the event loop."""
    if len(arrays) == 1:
        return arrays[0]
    if sum(array.nbytes for array in arrays) < JOIN_IN_THREAD_BYTES:
        return np.concatenate(arrays)
    return await asyncio.to_thread(np.concatenate, arrays)


def padded_batch_sizes(max_batch: int | None = None) -> tuple[int, ...]:
    """The batch sizes a compiled backend pads its runs up to, for the calls the server makes.

    One request's views (1 without the flip, 2 with it), its multi-crop batches (25 crops, 50
    with flips) and, with micro-batching up to ``max_batch`` views, the powers of two below
    ``max_batch`` and ``max_batch`` itself: padding wastes less than half a run, and warm-up
    can compile (and capture) every batch size the server will run.
    """
    crops = MULTICROP_GRID * MULTICROP_GRID
    sizes = {1, 2, crops, 2 * crops}
    if max_batch is not None:
        sizes |= {1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch}
        sizes.add(max_batch)
    return tuple(sorted(sizes))
