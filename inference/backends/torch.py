"""In-process PyTorch (``--backend torch``): the exported graphs' weights run by PyTorch on a GPU.

Each model's ``model.onnx`` is read back into a small ``nn.Module``
(:mod:`inference.backends.onnx_reader`), so this backend runs exactly the weights ONNX Runtime
and Triton run. On CUDA it runs the conv stack in bf16 (or fp16), channels-last, compiled; on CPU
(tests, small machines) in float32, eager.

Choices made here, and why:

* **cuDNN benchmark off** (cuDNN's heuristics pick the algorithm). With benchmark on, every new
  input shape pays an algorithm search (ONNX Runtime users report ~0.6 s per shape with
  EXHAUSTIVE search), and exact rescaling of photos of many aspect ratios makes many shapes.
* **torch.compile with dynamic shapes**, not a per-shape cache: a compile serves every H and W
  of a class of shapes. The compiler specialises sizes of 1 (a batch of one view; a score map 1
  wide, 1 high or 1x1, as multi-crop batches and Q = crop make) and, on the CPU, batch-size
  ranges (oneDNN's choice of kernel): a few compiles per model in all. Inductor (outside
  max-autotune) leaves the convolutions to cuDNN and fuses the elementwise work around them,
  so static shapes would buy little and cost a compile (tens of seconds for VGG) per shape.
* **Padded batch sizes** (``batch_sizes``): compiled, a run of N views is padded up to the
  next of a few sizes (:func:`inference.batching.padded_batch_sizes`) and its rows sliced after;
  micro-batching makes N anything from 1 to 64, and padding bounds what can occur to a list
  that warm-up compiles (and captures) in full.
* **No compile on the request path**: :meth:`TorchBackend.warmup` compiles; after it, a shape
  the compiled code does not cover runs eagerly, with a warning, instead of stalling every
  request behind a compile; so does a shape past the recompile limit (``fullgraph`` would
  raise there). Eager is slower, never wrong.
* **CUDA graphs for warm-up shapes only** (``reduce-overhead`` and ``max-autotune``): each
  warm-up shape is captured once, at warm-up, as vLLM does for its padded batch sizes
  (Inductor's own graph trees would record a graph for every new shape on the request path,
  with a device sync, and keep them all). Every other shape runs compiled without a graph. The
  graphs share one memory pool; their count and memory are in :attr:`TorchBackend.stats`.
* **Pinned, reused host buffers** (CUDA): a batch is copied into one page-locked staging
  buffer, grown to the largest batch, and from there to the device with ``non_blocking``: a
  pageable copy is synchronous and runs at half the bus speed.
* **One worker thread per device**: runs are serialised on the device anyway, PyTorch releases
  the GIL while kernels run, and the staging buffer and CUDA graphs are used by one thread at a
  time, so every run (warm-up included) comes from the same thread.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import types
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch._dynamo.exc import FailOnRecompileLimitHit

from inference.backends import torch_options
from inference.backends.onnx_reader import GraphNotReadable, read_serving_module
from inference.backends.serving_module import ServingModule
from inference.repository import ModelEntry

log = logging.getLogger("inference.torch")

DTYPES = {name: getattr(torch, attribute) for name, attribute in torch_options.DTYPES.items()}
COMPILE_MODES = torch_options.COMPILE_MODES
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# The Inductor mode each --torch-compile mode runs: this backend captures its own CUDA graphs
# (module docstring), so Inductor's graph trees stay off.
INDUCTOR_MODES = {
    "default": None,
    "reduce-overhead": None,
    "max-autotune": "max-autotune-no-cudagraphs",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}
# Compiled variants of one model before a shape runs eagerly: sizes of 1 and batch-size ranges
# make a few classes of shapes (module docstring), 16 leaves room for all of them.
RECOMPILE_LIMIT = 16
# How dynamo words its refusal under set_stance("fail_on_recompile"); it raises a plain
# RuntimeError (torch 2.14), so the text tells it from a failed kernel.
REFUSED_RECOMPILE = "Detected recompile when torch.compile stance is 'fail_on_recompile'"

Shape = tuple[int, ...]

__all__ = [
    "COMPILE_MODES",
    "DTYPES",
    "GraphNotReadable",
    "ServingStats",
    "TorchBackend",
    "load_modules",
]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA device if there is one, else the CPU; raises ``ValueError``."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"{name!r} is not a device (use auto, cpu, cuda or cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name!r}: no CUDA device is visible to PyTorch (torch.cuda.is_available() is "
                "False; a CPU-only build, no driver, or CUDA_VISIBLE_DEVICES); use cpu"
            )
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        device = torch.device("cuda", index)
    elif device.type != "cpu":
        raise ValueError(f"{name!r}: the torch backend runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (same range as fp32, no overflow risk), fp32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_compile(mode: str, device: torch.device) -> str:
    """``auto``: ``reduce-overhead`` on CUDA, ``off`` (eager) on the CPU."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "off"
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be auto or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode


def load_modules(models: Mapping[str, ModelEntry]) -> dict[str, ServingModule]:
    """Every model's graph as a float32 module on the CPU; raises ``GraphNotReadable``."""
    return {name: read_serving_module(entry.onnx_path) for name, entry in models.items()}


def _own_code_object(module: ServingModule, name: str):
    """``module``'s call through a function with its own code object.

    Dynamo caches compiled code (and counts recompiles) per code object; every ServingModule
    shares ``forward``'s, so two models of one architecture would share cache entries (and
    one recompile limit).
    """

    def serve(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return module(image)

    code = serve.__code__.replace(co_name=f"serve_{name}")
    return types.FunctionType(code, serve.__globals__, code.co_name, None, serve.__closure__)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides, in elements, of a C-contiguous tensor of ``shape``."""
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * max(shape[axis + 1], 1)
    return tuple(strides)


@dataclass
class ServingStats:
    """What the backend did that an operator watches (the server's /metrics)."""

    cuda_graphs: int = 0
    # Device memory reserved by the graphs' pool and their input buffers, measured around
    # each capture.
    cuda_graph_bytes: int = 0
    # (model, batch shape) pairs that run eagerly: not compiled at warm-up, or past the limit.
    eager_shapes: int = 0


@dataclass
class _CudaGraph:
    """One captured run: replaying ``graph`` reads ``image`` and writes ``outputs``."""

    graph: torch.cuda.CUDAGraph
    image: torch.Tensor
    outputs: dict[str, torch.Tensor]


class TorchBackend:
    """Runs the repository's graphs with PyTorch in this process.

    Args:
        modules: float32 modules by model name (:func:`load_modules`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: conv precision, ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        compile: ``auto`` (``reduce-overhead`` on CUDA, ``off`` on CPU) or a ``torch.compile``
            mode (:data:`COMPILE_MODES`); ``reduce-overhead`` and ``max-autotune`` capture CUDA
            graphs of the warm-up shapes.
        compile_backend: ``torch.compile`` backend; ``inductor`` in production, anything else
            (e.g. a dynamo test backend) runs without inductor's modes.
        threads: intra-op threads on the CPU (default: PyTorch's, every core).
        tune_cuda: set this process's cuDNN and TF32 switches for serving (see the module
            docstring); training validation passes False to leave its own settings alone.
        batch_sizes: compiled, every run is padded up to the smallest of these that holds it
            (a larger run is not padded); empty: no padding.
        recompile_limit: compiled variants per model before further shapes run eagerly.
    """

    name = "torch"

    def __init__(
        self,
        modules: Mapping[str, ServingModule],
        device: str = "auto",
        dtype: str = "auto",
        compile: str = "auto",
        compile_backend: str | object = "inductor",
        threads: int | None = None,
        tune_cuda: bool = True,
        batch_sizes: Sequence[int] = (),
        recompile_limit: int = RECOMPILE_LIMIT,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.compile_mode = resolve_compile(compile, self.device)
        on_cuda = self.on_gpu = self.device.type == "cuda"
        if threads and not on_cuda:
            torch.set_num_threads(threads)
        if on_cuda and tune_cuda:
            torch.backends.cudnn.benchmark = False  # see the module docstring
            # fp32 means fp32: TF32 would break the 1e-5 agreement with ONNX Runtime. These are
            # torch's process-wide switches: a bf16 backend turns TF32 on for the whole process.
            exact = self.dtype == torch.float32
            torch.backends.cudnn.allow_tf32 = not exact
            torch.backends.cuda.matmul.allow_tf32 = not exact
        self.modules = {
            name: module.to(self.device).configure(self.dtype, channels_last=on_cuda)
            for name, module in modules.items()
        }
        self.compiled = self.compile_mode != "off"
        self._callables = dict(self.modules)
        if self.compiled:
            inductor = compile_backend == "inductor"
            self._callables = {
                name: torch.compile(
                    _own_code_object(module, name),
                    backend=compile_backend,
                    mode=INDUCTOR_MODES[self.compile_mode] if inductor else None,
                    dynamic=True,
                    fullgraph=True,
                    recompile_limit=recompile_limit,
                )
                for name, module in self.modules.items()
            }
        self.batch_sizes = tuple(sorted(set(batch_sizes))) if self.compiled else ()
        # Until warm-up has run, the first call of a shape compiles it wherever it comes from.
        self.compile_on_request = True
        self._cuda_graphs = (
            on_cuda and compile_backend == "inductor" and self.compile_mode in CUDA_GRAPH_MODES
        )
        self._graphs: dict[tuple[str, Shape], _CudaGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if self._cuda_graphs else None
        self._eager: set[tuple[str, Shape]] = set()
        self.stats = ServingStats()
        self.shapes_seen: dict[str, set[Shape]] = {name: set() for name in self.modules}
        self._staging: torch.Tensor | None = None
        self._staging_read = torch.cuda.Event() if on_cuda else None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"torch-{self.device}"
        )

    @classmethod
    def from_models(cls, models: Mapping[str, ModelEntry], **options) -> TorchBackend:
        """Read every model's ``model.onnx`` and build the backend (``options``: see class)."""
        return cls(load_modules(models), **options)

    def padded_size(self, views: int) -> int:
        """The batch size a run of ``views`` views runs at (``views`` itself when unpadded)."""
        index = bisect.bisect_left(self.batch_sizes, views)
        return self.batch_sizes[index] if index < len(self.batch_sizes) else views

    def run(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        """Synchronous inference; call it from one thread only (``infer`` does)."""
        if model not in self._callables:
            raise KeyError(f"unknown model {model!r}; served: {', '.join(self._callables)}")
        unknown = set(outputs) - {"probs", "scores"}
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; use probs and/or scores")
        self.shapes_seen[model].add(tuple(images.shape))
        rows = len(images)
        shape = (self.padded_size(rows), *images.shape[1:])
        with torch.inference_mode():
            graph = self._graphs.get((model, shape))
            if graph is not None:
                self._upload(images, graph.image)
                graph.graph.replay()
                result = graph.outputs
            else:
                result = self._forward(model, self._device_batch(images, shape))
            # Only what was asked for crosses to the host (the score map is the larger one);
            # the copy waits for the run, so a graph's outputs are read before its next replay.
            return {name: result[name][:rows].cpu().numpy() for name in outputs}

    def _forward(self, model: str, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """``model`` on a device batch: compiled where it may be, else eagerly (and why, once)."""
        key = (model, tuple(batch.shape))
        if not self.compiled or key in self._eager:
            probs, scores = self.modules[model](batch)
            return {"probs": probs, "scores": scores}
        try:
            if self.compile_on_request:
                probs, scores = self._callables[model](batch)
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    probs, scores = self._callables[model](batch)
        except FailOnRecompileLimitHit:
            self._run_eagerly(key, "it would pass the recompile limit")
            return self._forward(model, batch)
        except RuntimeError as exc:
            if not str(exc).startswith(REFUSED_RECOMPILE):
                raise
            self._run_eagerly(key, "warm-up did not compile it (warm up its image size)")
            return self._forward(model, batch)
        return {"probs": probs, "scores": scores}

    def _run_eagerly(self, key: tuple[str, Shape], reason: str) -> None:
        self._eager.add(key)
        self.stats.eager_shapes = len(self._eager)
        model, shape = key
        log.warning("%s: batch shape %s runs eagerly (slower), as %s", model, shape, reason)

    def _device_batch(self, images: np.ndarray, shape: Shape) -> torch.Tensor:
        """``images`` on the device, padded to ``shape`` (padding rows: zeros on the CPU, any
        bytes on CUDA; their outputs are dropped)."""
        if not self.on_gpu:
            batch = torch.from_numpy(np.ascontiguousarray(images))
            if self.compiled:
                # numpy calls an array C-contiguous whatever the stride of an axis of size 1
                # (``view[None]`` has 0 there) and so does torch, but dynamo guards on strides:
                # such a batch would miss the compiled code. Same memory, the usual strides.
                batch = batch.as_strided(batch.shape, _contiguous_strides(batch.shape))
            if shape[0] == len(images):
                return batch
            padded = torch.zeros(shape, dtype=torch.uint8)
            padded[: len(images)] = batch
            return padded
        batch = torch.empty(shape, dtype=torch.uint8, device=self.device)
        self._upload(images, batch)
        return batch

    def _upload(self, images: np.ndarray, destination: torch.Tensor) -> None:
        """``images`` into the first rows of the CUDA tensor ``destination`` through the pinned
        staging buffer, without waiting for the copy."""
        # The previous batch's copy out of the staging buffer must be done before it is
        # overwritten (it is, unless that run failed before reading its results).
        self._staging_read.synchronize()
        if self._staging is None or self._staging.numel() < images.nbytes:
            self._staging = torch.empty(images.nbytes, dtype=torch.uint8, pin_memory=True)
        staged = self._staging[: images.nbytes].view(images.shape)
        np.copyto(staged.numpy(), images)
        destination[: len(images)].copy_(staged, non_blocking=True)
        self._staging_read.record(torch.cuda.current_stream(self.device))

    def _capture(self, model: str, shape: Shape) -> None:
        """Record ``model`` at the batch shape ``shape`` as a CUDA graph (warm-up only)."""
        if (model, shape) in self._graphs or (model, shape) in self._eager:
            return
        call = self._callables[model]
        device = self.device
        with torch.inference_mode(), torch.cuda.device(device):
            image = torch.zeros(shape, dtype=torch.uint8, device=device)
            # A run on a side stream first, as torch.cuda.graph asks: lazy initialisations
            # (cuBLAS and cuDNN handles, workspaces) must not happen inside the capture.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                call(image)
            torch.cuda.current_stream(device).wait_stream(side)
            torch.cuda.synchronize(device)
            # Cached blocks of other runs released first, so the growth measured is the graph's.
            torch.cuda.empty_cache()
            before = torch.cuda.memory_reserved(device)
            graph = torch.cuda.CUDAGraph()
            try:
                # One pool for every graph: replays run one at a time and each one's outputs
                # are copied out before the next, so intermediates can share memory.
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    probs, scores = call(image)
            except RuntimeError as exc:  # an op that cannot be captured: serve without a graph
                log.warning("%s: no CUDA graph for batch shape %s (%s)", model, shape, exc)
                return
            grown = torch.cuda.memory_reserved(device) - before
        self._graphs[(model, shape)] = _CudaGraph(graph, image, {"probs": probs, "scores": scores})
        self.stats.cuda_graphs = len(self._graphs)
        self.stats.cuda_graph_bytes += max(grown, 0) + image.numel()

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run, model, images, tuple(outputs))

    async def warmup(
        self, shapes: Iterable[Shape] | Mapping[str, Iterable[Shape]], repeats: int = 1
    ) -> float:
        """Compile every model at each (N, 3, H, W) shape (a mapping: per model) and, with CUDA
        graphs, capture each padded shape; returns the seconds taken.

        From then on nothing compiles on the request path: a shape the compiled code does not
        cover runs eagerly (:attr:`stats`). ``repeats``: runs per shape before the capture.
        """
        if not isinstance(shapes, Mapping):
            shapes = dict.fromkeys(self.modules, list(shapes))
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.compile_on_request = True
        for model, model_shapes in shapes.items():
            for shape in model_shapes:
                images = np.zeros(shape, dtype=np.uint8)
                for _ in range(repeats):
                    await loop.run_in_executor(self._executor, self.run, model, images, ("probs",))
                if self._cuda_graphs:
                    padded = (self.padded_size(shape[0]), *shape[1:])
                    await loop.run_in_executor(self._executor, self._capture, model, padded)
        if self.on_gpu:
            await loop.run_in_executor(self._executor, torch.cuda.synchronize, self.device)
        self.compile_on_request = False
        return loop.time() - started

    def describe(self) -> str:
        """One line for the start-up log."""
        dtype = next(k for k, v in DTYPES.items() if v == self.dtype)
        return (
            f"torch backend on {self.device}, {dtype}, compile {self.compile_mode}"
            f"{', CUDA graphs of the warm-up shapes' if self._cuda_graphs else ''}, "
            f"models {', '.join(self.modules)}"
        )

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
