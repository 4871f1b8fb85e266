"""Shared fixtures: small VGG variants and weights files built here (nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vgg.models import build  # noqa: E402

# A VGG-16 (config D) at 1/8 width, FC 128, crop 64: same topology, milliseconds per image.
SMALL = {"width": 0.125, "fc_width": 128, "crop": 64, "num_classes": 10}


@pytest.fixture(scope="session")
def small_state_dict_path(tmp_path_factory) -> Path:
    """A torchvision-format state dict of a small VGG-16 with random (seeded) weights."""
    torch.manual_seed(0)
    model = build("vgg16", **SMALL)
    path = tmp_path_factory.mktemp("weights") / "small16.pth"
    torch.save(model.state_dict(), path)
    return path


def peaked_small_model(arch: str, seed: int):
    """A small VGG whose FC layers are scaled up so posteriors are far from uniform."""
    torch.manual_seed(seed)
    model = build(arch, **SMALL)
    with torch.no_grad():
        for layer in model.classifier:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def two_model_repository(tmp_path_factory):
    """A repository with small VGG-16 ("m16") and VGG-19 ("m19") exports, and their torch models.

    Returns (repository path, {name: training-form torch model}).
    """
    from export import to_onnx

    root = tmp_path_factory.mktemp("two-models")
    repo = root / "repo"
    models = {}
    for name, arch, seed in (("m16", "vgg16", 16), ("m19", "vgg19", 19)):
        model = peaked_small_model(arch, seed)
        path = root / f"{name}.pth"
        torch.save(model.state_dict(), path)
        flags = ["--width", str(SMALL["width"]), "--fc-width", str(SMALL["fc_width"])]
        code = to_onnx.main(
            [
                "--arch",
                arch,
                "--weights",
                str(path),
                "--name",
                name,
                "--repository",
                str(repo),
                "--crop",
                str(SMALL["crop"]),
                # Served at the paper's scales by default: the tests check the protocol there.
                "--scales",
                "256,384,512",
                *flags,
            ]
        )
        assert code == 0
        models[name] = model
    return repo, models
