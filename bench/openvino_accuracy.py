"""Accuracy cost of OpenVINO's bf16: the demo models in fp32 and bf16 on the synthetic validation set.

    .venv/bin/python -m bench.openvino_accuracy                   # demo-vgg16 and demo-vgg19
    .venv/bin/python -m bench.openvino_accuracy --images 200      # quicker, fewer images

Each checkpoint is exported once (fp32, ``export_model``) into a temporary repository and run by
``--backend openvino``'s engine at ``--openvino-precision fp32`` and ``bf16`` under the serving
protocol (dense, Q = 64,96,128 with flips, as ``make serve`` serves the demo models) on the
validation images; ONNX Runtime runs the same files as the reference for fp32. Printed: the
top-1 accuracy of each, bf16's top-1 agreement with fp32 and the largest posterior change, per
model and for the two fused. Needs a CPU with native bf16.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.int8_accuracy import DEMO, labelled_images
from bench.report import load_average, machine
from export import quantize
from export.exporter import export_model
from inference import read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.backends.openvino import OpenVinoBackend, native_bf16
from inference.evaluation import collect
from inference.protocol import average_posteriors, parse_scales
from testkit import REPOSITORY_ROOT as ROOT

ENGINES = ("ONNX Runtime fp32", "OpenVINO fp32", "OpenVINO bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs")
    parser.add_argument("--models", default=",".join(DEMO))
    parser.add_argument("--val", type=Path, default=ROOT / "data/synthetic/val")
    parser.add_argument("--scales", default="64,96,128")
    parser.add_argument("--images", type=int, default=None, help="validation images (all)")
    args = parser.parse_args()
    if not native_bf16():
        raise SystemExit(
            "this CPU has no native bf16 (OpenVINO's CPU capabilities): nothing to measure"
        )
    scales = parse_scales(args.scales)
    files, classes = labelled_images(args.val, args.images)
    names = args.models.split(",")
    print(
        f"{machine()}; load average {load_average()}; {len(files)} validation images, "
        f"Q={list(scales)} with flips"
    )
    with tempfile.TemporaryDirectory(prefix="vggserve-openvino-accuracy-") as work:
        repo = Path(work) / "repo"
        for name in names:
            export_model(args.runs / name / "best.pth", repository=repo, name=name)
        entries = read_repository(repo, names)
        backends = {
            ENGINES[0]: OnnxRuntimeBackend(entries),
            ENGINES[1]: OpenVinoBackend(entries, precision="fp32"),
            ENGINES[2]: OpenVinoBackend(entries, precision="bf16"),
        }
        images = [quantize.decode_file(path) for path in files]
        posteriors: dict[str, dict[str, np.ndarray]] = {engine: {} for engine in ENGINES}
        for engine, backend in backends.items():
            for name in names:
                started = time.perf_counter()
                posteriors[engine][name] = collect(backend, name, images, scales).combine(scales)
                print(
                    f"{engine} {name}: {len(files)} images in {time.perf_counter() - started:.1f} s"
                )
        labels = entries[names[0]].labels
    truth = np.array([labels.index(c) for c in classes])
    rows = list(names)
    if len(names) > 1:
        fused = "+".join(names)
        for engine in ENGINES:
            posteriors[engine][fused] = average_posteriors([posteriors[engine][n] for n in names])
        rows.append(fused)
    print()
    print(
        "| model | top-1 fp32 | top-1 bf16 | bf16/fp32 top-1 agreement | max posterior change "
        "| OpenVINO fp32 vs ONNX Runtime, max posterior diff |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for name in rows:
        reference, fp32, bf16 = (posteriors[engine][name] for engine in ENGINES)
        agreement = quantize.compare(fp32, bf16)
        print(
            f"| {name} | {np.mean(fp32.argmax(1) == truth):.1%} | "
            f"{np.mean(bf16.argmax(1) == truth):.1%} | {agreement.top1_agreement:.2%} | "
            f"{agreement.max_prob_diff:.2e} | {np.abs(fp32 - reference).max():.1e} |"
        )


if __name__ == "__main__":
    main()
