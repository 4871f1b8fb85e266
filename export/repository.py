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
from inference.protocol import format_scales, serving_scales
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


def model_config(
    info: ModelInfo,
    backend: str = "onnxruntime",
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    instance_count: int = 1,
) -> mc.ModelConfig:
    """Triton's ``ModelConfig`` for one exported model.

    ``backend="onnxruntime"`` gives the native ``platform: "onnxruntime_onnx"`` config;
    ``backend="openvino"`` Triton's OpenVINO backend on the CPU reading the same model.onnx (one
    stream, latency hint; its float layers run in the CPU plugin's default precision, bf16 on
    CPUs with native bf16: the backend has no switch to force fp32);
    ``backend="python"`` the twin whose ``model.py`` runs the same ONNX file with ONNX Runtime.
    """
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
    kind = (
        mc.ModelInstanceGroup.KIND_CPU
        if info.precision == "int8" or backend == "openvino"
        else mc.ModelInstanceGroup.KIND_AUTO
    )
    config.instance_group.add(count=instance_count, kind=kind)
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
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


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
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    with open(staging, "rb") as f:
        os.fsync(f.fileno())
    os.replace(staging, path)


def config_text(config: mc.ModelConfig) -> str:
    """``config.pbtxt`` text for a ``ModelConfig``."""
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text with Triton's protobuf (raises on anything Triton rejects)."""
    return text_format.Parse(text, mc.ModelConfig())


def write_model(
    repository: Path, info: ModelInfo, version: int, onnx_bytes: bytes, labels: Sequence[str]
) -> Path:
    """Write one model version into ``repository`` atomically; returns the model.onnx path.

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
        (staging / "config.pbtxt").write_text(config_text(model_config(info)))
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
