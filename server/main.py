"""The FastAPI application: :func:`create_app` wires settings, state, middleware and routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from PIL import Image

from inference import Classifier, read_repository
from server.admission import Admission
from server.api_docs import install_api_docs
from server.dependencies import ServerState
from server.engine import EngineHandle, engine_opener, remote_classifier
from server.errors import UnexpectedErrorMiddleware, install_error_handlers
from server.metrics import Metrics, RequestMetricsMiddleware
from server.request_id import RequestIdMiddleware
from server.routers import classify, health, models, page
from server.routers.page import STATIC_DIR
from server.settings import Settings
from server.upload_limit import UploadLimitMiddleware

DESCRIPTION = """
Dense multi-scale image classification with VGG networks (Simonyan & Zisserman, ICLR 2015,
section 3.2): each image is rescaled so its shorter side is Q for every requested scale, run with
its horizontal flip through a fully convolutional graph, and the soft-max posteriors are averaged
over flips, scales and models.

Upload an image to `POST /v1/classify` as the multipart field `file`; errors are JSON
`{"detail": "..."}` saying what was wrong and what to do.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings``.

    The repository is read and the default scales are checked here, so a bad start fails at
    once (``RepositoryError``, ``OptionError``, :class:`~server.engine.StartupError`); the
    backend itself is opened when the app starts serving.
    """
    settings = settings or Settings()
    # Pillow refuses images over its own bomb limit (~89 MP) before ours is consulted; a larger
    # --max-pixels must be able to take effect, so Pillow's limit is raised to match.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, settings.max_pixels)
    remote = settings.backend == "triton"  # the models are Triton's, read when it answers
    served = (
        None
        if remote
        else read_repository(settings.repository, list(settings.models or ()) or None)
    )
    metrics = Metrics()
    engine = EngineHandle(
        settings.backend,
        engine_opener(
            settings,
            served,
            on_batch=metrics.batch_views.observe,
            on_torch_stats=metrics.watch_torch,
        ),
    )
    state = ServerState(
        settings=settings,
        metrics=metrics,
        admission=Admission(settings.max_concurrency, settings.max_queue),
        engine=engine,
        classifier=None
        if remote
        else Classifier(
            engine, served, default_scales=settings.scales, shape_multiple=settings.shape_multiple
        ),
        make_classifier=remote_classifier(settings, engine) if remote else None,
    )
    state.metrics.in_flight.set_function(lambda: state.admission.in_flight)
    state.metrics.waiting.set_function(lambda: state.admission.waiting)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.decode_pool = ThreadPoolExecutor(
            max_workers=settings.max_concurrency, thread_name_prefix="decode"
        )
        await engine.open()
        try:
            yield
        finally:
            await engine.close()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="vggserve",
        summary="Dense multi-scale VGG classification over HTTP",
        description=DESCRIPTION,
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's pages load Swagger UI and ReDoc from a CDN; install_api_docs serves them.
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state
    install_error_handlers(app)
    # Added innermost first: every response gets its request id and log line, metrics see every
    # response, the 500 guard sees every exception, and the upload limit runs before any body is
    # read.
    app.add_middleware(UploadLimitMiddleware, limit_bytes=settings.max_upload_bytes)
    app.add_middleware(UnexpectedErrorMiddleware)
    app.add_middleware(RequestMetricsMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(classify.router)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(page.router)
    install_api_docs(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
