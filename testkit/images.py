"""Images built here, never downloaded: photo-like fields, the load tests' mixed set, and the
awkward files the API must refuse (truncated, not an image, pixel bombs).

Every random image is drawn by :func:`smooth_image` from a seed, so the same call gives the same
pixels on every machine.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

CHANNELS = {"RGB": 3, "RGBA": 4, "L": 1}


def smooth_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Smooth random colour fields (a random 16x coarser grid, bicubically enlarged): more
    photo-like than noise, so JPEG sizes are realistic and classes differ between seeds.

    ``mode`` is ``RGB``, ``RGBA`` or ``L``.
    """
    channels = CHANNELS[mode]
    rng = np.random.default_rng(seed)
    shape = (max(2, height // 16), max(2, width // 16), channels)
    coarse = rng.integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(coarse if channels > 1 else coarse[..., 0], mode)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose every row and column differs (red codes x, green y), so a crop's
    position, a flip or a rotation shows in the pixels."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs % 256, ys % 256, (xs * 7 + ys * 3) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
    """``image`` saved as ``fmt`` (a Pillow format name) with Pillow's ``options``, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def jpeg(width: int = 320, height: int = 240, seed: int = 0, quality: int = 90) -> bytes:
    """A JPEG of :func:`smooth_image`."""
    return encode(smooth_image(width, height, seed), "JPEG", quality=quality)


def png(image: Image.Image) -> bytes:
    """``image`` as an RGB PNG (lossless: what a decoder of it returns is the image itself)."""
    return encode(image.convert("RGB"), "PNG")


def decoded(data: bytes) -> Image.Image:
    """``data`` decoded by Pillow to RGB, without EXIF rotation."""
    return Image.open(io.BytesIO(data)).convert("RGB")


# --- files the API must refuse ------------------------------------------------------------------


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    """The first ``keep`` of a file, as an interrupted upload leaves it."""
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
    t = np.linspace(0, 1, height)[:, None, None]
    sky = np.array([90, 150, 230]) * (1 - t) + np.array([250, 220, 180]) * t
    image = Image.fromarray(np.broadcast_to(sky, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    sx, sy, r = width * 0.73, height * 0.23, width * 0.08
    draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=(255, 210, 80))
    ridge = [(0, 0.69), (0.25, 0.48), (0.52, 0.67), (0.75, 0.52), (1, 0.69), (1, 1), (0, 1)]
    draw.polygon([(x * width, y * height) for x, y in ridge], fill=(60, 120, 70))
    return image


# --- the mixed set a load test uploads ----------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """One file of an upload set: its name, bytes, content type and pixel size."""

    filename: str
    data: bytes
    content_type: str
    width: int
    height: int


# What a real service sees: phone photos in landscape and portrait, squares, panoramas, small
# thumbnails and a large camera frame; JPEG at several qualities, PNG in RGB, RGBA and grey.
# (width, height, format, mode, JPEG quality): thumbnails to 2 MP, aspect ratios 1:4 to 5:1.
IMAGE_SET: tuple[tuple[int, int, str, str, int], ...] = (
    (320, 240, "JPEG", "RGB", 90),  # 4:3 landscape
    (240, 320, "JPEG", "RGB", 85),  # 3:4 portrait
    (640, 480, "JPEG", "RGB", 75),
    (480, 640, "PNG", "RGB", 0),
    (500, 500, "JPEG", "RGB", 95),  # square
    (1024, 768, "JPEG", "RGB", 85),
    (1600, 1200, "JPEG", "RGB", 80),  # a 2 MP camera frame
    (900, 180, "JPEG", "RGB", 90),  # 5:1 panorama
    (150, 600, "PNG", "RGB", 0),  # 1:4 tall strip
    (96, 64, "JPEG", "RGB", 90),  # thumbnail, smaller than most Q
    (300, 200, "PNG", "RGBA", 0),  # alpha is dropped
    (400, 300, "PNG", "L", 0),  # grey
    (333, 222, "JPEG", "L", 90),  # grey JPEG
)


def build_image_set(seed: int = 0) -> list[Upload]:
    """Every image of :data:`IMAGE_SET`, drawn from ``seed``."""
    uploads = []
    for index, (width, height, fmt, mode, quality) in enumerate(IMAGE_SET):
        image = smooth_image(width, height, seed * 1000 + index, mode)
        options = {"quality": quality} if fmt == "JPEG" else {}
        suffix = "jpg" if fmt == "JPEG" else "png"
        uploads.append(
            Upload(
                filename=f"{width}x{height}-{mode.lower()}.{suffix}",
                data=encode(image, fmt, **options),
                content_type=f"image/{'jpeg' if fmt == 'JPEG' else 'png'}",
                width=width,
                height=height,
            )
        )
    return uploads


def mixed_sizes(count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs and PNGs (every third) of random sizes 80-899 px a side: many aspect
    ratios, portrait, landscape and square, so a server sees many input shapes."""
    rng = np.random.default_rng(seed)
    files = []
    for index in range(count):
        width, height = (int(v) for v in rng.integers(80, 900, size=2))
        image = smooth_image(width, height, seed * 1000 + index)
        files.append(encode(image, "PNG") if index % 3 == 0 else encode(image, "JPEG"))
    return files
