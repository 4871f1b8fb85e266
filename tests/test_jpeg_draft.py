"""--jpeg-draft: large JPEGs decode at a power-of-two reduction, never below the asked side."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.images import decode_image
from testkit.images import encode, smooth_image


def encoded(width: int, height: int, fmt: str = "JPEG", exif_rotate: bool = False) -> bytes:
    image = smooth_image(width, height, seed=0)
    if exif_rotate:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise on display
        return encode(image, fmt, exif=exif)
    return encode(image, fmt)


@pytest.mark.parametrize(
    ("size", "short_side", "expected"),
    [
        ((4000, 3000), 1024, (2000, 1500)),  # 1/4 would be 750 < 1024
        ((4000, 3000), 512, (1000, 750)),
        ((4000, 3000), 256, (500, 375)),  # 1/8 at most
        ((4000, 3000), 2000, (4000, 3000)),  # less than twice: decoded in full
        ((1000, 3000), 300, (500, 1500)),  # portrait: the shorter side counts (1/4: 250)
    ],
)
def test_draft_decodes_at_the_largest_reduction_keeping_the_shorter_side(
    size, short_side, expected
):
    data = encoded(*size)
    image = decode_image(data, draft_short_side=short_side)
    assert image.size == expected and image.mode == "RGB"
    assert min(image.size) >= short_side
    assert decode_image(data).size == size  # off by default


def test_draft_keeps_exif_orientation_and_leaves_other_formats_alone():
    rotated = decode_image(encoded(1600, 800, exif_rotate=True), draft_short_side=200)
    assert rotated.size == (200, 400)  # decoded at 1/4, then turned upright
    png = encoded(1600, 800, fmt="PNG")
    assert decode_image(png, draft_short_side=100).size == (1600, 800)


def test_draft_stays_close_to_full_decoding_after_rescaling():
    from inference.protocol import rescale_shorter_side

    data = encoded(2048, 1536)
    full = np.asarray(rescale_shorter_side(decode_image(data), 256), dtype=np.float64)
    draft = np.asarray(
        rescale_shorter_side(decode_image(data, draft_short_side=512), 256), dtype=np.float64
    )
    assert full.shape == draft.shape
    assert np.abs(full - draft).mean() < 1.0  # of 255: same picture, slightly other filtering
