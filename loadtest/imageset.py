"""The images a load test uploads: generated here (seeded), never downloaded.

A mix a real service sees: phone photos in landscape and portrait, squares, panoramas, small
thumbnails and a large camera frame; JPEG at several qualities, PNG in RGB, RGBA and grey.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Upload:
    """One file of the set: its name, bytes, content type and pixel size."""

    filename: str
    data: bytes
    content_type: str
    width: int
    height: int


# (width, height, format, Pillow mode, JPEG quality): sizes and aspect ratios from thumbnails to
# 2 MP, 1:4 to 5:1.
SPECS: tuple[tuple[int, int, str, str, int], ...] = (
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


def smooth_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """Smooth random colour fields: image-like, so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), channels), np.uint8)
    image = Image.fromarray(coarse if channels > 1 else coarse[..., 0], mode)
    return image.resize((width, height), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """``image`` as ``fmt`` bytes."""
    buffer = io.BytesIO()
    options = {"quality": quality} if fmt == "JPEG" else {}
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def build_image_set(seed: int = 0) -> list[Upload]:
    """Every image of :data:`SPECS`, generated from ``seed``."""
    uploads = []
    for index, (width, height, fmt, mode, quality) in enumerate(SPECS):
        image = smooth_image(width, height, mode, seed * 1000 + index)
        suffix = "jpg" if fmt == "JPEG" else "png"
        uploads.append(
            Upload(
                filename=f"{width}x{height}-{mode.lower()}.{suffix}",
                data=encode(image, fmt, quality),
                content_type=f"image/{'jpeg' if fmt == 'JPEG' else 'png'}",
                width=width,
                height=height,
            )
        )
    return uploads
