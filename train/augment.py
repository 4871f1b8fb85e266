"""Training-time augmentation of the paper (section 3.1), as small functions of an explicit RNG.

An image is rescaled so its shorter side is the training scale S (fixed, or drawn per image from
[Smin, Smax]: scale jittering), a ``crop x crop`` window is cut at a random place, flipped
horizontally with probability 1/2, and shifted in colour along the principal components of the
training set's RGB pixels (AlexNet's "PCA lighting"). Every random choice comes from the
``numpy.random.Generator`` passed in, so a sample's augmentation is a pure function of its seed.

The crop stays uint8; the colour shift is returned separately as three floats and added to the
batch on the training device, where the same normalisation as the served graph
(``export.graph.ServingGraph``) follows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from inference.protocol import rescale_shorter_side

# AlexNet: "a Gaussian with mean zero and standard deviation 0.1".
LIGHTING_STD = 0.1


def parse_scale(text: str) -> tuple[int, int]:
    """``"256"`` -> (256, 256); ``"256:512"`` -> (256, 512) (scale jittering)."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"scale {text!r}: give S (e.g. 256) or Smin:Smax (e.g. 256:512)")
    return values[0], values[1]


def sample_scale(rng: np.random.Generator, smin: int, smax: int) -> int:
    """The training scale S of one image: uniform on the integers of [smin, smax]."""
    return int(rng.integers(smin, smax + 1))


def random_crop(image: Image.Image, crop: int, rng: np.random.Generator) -> Image.Image:
    """A ``crop x crop`` window at a uniformly random position (the image must be large enough)."""
    width, height = image.size
    if width < crop or height < crop:
        raise ValueError(f"cannot crop {crop}x{crop} from a {width}x{height} image; raise S")
    left = int(rng.integers(0, width - crop + 1))
    top = int(rng.integers(0, height - crop + 1))
    return image.crop((left, top, left + crop, top + crop))


@dataclass(frozen=True)
class Lighting:
    """AlexNet's PCA colour augmentation for pixels on the [0, 1] scale.

    ``eigval`` are the eigenvalues of the RGB covariance (descending) and ``eigvec`` the
    eigenvectors as columns. A shift is ``eigvec @ (alpha * eigval)`` with ``alpha ~ N(0, std^2)``
    per component, the same for every pixel of an image.
    """

    eigval: tuple[float, float, float]
    eigvec: tuple[tuple[float, float, float], ...]
    std: float = LIGHTING_STD

    def shift(self, rng: np.random.Generator) -> np.ndarray:
        """One image's RGB shift in units of 1/255 (the uint8 pixel scale), float32 (3,)."""
        if self.std == 0:
            return np.zeros(3, dtype=np.float32)
        alpha = rng.normal(0.0, self.std, size=3)
        shift = np.asarray(self.eigvec) @ (alpha * np.asarray(self.eigval))
        return (255.0 * shift).astype(np.float32)

    def covariance(self) -> np.ndarray:
        """The covariance of :meth:`shift` (uint8 units), for checks: ``V diag(std*l)^2 V^T``."""
        vec = np.asarray(self.eigvec)
        return (255.0 * self.std) ** 2 * vec @ np.diag(np.asarray(self.eigval) ** 2) @ vec.T


def pixel_statistics(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray, Lighting]:
    """Per-channel mean and std on [0, 1] and the PCA of RGB pixels over some images."""
    pixels = np.concatenate(
        [np.asarray(im.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0 for im in images]
    )
    mean = pixels.mean(axis=0)
    std = pixels.std(axis=0)
    eigval, eigvec = np.linalg.eigh(np.cov(pixels, rowvar=False))
    order = np.argsort(eigval)[::-1]
    eigval, eigvec = eigval[order], eigvec[:, order]
    lighting = Lighting(
        eigval=tuple(float(v) for v in eigval),
        eigvec=tuple(tuple(float(x) for x in row) for row in eigvec),
    )
    return mean, std, lighting


@dataclass(frozen=True)
class TrainAugmentation:
    """The whole training transform: rescale to S, random crop, random flip, colour shift."""

    smin: int
    smax: int
    crop: int
    flip: bool = True
    lighting: Lighting | None = None

    def __post_init__(self) -> None:
        if self.smin < self.crop:
            raise ValueError(
                f"training scale S={self.smin} is smaller than the crop {self.crop}; "
                f"use --scale of at least {self.crop}"
            )

    def __call__(
        self, image: Image.Image, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, dict]:
        """(uint8 (3, crop, crop) array, float32 (3,) colour shift, what was drawn)."""
        scale = sample_scale(rng, self.smin, self.smax)
        rescaled = rescale_shorter_side(image, scale)
        window = random_crop(rescaled, self.crop, rng)
        flipped = self.flip and bool(rng.random() < 0.5)
        pixels = np.asarray(window, dtype=np.uint8)
        if flipped:
            pixels = pixels[:, ::-1]
        chw = np.ascontiguousarray(pixels.transpose(2, 0, 1))
        shift = self.lighting.shift(rng) if self.lighting else np.zeros(3, dtype=np.float32)
        return chw, shift, {"scale": scale, "size": rescaled.size, "flipped": flipped}
