"""Decoding uploads: orientation, colour modes, limits and the errors a user sees."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from inference.images import CorruptImage, NotAnImage, TooManyPixels, decode_image
from testkit.images import encode, gradient, header_bomb


def test_exif_orientation_is_applied():
    image = gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    decoded = decode_image(encode(image, "JPEG", exif=exif, quality=95))
    assert decoded.size == (48, 64)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1"])
def test_colour_modes_become_rgb(mode):
    image = gradient(64, 48).convert(mode)
    fmt = {"CMYK": "JPEG", "1": "PNG"}.get(mode, "PNG")
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (64, 48)


def test_alpha_is_dropped_like_torchvision_loader():
    rgba = gradient(64, 48).convert("RGBA")
    rgba.putalpha(0)
    decoded = decode_image(encode(rgba, "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded), np.asarray(gradient(64, 48)))


def test_sixteen_bit_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)  # uint16 -> mode "I;16"
    decoded = decode_image(encode(image, "PNG"))
    np.testing.assert_array_equal(np.asarray(decoded)[0, :, 0], [0, 128, 255])


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    decoded = decode_image(encode(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    assert decoded.getpixel((5, 5))[0] > 200


@pytest.mark.parametrize(
    "data",
    [b"hello, I am text\n" * 10, bytes(range(256)) * 8, b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n"],
)
def test_not_an_image(data):
    with pytest.raises(NotAnImage):
        decode_image(data)


def test_truncated_jpeg_is_corrupt():
    data = encode(gradient(256, 256), "JPEG")
    with pytest.raises(CorruptImage, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2])


def test_pixel_limit_checked_from_header():
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(TooManyPixels, match="100x100 = 10,000 pixels"):
        decode_image(data, max_pixels=9_999)


@pytest.mark.parametrize("side", [10_000, 60_000])
def test_decompression_bomb_refused_without_decoding(side):
    with pytest.raises(TooManyPixels):
        decode_image(header_bomb(side, side), max_pixels=50_000_000)


def test_empty_file():
    with pytest.raises(NotAnImage, match="empty"):
        decode_image(b"")
