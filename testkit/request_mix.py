"""The request mix of a load test: which endpoint, which files and which query parameters.

Drawn the way clients of the API use it: mostly the defaults, sometimes fewer scales, one
model, no flip, a different ``top_k``, now and then a heat map or the costlier multi-crop
modes. Everything is chosen from what ``GET /v1/models`` says the server serves, so the same mix
works against the small test models and against full-size VGG-16/19.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from testkit.checks import Expected
from testkit.images import Upload

if TYPE_CHECKING:
    from testkit.expected_posteriors import ImagePosteriors

# Weights of the modes: multi-crop runs 25 crops per scale, ~5x the work of dense.
MODES = (("dense", 85), ("multicrop", 10), ("both", 5))
BATCH_SIZES = (2, 3, 4)


@dataclass(frozen=True)
class ServerInfo:
    """What the server serves, from ``GET /v1/models``."""

    models: tuple[str, ...]
    classes: int
    default_scales: tuple[int, ...]
    # Each model's own serving scales (what it runs at when a request names none).
    model_scales: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def server_info(body: dict[str, Any]) -> ServerInfo:
    """Parse a ``GET /v1/models`` body; raises ``ValueError`` if it cannot be used."""
    try:
        models = tuple(entry["name"] for entry in body["models"])
        classes = min(int(entry["classes"]) for entry in body["models"])
        scales = tuple(int(q) for q in body["default_scales"])
        model_scales = {
            entry["name"]: tuple(int(q) for q in entry.get("scales") or scales)
            for entry in body["models"]
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unexpected /v1/models body ({exc!r}): {body!r:.200}") from None
    if not models or not scales:
        raise ValueError(f"the server serves no models or no scales: {body!r:.200}")
    return ServerInfo(models, classes, scales, model_scales)


@dataclass(frozen=True)
class Plan:
    """One request's query parameters and what they resolve to on the server."""

    params: dict[str, str]
    top_k: int
    scales: tuple[int, ...]
    flip: bool
    models: tuple[str, ...]
    mode: str
    heatmap: bool
    # The scales each chosen model runs at: ``scales`` when the request names them, else each
    # model's own (None: every model at ``scales``).
    model_scales: Mapping[str, tuple[int, ...]] | None = None

    def expected(self, upload: Upload, posteriors: ImagePosteriors | None = None) -> Expected:
        """What a correct answer for ``upload`` under this plan looks like; with the image's
        ``posteriors``, its probabilities too."""
        return Expected(
            top_k=self.top_k,
            scales=self.scales,
            flip=self.flip,
            models=self.models,
            mode=self.mode,
            heatmap=self.heatmap,
            width=upload.width,
            height=upload.height,
            posteriors=posteriors,
            model_scales=self.model_scales,
        )


def choose_plan(rng: random.Random, info: ServerInfo) -> Plan:
    """A realistic set of query parameters (each omitted most of the time: the defaults)."""
    params: dict[str, str] = {}
    top_k = 5  # the server's default, valid when there are at least 5 classes
    if rng.random() < 0.4 or info.classes < top_k:
        top_k = min(rng.choice((1, 3, 10, 20)), info.classes)
        params["top_k"] = str(top_k)
    scales = info.default_scales
    if rng.random() < 0.4:
        count = rng.randint(1, len(info.default_scales))
        scales = tuple(sorted(rng.sample(info.default_scales, count)))
        params["scales"] = ",".join(map(str, scales))
    flip = True
    if rng.random() < 0.25:
        flip = False
        params["flip"] = "false"
    models = info.models
    if len(info.models) > 1 and rng.random() < 0.4:
        models = (rng.choice(info.models),)
        params["models"] = models[0]
    heatmap = rng.random() < 0.1
    if heatmap:
        params["heatmap"] = "true"
    mode = rng.choices([m for m, _ in MODES], weights=[w for _, w in MODES])[0]
    if mode != "dense":
        params["mode"] = mode
    if "scales" in params:
        model_scales = {name: scales for name in models}
    else:
        model_scales = {name: info.model_scales.get(name, scales) for name in models}
        # The server reports the chosen models' scales, their union when they differ.
        distinct = set(model_scales.values())
        scales = (
            next(iter(distinct)) if len(distinct) == 1 else tuple(sorted(set().union(*distinct)))
        )
    return Plan(params, top_k, scales, flip, models, mode, heatmap, model_scales)


def choose_uploads(rng: random.Random, images: list[Upload], count: int) -> list[Upload]:
    """``count`` distinct files of the set (a batch never repeats a file)."""
    return rng.sample(images, min(count, len(images)))
