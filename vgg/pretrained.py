"""torchvision's ImageNet weights, found in torchvision's cache or downloaded through its API."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision

from vgg.checkpoint import CheckpointError, LoadedWeights, load_state_dict_into, read_weights_file
from vgg.checkpoint import sha256_of as _sha256_of
from vgg.models import IMAGENET_MEAN, IMAGENET_STD, TORCHVISION_NAMES, resolve_arch


def imagenet_categories() -> list[str]:
    """ImageNet's 1000 class names from torchvision's weight metadata (no download)."""
    return list(torchvision.models.VGG16_Weights.IMAGENET1K_V1.meta["categories"])


def _weights_enum(arch: str):
    spec = resolve_arch(arch)
    name = next((n for n, c in TORCHVISION_NAMES.items() if c == spec.config), None)
    if name is None:
        raise CheckpointError(
            f"torchvision has no ImageNet weights for configuration {spec.config} ({arch}); "
            "train one with python -m train and pass --weights PATH"
        )
    name += "_bn" if spec.batch_norm else ""
    return torchvision.models.get_model_weights(name).IMAGENET1K_V1, name


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's cache keeps (or would keep) this architecture's ImageNet weights."""
    weights, _ = _weights_enum(arch)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def load_imagenet(arch: str) -> LoadedWeights:
    """ImageNet weights: from torchvision's cache, else downloaded; a clear error offline."""
    weights, name = _weights_enum(arch)
    path = imagenet_weights_path(arch)
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(weights.url, str(path), progress=True)
        except Exception as exc:
            path.unlink(missing_ok=True)
            raise CheckpointError(
                f"ImageNet weights for {name} are not in torchvision's cache ({path}) and could "
                f"not be downloaded ({type(exc).__name__}: {exc}). Copy the file there, or pass "
                f"a torchvision-format state dict with --weights PATH"
            ) from exc
    state = read_weights_file(path)
    model = load_state_dict_into(resolve_arch(arch), state, str(path))
    return LoadedWeights(
        model=model,
        classes=list(weights.meta["categories"]),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        source=f"torchvision:{weights}",
        sha256=_sha256_of(path),
    )
