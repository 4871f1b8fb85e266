"""Dense multi-scale classification of one image over one or several models, on any backend.

Per model and scale Q, one uint8 batch ``[x, flip(x)]`` goes to the backend, which returns the
posterior of each view (soft-max of the spatially averaged score map). Posteriors are averaged
over flips, then scales, then models. All (model, Q) runs of one request are in flight together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from inference.backends.base import Backend
from inference.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from inference.protocol import (
    MODES,
    ScalePosteriors,
    average_posteriors,
    dense_batch,
    mean_over_views,
    multicrop_batch,
    rescaled_size,
    top_k,
)
from inference.repository import ModelEntry

DEFAULT_TOP_K = 5
MAX_SCALE = 1024
# A rescaled view larger than this is refused: a 20000x20 strip at Q=512 would be 262 MP.
DEFAULT_MAX_RESCALED_PIXELS = 4_000_000


class OptionError(ValueError):
    """A request parameter that cannot be honoured; ``parameter`` names it (HTTP 422)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter


class ExtremeAspectRatio(ImageError):
    """The image would be too large once its shorter side is rescaled to Q (HTTP 422)."""

    kind = "unprocessable"


@dataclass(frozen=True)
class ClassifyOptions:
    """What one request asks for; ``None`` means the classifier's default."""

    scales: tuple[int, ...] | None = None  # None: each model's serving scales
    flip: bool = True
    models: tuple[str, ...] | None = None
    top_k: int | None = None  # None: 5, or every class of a model with fewer
    heatmap: bool = False
    mode: str = "dense"
    # Filled in by Classifier.resolve: the scales each model runs at (``scales`` is then their
    # union, what the response reports).
    model_scales: Mapping[str, tuple[int, ...]] | None = None


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Heatmap:
    """Class score map of the fused top-1 class at the largest Q (unflipped orientation)."""

    index: int
    label: str
    scale: int
    scores: np.ndarray  # (h, w), raw class scores averaged over flips and models


@dataclass
class Classification:
    predictions: list[Prediction]
    per_model: dict[str, list[Prediction]]
    # Every class's posterior; None where only the top-k came back (Triton's classify model).
    probabilities: np.ndarray | None
    per_model_probabilities: dict[str, np.ndarray] | None
    scales: tuple[int, ...]
    flip: bool
    models: tuple[str, ...]
    mode: str
    image_size: tuple[int, int]
    heatmap: Heatmap | None = None
    timing_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Views:
    """The uint8 batches of one image: ``dense[q]`` (1|2, 3, H, W) and ``multicrop[(q, crop)]``
    (25|50, 3, crop, crop), with the image's (width, height) and the time they took."""

    dense: dict[int, np.ndarray]
    multicrop: dict[tuple[int, int], np.ndarray]
    image_size: tuple[int, int]
    preprocess_ms: float = 0.0


class Classifier:
    """The protocol over a backend and the models it serves.

    ``backend`` may be None where only options are resolved and views prepared (the driver and
    the CPU tasks of a distributed job); classifying needs one.
    """

    def __init__(
        self,
        backend: Backend | None,
        models: Mapping[str, ModelEntry],
        default_scales: Sequence[int] | None = None,
        max_rescaled_pixels: int = DEFAULT_MAX_RESCALED_PIXELS,
        shape_multiple: int | None = None,
    ) -> None:
        if not models:
            raise ValueError("a classifier needs at least one model")
        if shape_multiple is not None and shape_multiple < 1:
            raise ValueError(f"shape_multiple must be positive, got {shape_multiple}")
        self.backend = backend
        self.models = dict(models)
        self.max_rescaled_pixels = max_rescaled_pixels
        # None: each model's own serving scales (its config.pbtxt); else these for every model.
        self.default_scales = tuple(default_scales) if default_scales else None
        self.shape_multiple = shape_multiple  # None: exact rescaling (the paper's protocol)
        self.resolve(ClassifyOptions())  # the defaults themselves must be valid

    def resolve(self, options: ClassifyOptions) -> ClassifyOptions:
        """Fill in defaults and check every parameter; raises :class:`OptionError`."""
        names = tuple(options.models) if options.models else tuple(self.models)
        unknown = [n for n in names if n not in self.models]
        if unknown:
            raise OptionError(
                "models", f"unknown model {', '.join(unknown)}; available: {', '.join(self.models)}"
            )
        if len(set(names)) != len(names):
            raise OptionError("models", "a model is listed twice")
        labels = {self.models[n].labels for n in names}
        if len(labels) > 1:
            raise OptionError("models", "these models have different classes and cannot be fused")
        if options.model_scales is not None and options.scales:  # resolved before
            model_scales = {n: tuple(options.model_scales[n]) for n in names}
        else:
            given = tuple(options.scales or ()) or self.default_scales
            model_scales = {n: given or self.models[n].scales for n in names}
        for scales in set(model_scales.values()):
            using = [n for n in names if model_scales[n] == scales]
            min_size = max(self.models[n].min_size for n in using)
            for q in scales:
                if not min_size <= q <= MAX_SCALE:
                    raise OptionError(
                        "scales",
                        f"Q={q} is outside [{min_size}, {MAX_SCALE}] (the smallest input "
                        f"{', '.join(using)} accept{'s' if len(using) == 1 else ''} is {min_size})",
                    )
            if len(set(scales)) != len(scales):
                raise OptionError("scales", "a scale is listed twice")
        distinct = set(model_scales.values())
        scales = (
            next(iter(distinct)) if len(distinct) == 1 else tuple(sorted(set().union(*distinct)))
        )
        num_classes = self.models[names[0]].num_classes
        k = min(DEFAULT_TOP_K, num_classes) if options.top_k is None else options.top_k
        if not 1 <= k <= num_classes:
            raise OptionError("top_k", f"must be between 1 and {num_classes}, got {k}")
        if options.mode not in MODES:
            raise OptionError("mode", f"must be one of {', '.join(MODES)}, got {options.mode!r}")
        return ClassifyOptions(
            scales=scales,
            flip=options.flip,
            models=names,
            top_k=k,
            heatmap=options.heatmap,
            mode=options.mode,
            model_scales=model_scales,
        )

    def check_image(self, image_size: tuple[int, int], scales: Sequence[int]) -> None:
        """Refuse images whose rescaled views would be unreasonably large."""
        width, height = rescaled_size(*image_size, max(scales), self.shape_multiple)
        if width * height > self.max_rescaled_pixels:
            raise ExtremeAspectRatio(
                f"the image is {image_size[0]}x{image_size[1]}; rescaled to Q={max(scales)} it "
                f"would be {width}x{height} pixels, over the limit of "
                f"{self.max_rescaled_pixels:,}. Crop it to a less extreme aspect ratio or use "
                "smaller scales"
            )

    async def classify_file(
        self,
        data: bytes,
        options: ClassifyOptions,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        jpeg_draft: bool = False,
        executor: Executor | None = None,
    ) -> Classification:
        """Fused top-k for one encoded file: decoded (in ``executor``, off the event loop), then
        :meth:`classify`. ``jpeg_draft``: a large JPEG decodes at reduced size, never below
        twice the largest Q. Raises :class:`~inference.images.ImageError` for a bad file."""
        opts = self.resolve(options)
        started = time.perf_counter()
        draft = 2 * max(opts.scales) if jpeg_draft else None
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(executor, decode_image, data, max_pixels, draft)
        decoded = time.perf_counter()
        result = await self.classify(image, opts)
        result.timing_ms["decode"] = (decoded - started) * 1e3
        return result

    async def classify(self, image: Image.Image, options: ClassifyOptions) -> Classification:
        """Fused top-k for one RGB image."""
        opts = self.resolve(options)
        self.check_image(image.size, opts.scales)
        # One worker thread per request rescales its scales, off the event loop; requests run in
        # parallel. A thread per scale made RSS creep (+16% over 300 requests, bench/memory.py).
        views = await asyncio.to_thread(self.prepare, image, opts)
        return await self.classify_views(views, opts)

    def prepare(self, image: Image.Image, options: ClassifyOptions) -> Views:
        """The uint8 batches ``options`` (resolved) run for ``image``: CPU work, no backend.

        A distributed job calls this in CPU tasks and :meth:`classify_views` where the engine is.
        """
        started = time.perf_counter()
        opts = options
        largest = max(opts.scales)
        if opts.mode != "multicrop":
            dense_scales = list(opts.scales)
        else:  # multi-crop alone needs the dense view only for a heatmap
            dense_scales = [largest] if opts.heatmap else []
        multi_keys = (
            sorted(
                {(q, self.models[n].min_size) for n in opts.models for q in opts.model_scales[n]}
            )
            if opts.mode != "dense"
            else []
        )
        dense = {q: dense_batch(image, q, opts.flip, self.shape_multiple) for q in dense_scales}
        multi = {(q, c): multicrop_batch(image, q, c, opts.flip) for q, c in multi_keys}
        return Views(dense, multi, image.size, (time.perf_counter() - started) * 1e3)

    async def classify_views(self, views: Views, options: ClassifyOptions) -> Classification:
        """Fused top-k from the batches :meth:`prepare` made with the same (resolved) options;
        every (model, Q) batch is in flight at once."""
        opts = options
        names, scales = opts.models, opts.scales
        largest = max(scales)
        dense, multi = views.dense, views.multicrop
        prepared = time.perf_counter()

        jobs: list[tuple[str, str, int]] = []  # (model, kind, Q)
        calls = []
        for name in names:
            crop = self.models[name].min_size
            for q in opts.model_scales[name]:
                wants_map = opts.heatmap and q == largest
                if opts.mode in ("dense", "both") or wants_map:
                    outputs = ("probs", "scores") if wants_map else ("probs",)
                    jobs.append((name, "dense", q))
                    calls.append(self.backend.infer(name, dense[q], outputs))
                if opts.mode in ("multicrop", "both"):
                    jobs.append((name, "multicrop", q))
                    calls.append(self.backend.infer(name, multi[(q, crop)], ("probs",)))
        results = await asyncio.gather(*calls)
        inferred = time.perf_counter()

        per_model_probs: dict[str, np.ndarray] = {}
        maps: list[np.ndarray] = []
        for name in names:
            posteriors = ScalePosteriors()
            for (job_model, kind, q), out in zip(jobs, results, strict=True):
                if job_model == name:
                    # Over the views: the flip, or every crop and its flip.
                    getattr(posteriors, kind)[q] = mean_over_views(out["probs"], len(out["probs"]))
                    if "scores" in out:
                        maps.append(out["scores"])
            # Over scales, then dense + multi-crop (a dense run made only for the heatmap of
            # mode "multicrop" is left out here).
            per_model_probs[name] = posteriors.combine(opts.model_scales[name], opts.mode)[0]
        fused = average_posteriors(list(per_model_probs.values()))  # over models

        labels = self.models[names[0]].labels

        def predictions(probs: np.ndarray) -> list[Prediction]:
            return [Prediction(i, labels[i], p) for i, p in top_k(probs, opts.top_k)]

        heatmap = None
        if opts.heatmap:
            best = top_k(fused, 1)[0][0]
            heatmap = Heatmap(best, labels[best], largest, _class_map(maps, best, opts.flip))
        finished = time.perf_counter()
        return Classification(
            predictions=predictions(fused),
            per_model={n: predictions(p) for n, p in per_model_probs.items()},
            probabilities=fused,
            per_model_probabilities=per_model_probs,
            scales=scales,
            flip=opts.flip,
            models=names,
            mode=opts.mode,
            image_size=views.image_size,
            heatmap=heatmap,
            timing_ms={
                "preprocess": views.preprocess_ms,
                "inference": (inferred - prepared) * 1e3,
                "fusion": (finished - inferred) * 1e3,
            },
        )


def _class_map(maps: list[np.ndarray], index: int, flip: bool) -> np.ndarray:
    """One class's score map averaged over the flip (mirrored back) and over models."""
    per_model = []
    for scores in maps:
        plane = scores[0, index].astype(np.float64)
        if flip:
            plane = (plane + scores[1, index, :, ::-1]) / 2
        per_model.append(plane)
    same_shape = [m for m in per_model if m.shape == per_model[0].shape]
    return np.mean(same_shape, axis=0)
