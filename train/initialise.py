"""Weight initialisation (paper section 3.1): N(0, 1e-2), Glorot, Kaiming, or layers of a trained A.

The paper trained configuration A from N(0, 1e-2) weights and zero biases, then started the
deeper nets with A's first four convolutional layers and its three FC layers, the rest random;
it notes that Glorot & Bengio's scheme works without pre-training. Kaiming's scheme (what
torchvision uses) is offered for small-width nets, where N(0, 1e-2) starves the signal.

Layers are matched by their paper names (``conv3_2``: second conv of the third stack), so A's
conv1_1, conv2_1, conv3_1 and conv3_2 land in the layers of the same name and shape in D or E.
"""

from __future__ import annotations

from torch import nn

from vgg.checkpoint import CheckpointError
from vgg.models import CONFIGS, VGG, VGGSpec

INITS = ("normal", "glorot", "kaiming")
FC_LAYERS = ("classifier.0", "classifier.3", "classifier.6")
# A's "first four convolutional layers".
COPIED_CONVS = 4


def initialise(model: VGG, scheme: str) -> None:
    """Re-initialise every conv and FC layer of ``model`` in place; biases zero, batch-norm 1/0."""
    if scheme not in INITS:
        raise ValueError(f"unknown initialisation {scheme!r}; choose one of {', '.join(INITS)}")
    last_fc = model.classifier[6]
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            continue
        if not isinstance(module, nn.Conv2d | nn.Linear):
            continue
        if scheme == "normal":
            nn.init.normal_(module.weight, 0.0, 1e-2)
        elif scheme == "glorot":
            nn.init.xavier_uniform_(module.weight)
        elif module is last_fc:  # kaiming: the soft-max layer stays small, as torchvision's
            nn.init.normal_(module.weight, 0.0, 1e-2)
        elif isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        else:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(module.bias)


def conv_layers(spec: VGGSpec) -> list[tuple[str, int]]:
    """(paper name, index in ``features``) of every conv, in order: ("conv1_1", 0), ..."""
    layers, index, stack, position = [], 0, 1, 1
    for item in CONFIGS[spec.config]:
        if item == "M":
            index, stack, position = index + 1, stack + 1, 1
        elif item == "LRN":
            index += 1
        else:
            layers.append((f"conv{stack}_{position}", index))
            index += 3 if spec.batch_norm else 2  # conv (+ bn) + relu
            position += 1
    return layers


def _copy(target: nn.Module, source: nn.Module, what: str) -> None:
    for name, tensor in source.state_dict().items():
        mine = target.state_dict()[name]
        if mine.shape != tensor.shape:
            raise CheckpointError(
                f"--init-from: layer {what}.{name} has shape {tuple(tensor.shape)} in the source "
                f"but {tuple(mine.shape)} here; use a source net of the same width, FC width, "
                "crop and classes"
            )
    target.load_state_dict(source.state_dict())


def init_from(model: VGG, source: VGG) -> list[str]:
    """Copy the first four conv layers and the three FC layers of ``source`` into ``model``.

    Returns the names of the layers copied. Batch-norm parameters travel with their conv when
    both nets have them.
    """
    target_layers = dict(conv_layers(model.spec))
    copied = []
    for name, source_index in conv_layers(source.spec)[:COPIED_CONVS]:
        if name not in target_layers:
            raise CheckpointError(f"--init-from: {model.spec.arch} has no layer {name}")
        index = target_layers[name]
        _copy(model.features[index], source.features[source_index], name)
        if model.spec.batch_norm and source.spec.batch_norm:
            _copy(model.features[index + 1], source.features[source_index + 1], f"{name}/bn")
        copied.append(name)
    for key in FC_LAYERS:
        index = int(key.split(".")[1])
        _copy(model.classifier[index], source.classifier[index], key)
        copied.append(key)
    return copied
