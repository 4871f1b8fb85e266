"""Shared dependencies: the per-app state, and the classify query parameters as options."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
    models: dict[str, ModelEntry]
    metrics: Metrics
    admission: Admission
    engine: EngineHandle
    classifier: Classifier
    # Decoding is CPU work: it runs here, off the event loop, one thread per admitted request.
    decode_pool: ThreadPoolExecutor | None = None


def get_state(request: Request) -> ServerState:
    """The state of the app serving ``request``."""
    return request.app.state.server


State = Annotated[ServerState, Depends(get_state)]


def classify_options(
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
    return state.classifier.resolve(options)


Options = Annotated[ClassifyOptions, Depends(classify_options)]
