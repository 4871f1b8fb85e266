"""Validation with the serving protocol (paper section 3.2), run in PyTorch on the training device.

The network is turned into its fully convolutional twin and wrapped in the exported graph's own
pre-processing (``export.graph.ServingGraph``: uint8 in, posterior out), and the images go
through :mod:`inference.evaluation`, the server's own views and fusion with many images per
batch. So the error measured here is the error the served model makes.

    python -m train.evaluate --data data/synthetic --weights runs/demo-vgg16/best.pth \\
        --weights runs/demo-vgg19/best.pth --scales 64,96,128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.graph import ServingGraph
from inference import evaluation
from inference.backends.torch import TorchBackend
from inference.protocol import MODES, ScalePosteriors, average_posteriors
from inference.protocol import parse_scales as parse_scale_list
from train.data import Folder, load_rgb, scan_folder
from vgg.checkpoint import load_weights
from vgg.convert import to_fully_conv
from vgg.models import VGG

# The one model of the backend built around a graph under validation.
MODEL = "net"


def serving_graph(
    model: VGG, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> ServingGraph:
    """The exported graph's PyTorch twin for a training-form ``model`` (a copy, in eval mode)."""
    return ServingGraph(to_fully_conv(model).eval(), mean, std).to(device).eval()


def graph_backend(graph: ServingGraph, device: torch.device | str = "cpu") -> TorchBackend:
    """``graph`` as an inference backend (model name :data:`MODEL`): float32, eager, on
    ``device``, leaving the process's cuDNN settings to training."""
    return TorchBackend(
        {MODEL: graph}, device=str(device), dtype="fp32", compile="off", tune_cuda=False
    )


def collect(
    graph: ServingGraph,
    images: Sequence[Image.Image],
    scales: Sequence[int],
    crop: int,
    mode: str = "dense",
    flip: bool = True,
    device: torch.device | str = "cpu",
) -> ScalePosteriors:
    """Dense, multi-crop or both posteriors of ``images`` at every scale of ``scales``
    (:func:`inference.evaluation.collect` on ``graph``; ``crop``: the training crop)."""
    backend = graph_backend(graph, device)
    return evaluation.collect(backend, MODEL, images, scales, crop, mode, flip)


def error_rates(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(top-1, top-5) error in percent; top-5 is top-k with k = min(5, classes)."""
    k = min(5, probabilities.shape[1])
    # Stable order (ties: lower index first), as inference.protocol.top_k.
    order = np.argsort(-probabilities, axis=1, kind="stable")
    top1 = np.mean(order[:, 0] != labels) * 100
    top5 = np.mean(~np.any(order[:, :k] == labels[:, None], axis=1)) * 100
    return float(top1), float(top5)


def load_images(folder: Folder, indices: Sequence[int]) -> tuple[list[Image.Image], np.ndarray]:
    """Decoded RGB images and their labels."""
    images = [load_rgb(folder.samples[i][0]) for i in indices]
    labels = np.array([folder.samples[i][1] for i in indices])
    return images, labels


def parse_scales(text: str) -> tuple[int, ...]:
    """``"64,96,128"`` -> (64, 96, 128), for argparse (its message, not argparse's)."""
    try:
        return parse_scale_list(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description="Top-1/top-5 error of trained checkpoints with the dense (and multi-crop) "
        "protocol; several --weights are fused by averaging their posteriors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, required=True, help="folder with train/ and val/")
    parser.add_argument("--split", default="val", help="subfolder of --data to evaluate")
    parser.add_argument(
        "--weights",
        type=Path,
        action="append",
        required=True,
        help="a python -m train checkpoint; repeat to fuse models",
    )
    parser.add_argument(
        "--scales",
        type=parse_scales,
        default=None,
        help="test scales Q, comma-separated (default: the training crop x1, 1.5, 2)",
    )
    parser.add_argument("--mode", choices=MODES, default="dense", help="evaluation protocol")
    parser.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average with the horizontally flipped image",
    )
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N images (0: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = [load_weights(path) for path in args.weights]
        classes = loaded[0].classes
        folder = scan_folder(args.data / args.split, tuple(classes) if classes else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    crop = loaded[0].model.spec.crop
    scales = args.scales or (crop, crop * 3 // 2, crop * 2)
    indices = range(len(folder) if args.limit <= 0 else min(args.limit, len(folder)))
    started = time.perf_counter()
    images, labels = load_images(folder, indices)
    fused = []
    rows = []
    for path, weights in zip(args.weights, loaded, strict=True):
        graph = serving_graph(weights.model, weights.mean, weights.std)
        posteriors = collect(graph, images, scales, weights.model.spec.crop, args.mode, args.flip)
        probs = posteriors.combine(scales, args.mode)
        fused.append(probs)
        top1, top5 = error_rates(probs, labels)
        rows.append({"weights": str(path), "top1_err": top1, "top5_err": top5})
    if len(fused) > 1:
        top1, top5 = error_rates(average_posteriors(fused), labels)
        rows.append({"weights": "fusion", "top1_err": top1, "top5_err": top5})
    result = {
        "images": len(images),
        "scales": list(scales),
        "mode": args.mode,
        "flip": args.flip,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{len(images)} images, Q={list(scales)}, {args.mode}, flip={args.flip}")
        for row in rows:
            print(
                f"  {row['weights']}: top-1 error {row['top1_err']:.2f}%, "
                f"top-5 error {row['top5_err']:.2f}%"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
