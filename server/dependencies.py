"""Shared dependencies: the per-app state, and the classify query parameters as options."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, Query, Request

from inference import Classifier, ClassifyOptions, ModelEntry, OptionError
from inference.protocol import parse_scales
from inference.repository import parse_model_names
from server.admission import Admission
from server.engine import EngineHandle
from server.metrics import Metrics
from server.settings import Settings


@dataclass
class ServerState:
    """What every request shares; built by the app's lifespan."""

    settings: Settings
    metrics: Metrics
    admission: Admission
    engine: EngineHandle
    # None until the models are known: with --backend triton they are read from Triton by
    # make_classifier when it first answers.
    classifier: Classifier | None
    make_classifier: Callable[[], Awaitable[Classifier]] | None = None
    # Decoding is CPU work: it runs here, off the event loop, one thread per admitted request.
    decode_pool: ThreadPoolExecutor | None = None
    _making: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def current_classifier(self) -> Classifier:
        """The classifier; raises :class:`BackendUnavailable` (503) while it cannot be made."""
        if self.classifier is None:
            async with self._making:
                if self.classifier is None:
                    self.classifier = await self.make_classifier()
        return self.classifier

    @property
    def models(self) -> dict[str, ModelEntry]:
        """The served models (empty until known)."""
        return self.classifier.models if self.classifier else {}


def get_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


async def classify_options(
    state: State,
    top_k: Annotated[
        int | None,
        Query(description="how many classes to return (1..classes; default 5, or all if fewer)"),
    ] = None,
    scales: Annotated[
        str | None,
        Query(
            description="comma-separated shorter-side sizes Q, e.g. 256,384,512 "
            "(default: the server's --scales if given, else each model's serving scales)",
            examples=["256,384,512"],
        ),
    ] = None,
    flip: Annotated[bool, Query(description="also run the horizontal flip")] = True,
    models: Annotated[
        str | None,
        Query(description="comma-separated model names to fuse (default: every served model)"),
    ] = None,
    heatmap: Annotated[
        bool, Query(description="return the top-1 class score map at the largest Q")
    ] = False,
    mode: Annotated[
        Literal["dense", "multicrop", "both"],
        Query(description="dense evaluation, 5x5 multi-crop, or both averaged (paper Table 5)"),
    ] = "dense",
) -> ClassifyOptions:
    """The query parameters of the classify endpoints, checked against the served models.

    Raises :class:`OptionError` (422, naming the parameter) before any image is decoded.
    """
    try:
        parsed_scales = parse_scales(scales) if scales is not None else None
    except ValueError as exc:
        raise OptionError("scales", str(exc)) from None
    try:
        parsed_models = parse_model_names(models) if models is not None else None
    except ValueError as exc:
        raise OptionError("models", str(exc)) from None
    options = ClassifyOptions(
        scales=parsed_scales,
        flip=flip,
        models=parsed_models,
        top_k=top_k,
        heatmap=heatmap,
        mode=mode,
    )
    return (await state.current_classifier()).resolve(options)


Options = Annotated[ClassifyOptions, Depends(classify_options)]
