"""What the protocol needs from an inference engine, and nothing about scales or fusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class BackendUnavailable(RuntimeError):
    """The engine cannot serve now (e.g. Triton is down); worth retrying later (HTTP 503)."""


class Backend(Protocol):
    """Runs one exported graph on one uint8 batch.

    ``infer`` takes a (N, 3, H, W) uint8 array for model ``model`` and returns the requested
    outputs (``"probs"`` (N, C) float32 and/or ``"scores"`` (N, C, h, w) float32).
    """

    name: str

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]: ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...
