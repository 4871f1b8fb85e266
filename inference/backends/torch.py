"""In-process PyTorch (``--backend torch``): the exported graphs' weights run by PyTorch on a GPU.

Each model's ``model.onnx`` is read back into a small ``nn.Module``
(:mod:`inference.backends.onnx_reader`), so this backend runs exactly the weights ONNX Runtime
and Triton run. On CUDA it runs the conv stack in bf16 (or fp16), channels-last, compiled; on CPU
(tests, small machines) in float32, eager.

Choices made here, and why:

* **cuDNN benchmark off** (cuDNN's heuristics pick the algorithm). With benchmark on, every new
  input shape pays an algorithm search (ONNX Runtime users report ~0.6 s per shape with
  EXHAUSTIVE search), and exact rescaling of photos of many aspect ratios makes many shapes.
* **torch.compile with dynamic shapes**, not a per-shape cache: one compile per model serves
  every H and W (plus one more when a size of 1 first appears, which the compiler specialises:
  a batch of a single view, or a 1x1 score map at Q = 224). Inductor (outside max-autotune)
  leaves the convolutions to cuDNN and fuses the elementwise work around them, so static shapes
  would buy little and cost a compile (tens of seconds for VGG) on every new aspect ratio.
* **CUDA graphs where shapes repeat** (``reduce-overhead``, the CUDA default): CUDA graph trees
  record one graph per distinct input shape on its second call and replay it from the third, so
  a shape seen once costs no capture, a recurring one (bucketed shapes, warm-up shapes) runs
  without per-kernel launch overhead. Behind the server's micro-batching every batch size of a
  shape is a shape of its own (graphs share one memory pool).
* **One worker thread per device**: runs are serialised on the device anyway, PyTorch releases
  the GIL while kernels run, and CUDA graph trees keep their state per thread, so every run
  (warm-up included) must come from the same thread.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from inference.backends import torch_options
from inference.backends.onnx_reader import GraphNotReadable, read_serving_module
from inference.backends.serving_module import ServingModule
from inference.repository import ModelEntry

log = logging.getLogger("inference.torch")

DTYPES = {name: getattr(torch, attribute) for name, attribute in torch_options.DTYPES.items()}
COMPILE_MODES = torch_options.COMPILE_MODES
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

__all__ = ["COMPILE_MODES", "DTYPES", "GraphNotReadable", "TorchBackend", "load_modules"]


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
    shares ``forward``'s, so two models of one architecture would share cache entries and CUDA
    graph trees would re-record whenever calls alternate between their weights.
    """

    def serve(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return module(image)

    code = serve.__code__.replace(co_name=f"serve_{name}")
    return types.FunctionType(code, serve.__globals__, code.co_name, None, serve.__closure__)


class TorchBackend:
    """Runs the repository's graphs with PyTorch in this process.

    Args:
        modules: float32 modules by model name (:func:`load_modules`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        dtype: conv precision, ``auto`` (bf16 on CUDA, fp32 on CPU), ``bf16``, ``fp16``, ``fp32``.
        compile: ``auto`` (``reduce-overhead`` on CUDA, ``off`` on CPU) or a ``torch.compile``
            mode (:data:`COMPILE_MODES`).
        compile_backend: ``torch.compile`` backend; ``inductor`` in production, anything else
            (e.g. a dynamo test backend) runs without inductor's modes.
        threads: intra-op threads on the CPU (default: PyTorch's, every core).
        tune_cuda: set this process's cuDNN and TF32 switches for serving (see the module
            docstring); training validation passes False to leave its own settings alone.
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
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.compile_mode = resolve_compile(compile, self.device)
        on_cuda = self.on_gpu = self.device.type == "cuda"
        if threads and not on_cuda:
            torch.set_num_threads(threads)
        if on_cuda and tune_cuda:
            torch.backends.cudnn.benchmark = False  # see the module docstring
            # fp32 means fp32: TF32 would break the 1e-5 agreement with ONNX Runtime.
            exact = self.dtype == torch.float32
            torch.backends.cudnn.allow_tf32 = not exact
            torch.backends.cuda.matmul.allow_tf32 = not exact
        self.modules = {
            name: module.to(self.device).configure(self.dtype, channels_last=on_cuda)
            for name, module in modules.items()
        }
        self._callables = {name: module for name, module in self.modules.items()}
        if self.compile_mode != "off":
            limits = torch._dynamo.config
            # A recompile per model for batch 1 vs larger, and headroom; never silent fallbacks.
            limits.recompile_limit = max(limits.recompile_limit, 16)
            limits.accumulated_recompile_limit = max(
                limits.accumulated_recompile_limit, 16 * len(self.modules)
            )
            inductor = compile_backend == "inductor"
            mode = None if self.compile_mode == "default" or not inductor else self.compile_mode
            self._callables = {
                name: torch.compile(
                    _own_code_object(module, name),
                    backend=compile_backend,
                    mode=mode,
                    dynamic=True,
                    fullgraph=True,
                )
                for name, module in self.modules.items()
            }
        self._cuda_graphs = (
            on_cuda and compile_backend == "inductor" and self.compile_mode in CUDA_GRAPH_MODES
        )
        self.shapes_seen: dict[str, set[tuple[int, ...]]] = {name: set() for name in self.modules}
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"torch-{self.device}"
        )

    @classmethod
    def from_models(cls, models: Mapping[str, ModelEntry], **options) -> TorchBackend:
        """Read every model's ``model.onnx`` and build the backend (``options``: see class)."""
        return cls(load_modules(models), **options)

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
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            if self._cuda_graphs:
                # Outputs of the previous replay may be overwritten from here on; they were
                # already copied to the host below.
                torch.compiler.cudagraph_mark_step_begin()
            probs, scores = self._callables[model](batch)
            result = {"probs": probs, "scores": scores}
            # Only what was asked for crosses to the host (the score map is the larger one).
            return {name: result[name].contiguous().cpu().numpy() for name in outputs}

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run, model, images, tuple(outputs))

    async def warmup(
        self, shapes: Iterable[tuple[int, int, int, int]], repeats: int | None = None
    ) -> float:
        """Run every model on zero images of each (N, 3, H, W) shape; returns seconds taken.

        Three runs per shape with CUDA graphs (the second records the graph, the third replays
        it), one otherwise (compiles and cuDNN's choice happen on the first).
        """
        repeats = repeats or (3 if self._cuda_graphs else 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for shape in shapes:
            images = np.zeros(shape, dtype=np.uint8)
            for model in self.modules:
                for _ in range(repeats):
                    await loop.run_in_executor(self._executor, self.run, model, images, ("probs",))
        if self.device.type == "cuda":
            await loop.run_in_executor(self._executor, torch.cuda.synchronize, self.device)
        return loop.time() - started

    def describe(self) -> str:
        """One line for the start-up log."""
        dtype = next(k for k, v in DTYPES.items() if v == self.dtype)
        return (
            f"torch backend on {self.device}, {dtype}, compile {self.compile_mode}"
            f"{', CUDA graphs' if self._cuda_graphs else ''}, models {', '.join(self.modules)}"
        )

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
