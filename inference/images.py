"""Decoding uploaded bytes into an RGB image, with limits checked before pixels are decoded."""

from __future__ import annotations

import io
import math
import re
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
# File suffixes a folder walk takes for images (training folders, int8 calibration, the batch
# client), sorted so messages list them in a stable order; Pillow reads every one of them.
IMAGE_SUFFIXES = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pbm",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)


class ImageError(ValueError):
    """An image the service cannot use; ``kind`` maps to an HTTP status in the front end."""

    kind = "invalid"


class NotAnImage(ImageError):
    kind = "unsupported"  # 415


class CorruptImage(ImageError):
    kind = "corrupt"  # 422


class TooManyPixels(ImageError):
    kind = "too_large"  # 413


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Identify ``data`` and check its pixel count from the header, without decoding pixels."""
    if not data:
        raise NotAnImage("the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own limit (raised to at least ours by the server) answered first; say it our
        # way, with the size its message gives.
        claimed = re.search(r"\((\d+) pixels\)", str(exc))
        size = f": {int(claimed.group(1)):,}" if claimed else ""
        raise TooManyPixels(
            f"the image has too many pixels{size}, over the limit of "
            f"{min(max_pixels, int(Image.MAX_IMAGE_PIXELS or max_pixels)):,}; downscale it "
            "before uploading"
        ) from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(
            "the file is not an image Pillow can read (JPEG, PNG, GIF, WebP, TIFF, BMP, ...)"
        ) from exc
    except Exception as exc:  # a header so broken Pillow fails while identifying it
        raise CorruptImage(f"the image header is corrupt: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image is {width}x{height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,}; downscale it before uploading"
        )
    if width < 1 or height < 1:
        raise CorruptImage(f"the image has no pixels ({width}x{height})")
    return image


def to_rgb(image: Image.Image, draft_short_side: int | None = None) -> Image.Image:
    """Decode ``image`` and convert it to 8-bit RGB the way a classifier expects.

    EXIF orientation is applied; palette, grey, CMYK and alpha images become RGB (alpha is
    dropped, as torchvision's ``ImageFolder`` loader does); 16-bit and float images are scaled to
    8 bits rather than clipped; animated images give their first frame.

    ``draft_short_side`` (off by default): a JPEG whose shorter side is at least twice this is
    decoded at 1/2, 1/4 or 1/8 size by libjpeg's scaled inverse DCT, keeping the shorter side at
    or above it; several times faster for photos much larger than the largest Q.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.seek(0)
            if draft_short_side and image.format == "JPEG":
                _draft(image, draft_short_side)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                image = _high_depth_to_rgb(image)
            elif image.mode == "P":
                image = image.convert("RGBA")
            if image.mode != "RGB":
                image = image.convert("RGB")
            image.load()
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        raise CorruptImage(f"the image is corrupt or truncated: {exc}") from exc
    return image


def _draft(image: Image.Image, short_side: int) -> None:
    """Ask the JPEG decoder for the smallest power-of-two reduction keeping ``short_side``."""
    width, height = image.size
    factor = min(width, height) / short_side
    if factor >= 2:
        # draft() picks the largest s in (8, 4, 2) with size // s >= the requested size.
        image.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        scaled = array / 257.0  # 65535 -> 255
    elif image.mode == "I" and array.size and array.max() > 255:
        scaled = array / 257.0  # 16-bit PNGs decode as mode "I"
    elif image.mode == "F":
        top = float(array.max()) if array.size else 1.0
        scaled = array * (255.0 / top if top > 1.0 else 255.0)
    else:
        scaled = array
    grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_short_side: int | None = None
) -> Image.Image:
    """Bytes to an RGB ``PIL.Image``; raises :class:`ImageError` subclasses on bad input."""
    return to_rgb(open_image(data, max_pixels), draft_short_side)
