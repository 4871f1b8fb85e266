"""What a correct classify response looks like, checked against the request that produced it.

Pure functions: each returns a list of problems (empty when the body is right), so Locust can
fail a request with a message that says what was wrong, and tests can reuse the same rules.
With the image's per-view posteriors (:mod:`testkit.expected_posteriors`), the probabilities are
checked too: fused for the request's plan and compared class by class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from testkit.expected_posteriors import ImagePosteriors

TIMING_STAGES = ("decode", "preprocess", "inference", "total")
# Posteriors are float32 averaged in float64: top-k of a distribution sums to at most 1 + rounding.
PROBABILITY_SLACK = 1e-5


# The keys of every classify answer (a heat map only when asked).
RESPONSE_KEYS = frozenset(
    {"predictions", "per_model", "scales", "flip", "models", "mode", "image", "timing_ms"}
)


@dataclass(frozen=True)
class Expected:
    """What a request asked for, resolved against the server's defaults."""

    top_k: int
    scales: tuple[int, ...]
    flip: bool
    models: tuple[str, ...]
    mode: str
    heatmap: bool
    width: int
    height: int
    # The image's per-view posteriors: the probabilities are checked when given.
    posteriors: ImagePosteriors | None = None
    # The scales each model runs at (a request naming no scales: each model's own); None: every
    # model at ``scales``.
    model_scales: Mapping[str, tuple[int, ...]] | None = None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_predictions(predictions: Any, top_k: int, where: str) -> list[str]:
    """``top_k`` classes, each ``{index, label, probability}``, most probable first."""
    if not isinstance(predictions, list):
        return [f"{where}: expected a list, got {type(predictions).__name__}"]
    problems = []
    if len(predictions) != top_k:
        problems.append(f"{where}: {len(predictions)} classes, expected top_k={top_k}")
    probabilities = []
    for rank, item in enumerate(predictions):
        if not isinstance(item, dict) or set(item) != {"index", "label", "probability"}:
            problems.append(
                f"{where}[{rank}]: expected {{index, label, probability}}, got {item!r}"
            )
            continue
        if not isinstance(item["index"], int) or item["index"] < 0:
            problems.append(f"{where}[{rank}].index: {item['index']!r} is not a class index")
        if not isinstance(item["label"], str) or not item["label"]:
            problems.append(f"{where}[{rank}].label: {item['label']!r} is not a label")
        p = item["probability"]
        if not _is_number(p) or not 0 <= p <= 1:
            problems.append(f"{where}[{rank}].probability: {p!r} is not in [0, 1]")
        else:
            probabilities.append(p)
    if any(a < b for a, b in zip(probabilities, probabilities[1:], strict=False)):
        problems.append(f"{where}: probabilities are not in decreasing order: {probabilities}")
    if sum(probabilities) > 1 + PROBABILITY_SLACK:
        problems.append(f"{where}: probabilities sum to {sum(probabilities)} > 1")
    indices = [item.get("index") for item in predictions if isinstance(item, dict)]
    if len(set(indices)) != len(indices):
        problems.append(f"{where}: a class appears twice: {indices}")
    return problems


def check_classification(body: Any, expected: Expected, where: str = "body") -> list[str]:
    """Problems with one image's result (``POST /v1/classify`` or one entry of a batch)."""
    if not isinstance(body, dict):
        return [f"{where}: expected a JSON object, got {type(body).__name__}"]
    missing = RESPONSE_KEYS - set(body)
    if missing:
        return [f"{where}: missing {', '.join(sorted(missing))}"]
    problems = check_predictions(body["predictions"], expected.top_k, f"{where}.predictions")
    # The fused top-1 class, which a heat map must be of.
    top = None if problems else (body["predictions"][0]["index"], body["predictions"][0]["label"])
    per_model = body["per_model"]
    if not isinstance(per_model, dict) or tuple(per_model) != expected.models:
        problems.append(f"{where}.per_model: models {per_model!r:.80} != {list(expected.models)}")
    else:
        for name, predictions in per_model.items():
            problems += check_predictions(predictions, expected.top_k, f"{where}.per_model.{name}")
    for key, want in (
        ("scales", list(expected.scales)),
        ("flip", expected.flip),
        ("models", list(expected.models)),
        ("mode", expected.mode),
    ):
        if body[key] != want:
            problems.append(f"{where}.{key}: {body[key]!r}, asked for {want!r}")
    if body["image"] != {"width": expected.width, "height": expected.height}:
        problems.append(
            f"{where}.image: {body['image']!r}, uploaded {expected.width}x{expected.height}"
        )
    timing = body["timing_ms"]
    if not isinstance(timing, dict) or set(timing) != set(TIMING_STAGES):
        problems.append(f"{where}.timing_ms: expected {', '.join(TIMING_STAGES)}, got {timing!r}")
    elif not all(_is_number(v) and v >= 0 for v in timing.values()):
        problems.append(f"{where}.timing_ms: negative or non-numeric times {timing!r}")
    problems += _check_heatmap(body.get("heatmap"), expected, where, top)
    if expected.posteriors is not None and not problems:
        problems += check_probabilities(body, expected, where)
    return problems


def check_probabilities(body: dict[str, Any], expected: Expected, where: str = "body") -> list[str]:
    """The fused and per-model top-k of a well-formed body against the posteriors expected for
    the image under the request's plan (``expected.posteriors``), within their tolerance."""
    posteriors = expected.posteriors
    if posteriors is None:
        return []
    model_scales = expected.model_scales or {name: expected.scales for name in expected.models}
    model_scales = {name: model_scales[name] for name in expected.models}
    if not posteriors.covers(model_scales, expected.mode):
        return []  # computed without multi-crop views: only the structure is checked
    fused, per_model = posteriors.fuse(model_scales, expected.flip, expected.mode)
    labels = posteriors.labels[expected.models[0]]
    problems = compare_top_k(
        body["predictions"], fused, labels, posteriors.tolerance, f"{where}.predictions"
    )
    for name, predictions in body["per_model"].items():
        problems += compare_top_k(
            predictions,
            per_model[name],
            posteriors.labels[name],
            posteriors.tolerance,
            f"{where}.per_model.{name}",
        )
    return problems


def compare_top_k(
    predictions: list[dict[str, Any]],
    probabilities: np.ndarray,
    labels: tuple[str, ...],
    tolerance: float,
    where: str,
) -> list[str]:
    """Well-formed top-k ``predictions`` against the expected posterior ``probabilities`` (C,).

    Rank r's probability must be the r-th largest expected one, and the class named there must
    have that probability, both within ``tolerance``: classes whose probabilities are within the
    tolerance of each other may come in either order, any other swap, missing or foreign class,
    and any probability off by more than the tolerance is a problem. Each label must be its
    class's.
    """
    ranked = np.sort(probabilities)[::-1]
    problems = []
    for rank, item in enumerate(predictions):
        index, probability, label = item["index"], item["probability"], item["label"]
        if index >= len(probabilities):
            problems.append(f"{where}[{rank}].index: {index}, the model has {len(labels)} classes")
            continue
        if abs(probability - ranked[rank]) > tolerance:
            problems.append(
                f"{where}[{rank}].probability: {probability:.9f}, expected the rank-{rank + 1} "
                f"probability {ranked[rank]:.9f} (bound {tolerance:.1e})"
            )
        elif abs(probability - probabilities[index]) > tolerance:
            problems.append(
                f"{where}[{rank}]: class {index} at probability {probability:.9f}, but its "
                f"expected probability is {probabilities[index]:.9f} (bound {tolerance:.1e})"
            )
        if label != labels[index]:
            problems.append(f"{where}[{rank}].label: {label!r}, class {index} is {labels[index]!r}")
    return problems


def _check_heatmap(
    heatmap: Any, expected: Expected, where: str, top: tuple[Any, Any] | None
) -> list[str]:
    """The heat map asked for, of the stated shape, for ``top`` (the fused top-1 class's index
    and label, when the predictions are well formed)."""
    if not expected.heatmap:
        return [] if heatmap is None else [f"{where}.heatmap: present but not asked for"]
    if not isinstance(heatmap, dict):
        return [f"{where}.heatmap: asked for, got {heatmap!r:.80}"]
    problems = []
    if top is not None and (heatmap.get("index"), heatmap.get("label")) != top:
        problems.append(
            f"{where}.heatmap: class {heatmap.get('index')!r} {heatmap.get('label')!r}, the fused "
            f"top-1 is {top[0]!r} {top[1]!r}"
        )
    if heatmap.get("scale") != max(expected.scales):
        problems.append(f"{where}.heatmap.scale: {heatmap.get('scale')!r}, expected the largest Q")
    rows = heatmap.get("scores")
    width, height = heatmap.get("width"), heatmap.get("height")
    if (
        not isinstance(rows, list)
        or not isinstance(width, int)
        or len(rows) != height
        or any(not isinstance(row, list) or len(row) != width for row in rows)
        or not all(_is_number(v) for row in rows for v in row)
    ):
        problems.append(f"{where}.heatmap.scores: not {height} rows of {width} numbers")
    return problems


def check_batch(body: Any, expected: list[tuple[str, Expected]]) -> list[str]:
    """Problems with a ``POST /v1/classify/batch`` body: one result per file, in upload order."""
    if not isinstance(body, dict) or not isinstance(body.get("results"), list):
        return [f"batch: expected {{'results': [...]}}, got {body!r:.100}"]
    results = body["results"]
    if len(results) != len(expected):
        return [f"batch: {len(results)} results for {len(expected)} files"]
    problems = []
    for index, (result, (filename, want)) in enumerate(zip(results, expected, strict=True)):
        where = f"results[{index}]"
        if not isinstance(result, dict) or result.get("filename") != filename:
            problems.append(f"{where}: filename {result.get('filename')!r}, sent {filename!r}")
            continue
        if "error" in result:
            problems.append(f"{where}: {filename} failed: {result['error']!r}")
            continue
        problems += check_classification(result, want, where)
    return problems
