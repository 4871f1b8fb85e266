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
