"""Test images built here, never downloaded: photos-like JPEGs, broken files, pixel bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colour fields (more image-like than noise, so JPEG keeps them well)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    """``image`` saved in ``fmt`` as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def jpeg(width: int = 320, height: int = 240, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG of a smooth random image."""
    return encode(smooth_image(width, height, seed), "JPEG", quality=quality)


def decoded(data: bytes) -> Image.Image:
    """What the server sees: the file decoded by Pillow to RGB."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first part of a file, as an interrupted upload leaves it."""
    return data[: int(len(data) * keep)]


def minimal_pdf() -> bytes:
    """A small valid one-page PDF (Pillow writes PDFs but cannot read them)."""
    return encode(Image.new("RGB", (8, 8), (200, 30, 30)), "PDF")


def one_bit_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of ``width x height`` pixels that compresses to a few kilobytes."""
    return encode(Image.new("1", (width, height)), "PNG", optimize=True)


def header_bomb(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width x height`` (CRC fixed, so the header is valid)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")  # length (4 bytes) precedes the type, the CRC follows the data
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def landscape(width: int = 640, height: int = 480) -> Image.Image:
    """A drawn landscape (sky, sun, hills): a friendlier picture for the page's screenshots."""
    from PIL import ImageDraw

    t = np.linspace(0, 1, height)[:, None, None]
    sky = np.array([90, 150, 230]) * (1 - t) + np.array([250, 220, 180]) * t
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    sx, sy, r = width * 0.73, height * 0.23, width * 0.08
    draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, 210, 80))
    ridge = [(0, 0.69), (0.25, 0.48), (0.52, 0.67), (0.75, 0.52), (1, 0.69), (1, 1), (0, 1)]
    draw.polygon([(x * width, y * height) for x, y in ridge], fill=(60, 120, 70))
    return image
