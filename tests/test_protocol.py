"""The dense multi-scale protocol against an independent plain-PyTorch implementation."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from inference import Classifier, ClassifyOptions, OptionError, read_repository
from inference.backends.onnxruntime import OnnxRuntimeBackend
from inference.classifier import ExtremeAspectRatio
from inference.protocol import MODES, crop_offsets, dense_batch, rescaled_size, top_k
from testkit.images import smooth_image
from testkit.tolerances import posterior_bound, score_bound, softmax_bound

from .reference import dense_scores, protocol, protocol_modes, rescale, to_batch


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
    reference = protocol([models["m16"], models["m19"]], image, scales=(256, 384, 512))
    # fp32 ONNX Runtime against the float64 reference (testkit.tolerances: the score maps'
    # rounding error, halved by the soft-max's slope; about 1e-5 for these models).
    bound = posterior_bound(models.values(), reference.largest_score)
    assert np.abs(result.probabilities - reference.probs).max() < bound
    for name, expected in zip(("m16", "m19"), reference.per_model, strict=True):
        assert np.abs(result.per_model_probabilities[name] - expected).max() < bound
    # top-5 fused, sorted, from the fused posterior
    probs = [p.probability for p in result.predictions]
    assert probs == sorted(probs, reverse=True) and len(probs) == 5
    assert result.predictions[0].index == int(np.argmax(reference.probs))
    assert result.predictions[0].label == f"class_{result.predictions[0].index}"
    assert result.image_size == size


def test_options_scales_flip_models(classifier, two_model_repository):
    _, models = two_model_repository
    image = smooth_image(400, 300, seed=7)
    result = classify(classifier, image, scales=(64, 200), flip=False, models=("m19",), top_k=3)
    reference = protocol([models["m19"]], image, scales=(64, 200), flip=False)
    bound = posterior_bound(models["m19"], reference.largest_score)
    assert np.abs(result.probabilities - reference.probs).max() < bound
    assert list(result.per_model) == ["m19"] and len(result.predictions) == 3
    assert result.scales == (64, 200) and result.flip is False


def test_flip_changes_the_answer_by_averaging_the_mirror(classifier, two_model_repository):
    _, models = two_model_repository
    image = smooth_image(300, 260, seed=3)
    with_flip = classify(classifier, image, scales=(256,), models=("m16",)).probabilities
    mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain, mirror = (protocol([models["m16"]], i, (256,), flip=False) for i in (image, mirrored))
    bound = posterior_bound(models["m16"], max(plain.largest_score, mirror.largest_score))
    assert np.abs(with_flip - (plain.probs + mirror.probs) / 2).max() < bound
    # The mirror's answer differs from the image's, so leaving it out would fail.
    assert np.abs(plain.probs - mirror.probs).max() > 100 * bound


@pytest.mark.parametrize("flip", [True, False], ids=["flip", "no-flip"])
def test_multicrop_is_a_5x5_grid_with_flips_and_both_is_their_mean(
    classifier, two_model_repository, flip
):
    _, models = two_model_repository
    # 3:2, so at Q = 96 and 128 (144 x 96, 192 x 128) every crop start is a whole pixel.
    image = smooth_image(360, 240, seed=11)
    options = {"scales": (96, 128), "models": ("m16",), "flip": flip}
    results = {mode: classify(classifier, image, mode=mode, **options) for mode in MODES}
    references = protocol_modes([models["m16"]], image, (96, 128), flip, MODES, crop=64)
    for mode, result in results.items():
        bound = posterior_bound(models["m16"], references[mode].largest_score)
        assert np.abs(result.probabilities - references[mode].probs).max() < bound, mode
    # "both" is the mean of the other two, each computed once: equal up to float64 rounding.
    expected = (results["dense"].probabilities + results["multicrop"].probabilities) / 2
    assert np.abs(results["both"].probabilities - expected).max() < 1e-15
    difference = results["dense"].probabilities - results["multicrop"].probabilities
    assert np.abs(difference).max() > 100 * bound  # the modes are told apart


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
    maps, largest = [], 0.0
    for name in ("m16", "m19"):
        scores = dense_scores(models[name], batch).numpy()
        largest = max(largest, np.abs(scores).max())
        chosen = scores[:, heatmap.index]
        maps.append((chosen[0] + chosen[1][:, ::-1]) / 2)
    expected = np.mean(maps, axis=0)
    assert heatmap.scores.shape == expected.shape == (7, 9)  # 256x341 -> 8x10 features, k=2
    # Means of fp32 score maps against float64 ones: within the maps' rounding bound, relative
    # to their largest magnitude (testkit.tolerances).
    bound = score_bound(models.values()) * largest
    assert np.abs(heatmap.scores - expected).max() < bound


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
    # An fp32 soft-max of C classes: each posterior within (C + 9) units of rounding of itself
    # (testkit.tolerances.softmax_bound), so together they add up to 1 within that much.
    assert abs(sum(result.probabilities) - 1) < softmax_bound(len(result.probabilities))
