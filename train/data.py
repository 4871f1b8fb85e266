"""ImageFolder data for training and validation, with augmentation that is a function of a seed.

A training sample is addressed by ``(epoch, index)``: its augmentation comes from a generator
seeded with ``(seed, epoch, index)``, and the order of an epoch from one seeded with
``(seed, epoch)``. Nothing depends on worker processes, their number or on what ran before, so
a resumed run (even mid-epoch) and a run split over several processes see exactly the same
samples as one uninterrupted process.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from inference.images import IMAGE_SUFFIXES, ImageError, decode_image
from train.augment import TrainAugmentation

# Salts keep the streams of different uses of one seed apart.
_ORDER_SALT, _AUGMENT_SALT = 11, 13


class DataError(ValueError):
    """A data folder that cannot be used, with what to do about it."""


@dataclass(frozen=True)
class Folder:
    """An ImageFolder split: class names (sorted folder names) and (path, label) samples."""

    root: Path
    classes: tuple[str, ...]
    samples: tuple[tuple[str, int], ...]

    def __len__(self) -> int:
        return len(self.samples)


def scan_folder(root: Path, classes: tuple[str, ...] | None = None) -> Folder:
    """Read an ImageFolder tree (``root/<class>/<image>``), as torchvision's ``ImageFolder`` does.

    ``classes`` forces the class list (the validation split must use the training split's).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root} is not a folder; expected an ImageFolder tree root/<class>/<image>"
        )
    found = tuple(
        sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    )
    if classes is None:
        classes = found
    elif set(found) - set(classes):
        extra = ", ".join(sorted(set(found) - set(classes)))
        raise DataError(f"{root} has classes that the training split lacks: {extra}")
    if not classes:
        raise DataError(f"{root} has no class folders; expected root/<class>/<image>")
    samples = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append((str(path), label))
    if not samples:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return Folder(root=root, classes=tuple(classes), samples=tuple(samples))


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to RGB exactly as the server decodes an upload
    (:func:`inference.images.decode_image`: EXIF orientation, colour modes, pixel limits), so the
    error measured in training is the error the served model makes; raises :class:`DataError`
    naming the file."""
    try:
        return decode_image(Path(path).read_bytes())
    except (OSError, ImageError) as exc:
        raise DataError(f"cannot use training image {path}: {exc}") from exc


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one training sample's augmentation."""
    return np.random.default_rng([seed, _AUGMENT_SALT, epoch, index])


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of sample indices for one epoch."""
    return np.random.default_rng([seed, _ORDER_SALT, epoch]).permutation(size)


class TrainSet(Dataset):
    """Augmented training samples, indexed by ``(epoch, index)``.

    Returns ``(uint8 (3, crop, crop) tensor, float32 (3,) colour shift, label)``.
    """

    def __init__(self, folder: Folder, augmentation: TrainAugmentation, seed: int) -> None:
        self.folder = folder
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        epoch, index = key
        path, label = self.folder.samples[index]
        pixels, shift, _ = self.augmentation(load_rgb(path), sample_rng(self.seed, epoch, index))
        return torch.from_numpy(pixels), torch.from_numpy(shift), label


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """This process's share of each global batch of an epoch, from step ``start_step`` on.

    The epoch's permutation is cut into global batches of ``global_batch`` (the incomplete last
    one is dropped, so every step has the same size on every process); process ``rank`` of
    ``world`` takes the ``rank``-th contiguous slice of each. Iterated in the main process, so
    :meth:`set_epoch` works with persistent workers.
    """

    def __init__(self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1):
        if global_batch % world:
            raise ValueError(
                f"the global batch {global_batch} does not split evenly over {world} processes"
            )
        if size < global_batch:
            raise DataError(
                f"{size} training images are fewer than one batch of {global_batch}; "
                "lower --batch-size"
            )
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world = rank, world
        self.local_batch = global_batch // world
        self.epoch, self.start_step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_order(self.size, self.seed, self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, int(i)) for i in order[start : start + self.local_batch]]
