"""Training augmentation: S within range, crop size, flip, colour-shift statistics, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from testkit.images import gradient
from train.augment import Lighting, TrainAugmentation, parse_scale, pixel_statistics
from train.data import EpochBatches, epoch_order

RNG = np.random.default_rng


def test_parse_scale():
    assert parse_scale("256") == (256, 256)
    assert parse_scale("256:512") == (256, 512)
    for bad in ("", "512:256", "a:b", "0", "1:2:3"):
        with pytest.raises(ValueError, match="give S"):
            parse_scale(bad)


def test_jittered_scale_stays_in_range_and_covers_it():
    augment = TrainAugmentation(64, 128, 64, flip=False)
    image = gradient(150, 100)
    scales = []
    for seed in range(400):
        pixels, _, info = augment(image, RNG(seed))
        assert 64 <= info["scale"] <= 128
        assert min(info["size"]) == info["scale"]  # the shorter side is rescaled to S
        assert pixels.shape == (3, 64, 64) and pixels.dtype == np.uint8
        scales.append(info["scale"])
    assert min(scales) <= 66 and max(scales) >= 126
    # uniform: each half of the range gets about half of the draws
    assert 0.4 < np.mean(np.array(scales) <= 96) < 0.6


def test_fixed_scale_and_crop_size():
    augment = TrainAugmentation(96, 96, 64)
    for seed in range(20):
        pixels, _, info = augment(gradient(150, 100), RNG(seed))
        assert info["scale"] == 96 and info["size"] == (144, 96)
        assert pixels.shape == (3, 64, 64)


def test_scale_below_crop_is_refused():
    with pytest.raises(ValueError, match="smaller than the crop 64"):
        TrainAugmentation(48, 96, 64)


def test_crop_is_a_window_of_the_rescaled_image():
    image = gradient(300, 200)
    augment = TrainAugmentation(200, 200, 64, flip=False)  # S = the image's own size: no resize
    lefts = set()
    for seed in range(50):
        pixels, _, _ = augment(image, RNG(seed))
        top, left = int(pixels[1, 0, 0]), int(pixels[0, 0, 0])  # channels 0/1 encode x/y
        lefts.add(left)
        expected = np.asarray(image)[top : top + 64, left : left + 64].transpose(2, 0, 1)
        assert np.array_equal(pixels, expected)
    assert len(lefts) > 30  # positions vary


def test_flip_mirrors_the_same_crop_half_the_time():
    image = gradient(150, 100)
    flipping = TrainAugmentation(64, 128, 64, flip=True)
    plain = TrainAugmentation(64, 128, 64, flip=False)
    flips = 0
    for seed in range(400):
        pixels, _, info = flipping(image, RNG(seed))
        reference, _, _ = plain(image, RNG(seed))  # same S and window, drawn first
        if info["flipped"]:
            flips += 1
            assert np.array_equal(pixels, reference[:, :, ::-1])
        else:
            assert np.array_equal(pixels, reference)
    assert 160 < flips < 240  # Binomial(400, 1/2): mean 200, sd 10


def test_colour_shift_statistics_follow_the_pca():
    rng = RNG(0)
    # A training set whose colours vary mostly along one direction.
    base = rng.normal(0, 1, size=(2000, 3)) * [0.2, 0.05, 0.02]
    basis = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    colours = np.clip(0.5 + base @ basis.T, 0, 1)
    images = [Image.fromarray((c * 255).astype(np.uint8).reshape(1, 1, 3)) for c in colours]
    mean, std, lighting = pixel_statistics(images)
    assert np.allclose(mean, colours.mean(0), atol=0.01)
    vec = np.asarray(lighting.eigvec)
    assert np.allclose(vec.T @ vec, np.eye(3), atol=1e-9)  # orthonormal components
    assert list(lighting.eigval) == sorted(lighting.eigval, reverse=True)
    assert abs(abs(vec[:, 0] @ basis[:, 0]) - 1) < 0.01  # the main direction is found

    shifts = np.stack([lighting.shift(RNG(seed)) for seed in range(20000)])
    assert np.abs(shifts.mean(0)).max() < 0.05 * np.sqrt(np.diag(lighting.covariance())).max()
    covariance = np.cov(shifts, rowvar=False)
    expected = lighting.covariance()
    assert np.allclose(covariance, expected, atol=0.05 * np.abs(expected).max())
    # alpha ~ N(0, 0.1): the shift along the first component has sd 0.1 * eigval * 255
    along = shifts @ vec[:, 0]
    assert abs(along.std() / (0.1 * lighting.eigval[0] * 255) - 1) < 0.03


def test_colour_shift_is_one_vector_per_image_and_off_at_zero():
    lighting = Lighting((0.2, 0.02, 0.005), ((1, 0, 0), (0, 1, 0), (0, 0, 1)), std=0.1)
    augment = TrainAugmentation(64, 64, 64, lighting=lighting)
    _, shift, _ = augment(gradient(64, 64), RNG(1))
    assert shift.shape == (3,) and shift.dtype == np.float32 and np.any(shift != 0)
    off = Lighting(lighting.eigval, lighting.eigvec, std=0.0)
    assert np.all(off.shift(RNG(1)) == 0)


def test_same_seed_same_sample():
    augment = TrainAugmentation(
        64, 128, 64, lighting=Lighting((0.1, 0.01, 0.001), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    )
    a = augment(gradient(150, 100), RNG([0, 13, 2, 5]))
    b = augment(gradient(150, 100), RNG([0, 13, 2, 5]))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_process_shards_make_up_the_global_batch():
    single = EpochBatches(100, 16, seed=7)
    shards = [EpochBatches(100, 16, seed=7, rank=r, world=4) for r in range(4)]
    for sampler in (single, *shards):
        sampler.set_epoch(3)
    joined = [sum(parts, []) for parts in zip(*[list(s) for s in shards], strict=True)]
    assert joined == list(single)
    assert len(joined) == 6  # 100 // 16, the incomplete batch dropped
    order = epoch_order(100, 7, 3)
    assert [i for _, i in joined[0]] == order[:16].tolist()
    single.set_epoch(3, start_step=4)
    assert list(single) == joined[4:]
    single.set_epoch(4)
    assert list(single)[0] != joined[0]
    with pytest.raises(ValueError, match="does not split evenly"):
        EpochBatches(100, 10, seed=0, world=4)
