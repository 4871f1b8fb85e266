"""Many images through the paper's protocol at once: validation sets, int8 checks, benchmarks.

The views are the ones the :class:`~inference.classifier.Classifier` sends for each request
(:func:`~inference.protocol.dense_batch`, :func:`~inference.protocol.multicrop_batch`) and the
posteriors are fused by the same code (:class:`~inference.protocol.ScalePosteriors`). Only the
scheduling differs: at each (model, Q) the views of all images that share a shape run together,
in image order, in runs of bounded size, synchronously. So a data set scores as the server
scores each of its images (within float rounding of the batch composition), and the result
does not depend on timing.

    backend = OnnxRuntimeBackend(read_repository("model_repository"))
    posteriors = collect(backend, "vgg16", images, scales=(256, 384, 512), crop=224)
    probs = posteriors.combine((256, 384, 512))              # (N, C), dense with flips
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image

from inference.protocol import (
    MODES,
    MULTICROP_GRID,
    ScalePosteriors,
    dense_batch,
    mean_over_views,
    multicrop_batch,
    rescaled_size,
)

# Input pixels (N x H x W) of one run: bounds the activations of full-size nets at Q = 512.
MAX_RUN_PIXELS = 1 << 22
MAX_RUN_VIEWS = 256


class SyncBackend(Protocol):
    """A backend with a synchronous ``run`` (ONNX Runtime, PyTorch; see inference.backends)."""

    def run(
        self, model: str, images: np.ndarray, outputs: Sequence[str] = ("probs",)
    ) -> dict[str, np.ndarray]: ...


def run_in_chunks(backend: SyncBackend, model: str, views: np.ndarray) -> np.ndarray:
    """Posteriors (N, C) float64 of a uint8 (N, 3, H, W) batch, in runs of bounded size."""
    pixels = views.shape[2] * views.shape[3]
    step = max(1, min(MAX_RUN_VIEWS, MAX_RUN_PIXELS // pixels))
    runs = [
        backend.run(model, views[start : start + step], ("probs",))["probs"]
        for start in range(0, len(views), step)
    ]
    return np.concatenate(runs).astype(np.float64)


def dense_posteriors(
    backend: SyncBackend,
    model: str,
    images: Sequence[Image.Image],
    scale: int,
    flip: bool = True,
    multiple: int | None = None,
) -> np.ndarray:
    """(N, C): each image's dense posterior at one Q, averaged over its flip.

    Images whose rescaled sizes are equal run as one batch (split by :func:`run_in_chunks`).
    """
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        groups[rescaled_size(*image.size, scale, multiple)].append(index)
    result: np.ndarray | None = None
    for indices in groups.values():
        views = np.concatenate([dense_batch(images[i], scale, flip, multiple) for i in indices])
        probs = mean_over_views(run_in_chunks(backend, model, views), 2 if flip else 1)
        if result is None:
            result = np.zeros((len(images), probs.shape[1]))
        result[indices] = probs
    if result is None:
        raise ValueError("no images to evaluate")
    return result


def multicrop_posteriors(
    backend: SyncBackend,
    model: str,
    images: Sequence[Image.Image],
    scale: int,
    crop: int,
    flip: bool = True,
) -> np.ndarray:
    """(N, C): each image's 5x5 grid of ``crop`` crops at one Q (with flips), averaged."""
    if not images:
        raise ValueError("no images to evaluate")
    per_image = MULTICROP_GRID * MULTICROP_GRID * (2 if flip else 1)
    # Every crop has the same shape: as many whole images per run as the run size allows.
    images_per_run = max(1, MAX_RUN_PIXELS // (crop * crop * per_image))
    rows = []
    for start in range(0, len(images), images_per_run):
        chunk = images[start : start + images_per_run]
        views = np.concatenate([multicrop_batch(image, scale, crop, flip) for image in chunk])
        rows.append(mean_over_views(run_in_chunks(backend, model, views), per_image))
    return np.concatenate(rows)


def collect(
    backend: SyncBackend,
    model: str,
    images: Sequence[Image.Image],
    scales: Sequence[int],
    crop: int | None = None,
    mode: str = "dense",
    flip: bool = True,
    multiple: int | None = None,
) -> ScalePosteriors:
    """One model's posteriors of ``images`` at every Q of ``scales``: dense, multi-crop (5x5
    grid of ``crop`` crops: the model's training crop, needed for that mode) or both, as
    ``mode`` asks.

    ``collect(...).combine(scales, mode)`` is what the server answers for each image (fused
    over flips and scales); average several models' results for fusion.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "dense" and crop is None:
        raise ValueError(f"mode {mode!r} needs the crop size (the model's training crop)")
    posteriors = ScalePosteriors()
    for q in dict.fromkeys(scales):  # each Q once, in the order given
        if mode in ("dense", "both"):
            posteriors.dense[q] = dense_posteriors(backend, model, images, q, flip, multiple)
        if mode in ("multicrop", "both"):
            posteriors.multicrop[q] = multicrop_posteriors(backend, model, images, q, crop, flip)
    return posteriors
