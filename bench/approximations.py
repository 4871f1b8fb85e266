"""What the two opt-in speed-ups cost in accuracy: ``--shape-multiple`` and ``--jpeg-draft``.

    python -m bench.approximations            # after make demo-models (about 2 minutes here)

Both are measured on the trained demo models (demo-vgg16 + demo-vgg19, fused, dense Q = 64, 96,
128 with flips) against the exact protocol, on images they were not trained on:

* shape bucketing: synthetic validation images cut to random aspect ratios (a stream of photos),
  the longer side rounded to multiples of 8, 16 and 32. At these Q a multiple of 8 stretches
  the image as much as a multiple of 32 does at Q = 256..512.
* reduced-size JPEG decoding: synthetic images drawn large (shorter side 768-1152, like photos
  at Q = 512) and saved as JPEG, decoded in full and at reduced size.

Printed: top-1 accuracy, top-1 agreement with the exact protocol, the largest and mean change of
any class probability, and input shapes (bucketing) or decode time (JPEG).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from inference import Classifier, ClassifyOptions, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.images import decode_image
from inference.protocol import rescaled_size
from testkit import REPOSITORY_ROOT as ROOT
from testkit.images import encode
from train import synthetic
from train.data import scan_folder

SCALES = (64, 96, 128)
MODELS = ("demo-vgg16", "demo-vgg19")


def classify_all(classifier: Classifier, images: list[Image.Image]) -> np.ndarray:
    async def run() -> list[np.ndarray]:
        return [
            (await classifier.classify(image, ClassifyOptions(models=MODELS))).probabilities
            for image in images
        ]

    return np.stack(asyncio.run(run()))


def compare(name: str, exact: np.ndarray, other: np.ndarray, labels: np.ndarray, extra: str):
    delta = np.abs(other - exact)
    agree = float(np.mean(other.argmax(1) == exact.argmax(1)) * 100)
    accuracy = float(np.mean(other.argmax(1) == labels) * 100)
    print(
        f"| {name} | {accuracy:.1f} | {agree:.1f} | {delta.max():.2e} | {delta.mean():.2e} "
        f"| {extra} |"
    )


def bucketing(args, served, labels_of) -> None:
    val = scan_folder(args.data / "val")
    picks = np.linspace(0, len(val) - 1, min(args.images, len(val))).astype(int)
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in picks:
        path, label = val.samples[i]
        image = Image.open(path).convert("RGB")
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.75, 1)), int(h * rng.uniform(0.75, 1))
        left, top = (w - cw) // 2, (h - ch) // 2
        images.append(image.crop((left, top, left + cw, top + ch)))
        labels.append(labels_of[val.classes[label]])
    labels = np.array(labels)
    print(f"\nShape bucketing: {len(images)} validation images cut to random aspect ratios")
    print("| longer side | top-1 acc % | top-1 agreement % | max abs dp | mean abs dp | shapes |")
    print("| --- | --- | --- | --- | --- | --- |")
    exact = None
    for multiple in (None, 8, 16, 32):
        backend = OnnxRuntimeBackend(served)
        classifier = Classifier(backend, served, default_scales=SCALES, shape_multiple=multiple)
        probs = classify_all(classifier, images)
        shapes = {rescaled_size(*i.size, q, multiple) for i in images for q in SCALES}
        if exact is None:
            exact = probs
        name = "exact" if multiple is None else f"multiple of {multiple}"
        compare(name, exact, probs, labels, str(len(shapes)))


def jpeg_draft(args, served, labels_of) -> None:
    config = synthetic.SyntheticConfig(classes=10)
    synthetic.SHORT_SIDES = (768, 960, 1152)  # photos: 6-9 times the largest Q
    datas, labels = [], []
    for index in range(args.jpeg_images):
        label = synthetic.label_of(index, config.classes)
        image, _ = synthetic.draw_image(label, synthetic.image_rng(1234, "val", index), config)
        datas.append(encode(image, "JPEG", quality=90))
        labels.append(labels_of[synthetic.CLASSES[label]])
    labels = np.array(labels)
    backend = OnnxRuntimeBackend(served)
    classifier = Classifier(backend, served, default_scales=SCALES)
    print(f"\nReduced-size JPEG decoding: {len(datas)} JPEGs, shorter side 768-1152, quality 90")
    print("| decoding | top-1 acc % | top-1 agreement % | max abs dp | mean abs dp | decode ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    variants = [("full", None)]
    variants += [(f"draft, shorter side >= {k} Q", k * max(SCALES)) for k in (4, 3, 2, 1)]
    # Interleaved per image, best of three: the machine's load drifts less between variants.
    decoded = {name: [] for name, _ in variants}
    times = {name: [] for name, _ in variants}
    for data in datas:
        for name, short in variants:
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                image = decode_image(data, draft_short_side=short)
                best = min(best, time.perf_counter() - started)
            decoded[name].append(image)
            times[name].append(best * 1e3)
    exact = classify_all(classifier, decoded["full"])
    for name, _ in variants:
        probs = exact if name == "full" else classify_all(classifier, decoded[name])
        compare(name, exact, probs, labels, f"{statistics.median(times[name]):.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "synthetic")
    parser.add_argument("--images", type=int, default=500, help="validation images (bucketing)")
    parser.add_argument("--jpeg-images", type=int, default=200, help="large JPEGs drawn")
    args = parser.parse_args(argv)
    served = read_repository(args.repository, list(MODELS))
    labels_of = {name: i for i, name in enumerate(served[MODELS[0]].labels)}
    print(f"demo models {', '.join(MODELS)} fused, dense Q = {SCALES} with flips")
    bucketing(args, served, labels_of)
    jpeg_draft(args, served, labels_of)
    return 0


if __name__ == "__main__":
    sys.exit(main())
