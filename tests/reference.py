"""An independent plain-PyTorch reference of the paper's dense and multi-crop evaluation.

Written from the paper (sections 3.2 and 4.3, Table 5) and torchvision's VGG alone, without
vgg/, export/ or inference/: the FC layers are applied as convolutions with ``F.conv2d`` on
reshaped weights, in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def dense_scores(tv_model, image_uint8: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Class score map (N, C, h, w) of a torchvision-layout VGG applied fully convolutionally.

    Runs in float64; the model is left in the dtype it came in (pass a float64 model to spare
    the conversions when calling many times)."""
    dtype = next(tv_model.parameters()).dtype
    x = image_uint8.double() / 255.0
    x = (x - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, 3, 1, 1)
    model = tv_model.double().eval()
    fc6, fc7, fc8 = (m for m in model.classifier if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        feats = model.features(x)
        channels = feats.shape[1]
        k = int(round((fc6.in_features / channels) ** 0.5))
        y = F.relu(F.conv2d(feats, fc6.weight.view(fc6.out_features, channels, k, k), fc6.bias))
        y = F.relu(F.conv2d(y, fc7.weight[:, :, None, None], fc7.bias))
        y = F.conv2d(y, fc8.weight[:, :, None, None], fc8.bias)
    tv_model.to(dtype)
    return y


def dense_probs(tv_model, image_uint8: torch.Tensor, mean=MEAN, std=STD) -> np.ndarray:
    """Soft-max of the spatially averaged score map, float64 numpy (N, C)."""
    scores = dense_scores(tv_model, image_uint8, mean, std)
    return torch.softmax(scores.mean(dim=(2, 3)), dim=1).numpy()


def rescale(image: Image.Image, q: int) -> Image.Image:
    """Shorter side to Q, longer side floor(long * Q / short + 0.5), bilinear."""
    w, h = image.size
    if w <= h:
        size = (q, int(np.floor(h * q / w + 0.5)))
    else:
        size = (int(np.floor(w * q / h + 0.5)), q)
    return image.resize(size, Image.Resampling.BILINEAR)


def to_batch(image: Image.Image, flip: bool) -> torch.Tensor:
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    x = arr.permute(2, 0, 1).unsqueeze(0)
    if flip:
        x = torch.cat([x, torch.flip(x, dims=[3])])
    return x


def protocol_probs(
    models: list, image: Image.Image, scales=(256, 384, 512), flip: bool = True, mean=MEAN, std=STD
) -> np.ndarray:
    """Posterior averaged over flips, then scales, then models (paper sections 3.2 and 4.4)."""
    return protocol(models, image, scales, flip, mean=mean, std=std).probs


GRID = 5  # crops per side in multi-crop evaluation: 5 x 5 per scale (paper section 4.3)


def crops(views: torch.Tensor, size: int, grid: int = GRID) -> torch.Tensor:
    """(1, 3, H, W) -> (grid * grid, 3, size, size): ``size``-sided crops whose starts are evenly
    spaced along each side, the first at 0 and the last at the far border, row by row."""
    _, _, height, width = views.shape

    def starts(length: int) -> list[int]:
        return [int(np.floor(i * max(length - size, 0) / (grid - 1) + 0.5)) for i in range(grid)]

    found = [
        views[0, :, top : top + size, left : left + size]
        for top in starts(height)
        for left in starts(width)
    ]
    return torch.stack(found)


def multicrop_probs(
    model, image: Image.Image, q: int, crop: int, flip: bool = True, mean=MEAN, std=STD
) -> tuple[np.ndarray, float]:
    """One scale of multi-crop evaluation: the mean posterior of the 5 x 5 crops of the image
    rescaled to Q (and of their mirror images), and the largest class score of any crop."""
    views = crops(to_batch(rescale(image, q), flip=False), crop)
    if flip:
        views = torch.cat([views, torch.flip(views, dims=[3])])
    scores = dense_scores(model, views, mean, std)
    probs = torch.softmax(scores.mean(dim=(2, 3)), dim=1).numpy()
    return probs.mean(axis=0), float(scores.abs().max())


@dataclass
class Posteriors:
    """What the reference says of one image: the fused posterior, each model's posterior, and
    the largest class score any view produced (the soft-max's input scale, for error bounds)."""

    probs: np.ndarray
    per_model: list[np.ndarray] = field(default_factory=list)
    largest_score: float = 0.0


MODES = ("dense", "multicrop", "both")


def protocol_modes(
    models: list,
    image: Image.Image,
    scales=(256, 384, 512),
    flip: bool = True,
    modes=MODES,
    crop: int = 64,
    mean=MEAN,
    std=STD,
) -> dict[str, Posteriors]:
    """The full protocol for one image in each of ``modes``, sharing the work they have in
    common. "dense": each scale's posterior is that of the whole rescaled image (and its flip);
    "multicrop": the mean over ``crop``-sided crops (and their flips); "both": per model, the
    mean of the dense and the multi-crop posteriors (each already averaged over scales; Table
    5). Then the mean over models."""
    wanted = {"dense", "multicrop"} & ({"dense", "multicrop"} if "both" in modes else set(modes))
    parts: dict[str, list[np.ndarray]] = {kind: [] for kind in wanted}  # per model
    largest = {kind: 0.0 for kind in wanted}
    for model in models:
        dense, multicrop = [], []
        for q in scales:
            if "dense" in wanted:
                batch = to_batch(rescale(image, q), flip)
                scores = dense_scores(model, batch, mean, std)
                probs = torch.softmax(scores.mean(dim=(2, 3)), dim=1).numpy()
                dense.append(probs.mean(axis=0))
                largest["dense"] = max(largest["dense"], float(scores.abs().max()))
            if "multicrop" in wanted:
                probs, score = multicrop_probs(model, image, q, crop, flip, mean, std)
                multicrop.append(probs)
                largest["multicrop"] = max(largest["multicrop"], score)
        for kind, found in (("dense", dense), ("multicrop", multicrop)):
            if kind in wanted:
                parts[kind].append(np.mean(found, axis=0))
    results = {}
    for kind in wanted & set(modes):
        results[kind] = Posteriors(np.mean(parts[kind], axis=0), parts[kind], largest[kind])
    if "both" in modes:
        per_model = [(d + m) / 2 for d, m in zip(parts["dense"], parts["multicrop"], strict=True)]
        results["both"] = Posteriors(np.mean(per_model, axis=0), per_model, max(largest.values()))
    return results


def protocol(
    models: list,
    image: Image.Image,
    scales=(256, 384, 512),
    flip: bool = True,
    mode: str = "dense",
    crop: int = 64,
    mean=MEAN,
    std=STD,
) -> Posteriors:
    """The full protocol for one image in one mode (see :func:`protocol_modes`)."""
    return protocol_modes(models, image, scales, flip, (mode,), crop, mean, std)[mode]
