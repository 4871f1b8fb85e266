"""Checkpoint import: torchvision state dicts, our checkpoints, and clear failures."""

from __future__ import annotations

import pytest
import torch
import torchvision

from testkit.models import SMALL
from vgg.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_weights
from vgg.models import build


def test_torchvision_state_dict_loads(tmp_path):
    reference = torchvision.models.vgg11(weights=None)
    path = tmp_path / "vgg11.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_weights(path, "vgg11")
    assert loaded.model.spec.arch == "vgg11"
    assert len(loaded.sha256) == 64
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)


def test_our_checkpoint_carries_spec_classes_and_normalisation(tmp_path):
    model = build("vgg19", **SMALL)
    path = tmp_path / "ours.pth"
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "spec": model.spec.to_dict(),
            "model": model.state_dict(),
            "classes": [f"shape{i}" for i in range(10)],
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
        },
        path,
    )
    loaded = load_weights(path)
    assert loaded.model.spec == model.spec
    assert loaded.classes[3] == "shape3"
    assert loaded.mean == (0.5, 0.5, 0.5)
    with pytest.raises(CheckpointError, match="is a vgg19 checkpoint, not vgg16"):
        load_weights(path, "vgg16")


def test_mismatched_checkpoint_names_missing_unexpected_and_misshaped(tmp_path):
    state = build("vgg16", **SMALL).state_dict()
    del state["features.0.bias"]
    state["features.99.weight"] = torch.zeros(1)
    state["classifier.3.weight"] = torch.zeros(5, 5)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(path, "vgg16", width=SMALL["width"], fc_width=SMALL["fc_width"], crop=64)
    message = str(info.value)
    assert "missing keys: features.0.bias" in message
    assert "unexpected keys: features.99.weight" in message
    assert "mis-shaped keys: classifier.3.weight (5, 5) != (128, 128)" in message


# Small nets with torchvision's key names (vgg.models keeps them): a key check needs no full-size
# weights.
SIZES = {"width": SMALL["width"], "fc_width": SMALL["fc_width"], "crop": SMALL["crop"]}


def test_checkpoint_of_another_arch_fails_naming_keys(tmp_path):
    path = tmp_path / "vgg11.pth"
    torch.save(build("vgg11", **SIZES).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"does not match vgg13: missing keys: features\.2"):
        load_weights(path, "vgg13", **SIZES)


def test_state_dict_of_bn_variant_into_plain_arch_fails(tmp_path):
    path = tmp_path / "bn.pth"
    torch.save(build("vgg11_bn", **SIZES).state_dict(), path)
    with pytest.raises(
        CheckpointError,
        match=r"does not match vgg11: missing keys: .*unexpected keys: .*running_mean",
    ):
        load_weights(path, "vgg11", **SIZES)


def test_weights_only_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": torch.zeros(1), "obj": torchvision.models.vgg11}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(path, "vgg11")


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_corrupt_or_missing_files_raise_clear_errors(tmp_path, content):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(path, "vgg16")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.pth", "vgg16")
