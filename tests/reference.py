"""An independent plain-PyTorch reference of the paper's dense evaluation.

Written from the paper (section 3.2) and torchvision's VGG alone, without vgg/, export/ or
inference/: the FC layers are applied as convolutions with ``F.conv2d`` on reshaped weights.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def dense_scores(tv_model, image_uint8: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """Class score map (N, C, h, w) of a torchvision-layout VGG applied fully convolutionally."""
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
    tv_model.float()
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
    per_model = []
    for model in models:
        per_scale = []
        for q in scales:
            probs = dense_probs(model, to_batch(rescale(image, q), flip), mean, std)
            per_scale.append(probs.mean(axis=0))
        per_model.append(np.mean(per_scale, axis=0))
    return np.mean(per_model, axis=0)
