"""In-process OpenVINO Runtime (``--backend openvino``): the same model.onnx, compiled for the CPU.

OpenVINO reads the exported ONNX file itself (no second export) with its dynamic N, H and W, and
compiles it for the CPU plugin once per model. Choices made here, and why:

* **Precision hint.** ``fp32`` sets ``INFERENCE_PRECISION_HINT`` to f32 (the plugin's own default
  on a CPU with bf16 instructions is bf16, so it is always set explicitly); ``bf16`` keeps weights
  and activations in bf16 with fp32 accumulation; ``auto`` is bf16 where the CPU computes bf16
  natively (``BF16`` among the CPU plugin's ``OPTIMIZATION_CAPABILITIES``: AVX-512 BF16 or AMX),
  else fp32. An int8 QDQ graph runs its quantised convolutions in int8 whatever the hint; the
  hint applies to what stays in floating point.
* **Latency, not throughput.** ``PERFORMANCE_HINT`` LATENCY (one stream) with
  ``INFERENCE_NUM_THREADS`` threads: one run already uses every core, so runs are serialised by
  one worker thread, as with ONNX Runtime; requests queue in the front end.
* **One infer request per model and worker thread**, reused: a request keeps its buffers between
  runs of one shape, and the compiled model's requests may run from different threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openvino as ov

from inference.cores import available_cores
from inference.repository import ModelEntry

PRECISIONS = ("auto", "fp32", "bf16")
# OpenVINO's names for the precision hint.
ELEMENT_TYPES = {"fp32": "f32", "bf16": "bf16"}
OUTPUTS = ("probs", "scores")


class GraphNotLoadable(ValueError):
    """OpenVINO cannot read or compile a model's graph; the message names the file."""


def native_bf16(core: ov.Core | None = None) -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (AVX-512 BF16 or AMX)."""
    core = core or ov.Core()
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(name: str, core: ov.Core | None = None) -> str:
    """``auto``: bf16 where the CPU computes bf16 natively, else fp32; raises ``ValueError`` for
    an unknown name, or bf16 on a CPU that would only emulate it."""
    if name not in PRECISIONS:
        raise ValueError(f"must be one of {', '.join(PRECISIONS)}, got {name!r}")
    core = core or ov.Core()
    if name == "auto":
        return "bf16" if native_bf16(core) else "fp32"
    if name == "bf16" and not native_bf16(core):
        capabilities = ", ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        raise ValueError(
            f"bf16: this CPU has no native bf16 (OpenVINO's CPU capabilities: {capabilities}); "
            "use fp32 or auto"
        )
    return name


def read_graph(core: ov.Core, path: Path | str) -> ov.Model:
    """``path``'s ONNX graph as an OpenVINO model; raises :class:`GraphNotLoadable`."""
    path = Path(path)
    if not path.is_file():
        raise GraphNotLoadable(f"{path}: no such file; export the model with python -m export")
    try:
        model = core.read_model(str(path))
    except RuntimeError as exc:
        # OpenVINO's messages carry C++ source locations over several lines: keep the gist.
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise GraphNotLoadable(
            f"OpenVINO cannot read {path} ({reason}); re-export it with python -m export"
        ) from exc
    names = {name for port in model.outputs for name in port.get_names()}
    missing = [name for name in OUTPUTS if name not in names]
    if "image" not in {name for port in model.inputs for name in port.get_names()} or missing:
        raise GraphNotLoadable(
            f"{path} is not a vggserve export: it needs input 'image' and outputs "
            f"{', '.join(OUTPUTS)} (outputs found: {', '.join(sorted(names)) or 'none'})"
        )
    return model


def read_graphs(models: Mapping[str, ModelEntry], core: ov.Core | None = None) -> dict:
    """Every model's ``model.onnx`` read by OpenVINO (not yet compiled), by model name."""
    core = core or ov.Core()
    return {name: read_graph(core, entry.onnx_path) for name, entry in models.items()}


class OpenVinoBackend:
    """Runs the repository's graphs with OpenVINO on the CPU in this process.

    Args:
        models: the repository's models by name (each ``model.onnx`` is read), or OpenVINO models
            already read (:func:`read_graphs`) by name.
        threads: OpenVINO's inference threads (default: every core this process may use).
        precision: ``auto``, ``fp32`` or ``bf16`` (see the module docstring).
        concurrency: runs executing at once (default 1: one run uses every core).
    """

    name = "openvino"
    on_gpu = False

    def __init__(
        self,
        models: Mapping[str, ModelEntry | ov.Model],
        threads: int | None = None,
        precision: str = "auto",
        concurrency: int | None = None,
    ) -> None:
        core = ov.Core()
        self.precision = resolve_precision(precision, core)
        self.threads = threads or available_cores()
        config = {
            "INFERENCE_PRECISION_HINT": ELEMENT_TYPES[self.precision],
            "INFERENCE_NUM_THREADS": self.threads,
            "PERFORMANCE_HINT": "LATENCY",
        }
        self.compiled: dict[str, ov.CompiledModel] = {}
        for name, model in models.items():
            graph = model if isinstance(model, ov.Model) else read_graph(core, model.onnx_path)
            try:
                self.compiled[name] = core.compile_model(graph, "CPU", config)
            except RuntimeError as exc:
                reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
                raise GraphNotLoadable(
                    f"OpenVINO cannot compile model {name!r} for the CPU ({reason})"
                ) from exc
        self._requests = threading.local()
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency or 1, thread_name_prefix="openvino"
        )

    def _request(self, model: str) -> ov.InferRequest:
        """This thread's infer request for ``model``, made on first use."""
        requests = self._requests.__dict__.setdefault("by_model", {})
        if model not in requests:
            requests[model] = self.compiled[model].create_infer_request()
        return requests[model]

    def run(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        """Synchronous inference (for scripts and benchmarks)."""
        if model not in self.compiled:
            raise KeyError(f"unknown model {model!r}; served: {', '.join(self.compiled)}")
        unknown = set(outputs) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; use probs and/or scores")
        request = self._request(model)
        request.infer({"image": np.ascontiguousarray(images, dtype=np.uint8)})
        # Copies: the request's output buffers are reused by its next run.
        return {name: np.array(request.get_tensor(name).data, copy=True) for name in outputs}

    async def infer(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run, model, images, tuple(outputs))

    def describe(self) -> str:
        """One line for the start-up log."""
        return (
            f"openvino {ov.__version__.split('-')[0]} backend on the CPU, {self.precision}, "
            f"{self.threads} threads, models {', '.join(self.compiled)}"
        )

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
