"""Liveness (``/healthz``), readiness (``/readyz``) and Prometheus metrics (``/metrics``)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from inference.backends.base import BackendUnavailable
from server.dependencies import State
from server.schemas import Health, Readiness

router = APIRouter(tags=["operations"])
log = logging.getLogger("server")


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    """200 whenever the process can answer at all (liveness probe)."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses={503: {"model": Readiness, "description": "the backend cannot serve now"}},
    summary="The backend can serve",
)
async def readyz(state: State) -> Readiness | JSONResponse:
    """200 with ``ready: true`` when the inference backend answers, else 503 (readiness probe)."""
    name = state.settings.backend
    detail = state.engine.failure
    try:
        ready = await state.engine.ready()
        if ready:
            await state.current_classifier()  # --backend triton: the models it serves fit
    except BackendUnavailable as exc:
        ready, detail = False, str(exc)
    except Exception as exc:  # a probe must answer, whatever the engine does
        log.warning("readiness check failed: %s", exc)
        ready, detail = False, f"{type(exc).__name__}: {exc}"
    if ready:
        return Readiness(ready=True, backend=name)
    detail = detail or await state.engine.not_ready_reason()
    body = Readiness(ready=False, backend=name, detail=detail or f"the {name} backend is not ready")
    return JSONResponse(body.model_dump(exclude_none=True), status_code=503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(state: State) -> Response:
    """Requests by endpoint and status, stage latency histograms, in-flight and rejections."""
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
