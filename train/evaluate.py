"""Validation with the serving protocol (paper section 3.2), run in PyTorch on the training device.

The network is turned into its fully convolutional twin and wrapped in the exported graph's own
pre-processing (``export.graph.ServingGraph``: uint8 in, posterior out), and the images go
through ``inference.protocol`` exactly as the server sends them. So the error measured here is
the error the served model makes.

Images whose rescaled sizes are equal are batched together; the synthetic set is drawn in a few
aspect ratios for that reason. Any other folder works too, one image per batch.

    python -m train.evaluate --data data/synthetic --weights runs/demo-vgg16/best.pth \\
        --weights runs/demo-vgg19/best.pth --scales 64,96,128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from export.graph import ServingGraph
from inference.protocol import average_posteriors, dense_batch, multicrop_batch, rescaled_size
from inference.protocol import parse_scales as parse_scale_list
from train.data import Folder, load_rgb, scan_folder
from vgg.checkpoint import load_weights
from vgg.convert import to_fully_conv
from vgg.models import VGG

MODES = ("dense", "multicrop", "both")
# Views of one forward pass: bounded in pixels so full-size nets at Q=512 fit in memory.
MAX_BATCH_PIXELS = 1 << 22
MAX_BATCH_VIEWS = 256


def serving_graph(
    model: VGG, mean: Sequence[float], std: Sequence[float], device: torch.device | str = "cpu"
) -> ServingGraph:
    """The exported graph's PyTorch twin for a training-form ``model`` (a copy, in eval mode)."""
    return ServingGraph(to_fully_conv(model).eval(), mean, std).to(device).eval()


@torch.no_grad()
def _run(graph: ServingGraph, views: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Posteriors (N, C) float64 of a uint8 batch, split to bound memory."""
    pixels = views.shape[2] * views.shape[3]
    step = max(1, min(MAX_BATCH_VIEWS, MAX_BATCH_PIXELS // pixels))
    out = []
    for start in range(0, len(views), step):
        batch = torch.from_numpy(views[start : start + step]).to(device)
        probs, _ = graph(batch)
        out.append(probs.double().cpu().numpy())
    return np.concatenate(out)


def dense_posteriors(
    graph: ServingGraph,
    images: Sequence[Image.Image],
    scale: int,
    flip: bool = True,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """(N, C) posteriors at one Q, averaged over the flip: the dense protocol for each image."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[rescaled_size(*image.size, scale)].append(i)
    result: np.ndarray | None = None
    views_per_image = 2 if flip else 1
    for indices in groups.values():
        views = np.concatenate([dense_batch(images[i], scale, flip) for i in indices])
        probs = _run(graph, views, device)
        probs = probs.reshape(len(indices), views_per_image, -1).mean(axis=1)
        if result is None:
            result = np.zeros((len(images), probs.shape[1]))
        result[indices] = probs
    assert result is not None
    return result


def multicrop_posteriors(
    graph: ServingGraph,
    images: Sequence[Image.Image],
    scale: int,
    crop: int,
    flip: bool = True,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """(N, C) posteriors at one Q from a 5x5 grid of crops (with flips), averaged (Table 5)."""
    rows = [
        _run(graph, multicrop_batch(image, scale, crop, flip), device).mean(axis=0)
        for image in images
    ]
    return np.stack(rows)


def error_rates(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(top-1, top-5) error in percent; top-5 is top-k with k = min(5, classes)."""
    k = min(5, probabilities.shape[1])
    # Stable order (ties: lower index first), as inference.protocol.top_k.
    order = np.argsort(-probabilities, axis=1, kind="stable")
    top1 = np.mean(order[:, 0] != labels) * 100
    top5 = np.mean(~np.any(order[:, :k] == labels[:, None], axis=1)) * 100
    return float(top1), float(top5)


@dataclass
class Posteriors:
    """Per-scale posteriors of one model on one image list, for combining afterwards."""

    dense: dict[int, np.ndarray]
    multicrop: dict[int, np.ndarray]

    def combine(self, scales: Sequence[int], mode: str = "dense") -> np.ndarray:
        """Average over scales (and over dense + multi-crop for mode "both", Table 5)."""
        parts = []
        if mode in ("dense", "both"):
            parts.append(average_posteriors([self.dense[q] for q in scales]))
        if mode in ("multicrop", "both"):
            parts.append(average_posteriors([self.multicrop[q] for q in scales]))
        return average_posteriors(parts)


def collect(
    graph: ServingGraph,
    images: Sequence[Image.Image],
    scales: Sequence[int],
    crop: int,
    modes: Sequence[str] = ("dense",),
    flip: bool = True,
    device: torch.device | str = "cpu",
) -> Posteriors:
    """Dense and/or multi-crop posteriors of ``images`` at every scale of ``scales``."""
    dense, multi = {}, {}
    for q in sorted(set(scales)):
        if "dense" in modes or "both" in modes:
            dense[q] = dense_posteriors(graph, images, q, flip, device)
        if "multicrop" in modes or "both" in modes:
            multi[q] = multicrop_posteriors(graph, images, q, crop, flip, device)
    return Posteriors(dense, multi)


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
        posteriors = collect(
            graph, images, scales, weights.model.spec.crop, (args.mode,), args.flip
        )
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
