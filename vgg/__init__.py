"""VGG model definitions (paper Table 1), FC-to-conv conversion and checkpoint import."""

from vgg.checkpoint import CheckpointError, LoadedWeights, load_state_dict_into, load_weights
from vgg.convert import classifier_to_conv, to_fully_conv
from vgg.models import (
    CONFIGS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_NAMES,
    VGG,
    FullyConvVGG,
    VGGSpec,
    build,
    count_parameters,
    resolve_arch,
)

__all__ = [
    "CONFIGS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_NAMES",
    "VGG",
    "CheckpointError",
    "FullyConvVGG",
    "LoadedWeights",
    "VGGSpec",
    "build",
    "classifier_to_conv",
    "count_parameters",
    "load_state_dict_into",
    "load_weights",
    "resolve_arch",
    "to_fully_conv",
]
