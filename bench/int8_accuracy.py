"""Accuracy cost of int8: the demo models in fp32 and int8 on the synthetic validation set.

    .venv/bin/python -m bench.int8_accuracy                       # demo-vgg16 and demo-vgg19
    .venv/bin/python -m bench.int8_accuracy --images 200          # quicker, fewer images

Each checkpoint is exported twice into a temporary repository with ``export_model``: fp32,
and ``--precision int8`` calibrated on *training* images (never the validation set). Both are run
under the serving protocol (dense, Q = 64,96,128 with flips, as ``make serve`` serves the demo
models) on the validation images; printed: the top-1 accuracy of each and the top-1 agreement of
int8 with fp32, per model and for the two fused.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import machine
from export import quantize
from export.exporter import export_model
from inference import read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.evaluation import collect
from inference.protocol import average_posteriors, parse_scales
from testkit import REPOSITORY_ROOT as ROOT

DEMO = ("demo-vgg16", "demo-vgg19")


def labelled_images(folder: Path, limit: int | None) -> tuple[list[Path], list[str]]:
    """ImageFolder files (sorted; spread evenly when limited) and their class names."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in quantize.IMAGE_SUFFIXES)
    if limit:
        files = quantize._spread(files, limit)
    return files, [p.parent.name for p in files]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--models", default=",".join(DEMO))
    parser.add_argument("--train", type=Path, default=ROOT / "data/synthetic/train")
    parser.add_argument("--val", type=Path, default=ROOT / "data/synthetic/val")
    parser.add_argument("--scales", default="64,96,128")
    parser.add_argument("--images", type=int, default=None, help="validation images (all)")
    parser.add_argument("--calibration-images", type=int, default=64)
    args = parser.parse_args()
    scales = parse_scales(args.scales)
    files, classes = labelled_images(args.val, args.images)
    names = args.models.split(",")
    print(f"{machine()}; {len(files)} validation images, Q={list(scales)} with flips")
    posteriors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="vggserve-int8-accuracy-") as work:
        repo = Path(work) / "repo"
        for name in names:
            weights = args.runs / name / "best.pth"
            export_model(weights, repository=repo, name=name)
            started = time.perf_counter()
            export_model(
                weights,
                repository=repo,
                name=f"{name}-int8",
                precision="int8",
                calibration=args.train,
                calibration_images=args.calibration_images,
                calibration_scales=scales,
            )
            print(f"{name}: int8 export {time.perf_counter() - started:.1f} s")
        entries = read_repository(repo)
        backend = OnnxRuntimeBackend(entries)
        images = [quantize.decode_file(path) for path in files]
        for model in entries:
            started = time.perf_counter()
            posteriors[model] = collect(backend, model, images, scales).combine(scales)
            print(f"{model}: {len(files)} images in {time.perf_counter() - started:.1f} s")
        labels = entries[names[0]].labels
    truth = np.array([labels.index(c) for c in classes])
    rows = [(n, posteriors[n], posteriors[f"{n}-int8"]) for n in names]
    if len(names) > 1:
        fused = [average_posteriors([posteriors[n + s] for n in names]) for s in ("", "-int8")]
        rows.append(("+".join(names), *fused))
    print()
    print("| model | top-1 fp32 | top-1 int8 | int8/fp32 top-1 agreement | max posterior diff |")
    print("| --- | --- | --- | --- | --- |")
    for name, fp32, int8 in rows:
        agreement = quantize.compare(fp32, int8)
        print(
            f"| {name} | {np.mean(fp32.argmax(1) == truth):.1%} | "
            f"{np.mean(int8.argmax(1) == truth):.1%} | {agreement.top1_agreement:.1%} | "
            f"{agreement.max_prob_diff:.4f} |"
        )


if __name__ == "__main__":
    main()
