"""The paper's dense multi-scale protocol, backend-agnostic (no HTTP here)."""

from inference.classifier import (
    Classification,
    Classifier,
    ClassifyOptions,
    ExtremeAspectRatio,
    Heatmap,
    OptionError,
    Prediction,
)
from inference.images import CorruptImage, ImageError, NotAnImage, TooManyPixels, decode_image
from inference.protocol import DEFAULT_SCALES, dense_batch, rescale_shorter_side, rescaled_size
from inference.repository import ModelEntry, RepositoryError, read_repository

__all__ = [
    "DEFAULT_SCALES",
    "Classification",
    "ClassifyOptions",
    "Classifier",
    "CorruptImage",
    "ExtremeAspectRatio",
    "Heatmap",
    "ImageError",
    "ModelEntry",
    "NotAnImage",
    "OptionError",
    "Prediction",
    "RepositoryError",
    "TooManyPixels",
    "decode_image",
    "dense_batch",
    "read_repository",
    "rescale_shorter_side",
    "rescaled_size",
]
