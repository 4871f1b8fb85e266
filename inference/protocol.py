"""The paper's test-time protocol as pure functions (Simonyan & Zisserman, section 3.2).

Rescale so the shorter side is Q; run the image and its horizontal flip as one uint8 batch;
spatially average the class score map and soft-max it (inside the exported graph); average the
posteriors over flips, then over scales, then over models. Multi-crop evaluation (Table 5) takes a
5x5 grid of training-size crops with flips per scale. Both the per-request
:class:`~inference.classifier.Classifier` and the many-image :mod:`inference.evaluation` build
their batches and fuse their posteriors with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

DEFAULT_SCALES: tuple[int, ...] = (256, 384, 512)
# The paper's training crop; DEFAULT_SCALES are the paper's test scales for it.
PAPER_CROP = 224
MULTICROP_GRID = 5
# Dense evaluation, multi-crop evaluation, or both averaged (paper Table 5).
MODES = ("dense", "multicrop", "both")


def serving_scales(crop: int) -> tuple[int, ...]:
    """The scales Q a model trained on ``crop``-sized crops is served at by default.

    The paper's Q = 256,384,512 for 224 crops; otherwise the crop x1, x1.5, x2 (Smin, the
    middle and Smax of scale jittering in [crop, 2 crop]: the demo models' 64,96,128).
    """
    if crop == PAPER_CROP:
        return DEFAULT_SCALES
    return (crop, crop * 3 // 2, crop * 2)


def format_scales(scales: Sequence[int]) -> str:
    """(256, 384, 512) -> ``"256,384,512"``, the form flags and config parameters use."""
    return ",".join(str(q) for q in scales)


def parse_scales(text: str) -> tuple[int, ...]:
    """``"256,384,512"`` -> (256, 384, 512); raises ``ValueError`` saying what to give."""
    items = [item.strip() for item in text.split(",")]
    # isascii: str.isdigit also accepts digits such as "²" that int() refuses.
    if all(item.isascii() and item.isdigit() and int(item) > 0 for item in items):
        return tuple(int(item) for item in items)
    raise ValueError(
        f"{text!r} is not a comma-separated list of positive integers (e.g. 256,384,512)"
    )


def rescaled_size(width: int, height: int, q: int, multiple: int | None = None) -> tuple[int, int]:
    """(width, height) with the shorter side Q and the longer ``floor(long * Q / short + 0.5)``.

    ``multiple`` (shape bucketing, off by default) rounds the longer side to the nearest
    multiple of it (at least Q): a stream of photos then makes a few input shapes instead of one
    per aspect ratio, at the cost of a slight stretch (at most ``multiple / 2`` pixels).
    """
    short, long = (width, height) if width <= height else (height, width)
    side = int(np.floor(long * q / short + 0.5))
    if multiple:
        side = max(q, multiple * int(np.floor(side / multiple + 0.5)))
    return (q, side) if width <= height else (side, q)


def rescale_shorter_side(image: Image.Image, q: int, multiple: int | None = None) -> Image.Image:
    """Resize so the shorter side is ``q`` (Pillow bilinear, as the protocol prescribes)."""
    return image.resize(rescaled_size(*image.size, q, multiple), Image.Resampling.BILINEAR)


def to_chw(image: Image.Image) -> np.ndarray:
    """RGB ``PIL.Image`` to a uint8 (3, H, W) array."""
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def with_flip(views: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (2N, 3, H, W): the views followed by their horizontal flips."""
    return np.ascontiguousarray(np.concatenate([views, views[..., ::-1]], axis=0))


def dense_batch(
    image: Image.Image, q: int, flip: bool = True, multiple: int | None = None
) -> np.ndarray:
    """The uint8 batch for one (model, Q): ``[x, flip(x)]`` (or ``[x]``), shape (1|2, 3, H, W)."""
    views = to_chw(rescale_shorter_side(image, q, multiple))[None]
    return with_flip(views) if flip else views


def crop_offsets(length: int, crop: int, grid: int = MULTICROP_GRID) -> list[int]:
    """``grid`` evenly spaced crop starts along one side, first and last at the borders.

    Fractional starts are rounded with Python's ``round`` (halves to even), as torchvision's
    ``center_crop`` rounds its offset.
    """
    if length <= crop:
        return [0] * grid
    return [int(round(i * (length - crop) / (grid - 1))) for i in range(grid)]


def multicrop_batch(
    image: Image.Image, q: int, crop: int, flip: bool = True, grid: int = MULTICROP_GRID
) -> np.ndarray:
    """A ``grid x grid`` set of ``crop``-sized crops of the rescaled image (+ flips): (25|50, 3, c, c)."""
    array = to_chw(rescale_shorter_side(image, q))
    _, height, width = array.shape
    crops = [
        array[:, top : top + crop, left : left + crop]
        for top in crop_offsets(height, crop, grid)
        for left in crop_offsets(width, crop, grid)
    ]
    views = np.stack(crops)
    return with_flip(views) if flip else views


def average_posteriors(posteriors: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of several (C,) or (N, C) posteriors along the first axis of their stack."""
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in posteriors]), axis=0)


def mean_over_views(probs: np.ndarray, views_per_image: int) -> np.ndarray:
    """(N * V, C) posteriors of V views per image (the image and its flip, or every crop and its
    flip) -> (N, C), each image's views averaged, in float64."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs.reshape(-1, views_per_image, probs.shape[-1]).mean(axis=1)


@dataclass
class ScalePosteriors:
    """One model's posteriors of N images at each scale Q, each averaged over its views.

    ``dense[q]`` (N, C): dense evaluation at Q, averaged over the flip; ``multicrop[q]`` (N, C):
    the 5x5 crops at Q and their flips, averaged. :meth:`combine` fuses them as the paper does.
    """

    dense: dict[int, np.ndarray] = field(default_factory=dict)
    multicrop: dict[int, np.ndarray] = field(default_factory=dict)

    def combine(self, scales: Sequence[int], mode: str = "dense") -> np.ndarray:
        """(N, C): averaged over ``scales``, then over dense and multi-crop for mode "both"
        (paper Table 5)."""
        parts = []
        if mode in ("dense", "both"):
            parts.append(average_posteriors([self.dense[q] for q in scales]))
        if mode in ("multicrop", "both"):
            parts.append(average_posteriors([self.multicrop[q] for q in scales]))
        if not parts:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        return average_posteriors(parts)


def top_k(probabilities: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The ``k`` most probable classes as (index, probability), most probable first.

    Ties keep the lower class index first, so results are stable.
    """
    k = min(k, probabilities.shape[-1])
    order = np.lexsort((np.arange(probabilities.shape[-1]), -probabilities))[:k]
    return [(int(i), float(probabilities[i])) for i in order]
