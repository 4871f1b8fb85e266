"""Export VGG weights to a fully convolutional ONNX graph inside a Triton model repository.

    from export.exporter import export_model

    export_model("imagenet", arch="vgg16")                   # torchvision's ImageNet weights
    export_model("vgg16.pth", arch="vgg16", name="vgg16")   # a torchvision-format state dict
    export_model("runs/demo-vgg16/best.pth", name="demo-vgg16", scales=(64, 96, 128))
    export_model("runs/demo-vgg16/best.pth", precision="int8",
                 calibration=Path("data/synthetic/train"))   # writes vgg16_bn-int8

Before anything is written, ONNX Runtime (CPU) is checked against PyTorch on three input sizes;
on a mismatch nothing is written. Writing is atomic: the repository is never left half-updated.
``python export/to_onnx.py`` (or ``python -m export``) is the command over :func:`export_model`;
each keyword argument is one of its flags, with the same default and the same checks, and the
errors name the flag.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch

from export import quantize
from export.graph import TOLERANCE, VERIFY_SIZES, ServingGraph, export_onnx, verify_against_torch
from export.repository import GpuServing, ModelInfo, write_model
from inference.protocol import format_scales, parse_scales, serving_scales
from inference.repository import CLASSIFY_MODEL
from vgg.checkpoint import LoadedWeights, load_weights
from vgg.convert import to_fully_conv

IMAGENET = "imagenet"
DEFAULT_MODELS = ("vgg16", "vgg19")
PRECISIONS = ("fp32", "fp16", "int8")
# Where Triton runs the model, as config.pbtxt says: auto (one KIND_AUTO instance: the GPU when
# Triton sees one) or gpu (export.repository.GpuServing).
TARGETS = ("auto", "gpu")
DEFAULT_OPSET = 17
DEFAULT_REPOSITORY = Path("model_repository")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Log = Callable[[str], None]


class ExportError(RuntimeError):
    """A failure reported to the user as one line."""


def log_to_stderr(message: str) -> None:
    """One line on stderr, flushed: the exporter's progress and warnings."""
    print(message, file=sys.stderr, flush=True)


def check_settings(
    *,
    name: str | None = None,
    version: int = 1,
    precision: str = "fp32",
    opset: int = DEFAULT_OPSET,
    calibration: Path | None = None,
    calibration_images: int = quantize.DEFAULT_CALIBRATION_IMAGES,
    verify_images: int = quantize.DEFAULT_VERIFY_IMAGES,
    target: str = "auto",
    gpu_memory_limit: float | None = None,
    tensorrt: bool = False,
    tensorrt_cache: str | None = None,
    tensorrt_max_side: int | None = None,
) -> None:
    """Raise :class:`ExportError`, naming the flag, for a setting no export can use."""
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    check_target_settings(
        target, precision, gpu_memory_limit, tensorrt, tensorrt_cache, tensorrt_max_side
    )
    if version < 1:
        raise ExportError("--version must be a positive integer")
    if not 13 <= opset <= 21:
        raise ExportError("--opset must be between 13 and 21")
    if name is not None and not NAME_PATTERN.match(name):
        raise ExportError(f"--name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
    if name == CLASSIFY_MODEL:
        raise ExportError(
            f"--name {name!r} is taken by the pipeline model every repository holds; choose "
            "another name"
        )
    if precision == "int8" and calibration is None:
        raise ExportError(
            "--precision int8 needs --calibration DIR, a folder of images like the ones "
            "the model will serve (e.g. training images)"
        )
    if precision != "int8" and calibration is not None:
        raise ExportError("--calibration is only used with --precision int8")
    if calibration_images < 1 or verify_images < 1:
        raise ExportError("--calibration-images and --verify-images must be at least 1")


def check_target_settings(
    target: str,
    precision: str,
    gpu_memory_limit: float | None,
    tensorrt: bool,
    tensorrt_cache: str | None,
    tensorrt_max_side: int | None,
) -> None:
    """Raise :class:`ExportError`, naming the flag, for GPU settings that do not fit together."""
    if target not in TARGETS:
        raise ExportError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    if target == "gpu" and precision == "int8":
        raise ExportError(
            "--target gpu with --precision int8: int8 graphs run on CPUs; export fp32 or fp16 "
            "for the GPU"
        )
    if target != "gpu" and (gpu_memory_limit is not None or tensorrt):
        raise ExportError("--gpu-memory-limit and --tensorrt are only used with --target gpu")
    if gpu_memory_limit is not None and not gpu_memory_limit > 0:
        raise ExportError(f"--gpu-memory-limit must be positive (GiB), got {gpu_memory_limit}")
    if not tensorrt and (tensorrt_cache is not None or tensorrt_max_side is not None):
        raise ExportError("--tensorrt-cache and --tensorrt-max-side are only used with --tensorrt")
    if tensorrt_max_side is not None and tensorrt_max_side < 1:
        raise ExportError(f"--tensorrt-max-side must be positive, got {tensorrt_max_side}")


def gpu_serving(
    target: str,
    gpu_memory_limit: float | None = None,
    tensorrt: bool = False,
    tensorrt_cache: str | None = None,
    tensorrt_max_side: int | None = None,
) -> GpuServing | None:
    """The GPU config's settings for ``--target gpu`` (None for auto), defaults filled in."""
    if target != "gpu":
        return None
    defaults = GpuServing()
    return GpuServing(
        memory_limit_gib=gpu_memory_limit or defaults.memory_limit_gib,
        tensorrt=tensorrt,
        tensorrt_cache=tensorrt_cache or defaults.tensorrt_cache,
        tensorrt_max_side=tensorrt_max_side,
    )


def scales_setting(value: str | Sequence[int] | None, flag: str) -> tuple[int, ...] | None:
    """``"64,96,128"`` or ``(64, 96, 128)`` as a tuple of positive integers; None stays None."""
    if value is None:
        return None
    try:
        return parse_scales(value if isinstance(value, str) else format_scales(value))
    except (ValueError, TypeError) as exc:
        raise ExportError(f"{flag}: {exc}") from None


def load_model_weights(
    weights: str | Path,
    arch: str | None,
    *,
    width: float | None = None,
    fc_width: int | None = None,
    crop: int | None = None,
) -> LoadedWeights:
    """The net, its class names and normalisation from ``weights`` ("imagenet" or a file)."""
    overrides = {
        key: value
        for key, value in (("width", width), ("fc_width", fc_width), ("crop", crop))
        if value is not None
    }
    if isinstance(weights, str) and weights == IMAGENET:
        if arch is None:
            raise ExportError("--weights imagenet needs --arch")
        if overrides:
            raise ExportError("ImageNet weights are full size; drop --width/--fc-width/--crop")
        from vgg.pretrained import load_imagenet

        return load_imagenet(arch)
    return load_weights(Path(weights), arch, **overrides)


def class_names(labels: Path | None, weights: LoadedWeights, log: Log = log_to_stderr) -> list[str]:
    """One name per class: the ``labels`` file, else the checkpoint's, else ImageNet's."""
    num_classes = weights.model.spec.num_classes
    if labels is not None:
        try:
            names = [line.strip() for line in labels.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ExportError(f"cannot read --labels {labels}: {exc}") from exc
    elif weights.classes:
        names = list(weights.classes)
    elif num_classes == 1000:
        from vgg.pretrained import imagenet_categories

        names = imagenet_categories()
    else:
        log(f"  no class names for {num_classes} classes: writing class_0..class_{num_classes - 1}")
        names = [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ExportError(
            f"{len(names)} labels for a model with {num_classes} classes; "
            "give a --labels file with one name per class"
        )
    return names


def _check_not_below_crop(scales: tuple[int, ...], crop: int, flag: str) -> None:
    if min(scales) < crop:
        raise ExportError(
            f"{flag} {[q for q in scales if q < crop]} are below the model's input minimum "
            f"{crop}; use scales >= {crop}"
        )


def verified_graph(
    weights: LoadedWeights, name: str, precision: str, opset: int, log: Log = log_to_stderr
) -> tuple[bytes, float]:
    """The serving graph as ONNX bytes in ``precision`` (int8: its fp32 graph), checked against
    PyTorch at :data:`export.graph.VERIFY_SIZES`, and the largest relative error found."""
    spec = weights.model.spec
    dtype = torch.float16 if precision == "fp16" else torch.float32
    reference = ServingGraph(to_fully_conv(weights.model).eval(), weights.mean, weights.std)
    graph = ServingGraph(to_fully_conv(weights.model).eval(), weights.mean, weights.std, dtype)
    log(f"[{name}] 2/4 exporting {spec.arch} ({precision}, opset {opset})")
    onnx_bytes = export_onnx(graph, opset=opset, example_size=spec.crop)

    sizes = [(max(h, spec.crop), max(w, spec.crop)) for h, w in VERIFY_SIZES]
    log(f"[{name}] 3/4 checking ONNX Runtime against PyTorch at {sizes}")
    tolerance = TOLERANCE["fp32" if precision == "int8" else precision]
    rows = verify_against_torch(onnx_bytes, reference, sizes)
    for row in rows:
        log(
            f"    {row['size'][0]}x{row['size'][1]}: relative error probs {row['probs']:.2e}, "
            f"scores {row['scores']:.2e}"
        )
    worst = max(max(r["probs"], r["scores"]) for r in rows)
    if worst >= tolerance:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch (relative error {worst:.2e} >= {tolerance:g} "
            f"for {precision}); nothing was written"
        )
    return onnx_bytes, worst


def quantize_verified(
    onnx_bytes: bytes,
    name: str,
    folder: Path,
    scales: tuple[int, ...],
    calibration: list[Path],
    held_out: list[Path],
    log: Log = log_to_stderr,
) -> tuple[bytes, dict[str, str]]:
    """The int8 graph of fp32 ``onnx_bytes`` calibrated on ``calibration`` (images of
    ``folder``), checked against it on ``held_out``; raises ExportError if too far."""
    log(
        f"[{name}] 3b/4 int8: calibrating on {len(calibration)} images of {folder} "
        f"at Q={','.join(map(str, scales))} with flips"
    )
    int8_bytes = quantize.quantize_int8(onnx_bytes, calibration, scales)
    unseen = "held-out" if not set(held_out) & set(calibration) else "calibration"
    log(f"[{name}] 3c/4 int8: checking against fp32 on {len(held_out)} {unseen} images")
    agreement = quantize.verify_int8(int8_bytes, onnx_bytes, held_out, scales)
    log(
        f"    top-1 agreement {agreement.top1_agreement:.1%}, "
        f"largest posterior difference {agreement.max_prob_diff:.4f}"
    )
    if not agreement.acceptable():
        raise ExportError(
            f"int8 disagrees with fp32 on {len(held_out)} {unseen} images of {folder} "
            f"(top-1 agreement {agreement.top1_agreement:.1%} < {quantize.MIN_TOP1_AGREEMENT:.0%} "
            f"or largest posterior difference {agreement.max_prob_diff:.3f} > "
            f"{quantize.MAX_PROB_DIFF}); nothing was written. Calibrate on more images "
            "(--calibration-images) like the ones served, or serve fp32"
        )
    metadata = {
        "calibration": json.dumps(
            {
                "folder": str(folder),
                "images": len(calibration),
                "scales": list(scales),
                "flip": True,
            }
        ),
        "quantization": "onnxruntime quantize_static QDQ, per-channel s8 weights, u8 activations, "
        f"min/max calibration; quantised ops {','.join(quantize.QUANTIZED_OPS)}",
        "int8_top1_agreement": f"{agreement.top1_agreement:.4f}",
        "int8_max_prob_diff": f"{agreement.max_prob_diff:.4e}",
        "int8_verify_images": str(agreement.images),
    }
    return int8_bytes, metadata


def model_metadata(
    weights: LoadedWeights, labels: list[str], precision: str, max_relative_error: float
) -> dict[str, str]:
    """The graph's ``metadata_props``: what the model is, where it came from, how exact it is."""
    spec = weights.model.spec
    return {
        "arch": spec.arch,
        "config": spec.config,
        "spec": json.dumps(spec.to_dict()),
        "mean": json.dumps(list(weights.mean)),
        "std": json.dumps(list(weights.std)),
        "min_size": str(spec.crop),
        "classes": str(spec.num_classes),
        "labels": json.dumps(labels),
        "precision": precision,
        "source": weights.source,
        "sha256": weights.sha256,
        "max_relative_error": f"{max_relative_error:.3e}",
    }


def export_model(
    weights: str | Path,
    *,
    arch: str | None = None,
    repository: Path = DEFAULT_REPOSITORY,
    name: str | None = None,
    version: int = 1,
    precision: str = "fp32",
    scales: str | Sequence[int] | None = None,
    labels: Path | None = None,
    opset: int = DEFAULT_OPSET,
    calibration: Path | None = None,
    calibration_images: int = quantize.DEFAULT_CALIBRATION_IMAGES,
    calibration_scales: str | Sequence[int] | None = None,
    verify_images: int = quantize.DEFAULT_VERIFY_IMAGES,
    width: float | None = None,
    fc_width: int | None = None,
    crop: int | None = None,
    target: str = "auto",
    gpu_memory_limit: float | None = None,
    tensorrt: bool = False,
    tensorrt_cache: str | None = None,
    tensorrt_max_side: int | None = None,
    log: Log = log_to_stderr,
) -> Path:
    """Export ``weights`` as model ``name`` into ``repository``; returns the written model.onnx.

    Args:
        weights: "imagenet" (torchvision's weights: cache, else download; needs ``arch``) or the
            path of a torchvision-format state dict or a ``python -m train`` checkpoint.
        arch: torchvision name (vgg11..vgg19, *_bn) or the paper's letter (A, A-LRN, B, C, D,
            E); our checkpoints carry their own.
        repository: Triton model repository to write into.
        name: model name in the repository (default: the arch, with "-int8" for int8).
        version: model version folder.
        precision: "fp32", "fp16" or "int8" (ONNX Runtime static quantisation for CPUs,
            calibrated on ``calibration`` images); pre- and post-processing stay fp32.
        scales: scales Q the model is served at when a request names none, written into
            config.pbtxt (default: 256,384,512 for 224 crops, else the crop x1, x1.5, x2).
        labels: class names file, one a line (default: the checkpoint's, else ImageNet's 1000).
        opset: ONNX opset, 13 to 21.
        calibration: int8: folder of images like the ones the model will serve (walked
            recursively; e.g. training images, never the validation set).
        calibration_images: int8: images taken from ``calibration``, spread evenly over it.
        calibration_scales: int8: Q values the calibration images are rescaled to, each with
            its flip (default: the serving scales).
        verify_images: int8: images not used for calibration on which int8 is checked against
            fp32 before anything is written.
        width, fc_width, crop: a small variant's width multiplier, FC6/FC7 width and training
            crop (plain state dicts only; FC6 kernel = crop / 32).
        target: where Triton runs the model, as config.pbtxt says: "auto" (one ``KIND_AUTO``
            instance: the GPU when Triton sees one) or "gpu" (two ``KIND_GPU`` instances,
            warm-up batches, a capped CUDA arena; fp32 and fp16 only).
        gpu_memory_limit: gpu: cap of each instance's CUDA arena in GiB (default 16).
        tensorrt: gpu: ONNX Runtime's TensorRT provider with an optimisation profile and an
            engine cache (default off: the CUDA provider alone).
        tensorrt_cache: tensorrt: engine cache folder on the Triton host
            (default /tmp/vggserve-tensorrt).
        tensorrt_max_side: tensorrt: the profile's largest H and W (default: a 16:9 photo's
            longer side at the largest serving scale, 910 for Q=512).
        log: where progress lines go (default: stderr).

    Raises:
        ExportError: a setting or input that cannot be exported, in one line naming the flag.
        vgg.checkpoint.CheckpointError: weights that cannot be read or do not fit ``arch``.
        ValueError: an unknown ``arch`` or an unusable calibration folder
            (``export.quantize.CalibrationError``).
        OSError: the repository cannot be written (it is left as it was).
    """
    check_settings(
        name=name,
        version=version,
        precision=precision,
        opset=opset,
        calibration=calibration,
        calibration_images=calibration_images,
        verify_images=verify_images,
        target=target,
        gpu_memory_limit=gpu_memory_limit,
        tensorrt=tensorrt,
        tensorrt_cache=tensorrt_cache,
        tensorrt_max_side=tensorrt_max_side,
    )
    gpu = gpu_serving(target, gpu_memory_limit, tensorrt, tensorrt_cache, tensorrt_max_side)
    serving = scales_setting(scales, "--scales")
    calibration_q = scales_setting(calibration_scales, "--calibration-scales")
    started = time.perf_counter()
    if precision == "int8":  # a bad folder fails now, not after the fp32 export
        calibration_files, held_out = quantize.select_images(
            calibration, calibration_images, verify_images
        )
    log(f"[{name or arch}] 1/4 loading weights ({weights})")
    loaded = load_model_weights(weights, arch, width=width, fc_width=fc_width, crop=crop)
    spec = loaded.model.spec
    name = name or (f"{spec.arch}-int8" if precision == "int8" else spec.arch)
    serving = serving or serving_scales(spec.crop)
    _check_not_below_crop(serving, spec.crop, "--scales")
    if precision == "int8":
        calibration_q = calibration_q or serving
        _check_not_below_crop(calibration_q, spec.crop, "--calibration-scales")
    if not NAME_PATTERN.match(name):
        raise ExportError(f"model name {name!r} is not valid; pass --name")
    names = class_names(labels, loaded, log)

    onnx_bytes, worst = verified_graph(loaded, name, precision, opset, log)
    extra_metadata = {}
    if precision == "int8":
        onnx_bytes, extra_metadata = quantize_verified(
            onnx_bytes, name, calibration, calibration_q, calibration_files, held_out, log
        )

    model = onnx.load_from_string(onnx_bytes)
    del model.metadata_props[:]  # the quantiser's own entries; ours say it all
    onnx.helper.set_model_props(
        model, {**model_metadata(loaded, names, precision, worst), **extra_metadata}
    )
    model.producer_name = "vggserve"
    info = ModelInfo(
        name=name,
        num_classes=spec.num_classes,
        mean=loaded.mean,
        std=loaded.std,
        min_size=spec.crop,
        arch=spec.arch,
        precision=precision,
        scales=serving,
    )
    repository = Path(repository)
    log(f"[{name}] 4/4 writing {repository / name}")
    path = write_model(repository, info, version, model.SerializeToString(), names, gpu)
    size_mb = path.stat().st_size / 1e6
    log(f"[{name}] done: {path} ({size_mb:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return path
