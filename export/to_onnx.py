"""Export VGG weights to a fully convolutional ONNX graph inside a Triton model repository.

    python export/to_onnx.py                       # VGG-16 and VGG-19, torchvision ImageNet weights
    python export/to_onnx.py --arch vgg16 --weights vgg16.pth --name vgg16
    python export/to_onnx.py --weights runs/demo-d/best.pth --name demo-d   # our checkpoint
    python export/to_onnx.py --weights runs/demo-d/best.pth --precision int8 \
        --calibration data/synthetic/train                                  # writes vgg16_bn-int8

Before anything is written, ONNX Runtime (CPU) is checked against PyTorch on three input sizes;
on a mismatch nothing is written. Writing is atomic: the repository is never left half-updated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx  # noqa: E402
import torch  # noqa: E402

from export import quantize  # noqa: E402
from export.graph import TOLERANCE, VERIFY_SIZES, ServingGraph, export_onnx, verify_against_torch  # noqa: E402
from export.repository import ModelInfo, write_model  # noqa: E402
from inference.protocol import parse_scales, serving_scales  # noqa: E402
from vgg.checkpoint import CheckpointError, LoadedWeights, load_weights  # noqa: E402
from vgg.convert import to_fully_conv  # noqa: E402
from vgg.models import resolve_arch  # noqa: E402

DEFAULT_MODELS = ("vgg16", "vgg19")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExportError(RuntimeError):
    """A failure reported to the user as one line."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python export/to_onnx.py",
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
        default="imagenet",
        help="'imagenet' (torchvision's weights: cache, else download) or the path of a "
        "torchvision-format state dict or a python -m train checkpoint",
    )
    parser.add_argument("--name", default=None, help="model name in the repository (default: arch)")
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="Triton model repository to write into",
    )
    parser.add_argument("--version", type=int, default=1, help="model version folder")
    parser.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
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
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset")
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
    args = parser.parse_args(argv)
    if args.version < 1:
        parser.error("--version must be a positive integer")
    if not 13 <= args.opset <= 21:
        parser.error("--opset must be between 13 and 21")
    if args.name is not None and not NAME_PATTERN.match(args.name):
        parser.error(f"--name {args.name!r}: use letters, digits, '_', '-', '.' (max 64)")
    if args.precision == "int8" and args.calibration is None:
        parser.error(
            "--precision int8 needs --calibration DIR, a folder of images like the ones "
            "the model will serve (e.g. training images)"
        )
    if args.precision != "int8" and args.calibration is not None:
        parser.error("--calibration is only used with --precision int8")
    if args.calibration_images < 1 or args.verify_images < 1:
        parser.error("--calibration-images and --verify-images must be at least 1")
    for flag in ("scales", "calibration_scales"):
        if getattr(args, flag) is not None:
            try:
                setattr(args, flag, parse_scales(getattr(args, flag)))
            except ValueError as exc:
                parser.error(f"--{flag.replace('_', '-')}: {exc}")
    return args


def load(args: argparse.Namespace, arch: str | None) -> LoadedWeights:
    overrides = {
        k: v
        for k, v in (("width", args.width), ("fc_width", args.fc_width), ("crop", args.crop))
        if v is not None
    }
    if args.weights == "imagenet":
        if arch is None:
            raise ExportError("--weights imagenet needs --arch")
        if overrides:
            raise ExportError("ImageNet weights are full size; drop --width/--fc-width/--crop")
        from vgg.pretrained import load_imagenet

        return load_imagenet(arch)
    return load_weights(Path(args.weights), arch, **overrides)


def read_labels(args: argparse.Namespace, weights: LoadedWeights) -> list[str]:
    num_classes = weights.model.spec.num_classes
    if args.labels is not None:
        try:
            labels = [line.strip() for line in args.labels.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ExportError(f"cannot read --labels {args.labels}: {exc}") from exc
    elif weights.classes:
        labels = list(weights.classes)
    elif num_classes == 1000:
        from vgg.pretrained import imagenet_categories

        labels = imagenet_categories()
    else:
        log(f"  no class names for {num_classes} classes: writing class_0..class_{num_classes - 1}")
        labels = [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ExportError(
            f"{len(labels)} labels for a model with {num_classes} classes; "
            "give a --labels file with one name per class"
        )
    return labels


def export_one(args: argparse.Namespace, arch: str | None, name: str | None) -> Path:
    started = time.perf_counter()
    if args.precision == "int8":  # a bad folder fails now, not after the fp32 export
        calibration, held_out = quantize.select_images(
            args.calibration, args.calibration_images, args.verify_images
        )
    log(f"[{name or arch}] 1/4 loading weights ({args.weights})")
    weights = load(args, arch)
    spec = weights.model.spec
    name = name or (f"{spec.arch}-int8" if args.precision == "int8" else spec.arch)
    serving = args.scales or serving_scales(spec.crop)
    if min(serving) < spec.crop:
        raise ExportError(
            f"--scales {[q for q in serving if q < spec.crop]} are below the "
            f"model's input minimum {spec.crop}; use scales >= {spec.crop}"
        )
    if args.precision == "int8":
        scales = args.calibration_scales or serving
        if min(scales) < spec.crop:
            small = [q for q in scales if q < spec.crop]
            raise ExportError(
                f"--calibration-scales {small} are below the model's input minimum "
                f"{spec.crop}; use scales >= {spec.crop}"
            )
    if not NAME_PATTERN.match(name):
        raise ExportError(f"model name {name!r} is not valid; pass --name")
    labels = read_labels(args, weights)

    dtype = torch.float16 if args.precision == "fp16" else torch.float32
    reference = ServingGraph(to_fully_conv(weights.model).eval(), weights.mean, weights.std)
    graph = ServingGraph(to_fully_conv(weights.model).eval(), weights.mean, weights.std, dtype)
    log(f"[{name}] 2/4 exporting {spec.arch} ({args.precision}, opset {args.opset})")
    onnx_bytes = export_onnx(graph, opset=args.opset, example_size=spec.crop)

    sizes = [(max(h, spec.crop), max(w, spec.crop)) for h, w in VERIFY_SIZES]
    log(f"[{name}] 3/4 checking ONNX Runtime against PyTorch at {sizes}")
    tolerance = TOLERANCE["fp32" if args.precision == "int8" else args.precision]
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
            f"for {args.precision}); nothing was written"
        )
    extra_metadata = {}
    if args.precision == "int8":
        onnx_bytes, extra_metadata = quantize_verified(
            args, onnx_bytes, name, scales, calibration, held_out
        )

    model = onnx.load_from_string(onnx_bytes)
    metadata = {
        "arch": spec.arch,
        "config": spec.config,
        "spec": json.dumps(spec.to_dict()),
        "mean": json.dumps(list(weights.mean)),
        "std": json.dumps(list(weights.std)),
        "min_size": str(spec.crop),
        "classes": str(spec.num_classes),
        "labels": json.dumps(labels),
        "precision": args.precision,
        "source": weights.source,
        "sha256": weights.sha256,
        "max_relative_error": f"{worst:.3e}",
        **extra_metadata,
    }
    del model.metadata_props[:]  # the quantiser's own entries; ours say it all
    onnx.helper.set_model_props(model, metadata)
    model.producer_name = "vggserve"
    info = ModelInfo(
        name=name,
        num_classes=spec.num_classes,
        mean=weights.mean,
        std=weights.std,
        min_size=spec.crop,
        arch=spec.arch,
        precision=args.precision,
        scales=serving,
    )
    log(f"[{name}] 4/4 writing {args.repository / name}")
    path = write_model(args.repository, info, args.version, model.SerializeToString(), labels)
    size_mb = path.stat().st_size / 1e6
    log(f"[{name}] done: {path} ({size_mb:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return path


def quantize_verified(
    args: argparse.Namespace,
    onnx_bytes: bytes,
    name: str,
    scales: tuple[int, ...],
    calibration: list[Path],
    held_out: list[Path],
) -> tuple[bytes, dict[str, str]]:
    """The int8 graph of fp32 ``onnx_bytes``, checked against it; raises ExportError if too far."""
    log(
        f"[{name}] 3b/4 int8: calibrating on {len(calibration)} images of {args.calibration} "
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
            f"int8 disagrees with fp32 on {len(held_out)} {unseen} images of {args.calibration} "
            f"(top-1 agreement {agreement.top1_agreement:.1%} < {quantize.MIN_TOP1_AGREEMENT:.0%} "
            f"or largest posterior difference {agreement.max_prob_diff:.3f} > "
            f"{quantize.MAX_PROB_DIFF}); nothing was written. Calibrate on more images "
            "(--calibration-images) like the ones served, or serve fp32"
        )
    metadata = {
        "calibration": json.dumps(
            {
                "folder": str(args.calibration),
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.arch is None and args.weights == "imagenet":
        if args.name:
            raise SystemExit("error: --name needs --arch when exporting the default models")
        suffix = "-int8" if args.precision == "int8" else ""
        jobs = [(arch, arch + suffix) for arch in DEFAULT_MODELS]
    else:
        if args.arch is not None:
            try:
                resolve_arch(args.arch)
            except ValueError as exc:
                log(f"error: {exc}")
                return 2
        jobs = [(args.arch, args.name)]
    for arch, name in jobs:
        try:
            export_one(args, arch, name)
        except (ExportError, CheckpointError, ValueError) as exc:
            log(f"error: {exc}")
            return 1
        except OSError as exc:
            log(f"error: cannot write to repository {args.repository}: {exc.strerror or exc}")
            return 1
        except KeyboardInterrupt:
            log("interrupted: the repository is unchanged")
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
