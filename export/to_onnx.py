"""Export VGG weights to a fully convolutional ONNX graph inside a Triton model repository.

    python export/to_onnx.py                       # VGG-16 and VGG-19, torchvision ImageNet weights
    python export/to_onnx.py --arch vgg16 --weights vgg16.pth --name vgg16
    python export/to_onnx.py --weights runs/demo-d/best.pth --name demo-d   # our checkpoint
    python export/to_onnx.py --weights runs/demo-d/best.pth --precision int8 \
        --calibration data/synthetic/train                                  # writes vgg16_bn-int8

Before anything is written, ONNX Runtime (CPU) is checked against PyTorch on three input sizes;
on a mismatch nothing is written. Writing is atomic: the repository is never left half-updated.
``python -m export`` is the same command; :func:`export.exporter.export_model` is the function
under it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from export import quantize
from export.exporter import (
    DEFAULT_MODELS,
    DEFAULT_OPSET,
    DEFAULT_REPOSITORY,
    IMAGENET,
    PRECISIONS,
    TARGETS,
    ExportError,
    check_settings,
    export_model,
    log_to_stderr,
    scales_setting,
)
from export.graph import TOLERANCE
from export.repository import DEFAULT_GPU_MEMORY_LIMIT_GIB, DEFAULT_TENSORRT_CACHE
from vgg.checkpoint import CheckpointError
from vgg.models import resolve_arch

# The command's names that callers and tests reach through this module.
__all__ = ["TOLERANCE", "ExportError", "build_parser", "export_model", "main", "parse_args"]

PROG = "python export/to_onnx.py"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The parser: one flag per keyword argument of ``export_model``, with its default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--arch",
        default=None,
        help="architecture: torchvision name (vgg11..vgg19, *_bn) or the paper's letter "
        "(A, A-LRN, B, C, D, E); our checkpoints carry their own. Without --arch and --weights: "
        f"{' and '.join(DEFAULT_MODELS)}",
    )
    parser.add_argument(
        "--weights",
        default=IMAGENET,
        help="'imagenet' (torchvision's weights: cache, else download) or the path of a "
        "torchvision-format state dict or a python -m train checkpoint",
    )
    parser.add_argument("--name", default=None, help="model name in the repository (default: arch)")
    parser.add_argument(
        "--repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help="Triton model repository to write into",
    )
    parser.add_argument("--version", type=int, default=1, help="model version folder")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="precision of the convolutions (pre- and post-processing stay fp32); "
        "int8: ONNX Runtime static quantisation for CPUs, calibrated on "
        "--calibration images, written as <name>-int8 unless --name is given",
    )
    parser.add_argument(
        "--scales",
        default=None,
        help="scales Q the model is served at when a request names none, written "
        "into config.pbtxt (default: 256,384,512 for 224 crops, else the crop x1, "
        "x1.5, x2)",
    )
    parser.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="int8: folder of images like the ones the model will serve (walked "
        "recursively; e.g. training images, never the validation set)",
    )
    parser.add_argument(
        "--calibration-images",
        type=int,
        default=quantize.DEFAULT_CALIBRATION_IMAGES,
        help="int8: images taken from --calibration, spread evenly over it",
    )
    parser.add_argument(
        "--calibration-scales",
        default=None,
        help="int8: Q values the calibration images are rescaled to, each with its "
        "flip (default: the serving scales, 256,384,512 for 224 crops, else the "
        "crop x1, x1.5, x2)",
    )
    parser.add_argument(
        "--verify-images",
        type=int,
        default=quantize.DEFAULT_VERIFY_IMAGES,
        help="int8: images not used for calibration on which int8 is checked "
        "against fp32 before anything is written",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="class names, one a line (default: the checkpoint's names, else ImageNet's 1000)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset")
    parser.add_argument(
        "--width",
        type=float,
        default=None,
        help="width multiplier of a small variant (plain state dicts only)",
    )
    parser.add_argument(
        "--fc-width",
        type=int,
        default=None,
        help="FC6/FC7 width of a small variant (plain state dicts only)",
    )
    parser.add_argument(
        "--crop",
        type=int,
        default=None,
        help="training crop of a small variant; FC6 kernel = crop / 32",
    )
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="auto",
        help="where Triton runs the model, as config.pbtxt says: auto (one KIND_AUTO instance, "
        "the GPU when Triton sees one) or gpu (two KIND_GPU instances, warm-up batches at the "
        "serving scales, a capped CUDA arena; fp32 and fp16 only)",
    )
    parser.add_argument(
        "--gpu-memory-limit",
        type=float,
        default=None,
        metavar="GIB",
        help=f"gpu: cap of each instance's CUDA arena in GiB (default {DEFAULT_GPU_MEMORY_LIMIT_GIB:g})",
    )
    parser.add_argument(
        "--tensorrt",
        action="store_true",
        help="gpu: ONNX Runtime's TensorRT provider, with one optimisation profile for the "
        "dynamic batch, height and width and an engine cache (engines take minutes to build)",
    )
    parser.add_argument(
        "--tensorrt-cache",
        default=None,
        metavar="DIR",
        help=f"tensorrt: engine cache folder on the Triton host (default {DEFAULT_TENSORRT_CACHE})",
    )
    parser.add_argument(
        "--tensorrt-max-side",
        type=int,
        default=None,
        metavar="PIXELS",
        help="tensorrt: the profile's largest height and width (default: a 16:9 photo's longer "
        "side at the largest serving scale, 910 for Q=512); longer views are outside the engine",
    )
    return parser


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    """Parse and check the command line (errors exit 2 with argparse's usage line)."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        check_settings(
            name=args.name,
            version=args.version,
            precision=args.precision,
            opset=args.opset,
            calibration=args.calibration,
            calibration_images=args.calibration_images,
            verify_images=args.verify_images,
            target=args.target,
            gpu_memory_limit=args.gpu_memory_limit,
            tensorrt=args.tensorrt,
            tensorrt_cache=args.tensorrt_cache,
            tensorrt_max_side=args.tensorrt_max_side,
        )
        args.scales = scales_setting(args.scales, "--scales")
        args.calibration_scales = scales_setting(args.calibration_scales, "--calibration-scales")
    except ExportError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Run the command; 0 when every model was written, 1 when one failed, 2 on bad flags."""
    args = parse_args(argv, prog)
    if args.arch is None and args.weights == IMAGENET:
        if args.name:
            raise SystemExit("error: --name needs --arch when exporting the default models")
        suffix = "-int8" if args.precision == "int8" else ""
        jobs = [(arch, arch + suffix) for arch in DEFAULT_MODELS]
    else:
        if args.arch is not None:
            try:
                resolve_arch(args.arch)
            except ValueError as exc:
                log_to_stderr(f"error: {exc}")
                return 2
        jobs = [(args.arch, args.name)]
    for arch, name in jobs:
        try:
            export_model(
                args.weights,
                arch=arch,
                repository=args.repository,
                name=name,
                version=args.version,
                precision=args.precision,
                scales=args.scales,
                labels=args.labels,
                opset=args.opset,
                calibration=args.calibration,
                calibration_images=args.calibration_images,
                calibration_scales=args.calibration_scales,
                verify_images=args.verify_images,
                width=args.width,
                fc_width=args.fc_width,
                crop=args.crop,
                target=args.target,
                gpu_memory_limit=args.gpu_memory_limit,
                tensorrt=args.tensorrt,
                tensorrt_cache=args.tensorrt_cache,
                tensorrt_max_side=args.tensorrt_max_side,
            )
        except (ExportError, CheckpointError, ValueError) as exc:
            log_to_stderr(f"error: {exc}")
            return 1
        except OSError as exc:
            log_to_stderr(
                f"error: cannot write to repository {args.repository}: {exc.strerror or exc}"
            )
            return 1
        except KeyboardInterrupt:
            log_to_stderr("interrupted: the repository is unchanged")
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
