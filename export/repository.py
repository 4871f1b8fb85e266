"""Triton model repository layout: ``config.pbtxt``, ``labels.txt``, ``<version>/model.onnx``.

The config is built as Triton's own ``ModelConfig`` protobuf and printed with ``text_format``, so
what we write is exactly what Triton parses. :func:`model_config` is the one source of truth for
the native ``onnxruntime_onnx`` config (NVIDIA's containers), the same model.onnx for Triton's
``openvino`` backend (CPU hosts), and the Python-backend twin used with the CPU ``tritonserver``
here.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from inference.classifier import DEFAULT_MAX_RESCALED_PIXELS
from inference.images import DEFAULT_MAX_PIXELS
from inference.protocol import MULTICROP_GRID, format_scales, rescaled_size, serving_scales
from inference.repository import CLASSIFY_MODEL

DEFAULT_MAX_BATCH_SIZE = 64
# Views of one (model, scale) arrive as a batch of 2; a short wait lets concurrent requests of
# the same shape share a batch without adding noticeable latency.
DEFAULT_QUEUE_DELAY_US = 2000
# Triton backends model_config writes for the same model.onnx.
TRITON_BACKENDS = ("onnxruntime", "openvino", "python")
# Triton's OpenVINO backend reads model.xml (OpenVINO IR) unless told the file's name; it reads
# ONNX itself, so the exported file serves as it is.
OPENVINO_MODEL_FILENAME = "model.onnx"
# GPU configs (GpuServing): two instances per GPU, so one instance's copies overlap the other's
# kernels (one instance serialises them).
GPU_INSTANCES = 2
# Each instance's CUDA arena is capped at this; it grows only as requested up to it. A 4:3 view
# at Q=512 (512x683) holds about 0.27 GB of VGG activations at the first convolutions (3 live
# tensors of 64 x 512 x 683 fp32), so 16 GiB admits batches of up to about 60 such views beside the
# weights (0.55 GB for VGG-16), less cuDNN's workspace.
DEFAULT_GPU_MEMORY_LIMIT_GIB = 16.0
# TensorRT engines are cached here (writable in the Dockerfile's image and the Kubernetes pod):
# built once per GPU model and profile, minutes each, then read back at every load.
DEFAULT_TENSORRT_CACHE = "/tmp/vggserve-tensorrt"
# The warm-up and the TensorRT profile's typical shape: the views of a 4:3 landscape photo
# (640x480, the benchmarks' images) at each serving scale.
WARMUP_PHOTO = (640, 480)
# The TensorRT profile's largest side by default: a 16:9 photo's longer side at the largest Q.
PROFILE_ASPECT = (16, 9)
# classify: files per request (a client sends shape [n, 1]) and Python stubs serving it. Each
# stub decodes and rescales, then waits on the classifiers; two keep one decoding while the
# other waits.
CLASSIFY_MAX_BATCH_SIZE = 16
CLASSIFY_INSTANCES = 2
# classify/1/model.py: the code is vggserve's own (tritonmodels.classify, installed where Triton
# runs: the venv of make triton, the Dockerfile's triton image), never a copy that could drift.
CLASSIFY_MODEL_PY = '''"""Triton model ``classify``: the paper's dense multi-scale protocol over this repository's
classifiers, as Business Logic Scripting. Written by vggserve's exporter; the code is
``tritonmodels.classify`` from the vggserve package installed where Triton runs."""

from tritonmodels.classify import TritonPythonModel

__all__ = ["TritonPythonModel"]
'''


@dataclass(frozen=True)
class ModelInfo:
    """What a config needs to know about an exported model."""

    name: str
    num_classes: int
    mean: Sequence[float]
    std: Sequence[float]
    min_size: int
    arch: str
    precision: str = "fp32"  # fp32, fp16 or int8 (export/quantize.py)
    # Q set a request naming none is served at; None: serving_scales(min_size).
    scales: Sequence[int] | None = None


@dataclass(frozen=True)
class GpuServing:
    """How a GPU config serves its model (``python export/to_onnx.py --target gpu``).

    Args:
        memory_limit_gib: cap of each instance's CUDA arena (``gpu_mem_limit``), in GiB.
        tensorrt: ONNX Runtime's TensorRT provider, with one optimisation profile for the
            dynamic N, H, W and an engine cache (off: the CUDA provider alone).
        tensorrt_cache: folder, on the Triton host, of the TensorRT engine cache.
        tensorrt_max_side: the profile's largest H and W (None: a 16:9 photo's longer side at
            the largest serving scale); a view with a longer side is outside the engine.
    """

    memory_limit_gib: float = DEFAULT_GPU_MEMORY_LIMIT_GIB
    tensorrt: bool = False
    tensorrt_cache: str = DEFAULT_TENSORRT_CACHE
    tensorrt_max_side: int | None = None


def warmup_views(info: ModelInfo, max_batch_size: int) -> list[tuple[str, int, int, int]]:
    """The batches a GPU config runs before it is ready, as (name, N, H, W): the two views of a
    4:3 photo at each serving scale, and one multi-crop batch (every crop and its flip)."""
    views = []
    for q in info.scales or serving_scales(info.min_size):
        width, height = rescaled_size(*WARMUP_PHOTO, q)
        views.append((f"views at Q={q}", min(2, max_batch_size), height, width))
    crops = min(2 * MULTICROP_GRID**2, max_batch_size)
    views.append(("multi-crop", crops, info.min_size, info.min_size))
    return views


def tensorrt_profile(
    info: ModelInfo, max_batch_size: int, max_side: int | None = None
) -> dict[str, str]:
    """The TensorRT provider's one optimisation profile of input ``image``, as the onnxruntime
    backend's ``trt_profile_{min,opt,max}_shapes`` parameters: the smallest batch at the
    training crop, the views of a 4:3 photo at the middle serving scale, and the largest batch
    at ``max_side`` square."""
    scales = sorted(info.scales or serving_scales(info.min_size))
    width, height = rescaled_size(*WARMUP_PHOTO, scales[len(scales) // 2])
    side = max_side or max(rescaled_size(*PROFILE_ASPECT, scales[-1]))
    shapes = {
        "min": (1, 3, info.min_size, info.min_size),
        "opt": (min(2, max_batch_size), 3, height, width),
        "max": (max_batch_size, 3, side, side),
    }
    return {
        f"trt_profile_{kind}_shapes": "image:" + "x".join(map(str, shape))
        for kind, shape in shapes.items()
    }


def model_config(
    info: ModelInfo,
    backend: str = "onnxruntime",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    instance_count: int | None = None,
    gpu: GpuServing | None = None,
) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` for one exported model.

    ``backend="onnxruntime"`` gives the native ``platform: "onnxruntime_onnx"`` config;
    ``backend="openvino"`` Triton's OpenVINO backend on the CPU reading the same model.onnx (one
    stream, latency hint; its float layers run in the CPU plugin's default precision, bf16 on
    CPUs with native bf16: the backend has no switch to force fp32);
    ``backend="python"`` the twin whose ``model.py`` runs the same ONNX file with ONNX Runtime.

    Without ``gpu``, one ``KIND_AUTO`` instance (the GPU when Triton sees one; ``KIND_CPU`` for
    int8 and OpenVINO). With ``gpu`` (onnxruntime, fp32 or fp16 only): ``KIND_GPU`` instances
    (default 2), warm-up batches (:func:`warmup_views`), a capped CUDA arena, one intra-op
    thread per instance and, if asked, TensorRT with a profile and an engine cache.
    """
    if gpu is not None and (backend != "onnxruntime" or info.precision == "int8"):
        raise ValueError(
            f"a GPU config is for Triton's onnxruntime backend with fp32 or fp16 graphs, not "
            f"backend {backend!r} with {info.precision}; export fp32 or fp16 for the GPU"
        )
    config = mc.ModelConfig(name=info.name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.backend = "onnxruntime"
    elif backend == "openvino":
        config.backend = "openvino"
        config.default_model_filename = OPENVINO_MODEL_FILENAME
    elif backend == "python":
        config.backend = "python"
    else:
        raise ValueError(
            f"unknown Triton backend {backend!r}; use one of {', '.join(TRITON_BACKENDS)}"
        )
    config.input.add(name="image", data_type=mc.TYPE_UINT8, dims=[3, -1, -1])
    config.output.add(
        name="probs", data_type=mc.TYPE_FP32, dims=[info.num_classes], label_filename="labels.txt"
    )
    config.output.add(name="scores", data_type=mc.TYPE_FP32, dims=[info.num_classes, -1, -1])
    config.dynamic_batching.max_queue_delay_microseconds = DEFAULT_QUEUE_DELAY_US
    # An int8 (QDQ) graph is a CPU model: ONNX Runtime's int8 kernels are CPU kernels, and on a
    # GPU instance its CUDA provider would run the QDQ graph node by node, slower than fp32.
    if gpu is not None:
        kind = mc.ModelInstanceGroup.KIND_GPU
    elif info.precision == "int8" or backend == "openvino":
        kind = mc.ModelInstanceGroup.KIND_CPU
    else:
        kind = mc.ModelInstanceGroup.KIND_AUTO
    default_count = GPU_INSTANCES if gpu is not None else 1
    config.instance_group.add(count=instance_count or default_count, kind=kind)
    config.version_policy.latest.num_versions = 1
    parameters = {
        "arch": info.arch,
        "mean": json.dumps(list(info.mean)),
        "std": json.dumps(list(info.std)),
        "min_size": str(info.min_size),
        "precision": info.precision,
        "scales": format_scales(info.scales or serving_scales(info.min_size)),
    }
    if backend == "onnxruntime":
        # ONNX Runtime backend options: every new input shape would otherwise cost an
        # exhaustive cuDNN search, and the default arena grows by powers of two.
        parameters["cudnn_conv_algo_search"] = "1"  # HEURISTIC
        parameters["arena_extend_strategy"] = "1"  # kSameAsRequested
    elif backend == "openvino":
        # One request at a time uses every core (as --backend openvino runs): latency, 1 stream.
        parameters["PERFORMANCE_HINT"] = "LATENCY"
        parameters["NUM_STREAMS"] = "1"
    if gpu is not None:
        # Read by the onnxruntime backend as the CUDA provider's options (top-level parameters:
        # it reads these after an accelerator's, so they are the ones that hold).
        parameters["gpu_mem_limit"] = str(int(gpu.memory_limit_gib * 2**30))
        parameters["intra_op_thread_count"] = "1"  # the GPU computes; threads only launch
        _add_gpu_settings(config, info, max_batch_size, gpu)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def _add_gpu_settings(
    config: mc.ModelConfig, info: ModelInfo, max_batch_size: int, gpu: GpuServing
) -> None:
    # Each instance runs these zero batches before the model is ready: the CUDA context,
    # cuDNN's choices, the arena's growth (and TensorRT's engine) happen at load, not on the
    # first requests.
    for name, batch, height, width in warmup_views(info, max_batch_size):
        warmup = config.model_warmup.add(name=name, batch_size=batch)
        warmup.inputs["image"].data_type = mc.TYPE_UINT8
        warmup.inputs["image"].dims.extend([3, height, width])
        warmup.inputs["image"].zero_data = True
    if not gpu.tensorrt:
        return
    # Without a profile TensorRT builds an engine for every new H x W (minutes each); without
    # the cache, again at every load.
    tensorrt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(
        name="tensorrt"
    )
    parameters = {
        "precision_mode": "FP16" if info.precision == "fp16" else "FP32",
        **tensorrt_profile(info, max_batch_size, gpu.tensorrt_max_side),
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": gpu.tensorrt_cache,
    }
    tensorrt.parameters.update(parameters)


def classify_config(
    max_batch_size: int = CLASSIFY_MAX_BATCH_SIZE, instance_count: int = CLASSIFY_INSTANCES
) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` of ``classify``: encoded files in, the fused top-k out.

    Every output but the first three is for clients that rebuild the HTTP API's answer (the
    front end, the batch client); a client asks only for the outputs it wants.
    """
    config = mc.ModelConfig(name=CLASSIFY_MODEL, backend="python", max_batch_size=max_batch_size)
    config.input.add(name="image", data_type=mc.TYPE_STRING, dims=[1])
    outputs = [
        ("probabilities", mc.TYPE_FP32, [-1]),  # fused, most probable first
        ("indices", mc.TYPE_INT32, [-1]),
        ("labels", mc.TYPE_STRING, [-1]),
        ("model_probabilities", mc.TYPE_FP32, [-1, -1]),  # (models, k): each model's top-k
        ("model_indices", mc.TYPE_INT32, [-1, -1]),
        ("model_labels", mc.TYPE_STRING, [-1, -1]),
        ("models", mc.TYPE_STRING, [-1]),  # the fused models, in the order of model_*
        ("scales", mc.TYPE_INT32, [-1]),  # every Q used
        ("image_size", mc.TYPE_INT32, [2]),  # width, height (EXIF orientation applied)
        ("heatmap", mc.TYPE_FP32, [-1, -1]),  # with parameter heatmap=true, one file a request
        ("timing_ms", mc.TYPE_FP32, [3]),  # decode, preprocess, inference
    ]
    for name, data_type, dims in outputs:
        config.output.add(name=name, data_type=data_type, dims=dims)
    config.dynamic_batching.max_queue_delay_microseconds = DEFAULT_QUEUE_DELAY_US
    config.instance_group.add(count=instance_count, kind=mc.ModelInstanceGroup.KIND_CPU)
    parameters = {
        "max_pixels": str(DEFAULT_MAX_PIXELS),
        "max_rescaled_pixels": str(DEFAULT_MAX_RESCALED_PIXELS),
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


def write_classify(repository: Path) -> Path:
    """(Re)write ``classify/`` in ``repository``: its config and ``1/model.py``; returns the
    folder. Files already as they should be are left alone (an operator's edits to the
    config's parameters are kept); each file is replaced atomically."""
    folder = Path(repository) / CLASSIFY_MODEL
    (folder / "1").mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.pbtxt"
    if not config_path.is_file():
        _replace(config_path, config_text(classify_config()))
    model_path = folder / "1" / "model.py"
    if not model_path.is_file() or model_path.read_text() != CLASSIFY_MODEL_PY:
        _replace(model_path, CLASSIFY_MODEL_PY)
    return folder


def _replace(path: Path, text: str) -> None:
    # A staging name of its own: two exports into one repository each write classify's files.
    descriptor, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(staging, 0o644)
    os.replace(staging, path)


def config_text(config: mc.ModelConfig) -> str:
    """``config.pbtxt`` text for a ``ModelConfig``."""
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text with Triton's protobuf (raises on anything Triton rejects)."""
    return text_format.Parse(text, mc.ModelConfig())


def write_model(
    repository: Path,
    info: ModelInfo,
    version: int,
    onnx_bytes: bytes,
    labels: Sequence[str],
    gpu: GpuServing | None = None,
) -> Path:
    """Write one model version into ``repository`` atomically; returns the model.onnx path.
    ``gpu``: write the GPU config (:func:`model_config`).

    Everything is written into a staging folder beside the repository first and moved in with
    renames, so a failed or killed export leaves the repository as it was (at worst a stale
    staging folder outside it, which nothing loads).
    """
    repository = Path(repository)
    if info.name == CLASSIFY_MODEL:
        raise ValueError(
            f"{CLASSIFY_MODEL!r} is the repository's pipeline model; choose another name"
        )
    repository.mkdir(parents=True, exist_ok=True)
    write_classify(repository)
    model_dir = repository / info.name
    staging = Path(
        tempfile.mkdtemp(prefix=f".{repository.name}-{info.name}-staging-", dir=repository.parent)
    )
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server of another user
        version_dir = staging / str(version)
        version_dir.mkdir()
        (version_dir / "model.onnx").write_bytes(onnx_bytes)
        (staging / "labels.txt").write_text("".join(f"{label}\n" for label in labels))
        (staging / "config.pbtxt").write_text(config_text(model_config(info, gpu=gpu)))
        for path in (version_dir / "model.onnx", staging / "labels.txt", staging / "config.pbtxt"):
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        if not model_dir.exists():
            os.rename(staging, model_dir)
            return model_dir / str(version) / "model.onnx"
        # The model exists: swap in the new version folder, then the small files.
        target = model_dir / str(version)
        if not (target.exists() and _exchange(version_dir, target)):
            if target.exists():  # no atomic exchange here: a short window without the version
                os.rename(target, staging / f"old-{version}")
            os.rename(version_dir, target)
        os.replace(staging / "labels.txt", model_dir / "labels.txt")
        os.replace(staging / "config.pbtxt", model_dir / "config.pbtxt")
        return target / "model.onnx"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Replacing a version folder with two renames leaves the model without that version for an
    instant; an export killed then leaves a repository the server refuses to load. Returns
    False where the call is not available, so the caller falls back to the two renames.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))
