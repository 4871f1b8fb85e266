"""The Triton config for GPUs (``python export/to_onnx.py --target gpu``): what Triton's
onnxruntime backend is told, read back with Triton's own protobuf. No GPU runs here; these are
the settings the first GPU run depends on."""

from __future__ import annotations

import math

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from export import to_onnx
from export.exporter import ExportError, export_model
from export.repository import (
    DEFAULT_GPU_MEMORY_LIMIT_GIB,
    DEFAULT_TENSORRT_CACHE,
    GpuServing,
    ModelInfo,
    config_text,
    model_config,
    parse_config,
)
from inference import read_repository
from testkit.models import SMALL
from tests.test_exporter import assert_refused_before_reading
from tritonlocal import twin_config

IMAGENET = ModelInfo("vgg16", 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 224, "vgg16")
GPU = mc.ModelInstanceGroup.KIND_GPU


def written(info: ModelInfo, **options) -> mc.ModelConfig:
    """The config as Triton reads it: printed, then parsed (raises on anything Triton rejects)."""
    return parse_config(config_text(model_config(info, **options)))


def parameters(config: mc.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def warmups(config: mc.ModelConfig) -> list[tuple[str, int, list[int], bool]]:
    return [
        (w.name, w.batch_size, list(w.inputs["image"].dims), w.inputs["image"].zero_data)
        for w in config.model_warmup
        if w.inputs["image"].data_type == mc.TYPE_UINT8
    ]


def photo_views(q: int) -> list[int]:
    """(3, H, W) of a 640x480 photo rescaled to Q as the protocol does: the shorter side Q, the
    longer floor(640 * Q / 480 + 0.5)."""
    return [3, q, math.floor(640 * q / 480 + 0.5)]


def test_default_config_has_no_gpu_settings():
    """Without --target gpu: one KIND_AUTO instance, no warm-up, no accelerator, the parameters
    every exported model has had (the CPU and twin paths depend on it)."""
    config = written(IMAGENET)
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (1, mc.ModelInstanceGroup.KIND_AUTO)
    ]
    assert not config.model_warmup and not config.HasField("optimization")
    assert set(parameters(config)) == {
        "arch",
        "mean",
        "std",
        "min_size",
        "precision",
        "scales",
        "cudnn_conv_algo_search",
        "arena_extend_strategy",
    }


def test_gpu_config_two_gpu_instances_warmup_and_a_capped_arena():
    config = written(IMAGENET, gpu=GpuServing())
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, GPU)]
    # The two views of a 4:3 photo at each serving scale, and the 5x5 crops with their flips.
    assert warmups(config) == [
        ("views at Q=256", 2, photo_views(256), True),
        ("views at Q=384", 2, photo_views(384), True),
        ("views at Q=512", 2, photo_views(512), True),
        ("multi-crop", 50, [3, 224, 224], True),
    ]
    assert photo_views(512) == [3, 512, 683]
    settings = parameters(config)
    assert settings["gpu_mem_limit"] == str(16 * 2**30) and DEFAULT_GPU_MEMORY_LIMIT_GIB == 16
    assert settings["arena_extend_strategy"] == "1"  # kSameAsRequested: no power-of-two growth
    assert settings["cudnn_conv_algo_search"] == "1"  # HEURISTIC: no exhaustive search per shape
    assert settings["intra_op_thread_count"] == "1"
    assert not config.HasField("optimization")  # no TensorRT unless asked
    # Everything the classifiers' readers use is as in the default config.
    default = written(IMAGENET)
    for field in ("input", "output", "max_batch_size", "dynamic_batching", "version_policy"):
        assert getattr(config, field) == getattr(default, field), field
    assert {k: v for k, v in settings.items() if k in parameters(default)} == parameters(default)


def test_gpu_config_follows_the_models_scales_limit_and_instances():
    small = ModelInfo("demo", 10, (0.5,) * 3, (0.25,) * 3, 64, "vgg16", "fp16", scales=(64, 96))
    config = written(
        small, max_batch_size=32, instance_count=3, gpu=GpuServing(memory_limit_gib=1.5)
    )
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, GPU)]
    assert parameters(config)["gpu_mem_limit"] == str(3 * 2**29)  # 1.5 GiB in bytes
    assert warmups(config) == [
        ("views at Q=64", 2, [3, 64, 85], True),
        ("views at Q=96", 2, [3, 96, 128], True),
        ("multi-crop", 32, [3, 64, 64], True),  # Triton refuses a warm-up over max_batch_size
    ]


def test_tensorrt_only_with_a_profile_and_an_engine_cache():
    config = written(IMAGENET, gpu=GpuServing(tensorrt=True))
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert not config.optimization.execution_accelerators.cpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    # min: one view at the training crop; opt: the 2 views of a 4:3 photo at the middle Q;
    # max: a full batch at a 16:9 photo's longer side at Q=512, floor(512 * 16 / 9 + 0.5) = 910.
    assert dict(accelerator.parameters) == {
        "precision_mode": "FP32",
        "trt_profile_min_shapes": "image:1x3x224x224",
        "trt_profile_opt_shapes": "image:2x3x384x512",
        "trt_profile_max_shapes": "image:64x3x910x910",
        "trt_engine_cache_enable": "1",
        "trt_engine_cache_path": DEFAULT_TENSORRT_CACHE,
    }
    fp16 = ModelInfo("vgg16-fp16", 1000, (0.5,) * 3, (0.25,) * 3, 224, "vgg16", "fp16")
    config = written(
        fp16, gpu=GpuServing(tensorrt=True, tensorrt_cache="/cache/trt", tensorrt_max_side=1024)
    )
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["precision_mode"] == "FP16"
    assert accelerator.parameters["trt_profile_max_shapes"] == "image:64x3x1024x1024"
    assert accelerator.parameters["trt_engine_cache_path"] == "/cache/trt"
    # The warm-up shapes lie inside the profile, so loading builds (or reads) the engine.
    assert len(config.model_warmup) == 4


@pytest.mark.parametrize(
    ("info", "backend"),
    [
        (ModelInfo("q", 10, (0.5,) * 3, (0.25,) * 3, 64, "vgg16", "int8"), "onnxruntime"),
        (IMAGENET, "openvino"),
        (IMAGENET, "python"),
    ],
    ids=["int8", "openvino", "python"],
)
def test_gpu_config_only_for_onnxruntime_float_graphs(info, backend):
    with pytest.raises(ValueError, match="export fp32 or fp16 for the GPU"):
        model_config(info, backend=backend, gpu=GpuServing())


def test_twin_serves_a_gpu_config_on_the_cpu():
    """make triton on a repository exported for the GPU: CPU instances, no TensorRT, no GPU
    warm-up; the rest as the production config says."""
    twin = twin_config(config_text(model_config(IMAGENET, gpu=GpuServing(tensorrt=True))))
    assert [(g.count, g.kind) for g in twin.instance_group] == [(2, mc.ModelInstanceGroup.KIND_CPU)]
    assert not twin.HasField("optimization") and not twin.model_warmup
    python = model_config(IMAGENET, backend="python", instance_count=2)
    python.instance_group[0].kind = mc.ModelInstanceGroup.KIND_CPU
    for key in ("cudnn_conv_algo_search", "arena_extend_strategy", "gpu_mem_limit"):
        del twin.parameters[key]
    del twin.parameters["intra_op_thread_count"]
    assert twin == python


# (keyword arguments, the same settings as flags, the one message both give)
BAD_GPU_SETTINGS = [
    (
        {"target": "gpu", "precision": "int8"},
        ["--target", "gpu", "--precision", "int8"],
        "--target gpu with --precision int8: int8 graphs run on CPUs",
    ),
    (
        {"tensorrt": True},
        ["--tensorrt"],
        "--gpu-memory-limit and --tensorrt are only used with --target gpu",
    ),
    (
        {"gpu_memory_limit": 8.0},
        ["--gpu-memory-limit", "8"],
        "--gpu-memory-limit and --tensorrt are only used with --target gpu",
    ),
    (
        {"target": "gpu", "gpu_memory_limit": 0.0},
        ["--target", "gpu", "--gpu-memory-limit", "0"],
        "--gpu-memory-limit must be positive (GiB), got 0.0",
    ),
    (
        {"target": "gpu", "tensorrt_cache": "/c"},
        ["--target", "gpu", "--tensorrt-cache", "/c"],
        "--tensorrt-cache and --tensorrt-max-side are only used with --tensorrt",
    ),
    (
        {"target": "gpu", "tensorrt": True, "tensorrt_max_side": 0},
        ["--target", "gpu", "--tensorrt", "--tensorrt-max-side", "0"],
        "--tensorrt-max-side must be positive, got 0",
    ),
]


@pytest.mark.parametrize(
    ("settings", "flags", "message"),
    BAD_GPU_SETTINGS,
    ids=["int8", "tensorrt-alone", "limit-alone", "limit", "cache-alone", "side"],
)
def test_bad_gpu_settings_give_the_flags_message_before_anything_is_read(
    settings, flags, message, tmp_path, capsys
):
    assert_refused_before_reading(settings, flags, message, tmp_path, capsys)


def test_unknown_target_is_refused_by_the_library_too(tmp_path):
    with pytest.raises(ExportError, match="--target 'tpu': use one of auto, gpu"):
        export_model(tmp_path / "w.pth", arch="vgg16", target="tpu")


def test_export_for_the_gpu_writes_the_gpu_config(small_state_dict_path, tmp_path):
    """The command's flags reach config.pbtxt, and the server's repository reader (and so
    classify's) reads the GPU config as it reads any other."""
    repository = tmp_path / "repo"
    flags = ["--width", str(SMALL["width"]), "--fc-width", str(SMALL["fc_width"])]
    flags += ["--crop", str(SMALL["crop"]), "--arch", "vgg16", "--name", "small"]
    flags += ["--weights", str(small_state_dict_path), "--repository", str(repository)]
    flags += ["--target", "gpu", "--gpu-memory-limit", "2", "--tensorrt"]
    flags += ["--tensorrt-cache", "/var/cache/trt", "--tensorrt-max-side", "256"]
    assert to_onnx.main(flags) == 0
    config = parse_config((repository / "small" / "config.pbtxt").read_text())
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, GPU)]
    assert parameters(config)["gpu_mem_limit"] == str(2 * 2**30)
    assert [w.name for w in config.model_warmup] == [
        "views at Q=64",
        "views at Q=96",
        "views at Q=128",
        "multi-crop",
    ]
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.parameters["trt_engine_cache_path"] == "/var/cache/trt"
    assert accelerator.parameters["trt_profile_max_shapes"] == "image:64x3x256x256"
    assert accelerator.parameters["trt_profile_min_shapes"] == "image:1x3x64x64"
    model = read_repository(repository)["small"]
    assert (model.min_size, model.scales, model.precision) == (64, (64, 96, 128), "fp32")
