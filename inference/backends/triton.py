"""Triton Inference Server over gRPC (``tritonclient.grpc.aio``).

Each ``infer`` is one gRPC call asking only for the outputs the protocol needs; the classifier
keeps every (model, Q) call of a request in flight together and Triton's dynamic batcher merges
equal shapes. ``classify`` is one call to Triton's ``classify`` model instead: encoded files in,
the whole protocol run inside Triton. What a client needs to know about the models (labels,
input limits, serving scales) is read from Triton itself by :meth:`TritonBackend.served_models`.
When Triton is unreachable, not ready or lacks a model, calls raise :class:`BackendUnavailable`
(HTTP 503) with what to do; the next call after an outage opens a new channel, so the same
backend object recovers by itself when Triton comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from inference.backends.base import BackendUnavailable
from inference.repository import CLASSIFY_MODEL, ModelEntry, RepositoryError, model_entry

DEFAULT_TIMEOUT_S = 120.0  # full VGG at Q=512 queued behind others takes seconds on a CPU
DEFAULT_CHECK_TIMEOUT_S = 2.0
MIN_SHM_REGION_BYTES = 1 << 20
# Reconnect quickly after an outage: gRPC's default backoff grows to 120 s, during which every
# call would fail although Triton is back. A local subchannel pool keeps a new channel from
# inheriting the old one's backoff.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.use_local_subchannel_pool", 1),
]
LOOPBACK = {"127.0.0.1", "localhost", "[::1]"}
# gRPC codes that mean "not now" rather than "wrong request".
_UNAVAILABLE = {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.UNKNOWN"}


class TritonTimeout(BackendUnavailable):
    """Triton did not answer within the timeout (gRPC DEADLINE_EXCEEDED)."""


class TritonError(RuntimeError):
    """Triton refused or failed a request for a reason retrying will not fix."""


class TritonRefused(TritonError):
    """Triton's ``classify`` refused a request (INVALID_ARGUMENT): a bad file or parameter. The
    message is the HTTP API's."""


class _RegionLost(TritonError):
    """Triton does not know a shared memory region we registered (it restarted)."""


@dataclass
class _Region:
    """One system shared memory region registered (or to be registered) with Triton."""

    name: str
    handle: object
    size: int
    registered: bool = False


class _SharedMemoryPool:
    """Input regions in /dev/shm, one per call in flight, reused and grown as needed."""

    def __init__(self) -> None:
        self._prefix = f"vggserve_{secrets.token_hex(4)}"
        self._free: list[_Region] = []
        self._all: list[_Region] = []

    async def acquire(self, client: grpcclient.InferenceServerClient, nbytes: int) -> _Region:
        fitting = [r for r in self._free if r.size >= nbytes]
        if fitting:
            region = min(fitting, key=lambda r: r.size)
            self._free.remove(region)
        else:
            size = max(MIN_SHM_REGION_BYTES, 1 << (nbytes - 1).bit_length())
            name = f"{self._prefix}_{len(self._all)}"
            handle = shm.create_shared_memory_region(name, f"/{name}", size, create_only=True)
            region = _Region(name, handle, size)
            self._all.append(region)
        if not region.registered:
            try:
                await client.unregister_system_shared_memory(region.name)  # stale, if any
                await client.register_system_shared_memory(
                    region.name, f"/{region.name}", region.size
                )
            except BaseException:
                self._free.append(region)
                raise
            region.registered = True
        return region

    def release(self, region: _Region) -> None:
        self._free.append(region)

    def forget_registrations(self) -> None:
        """After an outage Triton has forgotten every region: register again on next use."""
        for region in self._all:
            region.registered = False

    async def close(self, client: grpcclient.InferenceServerClient | None) -> None:
        for region in self._all:
            if client is not None and region.registered:
                with contextlib.suppress(Exception):
                    await client.unregister_system_shared_memory(region.name)
            shm.destroy_shared_memory_region(region.handle)
        self._all.clear()
        self._free.clear()


class TritonBackend:
    """Runs the exported graphs on a Triton server (``model_repository/`` served by Triton).

    Args:
        url: Triton's gRPC ``host:port`` (e.g. ``127.0.0.1:8001``).
        models: the repository's models by name; Triton must serve the same names. None: the
            classifiers Triton serves, read from it when first needed (:meth:`served_models`).
        timeout_s: per-call deadline.
        check_timeout_s: deadline of the readiness checks.
        shared_memory: send inputs through Triton's system shared memory (Triton on this host).
        pipeline: calls go to the ``classify`` model; readiness includes it.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        models: Mapping[str, ModelEntry] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S,
        shared_memory: bool = False,
        pipeline: bool = False,
    ) -> None:
        self.url = url
        self.models = dict(models) if models is not None else None
        self.timeout_s = timeout_s
        self.check_timeout_s = check_timeout_s
        self.pipeline = pipeline
        self._client: grpcclient.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shm = _SharedMemoryPool() if shared_memory else None
        self._retired: dict[grpcclient.InferenceServerClient, asyncio.TimerHandle] = {}
        self._closing: set[asyncio.Task] = set()

    def _channel(self) -> grpcclient.InferenceServerClient:
        """The current client; a new one after an outage or in another event loop."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            # A channel belongs to the loop it was made in; one from a finished loop is dropped.
            args = list(CHANNEL_ARGS)
            if self.url.rsplit(":", 1)[0] in LOOPBACK:
                args.append(("grpc.enable_http_proxy", 0))  # an http_proxy must not catch these
            self._client = grpcclient.InferenceServerClient(self.url, channel_args=args)
            self._loop = loop
            if self._shm:
                self._shm.forget_registrations()
        return self._client

    def _drop_channel(self, client: grpcclient.InferenceServerClient) -> None:
        """Forget a channel that failed, so the next call connects afresh.

        Closing it now would cancel the other calls still in flight on it (CancelledError
        instead of a clean error), so it is closed once they are past their deadline.
        """
        if self._client is client:
            self._client = None
            if self._shm:
                self._shm.forget_registrations()
            loop = asyncio.get_running_loop()
            self._retired[client] = loop.call_later(
                self.timeout_s + 1, self._start_closing, loop, client
            )

    def _start_closing(self, loop: asyncio.AbstractEventLoop, client) -> None:
        task = loop.create_task(self._close_retired(client))
        self._closing.add(task)  # a task nobody references may be garbage-collected
        task.add_done_callback(self._closing.discard)

    async def _close_retired(self, client: grpcclient.InferenceServerClient) -> None:
        timer = self._retired.pop(client, None)
        if timer is not None:
            timer.cancel()
            with contextlib.suppress(Exception):  # closing a dead channel may fail
                await client.close()

    def _unreachable(self, detail: str) -> BackendUnavailable:
        return BackendUnavailable(
            f"Triton at {self.url} is unreachable or not ready ({detail}); start it (make "
            "triton, or the triton container) or point --triton-url at it, then retry"
        )

    def _translate(
        self, exc: Exception, model: str, client, timeout_s: float | None = None
    ) -> Exception:
        """A tritonclient/grpc error as what the caller can act on."""
        if isinstance(exc, InferenceServerException):
            status, message = str(exc.status()), exc.message() or str(exc)
        elif isinstance(exc, grpc.RpcError):
            status, message = str(exc.code()), exc.details() or str(exc)
        else:  # e.g. grpc.aio.UsageError on a channel closed under us
            status, message = "StatusCode.UNAVAILABLE", str(exc)
        if status == "StatusCode.DEADLINE_EXCEEDED":
            self._drop_channel(client)
            return TritonTimeout(
                f"Triton at {self.url} did not answer {model} within "
                f"{timeout_s or self.timeout_s:g} s; it is overloaded or stuck, retry later"
            )
        if "shared memory region" in message.lower():
            return _RegionLost(f"Triton lost a shared memory region: {message}")
        if status == "StatusCode.INVALID_ARGUMENT" and model == CLASSIFY_MODEL:
            return TritonRefused(message)
        if model == CLASSIFY_MODEL and (
            status == "StatusCode.NOT_FOUND" or "unknown model" in message.lower()
        ):
            return BackendUnavailable(
                f"Triton at {self.url} does not serve the {CLASSIFY_MODEL} model ({message}); "
                "export the repository again with python export/to_onnx.py (it writes "
                f"{CLASSIFY_MODEL}/) and restart Triton"
            )
        if status == "StatusCode.NOT_FOUND" or "unknown model" in message.lower():
            return BackendUnavailable(
                f"model {model} is not loaded in Triton at {self.url} ({message}); serve the "
                "same model repository as the front end, then retry"
            )
        if status in _UNAVAILABLE or status == "None":
            self._drop_channel(client)
            return self._unreachable(message.splitlines()[0] if message else status)
        return TritonError(f"Triton failed {model}: {message}")

    async def served_models(self, names: Sequence[str] | None = None) -> dict[str, ModelEntry]:
        """The classifiers Triton serves (all, or ``names`` in that order), as a repository on
        disk would describe them; read from Triton once, then kept.

        Each model's config gives its pre-processing, input limits and serving scales; its
        labels come from Triton's classification extension (one run at the smallest input).
        Raises :class:`BackendUnavailable` while Triton is down, :class:`RepositoryError` when
        it serves none of ``names``.
        """
        if self.models is None:
            self.models = await self._read_models()
        if not names:
            return dict(self.models)
        unknown = [name for name in names if name not in self.models]
        if unknown:
            raise RepositoryError(
                f"Triton at {self.url} serves no model {', '.join(unknown)}; it serves "
                f"{', '.join(self.models) or 'no classifier'}"
            )
        return {name: self.models[name] for name in names}

    async def _read_models(self) -> dict[str, ModelEntry]:
        client = self._channel()
        timeout = self.check_timeout_s
        try:
            index = await client.get_model_repository_index(as_json=True)
            ready = sorted(
                (m["name"], int(m.get("version") or 1))
                for m in index.get("models", [])
                if m.get("state") == "READY" and m["name"] != CLASSIFY_MODEL
            )
            configs = await asyncio.gather(
                *(client.get_model_config(name, client_timeout=timeout) for name, _ in ready)
            )
        except (InferenceServerException, grpc.RpcError, grpc.aio.UsageError) as exc:
            raise self._translate(exc, "the model list", client, timeout) from exc
        models = {}
        for (name, version), response in zip(ready, configs, strict=True):
            config = response.config
            outputs = {output.name: output for output in config.output}
            if "probs" not in outputs or "min_size" not in config.parameters:
                continue  # not one of our classifiers
            classes = int(outputs["probs"].dims[0])
            labels = await self._labels(
                name, classes, int(config.parameters["min_size"].string_value)
            )
            models[name] = model_entry(config, labels, version)
        if not models:
            raise BackendUnavailable(
                f"Triton at {self.url} serves no classifier yet; serve a repository written by "
                "python export/to_onnx.py"
            )
        return models

    async def _labels(self, model: str, classes: int, min_size: int) -> tuple[str, ...]:
        """Every class name of ``model``, from Triton's classification extension: one run on a
        black image at the smallest input asks for all ``classes`` as ``score:index:label``."""
        image = grpcclient.InferInput("image", [1, 3, min_size, min_size], "UINT8")
        image.set_data_from_numpy(np.zeros((1, 3, min_size, min_size), np.uint8))
        wanted = [grpcclient.InferRequestedOutput("probs", class_count=classes)]
        result = await self._call(model, image, wanted)
        labels = [str(i) for i in range(classes)]
        for entry in result.as_numpy("probs").reshape(-1):
            parts = entry.decode().split(":", 2)
            if len(parts) == 3:  # score:index:label (no label file: score:index)
                labels[int(parts[1])] = parts[2]
        return tuple(labels)

    async def classify(
        self, files: Sequence[bytes], parameters: Mapping[str, object], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """One call to Triton's ``classify``: encoded ``files`` in ([n, 1] BYTES), ``outputs``
        back, each with the files along the first axis. A refused file or parameter raises
        :class:`TritonRefused` with the HTTP API's message."""
        data = np.array([[bytes(f)] for f in files], dtype=np.object_)
        files_input = grpcclient.InferInput("image", list(data.shape), "BYTES")
        files_input.set_data_from_numpy(data)
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        result = await self._call(CLASSIFY_MODEL, files_input, requested, dict(parameters))
        return {name: result.as_numpy(name) for name in outputs}

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        """One gRPC call: ``images`` (N, 3, H, W) uint8 in, only ``outputs`` back."""
        if self.models is None:
            await self.served_models()
        if model not in self.models:
            raise TritonError(f"unknown model {model!r}; available: {', '.join(self.models)}")
        images = np.ascontiguousarray(images, dtype=np.uint8)
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]
        if not self._shm:
            image = grpcclient.InferInput("image", list(images.shape), "UINT8")
            image.set_data_from_numpy(images)
            result = await self._call(model, image, requested)
            return {name: result.as_numpy(name) for name in outputs}
        for attempt in range(2):
            region = await self._register(model, images.nbytes)
            try:
                shm.set_shared_memory_region(region.handle, [images])
                image = grpcclient.InferInput("image", list(images.shape), "UINT8")
                image.set_shared_memory(region.name, images.nbytes)
                result = await self._call(model, image, requested)
                return {name: result.as_numpy(name) for name in outputs}
            except _RegionLost:
                # A Triton restarted between two calls has forgotten our regions without the
                # channel ever failing: register them again, once.
                if attempt:
                    raise
                self._shm.forget_registrations()
            finally:
                self._shm.release(region)
        raise AssertionError("unreachable")

    async def _call(
        self, model: str, image, requested, parameters: dict | None = None
    ) -> grpcclient.InferResult:
        client = self._channel()
        try:
            return await client.infer(
                model,
                [image],
                outputs=requested,
                client_timeout=self.timeout_s,
                parameters=parameters or None,
            )
        except (InferenceServerException, grpc.RpcError, grpc.aio.UsageError) as exc:
            raise self._translate(exc, model, client) from exc

    async def _register(self, model: str, nbytes: int) -> _Region:
        client = self._channel()
        try:
            return await self._shm.acquire(client, nbytes)
        except (InferenceServerException, grpc.RpcError, grpc.aio.UsageError) as exc:
            raise self._translate(exc, model, client) from exc

    async def check(self, names: Sequence[str] | None = None, pipeline: bool = False) -> None:
        """Raise :class:`BackendUnavailable` saying why Triton cannot serve now: every model
        (or ``names``), and with ``pipeline`` the ``classify`` model too."""
        client = self._channel()
        timeout = self.check_timeout_s
        try:
            if not await client.is_server_ready(client_timeout=timeout):
                raise self._unreachable("server not ready")
        except (InferenceServerException, grpc.RpcError, grpc.aio.UsageError) as exc:
            raise self._translate(exc, "the readiness check", client, timeout) from exc
        wanted = list(names or (await self.served_models()))
        if pipeline:
            wanted.append(CLASSIFY_MODEL)
        client = self._channel()
        try:
            ready = await asyncio.gather(
                *(client.is_model_ready(name, client_timeout=timeout) for name in wanted)
            )
        except (InferenceServerException, grpc.RpcError, grpc.aio.UsageError) as exc:
            raise self._translate(exc, "the readiness check", client, timeout) from exc
        missing = [name for name, ok in zip(wanted, ready, strict=True) if not ok]
        if missing == [CLASSIFY_MODEL]:
            raise BackendUnavailable(
                f"Triton at {self.url} has not loaded the {CLASSIFY_MODEL} model; serve a "
                "repository exported by python export/to_onnx.py (it writes "
                f"{CLASSIFY_MODEL}/), or decode here (grpc_batch --decode local)"
            )
        if missing:
            raise BackendUnavailable(
                f"Triton at {self.url} has not loaded {', '.join(missing)}; serve the model "
                "repository they are in, then retry"
            )

    async def ready(self) -> bool:
        """Whether Triton is reachable, ready and serves every model (and ``classify``)."""
        try:
            await self.check(pipeline=self.pipeline)
        except (BackendUnavailable, TritonError, RepositoryError):
            return False
        return True

    async def close(self) -> None:
        """Unregister shared memory and close the channel."""
        same_loop = self._loop is asyncio.get_running_loop()
        if same_loop:
            for retired in list(self._retired):
                await self._close_retired(retired)
        self._retired.clear()
        client = self._client if same_loop else None
        if self._shm:
            await self._shm.close(client)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        self._client = None
