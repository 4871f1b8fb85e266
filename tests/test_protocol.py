"""The dense multi-scale protocol against an independent plain-PyTorch implementation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image

from inference import Classifier, ClassifyOptions, OptionError, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.classifier import ExtremeAspectRatio
from inference.protocol import crop_offsets, dense_batch, rescaled_size, top_k
from testkit.images import smooth_image

from .reference import dense_probs, dense_scores, protocol_probs, rescale, to_batch


@pytest.fixture(scope="module")
def classifier(two_model_repository):
    repo, _ = two_model_repository
    entries = read_repository(repo)
    return Classifier(OnnxRuntimeBackend(entries), entries)


def classify(classifier, image, **options):
    return asyncio.run(classifier.classify(image, ClassifyOptions(**options)))


@pytest.mark.parametrize(
    "width, height, q, expected",
    [
        (640, 480, 256, (341, 256)),
        (480, 640, 256, (256, 341)),
        (500, 333, 384, (577, 384)),
        (3, 2, 3, (5, 3)),
        (1, 1, 256, (256, 256)),
        (100, 100, 512, (512, 512)),
        (1000, 999, 256, (256, 256)),
    ],
)
def test_rescaled_size_rounds_half_up(width, height, q, expected):
    # floor(1000 * 256 / 999 + 0.5) = floor(256.756...) = 256 ; floor(4.5 + 0.5) = 5
    assert rescaled_size(width, height, q) == expected


def test_dense_batch_is_bilinear_rescale_plus_flip():
    image = smooth_image(333, 500, seed=1)
    batch = dense_batch(image, 256, flip=True)
    expected = to_batch(rescale(image, 256), flip=True).numpy()
    assert batch.dtype == np.uint8 and batch.shape == (2, 3, 384, 256)
    np.testing.assert_array_equal(batch, expected)
    np.testing.assert_array_equal(batch[1], batch[0][:, :, ::-1])
    assert dense_batch(image, 256, flip=False).shape == (1, 3, 384, 256)


@pytest.mark.parametrize(
    "size", [(640, 480), (480, 640), (300, 300), (517, 263), (201, 437)], ids=str
)
def test_fused_probabilities_equal_independent_reference(classifier, two_model_repository, size):
    _, models = two_model_repository
    image = smooth_image(*size, seed=sum(size))
    result = classify(classifier, image, top_k=5)
    reference = protocol_probs([models["m16"], models["m19"]], image, scales=(256, 384, 512))
    assert np.abs(result.probabilities - reference).max() < 1e-5
    # per-model posteriors too
    for name in ("m16", "m19"):
        ref = protocol_probs([models[name]], image, scales=(256, 384, 512))
        assert np.abs(result.per_model_probabilities[name] - ref).max() < 1e-5
    # top-5 fused, sorted, from the fused posterior
    probs = [p.probability for p in result.predictions]
    assert probs == sorted(probs, reverse=True) and len(probs) == 5
    assert result.predictions[0].index == int(np.argmax(reference))
    assert result.predictions[0].label == f"class_{result.predictions[0].index}"
    assert result.image_size == size


def test_options_scales_flip_models(classifier, two_model_repository):
    _, models = two_model_repository
    image = smooth_image(400, 300, seed=7)
    result = classify(classifier, image, scales=(64, 200), flip=False, models=("m19",), top_k=3)
    reference = protocol_probs([models["m19"]], image, scales=(64, 200), flip=False)
    assert np.abs(result.probabilities - reference).max() < 1e-5
    assert list(result.per_model) == ["m19"] and len(result.predictions) == 3
    assert result.scales == (64, 200) and result.flip is False


def test_flip_changes_the_answer_by_averaging_the_mirror(classifier, two_model_repository):
    _, models = two_model_repository
    image = smooth_image(300, 260, seed=3)
    with_flip = classify(classifier, image, scales=(256,), models=("m16",)).probabilities
    plain = dense_probs(models["m16"], to_batch(rescale(image, 256), flip=False))[0]
    mirror = dense_probs(
        models["m16"],
        to_batch(rescale(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 256), False),
    )[0]
    assert np.abs(with_flip - (plain + mirror) / 2).max() < 1e-5


def test_multicrop_is_a_5x5_grid_with_flips(classifier, two_model_repository):
    _, models = two_model_repository
    image = smooth_image(350, 260, seed=11)
    result = classify(classifier, image, scales=(96, 128), models=("m16",), mode="multicrop")
    per_scale = []
    for q in (96, 128):
        arr = to_batch(rescale(image, q), flip=False)[0]
        _, h, w = arr.shape
        ys = [round(i * (h - 64) / 4) for i in range(5)]
        xs = [round(i * (w - 64) / 4) for i in range(5)]
        crops = torch.stack([arr[:, y : y + 64, x : x + 64] for y in ys for x in xs])
        crops = torch.cat([crops, torch.flip(crops, dims=[3])])
        per_scale.append(dense_probs(models["m16"], crops).mean(axis=0))
    assert np.abs(result.probabilities - np.mean(per_scale, axis=0)).max() < 1e-5
    both = classify(classifier, image, scales=(96, 128), models=("m16",), mode="both")
    dense = classify(classifier, image, scales=(96, 128), models=("m16",))
    expected = (dense.probabilities + result.probabilities) / 2
    assert np.abs(both.probabilities - expected).max() < 1e-9


def test_crop_offsets_span_the_image():
    assert crop_offsets(256, 64) == [0, 48, 96, 144, 192]
    assert crop_offsets(64, 64) == [0, 0, 0, 0, 0]


def test_heatmap_is_top1_score_map_at_largest_scale(classifier, two_model_repository):
    _, models = two_model_repository
    image = smooth_image(320, 240, seed=5)
    result = classify(classifier, image, scales=(128, 256), heatmap=True)
    heatmap = result.heatmap
    assert heatmap.index == result.predictions[0].index and heatmap.scale == 256
    batch = to_batch(rescale(image, 256), flip=True)
    maps = []
    for name in ("m16", "m19"):
        scores = dense_scores(models[name], batch).numpy()[:, heatmap.index]
        maps.append((scores[0] + scores[1][:, ::-1]) / 2)
    expected = np.mean(maps, axis=0)
    assert heatmap.scores.shape == expected.shape == (7, 9)  # 256x341 -> 8x10 features, k=2
    assert np.abs(heatmap.scores - expected).max() < 1e-4 * np.abs(expected).max()


def test_top_k_breaks_ties_by_index():
    assert top_k(np.array([0.1, 0.4, 0.4, 0.1]), 3) == [(1, 0.4), (2, 0.4), (0, 0.1)]


@pytest.mark.parametrize(
    "options, parameter",
    [
        ({"scales": (32,)}, "scales"),
        ({"scales": (2048,)}, "scales"),
        ({"scales": (256, 256)}, "scales"),
        ({"models": ("nope",)}, "models"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 11}, "top_k"),
        ({"mode": "sparse"}, "mode"),
    ],
)
def test_bad_options_name_the_parameter(classifier, options, parameter):
    with pytest.raises(OptionError) as info:
        classify(classifier, smooth_image(100, 100, 0), **options)
    assert info.value.parameter == parameter
    assert str(info.value).startswith(parameter)


def test_below_minimum_scale_says_the_minimum(classifier):
    with pytest.raises(OptionError, match="smallest input m16, m19 accept is 64"):
        classify(classifier, smooth_image(100, 100, 0), scales=(48,))


def test_extreme_strip_is_refused_before_resizing(classifier):
    strip = Image.new("RGB", (20000, 20))
    with pytest.raises(ExtremeAspectRatio, match="20000x20"):
        classify(classifier, strip)


def test_tiny_image_is_upscaled_and_classified(classifier):
    result = classify(classifier, Image.new("RGB", (1, 1), (200, 30, 30)), scales=(64,))
    assert abs(sum(result.probabilities) - 1) < 1e-6
