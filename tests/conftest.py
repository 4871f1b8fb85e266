"""Shared fixtures: small VGG variants and weights files built here (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from testkit.models import SMALL, write_small_repository


@pytest.fixture(scope="session")
def small_state_dict_path(tmp_path_factory) -> Path:
    """A torchvision-format state dict of a small VGG-16 with random (seeded) weights."""
    from vgg.models import build

    torch.manual_seed(0)
    model = build("vgg16", **SMALL)
    path = tmp_path_factory.mktemp("weights") / "small16.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def two_model_repository(tmp_path_factory):
    """A repository with small VGG-16 ("m16") and VGG-19 ("m19") exports, and their torch models.

    Returns (repository path, {name: training-form torch model}); each model's weights are
    beside the repository as ``NAME.pth``.
    """
    root = tmp_path_factory.mktemp("two-models")
    repository = root / "repo"
    # Served at the paper's scales by default: the tests check the protocol there.
    models = write_small_repository(repository, scales=(256, 384, 512), weights_dir=root)
    return repository, models
