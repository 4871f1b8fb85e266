"""The normalisation a run trains with: the graph's mean/std and the training set's colour PCA."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from train.augment import Lighting, pixel_statistics
from train.data import Folder, load_rgb
from vgg.models import IMAGENET_MEAN, IMAGENET_STD

# Training images are shrunk to this shorter side before their pixel statistics are taken.
STATS_SIDE = 64
_STATS_SALT = 17


@dataclass
class Normalisation:
    """The graph's mean/std (on [0, 1]) and the colour PCA of the training set."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lighting: Lighting | None

    def to_dict(self) -> dict:
        """Plain values, as the checkpoint keeps them."""
        lighting = None
        if self.lighting is not None:
            lighting = {
                "eigval": list(self.lighting.eigval),
                "eigvec": [list(r) for r in self.lighting.eigvec],
            }
        return {"mean": list(self.mean), "std": list(self.std), "lighting": lighting}

    @classmethod
    def from_dict(cls, values: dict, lighting_std: float) -> Normalisation:
        """Undo :meth:`to_dict`; ``lighting_std`` 0 turns the colour shift off."""
        lighting = values.get("lighting")
        return cls(
            tuple(values["mean"]),
            tuple(values["std"]),
            None
            if lighting is None or lighting_std == 0
            else Lighting(
                tuple(lighting["eigval"]), tuple(tuple(r) for r in lighting["eigvec"]), lighting_std
            ),
        )


def dataset_statistics(
    folder: Folder, count: int, seed: int, normalize: str, lighting_std: float
) -> Normalisation:
    """Mean/std for ``normalize`` and the colour PCA, from ``count`` sampled training images."""
    rng = np.random.default_rng([seed, _STATS_SALT])
    picks = rng.choice(len(folder), size=min(count, len(folder)), replace=False)
    images = []
    for i in sorted(picks):
        image = load_rgb(folder.samples[i][0])
        if min(image.size) > STATS_SIDE:
            scale = STATS_SIDE / min(image.size)
            image = image.resize(
                (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            )
        images.append(image)
    mean, std, lighting = pixel_statistics(images)
    if normalize == "imagenet":
        graph_mean, graph_std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "mean-std":
        graph_mean, graph_std = tuple(mean.tolist()), tuple(std.tolist())
    else:  # the paper: subtract the mean RGB value, nothing else (std 1/255 on the [0,1] scale)
        graph_mean, graph_std = tuple(mean.tolist()), (1 / 255,) * 3
    lighting = Lighting(lighting.eigval, lighting.eigvec, lighting_std) if lighting_std else None
    return Normalisation(graph_mean, graph_std, lighting)
