"""The inference backend as the classifier sees it: opened when the app starts, possibly down.

The classifier is built (and its defaults checked) when the app is created, except with
``--backend triton``, whose models are read from Triton once it answers; the engine itself is
opened inside the running event loop (an async gRPC client belongs to the loop that made it).
Until it is open, or if opening failed, requests get 503 and ``/readyz`` says why.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import numpy as np

from inference import Classifier, ModelEntry, OptionError, RepositoryError
from inference.backends.base import Backend, BackendUnavailable
from server.settings import Settings

log = logging.getLogger("server")

Opener = Callable[[], Awaitable[Backend]]
ClassifierFactory = Callable[[], Awaitable[Classifier]]


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

    def backend(self) -> Backend:
        """The open engine; raises :class:`BackendUnavailable` until it is open."""
        if self._backend is None:
            raise BackendUnavailable(self.failure or f"the {self.name} backend is starting")
        return self._backend

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        return await self.backend().infer(model, images, outputs)

    async def ready(self) -> bool:
        return self._backend is not None and await self._backend.ready()

    async def not_ready_reason(self) -> str | None:
        """Why the open backend cannot serve, where it can say (Triton's ``check``)."""
        check = getattr(self._backend, "check", None)
        if check is None:
            return None
        try:
            await check()
        except Exception as exc:
            return str(exc)
        return None

    async def close(self) -> None:
        if self._backend is not None:
            backend, self._backend = self._backend, None
            await backend.close()


def with_batching(
    backend: Backend, settings: Settings, on_gpu: bool, on_batch: Callable[[int], object] | None
) -> Backend:
    """``backend`` behind a :class:`~inference.batching.MicroBatcher` when batching is on."""
    if not batching_on(settings, on_gpu):
        return backend
    from inference.batching import MicroBatcher

    delay_ms = 2.0 if settings.batch_delay_ms is None else settings.batch_delay_ms
    return MicroBatcher(
        backend, max_delay=delay_ms / 1e3, max_batch=settings.max_batch, on_batch=on_batch
    )


def engine_opener(
    settings: Settings,
    models: Mapping[str, ModelEntry] | None,
    on_batch: Callable[[int], object] | None = None,
    on_torch_stats: Callable[[object], object] | None = None,
) -> Opener:
    """How to open the backend ``settings`` names; the Triton client is imported only if asked.

    ``models`` are the repository's (None with ``--backend triton``: Triton's own);
    ``on_batch`` and ``on_torch_stats``: see :func:`with_batching`, :func:`torch_opener`."""
    if settings.backend == "onnxruntime":
        from inference.backends.onnxruntime import EngineError, OnnxRuntimeBackend, providers

        try:  # a CUDA that is not there, or two ONNX Runtime builds, stop the start now
            providers(settings.onnxruntime_device)
        except EngineError as exc:
            raise StartupError(
                f"--onnxruntime-device {settings.onnxruntime_device}: {exc}"
            ) from exc

        async def open_onnxruntime() -> Backend:
            # Loading the graphs takes seconds for full-size VGG: keep the loop responsive.
            arena_mb = settings.onnxruntime_arena_mb
            backend = await asyncio.to_thread(
                OnnxRuntimeBackend,
                models,
                settings.threads,
                device=settings.onnxruntime_device,
                arena_bytes=None if arena_mb is None else arena_mb << 20,
            )
            log.info("%s", backend.describe())
            return with_batching(backend, settings, backend.on_gpu, on_batch)

        return open_onnxruntime
    if settings.backend == "torch":
        return torch_opener(settings, models, on_batch, on_torch_stats)
    if settings.backend == "openvino":
        return openvino_opener(settings, models, on_batch)
    try:
        from inference.backends.triton import TritonBackend
    except ImportError as exc:
        raise StartupError(f"--backend triton is not available here ({exc})") from exc

    if settings.shape_multiple is not None:
        raise StartupError(
            "--shape-multiple is not available with --backend triton: Triton's classify model "
            "rescales exactly, as the paper does; drop the flag"
        )

    async def open_triton() -> Backend:
        # One classify call per request; the models are read from Triton when it answers.
        return TritonBackend(settings.triton_url, pipeline=True)

    return open_triton


def remote_classifier(settings: Settings, engine: EngineHandle) -> ClassifierFactory:
    """``--backend triton``: the classifier over Triton's ``classify``, made once Triton has
    said which models it serves (until then requests get 503 saying why)."""
    from inference.remote import RemoteClassifier

    async def make() -> Classifier:
        backend = engine.backend()
        try:
            models = await backend.served_models(settings.models)
            return RemoteClassifier(backend, models, default_scales=settings.scales)
        except RepositoryError as exc:
            raise BackendUnavailable(
                f"{exc}; start the front end with --models naming them"
            ) from exc
        except OptionError as exc:
            raise BackendUnavailable(f"--{exc}, for the models Triton serves") from exc

    return make


# Image sizes warmed up when torch.compile is on and --torch-warmup names none: after warm-up
# nothing compiles on the request path, so the common photo orientations must be compiled.
DEFAULT_WARMUP_SIZES = ((640, 480), (480, 640))


def warmup_shapes(
    settings: Settings,
    models: Mapping[str, ModelEntry],
    batch_sizes: Sequence[int] = (),
    batching: bool = False,
) -> dict[str, list[tuple[int, int, int, int]]]:
    """Per model, the (N, 3, H, W) batches warm-up runs.

    Without ``batch_sizes`` (eager): the batch of 2 (image and flip) a request for each
    ``--torch-warmup`` size makes at every Q. With them (compiled, runs padded to those sizes):
    every size up to the largest dense run (2 views, or ``--max-batch`` with ``batching``) at
    those sizes, and the multi-crop batches (the sizes from 25 crops up, at the model's crop), so
    that every batch shape the server can run is compiled before it answers.
    """
    from inference import rescaled_size
    from inference.protocol import MULTICROP_GRID

    multiple = settings.shape_multiple
    sizes = settings.torch_warmup
    if sizes is None:
        sizes = DEFAULT_WARMUP_SIZES if batch_sizes else ()
    largest_dense = settings.max_batch if batching else 2
    dense_counts = [n for n in batch_sizes if n <= largest_dense] or [2]
    crop_counts = [n for n in batch_sizes if n >= MULTICROP_GRID * MULTICROP_GRID]
    min_size = max(entry.min_size for entry in models.values())
    views = set()
    for width, height in sizes:
        for q in settings.scales or {q for entry in models.values() for q in entry.scales}:
            if q < min_size:
                continue  # such requests are refused before they reach the backend
            size = rescaled_size(width, height, q, multiple)
            views.add((size[1], size[0]))
    return {
        name: sorted({(n, 3, h, w) for n in dense_counts for h, w in views})
        + [(n, 3, entry.min_size, entry.min_size) for n in crop_counts]
        for name, entry in models.items()
    }


def batching_on(settings: Settings, on_gpu: bool) -> bool:
    """Whether micro-batching runs (``--batch-delay-ms``, by default on a GPU only)."""
    return on_gpu if settings.batch_delay_ms is None else settings.batch_delay_ms > 0


def torch_opener(
    settings: Settings,
    models: Mapping[str, ModelEntry],
    on_batch: Callable[[int], object] | None = None,
    on_torch_stats: Callable[[object], object] | None = None,
) -> Opener:
    """``--backend torch``: the graphs are read now, so an unreadable one (an int8 graph, a
    foreign op) or a missing GPU stops the start with one line; moving them to the device,
    compiling and warming up happen when the app starts, before it answers.

    ``on_torch_stats`` is handed the backend's :class:`~inference.backends.torch.ServingStats`
    once it exists (the server's /metrics read it)."""
    try:
        from inference.backends.torch import (
            GraphNotReadable,
            TorchBackend,
            load_modules,
            resolve_compile,
            resolve_device,
        )
    except ImportError as exc:
        raise StartupError(f"--backend torch needs PyTorch and onnx ({exc})") from exc
    from inference.batching import padded_batch_sizes

    try:
        device = resolve_device(settings.torch_device)
    except ValueError as exc:
        raise StartupError(f"--torch-device {exc}") from exc
    try:
        modules = load_modules(models)
    except GraphNotReadable as exc:
        raise StartupError(f"--backend torch cannot run {exc}") from exc
    on_gpu = device.type == "cuda"
    compiled = resolve_compile(settings.torch_compile, device) != "off"
    batching = batching_on(settings, on_gpu)
    batch_sizes = padded_batch_sizes(settings.max_batch if batching else None) if compiled else ()
    shapes = warmup_shapes(settings, models, batch_sizes, batching)

    async def open_torch() -> Backend:
        backend = await asyncio.to_thread(
            TorchBackend,
            modules,
            device=settings.torch_device,
            dtype=settings.torch_dtype,
            compile=settings.torch_compile,
            threads=settings.threads,
            batch_sizes=batch_sizes,
        )
        log.info("%s", backend.describe())
        if on_torch_stats is not None:
            on_torch_stats(backend.stats)
        runs = sum(len(model_shapes) for model_shapes in shapes.values())
        if runs:
            try:
                seconds = await backend.warmup(shapes)
            except BaseException:
                await backend.close()
                raise
            stats = backend.stats
            log.info(
                "torch warm-up of %d (model, batch shape) pairs in %.1f s: %d CUDA graphs "
                "(%.0f MiB), %d shapes run eagerly",
                runs,
                seconds,
                stats.cuda_graphs,
                stats.cuda_graph_bytes / 2**20,
                stats.eager_shapes,
            )
        return with_batching(backend, settings, backend.on_gpu, on_batch)

    return open_torch


def openvino_opener(
    settings: Settings,
    models: Mapping[str, ModelEntry],
    on_batch: Callable[[int], object] | None = None,
) -> Opener:
    """``--backend openvino``: the graphs are read and the precision resolved now, so a missing
    OpenVINO, an unreadable graph or bf16 on a CPU without it stops the start with one line;
    compiling (seconds for full-size VGG) happens when the app starts, before it answers."""
    try:
        from inference.backends.openvino import (
            GraphNotLoadable,
            OpenVinoBackend,
            read_graphs,
            resolve_precision,
        )
    except ImportError as exc:
        raise StartupError(
            f"--backend openvino needs OpenVINO Runtime ({exc}); install it with "
            "pip install 'openvino>=2026.4,<2027'"
        ) from exc
    try:
        precision = resolve_precision(settings.openvino_precision)
    except ValueError as exc:
        raise StartupError(f"--openvino-precision {exc}") from exc
    try:
        graphs = read_graphs(models)
    except GraphNotLoadable as exc:
        raise StartupError(f"--backend openvino cannot run {exc}") from exc

    async def open_openvino() -> Backend:
        backend = await asyncio.to_thread(
            OpenVinoBackend, graphs, threads=settings.threads, precision=precision
        )
        log.info("%s", backend.describe())
        return with_batching(backend, settings, backend.on_gpu, on_batch)

    return open_openvino
