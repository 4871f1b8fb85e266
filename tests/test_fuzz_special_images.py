"""Awkward but legal (and some illegal) images sent to the HTTP API, each answered as documented.

``inference/images.py`` and the README promise: EXIF orientation is applied; CMYK, palette,
grey and 16-bit images become 8-bit RGB (16-bit scaled, not clipped); an animated image gives
its first frame; a 1x1 image is classified; an empty file is 400; a zero-size image is refused
(Pillow cannot read it: 415); a 20000x20 strip is 422 (extreme aspect ratio); a decompression
bomb is 413 without being decoded. Each promise is checked by comparing the server's answer for
the awkward file with its answer for the plain RGB PNG the promise says it equals. The app runs
in process (FastAPI's TestClient).
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from server.main import create_app
from server.settings import Settings
from testkit.images import encode, header_bomb, one_bit_bomb, png, smooth_image
from testkit.processes import sample_resources

PARAMS = {"scales": "64,96", "top_k": 10}


@pytest.fixture(scope="module")
def client(two_model_repository):
    repository, _ = two_model_repository
    # The shipped limits (20 MB uploads, 50 MP): what a user of the defaults gets.
    with TestClient(create_app(Settings(repository=repository, scales=(64, 96)))) as client:
        yield client


def classify(client: TestClient, data: bytes, name: str = "image", ctype: str = "") -> dict:
    files = {"file": (name, data, ctype or "application/octet-stream")}
    response = client.post("/v1/classify", params=PARAMS, files=files)
    assert response.status_code == 200, response.text
    return response.json()


def refused(client: TestClient, data: bytes, status: int, *needles: str) -> str:
    response = client.post("/v1/classify", params=PARAMS, files={"file": ("x", data, "")})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    for needle in needles:
        assert needle in detail, detail
    return detail


def same(a: dict, b: dict) -> bool:
    """The same fused top-10 (indices and probabilities) for the same image size."""
    if a["image"] != b["image"]:
        return False
    if [p["index"] for p in a["predictions"]] != [p["index"] for p in b["predictions"]]:
        return False
    pa = [p["probability"] for p in a["predictions"]]
    pb = [p["probability"] for p in b["predictions"]]
    return bool(np.allclose(pa, pb, rtol=0, atol=1e-6))


BASE = smooth_image(120, 80, seed=5)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(client, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation  # 3: 180 degrees, 6: 90 clockwise, 8: 90 counter-clockwise
    tagged = encode(BASE, "JPEG", quality=95, exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(tagged)))  # what a viewer shows
    got = classify(client, tagged, "photo.jpg", "image/jpeg")
    assert same(got, classify(client, png(upright)))
    as_stored = Image.open(io.BytesIO(tagged)).convert("RGB")  # the tag ignored
    assert not same(got, classify(client, png(as_stored)))
    if orientation in (6, 8):
        assert got["image"] == {"width": 80, "height": 120}


def test_cmyk_jpeg_is_converted_to_rgb(client):
    cmyk = encode(BASE.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk)).mode == "CMYK"
    rgb = Image.open(io.BytesIO(cmyk)).convert("RGB")
    assert same(classify(client, cmyk, "print.jpg", "image/jpeg"), classify(client, png(rgb)))


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(client):
    levels = np.linspace(0, 65535, 120, dtype=np.float64)
    grey16 = np.tile(levels, (80, 1)).astype(np.uint16)
    grey16[20:60, 30:90] = 65535 - grey16[20:60, 30:90]  # some structure
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode in ("I", "I;16")
    scaled = Image.fromarray(np.rint(grey16 / 257.0).astype(np.uint8))
    got = classify(client, data, "scan.png", "image/png")
    assert same(got, classify(client, png(scaled)))
    clipped = Image.fromarray(np.clip(grey16, 0, 255).astype(np.uint8))
    assert not same(got, classify(client, png(clipped)))


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP"])
def test_palette_image_is_converted_to_rgb(client, fmt):
    palette = BASE.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    data = encode(palette, fmt)
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    assert same(classify(client, data, f"palette.{fmt.lower()}"), classify(client, png(rgb)))


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animated_image_gives_its_first_frame(client, fmt):
    first, second = BASE, smooth_image(120, 80, seed=6)
    data = encode(first, fmt, save_all=True, append_images=[second], duration=100, loop=0)
    decoded = Image.open(io.BytesIO(data))
    assert getattr(decoded, "n_frames", 1) == 2
    got = classify(client, data, f"animated.{fmt.lower()}")
    assert same(got, classify(client, png(decoded.convert("RGB"))))  # frame 0 as Pillow reads it
    decoded.seek(1)
    assert not same(got, classify(client, png(decoded.convert("RGB"))))


def test_one_pixel_image_is_classified(client):
    body = classify(client, png(Image.new("RGB", (1, 1), (200, 40, 40))), "dot.png")
    assert body["image"] == {"width": 1, "height": 1}
    assert len(body["predictions"]) == 10


def test_empty_file_is_400_and_zero_size_image_is_refused(client):
    response = client.post("/v1/classify", files={"file": ("empty.jpg", b"", "image/jpeg")})
    assert response.status_code == 400 and "empty" in response.json()["detail"]
    for width, height in ((0, 0), (0, 20), (20, 0)):
        refused(client, header_bomb(width, height), 415, "not an image")


@pytest.mark.parametrize("size", [(20000, 20), (20, 20000)])
def test_extreme_strip_is_422_with_the_reason(client, size):
    strip = encode(Image.new("RGB", size, (10, 120, 200)), "PNG")
    refused(client, strip, 422, f"{size[0]}x{size[1]}", "aspect ratio")


def test_decompression_bombs_are_413_without_decoding(client):
    before = sample_resources(os.getpid()).rss_bytes  # the app runs in this process
    real_bomb = one_bit_bomb(10_000, 10_000)  # 100 MP, 1-bit: ~12 KB of PNG, 300 MB as RGB
    assert len(real_bomb) < 100_000
    refused(client, real_bomb, 413, "too many pixels")
    refused(client, header_bomb(100_000, 100_000), 413, "pixels")
    grown_mb = (sample_resources(os.getpid()).rss_bytes - before) / 2**20
    assert grown_mb < 30, f"RSS grew by {grown_mb:.0f} MB: the bomb was decoded"


def test_batch_answers_each_special_file_as_it_would_alone(client):
    exif = Image.Exif()
    exif[0x0112] = 6
    files = [
        ("files", ("rotated.jpg", encode(BASE, "JPEG", exif=exif), "image/jpeg")),
        ("files", ("cmyk.jpg", encode(BASE.convert("CMYK"), "JPEG"), "image/jpeg")),
        ("files", ("strip.png", encode(Image.new("RGB", (20000, 20)), "PNG"), "image/png")),
        ("files", ("bomb.png", header_bomb(100_000, 100_000), "image/png")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("text.png", b"hello, world", "image/png")),
    ]
    response = client.post("/v1/classify/batch", params=PARAMS, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == [f[1][0] for f in files]
    assert results[0]["image"] == {"width": 80, "height": 120}
    assert "predictions" in results[1]
    assert [r["error"]["status"] for r in results[2:]] == [422, 413, 400, 415]
