"""In-process ONNX Runtime: one session per model, shared by every request."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.cores import available_cores
from inference.repository import ModelEntry


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for dynamic input shapes on a shared machine.

    The CPU arena and memory patterns are off: with a new input shape per image size patterns
    grow RSS request after request, and the arena holds the largest run's activations for good
    (``bench/memory.py``, small VGG-16: 1087 MiB with it against 138 MiB without). Without it
    every activation is a fresh, page-faulted mapping: about 1.25x a default session's time on
    full VGG-16 (``python -m bench.ort_allocation``), the price of that memory.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.log_severity_level = 3
    return options


def providers() -> list:
    """CUDA (HEURISTIC conv search, arena grown only as needed) when onnxruntime-gpu has it."""
    if "CUDAExecutionProvider" in ort.get_available_providers():
        cuda = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """Runs exported graphs in this process.

    Args:
        models: the repository's models by name.
        threads: intra-op threads per run (default: all cores).
        concurrency: runs executing at once. On CPU one run already uses every core, so the
            default 1 avoids oversubscription; requests queue in the front end, not here.
    """

    name = "onnxruntime"

    def __init__(
        self,
        models: Mapping[str, ModelEntry],
        threads: int | None = None,
        concurrency: int | None = None,
    ) -> None:
        self._providers = providers()
        options = session_options(threads)
        sessions = {
            name: ort.InferenceSession(str(entry.onnx_path), options, providers=self._for(entry))
            for name, entry in models.items()
        }
        self._start(sessions, self._providers[0] != "CPUExecutionProvider", concurrency)

    @classmethod
    def from_graphs(
        cls, graphs: Mapping[str, bytes | str | Path], threads: int | None = None
    ) -> OnnxRuntimeBackend:
        """Graphs that are not in a repository (ONNX bytes or files) on the CPU provider, e.g. an
        int8 graph checked against its fp32 source before either is written."""
        backend = cls.__new__(cls)
        backend._providers = ["CPUExecutionProvider"]
        options = session_options(threads)
        sessions = {
            name: ort.InferenceSession(
                graph if isinstance(graph, bytes) else str(graph),
                options,
                providers=["CPUExecutionProvider"],
            )
            for name, graph in graphs.items()
        }
        backend._start(sessions, on_gpu=False, concurrency=None)
        return backend

    def _start(
        self, sessions: dict[str, ort.InferenceSession], on_gpu: bool, concurrency: int | None
    ) -> None:
        self.sessions = sessions
        self.on_gpu = on_gpu
        workers = concurrency or (2 if on_gpu else 1)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")

    def _for(self, entry: ModelEntry) -> list:
        # int8 QDQ graphs are for CPUs (VNNI kernels); on CUDA they would fall back op by op.
        return ["CPUExecutionProvider"] if entry.precision == "int8" else self._providers

    def run(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        """Synchronous inference (for scripts, training validation and benchmarks)."""
        results = self.sessions[model].run(list(outputs), {"image": images})
        return dict(zip(outputs, results, strict=True))

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run, model, images, tuple(outputs))

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
