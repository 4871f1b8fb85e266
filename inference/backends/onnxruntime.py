"""In-process ONNX Runtime: one session per model, shared by every request.

Where a session runs is decided by the session itself: ``get_available_providers()`` lists the
CUDA provider whenever the installed build has it, even when its CUDA libraries then fail to
load, and the session quietly runs on the CPU. Each session's ``get_providers()[0]`` is checked
after it is built; a GPU that was asked for and not obtained stops the backend with one line
saying why, never a silent fallback.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import importlib.util
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from inference.cores import available_cores
from inference.repository import ModelEntry

# "auto": CUDA when the installed ONNX Runtime offers it, else the CPU.
DEVICES = ("auto", "cpu", "cuda")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
# Both install the same ``onnxruntime`` module: with both, whichever was installed last runs.
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu")
# On the GPU a run's CPU side is launching kernels and copying: more intra-op threads only
# oversubscribe the cores, two workers each spinning every core's thread.
GPU_INTRA_OP_THREADS = 1


class EngineError(RuntimeError):
    """ONNX Runtime cannot run where it was asked to; the message is one line: why, what to do."""


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Options for dynamic input shapes on a shared machine.

    Memory patterns are off: they plan one block per input shape, and with a new shape per image
    size RSS grows request after request. ONNX Runtime's own CPU arena is off too: it grows by
    doubling regions and never returns them (``bench/memory.py``, small VGG-16: 1087 MiB against
    138 MiB). :class:`OnnxRuntimeBackend` turns on the bounded, shared arena of
    :func:`register_cpu_arena` instead.
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


# The activations of a run live in one arena region of this many bytes (see register_cpu_arena).
_cpu_arena_bytes: int | None = None
# Freeing, at the end of each run, every arena region but the first (the kept one).
SHRINK_ARENA = ("memory.enable_memory_arena_shrinkage", "cpu:0")
# Per pixel of a view: the first conv's input and output (fp32) live at once, with 1/4 to spare.
LIVE_ACTIVATIONS = 2.5
# The view a budget is sized for: a 4:3 photo, two views (the image and its flip) per run.
ASPECT, VIEWS = 4 / 3, 2


def register_cpu_arena(size_bytes: int) -> int:
    """Register the process's shared CPU arena: one region of ``size_bytes`` kept between runs.

    Without an arena every activation is a fresh mapping, page-faulted on every run: about 1.25x
    a default session's time on full VGG-16 (``python -m bench.ort_allocation``). ONNX Runtime's
    default arena removes that but grows by doubling regions and keeps them for good. This one
    is created with its first region as large as a typical run's activations; that region is
    never shrunk, so its pages stay mapped, and each run ends by freeing the regions a larger
    run added. Resident memory stays within ``size_bytes`` beyond the weights, whatever the
    image sizes. The arena is ONNX Runtime's environment allocator, one per process: the first
    registration's size holds; returns it.
    """
    global _cpu_arena_bytes
    if _cpu_arena_bytes is not None:
        return _cpu_arena_bytes
    info = ort.OrtMemoryInfo(
        "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
    )
    # initial_chunk_size_bytes is a C int: at most 2 GiB - 1.
    size = max(1 << 20, min(int(size_bytes), (1 << 31) - 1))
    config = {"arena_extend_strategy": 0, "initial_chunk_size_bytes": size}  # kNextPowerOfTwo
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(config))
    _cpu_arena_bytes = size
    return size


def first_conv_width(path: Path) -> int:
    """Output channels of the graph's first convolution, the widest activations per pixel (3,
    the image's channels, for a graph without one)."""
    import onnx  # here, not at the top: only sizing the arena reads a graph

    model = onnx.load(str(path), load_external_data=False)
    shapes = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in shapes:  # int8 QDQ weights
            shapes[node.output[0]] = shapes[node.input[0]]
        weight = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3}.get(node.op_type)
        if weight is not None and node.input[weight] in shapes:
            return max(3, int(shapes[node.input[weight]][0]))
    return 3


def arena_budget(models: Mapping[str, ModelEntry]) -> int:
    """Bytes of activations of the largest run a served model makes at its largest serving
    scale on a 4:3 photo (two views): the arena region kept between runs."""
    budget = 0
    for entry in models.values():
        scale = max(entry.scales)
        pixels = VIEWS * scale * math.ceil(scale * ASPECT)
        width = first_conv_width(entry.onnx_path)
        budget = max(budget, int(LIVE_ACTIVATIONS * width * pixels * np.dtype(np.float32).itemsize))
    return budget


def installed_runtimes() -> dict[str, str]:
    """The ONNX Runtime distributions installed here, name -> version."""
    found = {}
    for name in RUNTIME_DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def check_single_runtime() -> None:
    """Raise :class:`EngineError` when the CPU and GPU distributions are both installed."""
    found = installed_runtimes()
    if len(found) > 1:
        installed = " and ".join(f"{name} {version}" for name, version in found.items())
        # Uninstalling one deletes the module files the other shares: remove both, then reinstall.
        raise EngineError(
            f"{installed} are both installed and share the onnxruntime module, so whichever was "
            "installed last runs; keep only the GPU build: pip uninstall -y onnxruntime "
            f"onnxruntime-gpu && pip install onnxruntime-gpu=={found['onnxruntime-gpu']}"
        )


def runtime_description() -> str:
    """The running ONNX Runtime build in words: version, package, the CUDA and cuDNN it was
    built for (GPU builds record them), and torch's CUDA where torch is installed."""
    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:
        build = None
    package = getattr(build, "package_name", "onnxruntime")
    words = f"{package} {ort.__version__}"
    cuda, cudnn = getattr(build, "cuda_version", None), getattr(build, "cudnn_version", None)
    if cuda:
        words += f" built for CUDA {cuda}" + (f" and cuDNN {cudnn}" if cudnn else "")
    torch_cuda = _torch_cuda_version()
    if torch_cuda:
        words += f"; torch here uses CUDA {torch_cuda}"
    return words


def _torch_cuda_version() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch

        return torch.version.cuda
    except Exception:  # a broken torch must not hide the error being reported
        return None


def cuda_library_problem() -> str | None:
    """Why ONNX Runtime's CUDA provider library does not load here (the loader's message, e.g.
    ``libcublasLt.so.12: cannot open shared object file``), or None when it loads."""
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return str(exc)
    return None


def providers(device: str = "auto") -> list:
    """The execution providers for ``device`` (one of :data:`DEVICES`): CUDA (HEURISTIC conv
    search, arena grown only as needed) first when the GPU is asked for, else the CPU.

    Raises:
        ValueError: an unknown ``device``.
        EngineError: ``"cuda"`` without a CUDA build, or the GPU with both builds installed.
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return [CPU_PROVIDER]
    listed = CUDA_PROVIDER in ort.get_available_providers()
    if device == "auto" and not listed:
        return [CPU_PROVIDER]
    check_single_runtime()
    if not listed:
        raise EngineError(
            f"the GPU was asked for but this ONNX Runtime has no {CUDA_PROVIDER} "
            f"({runtime_description()}); "
            "install the GPU build in its place (pip uninstall -y onnxruntime && pip install "
            f"onnxruntime-gpu=={ort.__version__}) or choose the CPU"
        )
    cuda = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
    return [(CUDA_PROVIDER, cuda), CPU_PROVIDER]


def check_on_cuda(session: ort.InferenceSession, model: str) -> None:
    """Raise :class:`EngineError` unless ``session`` runs on the CUDA provider it was given."""
    first = session.get_providers()[0]
    if first == CUDA_PROVIDER:
        return
    library = cuda_library_problem()
    why = (
        f"its CUDA library does not load ({library})"
        if library
        else "its CUDA library loads, so the GPU, its driver or cuDNN refused (ONNX Runtime's "
        "error above says which)"
    )
    raise EngineError(
        f"model {model}: the GPU was asked for but the session runs on {first}: {why}; "
        f"{runtime_description()}. Install the onnxruntime-gpu build for this machine's CUDA "
        "(or that CUDA's libraries on LD_LIBRARY_PATH), or choose the CPU"
    )


class OnnxRuntimeBackend:
    """Runs exported graphs in this process.

    Args:
        models: the repository's models by name.
        threads: intra-op threads per run (default: all cores on the CPU, one on the GPU).
        concurrency: runs executing at once. On CPU one run already uses every core, so the
            default 1 avoids oversubscription; requests queue in the front end, not here. On
            the GPU the default 2 overlaps one run's copies with the other's kernels.
        device: "auto" (CUDA when the installed ONNX Runtime offers it, else the CPU), "cpu" or
            "cuda". Whenever the GPU is asked for, each session must run on it.

    Raises:
        EngineError: the GPU was asked for and a session does not run on it, or both ONNX
            Runtime builds are installed (one line: why, and what to do).
    """

    name = "onnxruntime"

    def __init__(
        self,
        models: Mapping[str, ModelEntry],
        threads: int | None = None,
        concurrency: int | None = None,
        device: str = "auto",
        arena_bytes: int | None = None,
    ) -> None:
        self._providers = providers(device)
        self.threads: dict[str, int] = {}
        self.arena_bytes = 0
        self.run_options: dict[str, ort.RunOptions | None] = {}
        on_cpu = any(self._for(entry)[0] == CPU_PROVIDER for entry in models.values())
        if on_cpu and arena_bytes != 0:
            wanted = arena_bytes if arena_bytes is not None else arena_budget(models)
            self.arena_bytes = register_cpu_arena(wanted)
        sessions = {}
        for name, entry in models.items():
            chosen = self._for(entry)
            on_cuda = chosen[0] != CPU_PROVIDER
            self.run_options[name] = None
            if on_cuda:
                options = session_options(threads or GPU_INTRA_OP_THREADS)
            else:
                options = session_options(threads)
                if self.arena_bytes:
                    self._use_arena(options, name)
            self.threads[name] = options.intra_op_num_threads
            sessions[name] = ort.InferenceSession(str(entry.onnx_path), options, providers=chosen)
            if on_cuda:
                check_on_cuda(sessions[name], name)
        on_gpu = any(session.get_providers()[0] == CUDA_PROVIDER for session in sessions.values())
        self._start(sessions, on_gpu, concurrency)

    @classmethod
    def from_graphs(
        cls, graphs: Mapping[str, bytes | str | Path], threads: int | None = None
    ) -> OnnxRuntimeBackend:
        """Graphs that are not in a repository (ONNX bytes or files) on the CPU provider, e.g. an
        int8 graph checked against its fp32 source before either is written."""
        backend = cls.__new__(cls)
        backend._providers = [CPU_PROVIDER]
        options = session_options(threads)
        backend.threads = dict.fromkeys(graphs, options.intra_op_num_threads)
        backend.arena_bytes, backend.run_options = 0, {}
        sessions = {
            name: ort.InferenceSession(
                graph if isinstance(graph, bytes) else str(graph), options, providers=[CPU_PROVIDER]
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
        self._workers = concurrency or (2 if on_gpu else 1)
        self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="ort")

    def _use_arena(self, options: ort.SessionOptions, model: str) -> None:
        options.enable_cpu_mem_arena = True
        options.add_session_config_entry("session.use_env_allocators", "1")
        # Weights outside the arena: they would pin its kept region for the session's life.
        options.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        run_options = ort.RunOptions()
        run_options.add_run_config_entry(*SHRINK_ARENA)
        self.run_options[model] = run_options

    def _for(self, entry: ModelEntry) -> list:
        # int8 QDQ graphs are for CPUs (VNNI kernels); on CUDA they would fall back op by op.
        return [CPU_PROVIDER] if entry.precision == "int8" else self._providers

    def describe(self) -> str:
        """One line for the start-up log: where each model runs, with how many threads."""
        where = ", ".join(
            f"{name} on {session.get_providers()[0]} ({self.threads[name]} intra-op threads)"
            for name, session in self.sessions.items()
        )
        arena = f"; CPU arena kept {self.arena_bytes / 2**20:.0f} MiB" if self.arena_bytes else ""
        return f"onnxruntime {ort.__version__}: {where}; {self._workers} concurrent runs{arena}"

    def run(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]:
        """Synchronous inference (for scripts, training validation and benchmarks)."""
        results = self.sessions[model].run(
            list(outputs), {"image": images}, self.run_options.get(model)
        )
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
