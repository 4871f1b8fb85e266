"""Checkpoint files of a run: written atomically, read with ``weights_only=True``.

``last.pth`` holds everything needed to continue exactly (weights, optimiser, schedule, epoch
and step, RNG states, history); ``best.pth`` holds the best validated weights only. Both are in
the format ``vgg.checkpoint.load_weights`` and ``export/to_onnx.py`` read.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from vgg.checkpoint import CHECKPOINT_FORMAT, read_weights_file

LAST = "last.pth"
BEST = "best.pth"


def atomic_save(obj: dict, path: Path) -> Path:
    """``torch.save`` into a temporary file beside ``path``, flushed to disk, then renamed."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def rng_states() -> dict:
    """Global RNG states as tensors and plain values (loadable with ``weights_only=True``)."""
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "pos": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    """Undo :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def weights_checkpoint(model: torch.nn.Module, classes, mean, std, epoch: int, **extra) -> dict:
    """The part every checkpoint has: what ``vgg.checkpoint.load_weights`` needs."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "spec": model.spec.to_dict(),
        "model": state,
        "classes": list(classes),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "epoch": epoch,
        **extra,
    }


def read(path: Path) -> dict:
    """A checkpoint as a dict (raises ``vgg.checkpoint.CheckpointError`` with a reason)."""
    return read_weights_file(path)
