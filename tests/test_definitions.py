"""Definitions every command shares: the scale and model list parsers, the image suffixes."""

from __future__ import annotations

import pytest
from PIL import Image

from inference.images import IMAGE_SUFFIXES
from inference.protocol import parse_scales
from inference.repository import parse_model_names


@pytest.mark.parametrize(
    ("text", "scales"), [("256,384,512", (256, 384, 512)), (" 64 , 96 ", (64, 96)), ("7", (7,))]
)
def test_scales_parse(text, scales):
    assert parse_scales(text) == scales


@pytest.mark.parametrize("text", ["", " ", "64,,96", "64,", "64;96", "0", "-64", "6.5", "²"])
def test_bad_scales_say_what_to_give(text):
    with pytest.raises(ValueError) as error:
        parse_scales(text)
    assert str(error.value) == (
        f"{text!r} is not a comma-separated list of positive integers (e.g. 256,384,512)"
    )


def test_model_names_parse():
    assert parse_model_names("vgg16, vgg19") == ("vgg16", "vgg19")
    for text in ("", ",", "vgg16,,vgg19"):
        with pytest.raises(ValueError, match="is not a comma-separated list of model names"):
            parse_model_names(text)


def test_every_image_suffix_is_a_format_pillow_reads():
    readable = {
        suffix
        for suffix, format_name in Image.registered_extensions().items()
        if format_name in Image.OPEN
    }
    assert set(IMAGE_SUFFIXES) <= readable
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= set(
        IMAGE_SUFFIXES
    )
    assert list(IMAGE_SUFFIXES) == sorted(IMAGE_SUFFIXES)  # messages list them in this order
