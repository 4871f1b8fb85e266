"""FC-to-conv conversion (paper section 3.2) as small pure functions on state dicts.

In the spirit of timm's ``_filter_fn``: a checkpoint of the training form (torchvision's key
names) becomes one of the dense-evaluation form by renaming the classifier and reshaping its
matrices into convolution kernels. Nothing else changes, so the two nets agree exactly at the
training crop.
"""

from __future__ import annotations

import torch

from vgg.models import VGG, FullyConvVGG, VGGSpec

# classifier index in the training form -> head index in the fully convolutional form
_FC_TO_CONV = {"classifier.0": "head.0", "classifier.3": "head.3", "classifier.6": "head.6"}


def classifier_to_conv(
    state_dict: dict[str, torch.Tensor], spec: VGGSpec
) -> dict[str, torch.Tensor]:
    """Map a training-form state dict to the fully convolutional form's keys and shapes.

    FC6's (out, C*k*k) matrix becomes an (out, C, k, k) kernel; FC7 and FC8 become 1x1 kernels.
    Feature weights pass through untouched. Returns a new dict; the input is not modified.
    """
    k = spec.fc6_kernel
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in _FC_TO_CONV:
            converted[key] = tensor
            continue
        new_key = f"{_FC_TO_CONV[prefix]}.{leaf}"
        if leaf == "weight":
            in_channels = spec.feature_channels if prefix == "classifier.0" else tensor.shape[1]
            side = k if prefix == "classifier.0" else 1
            tensor = tensor.reshape(tensor.shape[0], in_channels, side, side)
        converted[new_key] = tensor
    return converted


def to_fully_conv(model: VGG) -> FullyConvVGG:
    """The dense-evaluation twin of a training-form VGG, sharing no storage with it."""
    fcn = FullyConvVGG(model.spec)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fcn.load_state_dict(classifier_to_conv(state, model.spec))
    return fcn.train(model.training)
