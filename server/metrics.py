"""Prometheus metrics of one app: requests by endpoint and status, stage latencies, load.

Each app has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds: a small model on a GPU answers in milliseconds, full VGG-19 on a CPU in seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGES = ("decode", "preprocess", "inference", "total")


class Metrics:
    """The collectors the front end updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vggserve_http_requests",
            "HTTP requests by endpoint (route template), method and status code",
            ("endpoint", "method", "status"),
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "vggserve_http_request_duration_seconds",
            "Time from the request's first byte to the end of the response, by endpoint",
            ("endpoint",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "vggserve_stage_duration_seconds",
            "Time spent per classified image in each stage (decode, preprocess, inference, total)",
            ("stage",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "vggserve_in_flight_requests",
            "Requests holding a classification slot now",
            registry=self.registry,
        )
        self.waiting = Gauge(
            "vggserve_waiting_requests",
            "Requests queued for a classification slot now",
            registry=self.registry,
        )
        self.rejected = Counter(
            "vggserve_rejected_requests",
            "Requests refused with 429 because every slot was busy and the queue was full",
            registry=self.registry,
        )
        self.batch_views = Histogram(
            "vggserve_batch_views",
            "Views (images and flips) per backend run when micro-batching is on",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.torch_cuda_graphs = Gauge(
            "vggserve_torch_cuda_graphs",
            "CUDA graphs the torch backend captured at warm-up (one per model and batch shape)",
            registry=self.registry,
        )
        self.torch_cuda_graph_bytes = Gauge(
            "vggserve_torch_cuda_graph_memory_bytes",
            "Device memory the torch backend's CUDA graphs hold (their pool and input buffers)",
            registry=self.registry,
        )
        self.torch_eager_shapes = Gauge(
            "vggserve_torch_eager_shapes",
            "Batch shapes the compiled torch backend runs eagerly: not compiled at warm-up (add "
            "the image size to --torch-warmup) or past the recompile limit",
            registry=self.registry,
        )
        for stage in STAGES:  # export every stage from the start, not after the first request
            self.stage_seconds.labels(stage)

    def watch_torch(self, stats: Any) -> None:
        """Read the torch backend's :class:`~inference.backends.torch.ServingStats` at every
        scrape (0 until the backend exists, and with other backends)."""
        self.torch_cuda_graphs.set_function(lambda: stats.cuda_graphs)
        self.torch_cuda_graph_bytes.set_function(lambda: stats.cuda_graph_bytes)
        self.torch_eager_shapes.set_function(lambda: stats.eager_shapes)

    def observe_stages(self, timing_ms: dict[str, float]) -> None:
        """Record one image's stage timings (milliseconds, as in the response)."""
        for stage in STAGES:
            if stage in timing_ms:
                self.stage_seconds.labels(stage).observe(timing_ms[stage] / 1e3)


class RequestMetricsMiddleware:
    """Counts every HTTP response (413s and 500s included) by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            endpoint = _endpoint(scope)
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - started)


def _endpoint(scope: Scope) -> str:
    """The matched route's path template; one label for every unmatched path (bounded labels)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is not None:
        return path
    if scope["path"].startswith("/static/"):
        return "/static"
    # Rejected before routing (413 on Content-Length): label by the known path if any.
    return scope["path"] if scope["path"] in KNOWN_PATHS else "unmatched"


KNOWN_PATHS = frozenset({"/v1/classify", "/v1/classify/batch"})
