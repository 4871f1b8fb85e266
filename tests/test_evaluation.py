"""One evaluator: data sets scored by inference.evaluation equal what the server answers.

The Classifier (one request at a time, the server's path) and inference.evaluation (many images
per batch: training validation, int8 checks, benchmarks) build the same views and fuse with the
same code; only the batch composition differs. The bound for that: a float32 run of a view in
another batch may sum in another order, which moves the scores and posteriors within the bounds
of testkit.tolerances (about 1e-5 for these models); the in-memory PyTorch graph against its ONNX
export differs the same way.
"""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest
from PIL import Image

from inference import Classifier, ClassifyOptions, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.evaluation import collect
from inference.protocol import average_posteriors, dense_batch, multicrop_batch
from testkit.images import encode, smooth_image
from testkit.tolerances import largest_score, posterior_bound
from train.data import load_rgb
from train.evaluate import collect as collect_in_training
from train.evaluate import serving_graph

SCALES = (64, 96)


@pytest.fixture(scope="module")
def served(two_model_repository):
    repository, models = two_model_repository
    entries = read_repository(repository)
    return entries, OnnxRuntimeBackend(entries), models


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # Two share a shape at every Q (run as one batch), one is portrait, one is small.
    sizes = [(120, 90), (160, 120), (120, 90), (90, 130), (70, 66)]
    return [smooth_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]


@pytest.fixture(scope="module")
def bound(served, images) -> float:
    """How far two fp32 runs of these models may differ in a posterior of these images, dense
    or multi-crop (testkit.tolerances)."""
    entries, _, models = served
    views = [dense_batch(image, q) for image in images for q in SCALES]
    views += [multicrop_batch(image, q, 64) for image in images for q in SCALES]
    graphs = [entry.onnx_path for entry in entries.values()]
    return posterior_bound(models.values(), largest_score(graphs, views))


def classify_each(classifier: Classifier, images, **options) -> list:
    async def run():
        return [await classifier.classify(image, ClassifyOptions(**options)) for image in images]

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["dense", "multicrop", "both"])
@pytest.mark.parametrize("flip", [True, False])
def test_data_set_scores_equal_the_servers_answers(served, images, bound, mode, flip):
    entries, backend, _ = served
    classifier = Classifier(backend, entries)
    answers = classify_each(classifier, images, scales=SCALES, mode=mode, flip=flip)
    per_model = {
        name: collect(backend, name, images, SCALES, entry.min_size, mode, flip).combine(
            SCALES, mode
        )
        for name, entry in entries.items()
    }
    fused = average_posteriors(list(per_model.values()))
    for row, answer in enumerate(answers):
        np.testing.assert_allclose(fused[row], answer.probabilities, rtol=0, atol=bound)
        for name, probs in per_model.items():
            np.testing.assert_allclose(
                probs[row], answer.per_model_probabilities[name], rtol=0, atol=bound
            )


def test_training_validation_scores_as_the_exported_model(served, images, bound):
    entries, backend, models = served
    for name, model in models.items():
        entry = entries[name]
        graph = serving_graph(model, entry.mean, entry.std)
        in_training = collect_in_training(graph, images, SCALES, entry.min_size, "both")
        exported = collect(backend, name, images, SCALES, entry.min_size, "both")
        for mode in ("dense", "multicrop", "both"):
            np.testing.assert_allclose(
                in_training.combine(SCALES, mode),
                exported.combine(SCALES, mode),
                rtol=0,
                atol=bound,
            )


def test_each_model_runs_at_its_own_serving_scales(two_model_repository, tmp_path, images):
    repository, _ = two_model_repository
    copy = tmp_path / "repo"
    shutil.copytree(repository, copy, symlinks=True)
    config = copy / "m19" / "config.pbtxt"
    config.write_text(config.read_text().replace('"256,384,512"', '"64,96"'))
    entries = read_repository(copy)
    assert entries["m16"].scales == (256, 384, 512) and entries["m19"].scales == (64, 96)
    backend = OnnxRuntimeBackend(entries)
    fused = classify_each(Classifier(backend, entries), images[:2])
    alone = {
        name: classify_each(Classifier(backend, {name: entries[name]}), images[:2])
        for name in entries
    }
    for row, answer in enumerate(fused):
        assert answer.scales == (64, 96, 256, 384, 512)  # the union, what the response reports
        for name in entries:
            expected = alone[name][row]
            assert expected.scales == entries[name].scales
            np.testing.assert_array_equal(
                answer.per_model_probabilities[name], expected.per_model_probabilities[name]
            )
    # A request naming scales runs every model at them.
    given = classify_each(Classifier(backend, entries), images[:1], scales=(96,))[0]
    assert given.scales == (96,)


def test_training_decodes_files_as_the_server_decodes_uploads(tmp_path):
    # A photo taken in portrait: stored 80x60 with EXIF orientation 6 (rotate 90 degrees).
    image = smooth_image(80, 60, seed=3)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    path.write_bytes(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert load_rgb(path).size == (60, 80)
    cmyk = tmp_path / "cmyk.jpg"
    cmyk.write_bytes(encode(image.convert("CMYK"), "JPEG"))
    assert load_rgb(cmyk).mode == "RGB"
