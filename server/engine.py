"""The inference backend as the classifier sees it: opened when the app starts, possibly down.

The classifier is built (and its defaults checked) when the app is created; the engine itself
is opened inside the running event loop (an async gRPC client belongs to the loop that made it).
Until it is open, or if opening failed, requests get 503 and ``/readyz`` says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import numpy as np

from inference import ModelEntry
from inference.backends.base import Backend, BackendUnavailable
from server.settings import Settings

log = logging.getLogger("server")

Opener = Callable[[], Awaitable[Backend]]


class StartupError(RuntimeError):
    """The server cannot start as asked; the message says what to do (one line, no traceback)."""


class EngineHandle:
    """A :class:`~inference.backends.base.Backend` that forwards to the engine once it is open."""

    def __init__(self, name: str, opener: Opener) -> None:
        self.name = name
        self._opener = opener
        self._backend: Backend | None = None
        self.failure: str | None = None

    async def open(self) -> None:
        """Open the engine; a failure is logged and kept, and the server answers 503."""
        try:
            self._backend = await self._opener()
            self.failure = None
        except Exception as exc:
            self.failure = f"the {self.name} backend failed to start: {type(exc).__name__}: {exc}"
            log.error("%s", self.failure)

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        if self._backend is None:
            raise BackendUnavailable(self.failure or f"the {self.name} backend is starting")
        return await self._backend.infer(model, images, outputs)

    async def ready(self) -> bool:
        return self._backend is not None and await self._backend.ready()

    async def close(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()


def engine_opener(settings: Settings, models: Mapping[str, ModelEntry]) -> Opener:
    """How to open the backend ``settings`` names; the Triton client is imported only if asked."""
    if settings.backend == "onnxruntime":
        from inference.backends.onnxruntime import OnnxRuntimeBackend

        async def open_onnxruntime() -> Backend:
            # Loading the graphs takes seconds for full-size VGG: keep the loop responsive.
            return await asyncio.to_thread(OnnxRuntimeBackend, models, settings.threads)

        return open_onnxruntime
    try:
        from inference.backends.triton import TritonBackend
    except ImportError as exc:
        raise StartupError(f"--backend triton is not available here ({exc})") from exc

    async def open_triton() -> Backend:
        return TritonBackend(settings.triton_url, models)

    return open_triton
