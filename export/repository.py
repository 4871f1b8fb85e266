"""Triton model repository layout: ``config.pbtxt``, ``labels.txt``, ``<version>/model.onnx``.

The config is built as Triton's own ``ModelConfig`` protobuf and printed with ``text_format``, so
what we write is exactly what Triton parses. :func:`model_config` is the one source of truth for
both the native ``onnxruntime_onnx`` config (NVIDIA's containers) and the Python-backend twin
used with the CPU ``tritonserver`` here.
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

from inference.protocol import format_scales, serving_scales

DEFAULT_MAX_BATCH_SIZE = 64
# Views of one (model, scale) arrive as a batch of 2; a short wait lets concurrent requests of
# the same shape share a batch without adding noticeable latency.
DEFAULT_QUEUE_DELAY_US = 2000


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
    ``backend="python"`` the twin whose ``model.py`` runs the same ONNX file with ONNX Runtime.
    """
    config = mc.ModelConfig(name=info.name, max_batch_size=max_batch_size)
    if backend == "onnxruntime":
        config.platform = "onnxruntime_onnx"
        config.backend = "onnxruntime"
    elif backend == "python":
        config.backend = "python"
    else:
        raise ValueError(f"unknown Triton backend {backend!r}; use 'onnxruntime' or 'python'")
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
        if info.precision == "int8"
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
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


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
    repository.mkdir(parents=True, exist_ok=True)
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
