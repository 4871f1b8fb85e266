"""Checkpoint files of a run: written atomically, read with ``weights_only=True``.

``last.pth`` holds everything needed to continue exactly (weights, optimiser, schedule, epoch
and step, RNG states, history); ``best.pth`` holds the best validated weights only. Both are in
the format ``vgg.checkpoint.load_weights`` and ``export.exporter.export_model`` read.

Saving: :func:`last_checkpoint` / :func:`best_checkpoint` build the dicts, :func:`atomic_save`
writes them. Resuming: :func:`read_last` finds ``last.pth``, :func:`restore_model` puts its
weights into a freshly built net, :func:`run_state` gives back the position in training and
:func:`restore_training` the optimiser, schedule and RNG states.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from train.normalisation import Normalisation
from train.schedule import LearningRate
from vgg.checkpoint import CHECKPOINT_FORMAT, check_state_dict, read_weights_file
from vgg.models import VGG, VGGSpec

LAST = "last.pth"
BEST = "best.pth"


@dataclass
class Progress:
    """Running sums of an epoch (kept in the checkpoint for a mid-epoch resume)."""

    loss: float = 0.0
    correct: float = 0.0
    seconds: float = 0.0

    def to_list(self) -> list[float]:
        """``[loss, correct, seconds]``, as the checkpoint keeps them."""
        return [self.loss, self.correct, self.seconds]


@dataclass
class RunState:
    """Where a run is: what ``last.pth`` records besides the weights and the optimiser."""

    epoch: int = 0  # completed epochs
    step: int = 0  # completed steps of the current epoch
    history: list[dict] = field(default_factory=list)
    best: dict | None = None
    finished: bool = False
    progress: Progress = field(default_factory=Progress)


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


def last_checkpoint(
    model: VGG,
    classes,
    norm: Normalisation,
    state: RunState,
    optimizer: torch.optim.Optimizer,
    schedule: LearningRate,
    settings: dict,
    world_size: int,
) -> dict:
    """``last.pth``: the weights and everything needed to continue exactly where ``state`` is."""
    return weights_checkpoint(
        model,
        classes,
        norm.mean,
        norm.std,
        state.epoch,
        step=state.step,
        finished=state.finished,
        optimizer=optimizer.state_dict(),
        scheduler=schedule.state_dict(),
        rng=rng_states(),
        normalisation=norm.to_dict(),
        history=state.history,
        best=state.best,
        progress=state.progress.to_list(),
        args=settings,
        world_size=world_size,
    )


def best_checkpoint(model: VGG, classes, norm: Normalisation, epoch: int, metrics: dict) -> dict:
    """``best.pth``: the best validated weights and their validation metrics."""
    return weights_checkpoint(model, classes, norm.mean, norm.std, epoch, metrics=metrics)


def read_last(directory: Path, resume: bool = True) -> dict | None:
    """``directory/last.pth`` when there is one to continue from; None for a fresh run."""
    path = Path(directory) / LAST
    if not path.is_file():
        return None
    if not resume:
        raise ValueError(f"{path} exists; remove {directory} or drop --no-resume to continue it")
    return read(path)


def restore_model(model: VGG, saved: dict, spec: VGGSpec, classes, path: Path) -> None:
    """Load ``saved``'s weights into ``model``, refusing a checkpoint of another net or classes."""
    if saved["spec"] != spec.to_dict() or list(saved["classes"]) != list(classes):
        raise ValueError(
            f"{path} was trained as {saved['spec']} on classes {saved['classes'][:5]}..., "
            f"which differs from this command; use another --output-dir"
        )
    check_state_dict(model, saved["model"], str(path))
    model.load_state_dict(saved["model"])


def run_state(saved: dict) -> RunState:
    """The position in training ``last.pth`` was saved at."""
    return RunState(
        epoch=saved["epoch"],
        step=saved["step"],
        history=list(saved["history"]),
        best=saved["best"],
        progress=Progress(*saved["progress"]),
    )


def restore_training(saved: dict, optimizer: torch.optim.Optimizer, schedule: LearningRate) -> None:
    """The optimiser, the schedule and every RNG as ``last.pth`` saved them."""
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    restore_rng_states(saved["rng"])
