"""The posteriors a correct server answers for known images, computed once in this process.

For each image, model and scale Q, the views the server runs (``inference.protocol``'s
``dense_batch`` and ``multicrop_batch``) go through the same graph with ONNX Runtime here, and
four posteriors are kept: the dense view, its flip, the 25 crops averaged and their 25 flips
averaged. Any request plan (a subset of the scales, flip on or off, one model or the fusion,
dense, multi-crop or both) is a simple mean of these: :meth:`ImagePosteriors.fuse` takes it,
written apart from inference's fusion code, and :mod:`testkit.checks` compares a response's
probabilities with the result, within :attr:`ImagePosteriors.tolerance`.

    python -m testkit.expected_posteriors --host http://127.0.0.1:8080 \\
        --repository model_repository --out expected.json   # then: locust ... --expected-posteriors expected.json

Imports numpy at module import time only; ONNX Runtime and the product's ``inference`` package
are imported by the functions that compute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from testkit.images import Upload, build_image_set

# The four posteriors kept per (image, model, Q).
VIEWS = ("dense", "dense_flip", "multicrop", "multicrop_flip")
MODES = ("dense", "multicrop")
FORMAT = 1
FLOAT32_EPSILON = float(np.finfo(np.float32).eps)  # 2**-23, one unit of float32 rounding at 1
# Units of float32 rounding, relative to the largest class score, by which a differently
# batched run of a 16- or 19-layer VGG may move a logit (see tolerance_for).
ROUNDINGS_PER_LOGIT = 64
# The output probabilities are float32 themselves: half a unit at 1, with margin.
OUTPUT_ROUNDING = 8 * FLOAT32_EPSILON
# Input pixels (N x H x W) of one run, as inference.evaluation bounds them.
MAX_RUN_PIXELS = 1 << 22


def tolerance_for(largest_score: float) -> float:
    """How far a server's probability may be from the one computed here, for views whose
    largest class score (raw, before the soft-max) is ``largest_score`` in magnitude.

    The server and this computation run the same graph on the same uint8 views; only the batch
    a view runs in differs (the image alone or with its flip, 25 crops or 50, other requests'
    views in a Triton run), and with it, at most, the order of float32 sums inside the kernels.
    A reordered float32 sum differs by a few units of rounding (eps = 2**-23) of the magnitudes
    summed; over the 16 or 19 layers of a VGG that is well under ``ROUNDINGS_PER_LOGIT`` = 64
    units of the largest class score ``s``, so a logit (the spatial mean of the score map)
    moves by at most ``delta = 64 eps |s|``. The soft-max passes that to a probability as at
    most ``delta / 2`` (dp_i/dz_j = p_i (1[i=j] - p_j), so |dp_i| <= 2 p_i (1 - p_i) delta),
    and the means over views, scales and models keep the bound. So: ``32 eps |s|``, and never
    less than the rounding of the float32 probabilities themselves. For the small test models
    (|s| about 0.7 to 1.2) that is 2.7e-6 to 4.4e-6; measured: batches of 1, 2, 4, 25 and 50
    views, on 1 or 2 threads, differ by at most 1.5e-8 (one float32 unit at 0.1 to 0.25).
    """
    return max(OUTPUT_ROUNDING, ROUNDINGS_PER_LOGIT * FLOAT32_EPSILON * abs(largest_score) / 2)


def fingerprint(data: bytes) -> str:
    """The SHA-256 of a file, so posteriors are never compared against other bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ImagePosteriors:
    """One image's per-view posteriors: ``views[model][q][view]`` is a (C,) float64 array
    (``view`` one of :data:`VIEWS`; the multi-crop ones only when computed)."""

    views: Mapping[str, Mapping[int, Mapping[str, np.ndarray]]]
    labels: Mapping[str, tuple[str, ...]]
    tolerance: float
    width: int
    height: int

    def fuse(
        self, model_scales: Mapping[str, Sequence[int]], flip: bool, mode: str
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(fused, {model: posterior}) for a request plan: per model the mean over the flip,
        then over its scales, then over dense and multi-crop ("both"); fused is the mean over
        the models. Raises ``KeyError`` for a model, scale or view that was not computed."""
        kinds = {"dense": ("dense",), "multicrop": ("multicrop",), "both": ("dense", "multicrop")}
        per_model = {}
        for name, scales in model_scales.items():
            parts = []
            for kind in kinds[mode]:
                at_scales = []
                for q in scales:
                    views = self.views[name][q]
                    if flip:
                        at_scales.append((views[kind] + views[kind + "_flip"]) / 2)
                    else:
                        at_scales.append(views[kind])
                parts.append(sum(at_scales) / len(at_scales))
            per_model[name] = sum(parts) / len(parts)
        fused = sum(per_model.values()) / len(per_model)
        return fused, per_model

    def as_json(self) -> dict[str, Any]:
        """The JSON form (see :meth:`ExpectedPosteriors.save`)."""
        return {
            "width": self.width,
            "height": self.height,
            "tolerance": self.tolerance,
            "posteriors": {
                name: {
                    str(q): {view: values.tolist() for view, values in views.items()}
                    for q, views in per_scale.items()
                }
                for name, per_scale in self.views.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], labels: Mapping[str, tuple[str, ...]]):
        """Inverse of :meth:`as_json`."""
        views = {
            name: {
                int(q): {view: np.asarray(values, dtype=np.float64) for view, values in at.items()}
                for q, at in per_scale.items()
            }
            for name, per_scale in data["posteriors"].items()
        }
        return cls(views, labels, float(data["tolerance"]), data["width"], data["height"])

    def covers(self, model_scales: Mapping[str, Sequence[int]], mode: str) -> bool:
        """Whether :meth:`fuse` can answer this plan (multi-crop views are optional)."""
        kinds = ("dense", "multicrop") if mode == "both" else (mode,)
        return all(
            kind in self.views.get(name, {}).get(q, {})
            for name, scales in model_scales.items()
            for q in scales
            for kind in kinds
        )


@dataclass(frozen=True)
class ExpectedPosteriors:
    """Per-view posteriors of a set of files, by file name, with what they were computed for."""

    images: Mapping[str, ImagePosteriors]
    fingerprints: Mapping[str, str]
    model_scales: Mapping[str, tuple[int, ...]]
    shape_multiple: int | None

    def for_upload(self, upload: Upload) -> ImagePosteriors:
        """The posteriors of ``upload``; raises ``KeyError`` if the file was not computed or its
        bytes differ from the ones that were."""
        if self.fingerprints.get(upload.filename) != fingerprint(upload.data):
            raise KeyError(f"no expected posteriors for these bytes of {upload.filename}")
        return self.images[upload.filename]

    def check_uploads(self, uploads: Iterable[Upload]) -> None:
        """Raise ``ValueError`` unless every upload's bytes are the ones computed."""
        differing = [
            u.filename for u in uploads if self.fingerprints.get(u.filename) != fingerprint(u.data)
        ]
        if differing:
            raise ValueError(
                f"the expected posteriors were computed for other files than {differing}: "
                "recompute them for this image set (python -m testkit.expected_posteriors)"
            )

    def save(self, path: Path | str) -> Path:
        """Write as JSON (floats in full precision); returns the path."""
        some = next(iter(self.images.values()), None)
        document = {
            "format": FORMAT,
            "model_scales": {name: list(s) for name, s in self.model_scales.items()},
            "shape_multiple": self.shape_multiple,
            "labels": {
                name: list(labels) for name, labels in (some.labels if some else {}).items()
            },
            "images": {
                name: {**image.as_json(), "sha256": self.fingerprints[name]}
                for name, image in self.images.items()
            },
        }
        path = Path(path)
        path.write_text(json.dumps(document))
        return path

    @classmethod
    def load(cls, path: Path | str) -> ExpectedPosteriors:
        """Read a file written by :meth:`save`; raises ``ValueError`` if it is not one."""
        document = json.loads(Path(path).read_text())
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{path} is not an expected-posteriors file of format {FORMAT}")
        labels = {name: tuple(values) for name, values in document["labels"].items()}
        return cls(
            images={
                name: ImagePosteriors.from_json(data, labels)
                for name, data in document["images"].items()
            },
            fingerprints={name: data["sha256"] for name, data in document["images"].items()},
            model_scales={name: tuple(s) for name, s in document["model_scales"].items()},
            shape_multiple=document["shape_multiple"],
        )


def _run(backend, model: str, views: np.ndarray) -> tuple[np.ndarray, float]:
    """Posteriors (N, C) float64 of a uint8 batch in runs of bounded size, and the largest
    class score magnitude any view produced."""
    step = max(1, MAX_RUN_PIXELS // (views.shape[2] * views.shape[3]))
    probs, largest = [], 0.0
    for start in range(0, len(views), step):
        out = backend.run(model, views[start : start + step], ("probs", "scores"))
        probs.append(out["probs"].astype(np.float64))
        largest = max(largest, float(np.abs(out["scores"]).max()))
    return np.concatenate(probs), largest


def image_posteriors(
    backend,
    models: Mapping[str, Any],
    data: bytes,
    model_scales: Mapping[str, Sequence[int]],
    shape_multiple: int | None = None,
    modes: Sequence[str] = MODES,
    max_pixels: int | None = None,
) -> ImagePosteriors:
    """The per-view posteriors of one file, decoded as the server decodes it.

    Args:
        backend: an ``inference.backends.onnxruntime.OnnxRuntimeBackend`` (anything with its
            synchronous ``run``) serving ``models``.
        models: ``{name: inference.ModelEntry}`` of the repository.
        data: the file's bytes.
        model_scales: the scales Q to compute for each model.
        shape_multiple: the server's ``--shape-multiple`` (dense views only, as the server).
        modes: "dense" and/or "multicrop" (25 crops of the model's training size per Q).
        max_pixels: the server's ``--max-pixels`` (default: the decoder's).

    Raises the decoder's ``inference.ImageError`` for a file the server refuses.
    """
    from inference.images import DEFAULT_MAX_PIXELS, decode_image
    from inference.protocol import MULTICROP_GRID, dense_batch, multicrop_batch

    image = decode_image(data, max_pixels or DEFAULT_MAX_PIXELS)
    crops = MULTICROP_GRID * MULTICROP_GRID
    views: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    largest = 0.0
    for name, scales in model_scales.items():
        views[name] = {}
        for q in scales:
            found: dict[str, np.ndarray] = {}
            if "dense" in modes:
                probs, score = _run(backend, name, dense_batch(image, q, True, shape_multiple))
                found["dense"], found["dense_flip"] = probs[0], probs[1]
                largest = max(largest, score)
            if "multicrop" in modes:
                batch = multicrop_batch(image, q, models[name].min_size, True)
                probs, score = _run(backend, name, batch)
                found["multicrop"] = probs[:crops].mean(axis=0)
                found["multicrop_flip"] = probs[crops:].mean(axis=0)
                largest = max(largest, score)
            views[name][q] = found
    labels = {name: tuple(models[name].labels) for name in model_scales}
    return ImagePosteriors(views, labels, tolerance_for(largest), *image.size)


def compute(
    repository: Path | str,
    model_scales: Mapping[str, Sequence[int]],
    uploads: Sequence[Upload] | None = None,
    shape_multiple: int | None = None,
    modes: Sequence[str] = MODES,
) -> ExpectedPosteriors:
    """The per-view posteriors of ``uploads`` (default: the load tests' image set) for the models
    of ``repository`` named in ``model_scales``, at their scales, with ONNX Runtime here."""
    from inference.backends.onnxruntime import OnnxRuntimeBackend
    from inference.repository import read_repository

    entries = read_repository(Path(repository))
    missing = [name for name in model_scales if name not in entries]
    if missing:
        raise ValueError(f"{repository} has no model {', '.join(missing)}")
    models = {name: entries[name] for name in model_scales}
    uploads = build_image_set() if uploads is None else uploads
    backend = OnnxRuntimeBackend(models)
    images = {
        u.filename: image_posteriors(backend, models, u.data, model_scales, shape_multiple, modes)
        for u in uploads
    }
    return ExpectedPosteriors(
        images=images,
        fingerprints={u.filename: fingerprint(u.data) for u in uploads},
        model_scales={name: tuple(s) for name, s in model_scales.items()},
        shape_multiple=shape_multiple,
    )


def cached(
    repository: Path | str,
    model_scales: Mapping[str, Sequence[int]],
    shape_multiple: int | None = None,
    modes: Sequence[str] = MODES,
) -> Path:
    """:func:`compute` for the image set, saved beside ``repository`` and computed only once for
    the same repository and arguments (later calls, from any process, return the file)."""
    repository = Path(repository).resolve()
    key = json.dumps([str(repository), sorted(model_scales.items()), shape_multiple, list(modes)])
    path = repository.parent / f"expected-posteriors-{fingerprint(key.encode())[:16]}.json"
    if not path.is_file():
        scratch = path.with_suffix(f".{os.getpid()}.partial")
        compute(repository, model_scales, shape_multiple=shape_multiple, modes=modes).save(scratch)
        os.replace(scratch, path)  # whole or absent, whoever computed it
    return path


def served(models_body: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """({model: its serving scales}, shape_multiple) from a ``GET /v1/models`` body: every scale a
    request plan drawn from that body can ask of each model (its own, and the union)."""
    union = tuple(int(q) for q in models_body["default_scales"])
    model_scales = {
        entry["name"]: tuple(sorted({*map(int, entry.get("scales") or union), *union}))
        for entry in models_body["models"]
    }
    return model_scales, models_body.get("shape_multiple")


def compute_for_server(
    url: str, repository: Path | str, modes: Sequence[str] = MODES
) -> ExpectedPosteriors:
    """:func:`compute` for what the server at ``url`` says it serves (``GET /v1/models``), from
    the repository it serves."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # straight to it
    with opener.open(f"{url.rstrip('/')}/v1/models", timeout=60) as response:
        body = json.loads(response.read())
    model_scales, multiple = served(body)
    return compute(repository, model_scales, shape_multiple=multiple, modes=modes)


def main(argv: list[str] | None = None) -> int:
    """Write the expected posteriors of the load tests' image set for a running server."""
    parser = argparse.ArgumentParser(
        prog="python -m testkit.expected_posteriors", description=main.__doc__
    )
    parser.add_argument("--host", required=True, help="the server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--repository", required=True, type=Path, help="the repository it serves")
    parser.add_argument("--out", required=True, type=Path, help="the JSON file to write")
    parser.add_argument(
        "--dense-only", action="store_true", help="skip multi-crop views (full-size models: faster)"
    )
    args = parser.parse_args(argv)
    modes = ("dense",) if args.dense_only else MODES
    compute_for_server(args.host, args.repository, modes).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
