"""Loading weights: torchvision state dicts and our own training checkpoints.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from vgg.models import IMAGENET_MEAN, IMAGENET_STD, VGG, VGGSpec, resolve_arch

# Marks a checkpoint written by train/ (a dict with the spec, the weights and their metadata).
CHECKPOINT_FORMAT = "vggserve-checkpoint/1"


class CheckpointError(ValueError):
    """A weights file that cannot be used, with a message that says why and what to do."""


@dataclass
class LoadedWeights:
    """A ready model and the facts the exporter records next to it."""

    model: VGG
    classes: list[str] | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source: str = ""
    sha256: str = ""
    extra: dict = field(default_factory=dict)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights_file(path: str | Path) -> dict:
    """``torch.load`` with ``weights_only=True``; raise :class:`CheckpointError` on any failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; pass the path of a .pth file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot read {path} as PyTorch weights ({first}); is it a state dict saved with "
            "torch.save, complete and not corrupt?"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict()"
        )
    return obj


def check_state_dict(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict
        and isinstance(state_dict[k], torch.Tensor)
        and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped", misshaped),
        ):
            if keys:
                shown = ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
                parts.append(f"{label} keys: {shown}")
        raise CheckpointError(
            f"{what} does not match {model.spec.arch}: "
            + "; ".join(parts)
            + ". Is --arch the architecture these weights were trained as?"
        )


def load_state_dict_into(spec: VGGSpec, state_dict: dict, what: str = "checkpoint") -> VGG:
    """Build ``spec`` and load a torchvision-format state dict into it, strictly."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP-saved files
    fc8 = state_dict.get("classifier.6.weight")
    if isinstance(fc8, torch.Tensor) and fc8.ndim == 2 and fc8.shape[0] != spec.num_classes:
        spec = replace(spec, num_classes=int(fc8.shape[0]))  # a fine-tuned head: take its classes
    model = VGG(spec)
    check_state_dict(model, state_dict, what)
    model.load_state_dict(state_dict)
    return model.eval()


def load_weights(path: str | Path, arch: str | None = None, **overrides) -> LoadedWeights:
    """Load a torchvision state dict (needs ``arch``) or one of our training checkpoints.

    Our checkpoints carry their spec, class names and normalisation; for them ``arch``, if given,
    must agree with the stored configuration.
    """
    path = Path(path)
    obj = read_weights_file(path)
    digest = sha256_of(path)
    if obj.get("format") == CHECKPOINT_FORMAT:
        spec = VGGSpec.from_dict(obj["spec"])
        if arch is not None:
            wanted = resolve_arch(arch)
            if (wanted.config, wanted.batch_norm) != (spec.config, spec.batch_norm):
                raise CheckpointError(
                    f"{path} is a {spec.arch} checkpoint, not {wanted.arch}; "
                    f"pass --arch {spec.arch} or the right file"
                )
        model = load_state_dict_into(spec, obj["model"], str(path))
        return LoadedWeights(
            model=model,
            classes=list(obj.get("classes") or []) or None,
            mean=tuple(obj.get("mean", IMAGENET_MEAN)),
            std=tuple(obj.get("std", IMAGENET_STD)),
            source=str(path),
            sha256=digest,
            extra={"epoch": obj.get("epoch")},
        )
    if "model" in obj and isinstance(obj["model"], dict) and "format" not in obj:
        obj = obj["model"]  # torchvision references' checkpoints: {"model": state_dict, ...}
    if arch is None:
        raise CheckpointError(f"{path} is a plain state dict; say which architecture with --arch")
    spec = resolve_arch(arch, **overrides)
    model = load_state_dict_into(spec, obj, str(path))
    return LoadedWeights(model=model, source=str(path), sha256=digest)
