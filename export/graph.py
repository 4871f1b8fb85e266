"""The served graph: uint8 image in, posterior and class score map out, checked against PyTorch.

Pre-processing belongs to the model: the graph casts the uint8 RGB batch, normalises it with the
mean and std its weights were trained with, runs the fully convolutional VGG, and returns

* ``probs`` (N, C): soft-max of the spatially averaged score map (paper section 3.2), float32;
* ``scores`` (N, C, h, w): the class score map itself, float32.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from inference.backends.serving_module import ServingModule
from vgg.models import FullyConvVGG

# Input sizes checked before anything is written: square, 3:4 and an odd pair.
VERIFY_SIZES: tuple[tuple[int, int], ...] = ((224, 224), (256, 341), (301, 457))
# Largest relative error (max |ONNX Runtime - PyTorch| / max |PyTorch|) an export may have. Two
# correct fp32 runs differ by float rounding: errors of independent sign add like a random walk
# over a path of sum(n) accumulations (n: terms per output of each layer), about
# 2**-24 * sqrt(sum(n)), 1.7e-5 for VGG-19's 78,235; 1e-4 leaves room for other CPUs' kernels.
# A wrong graph (normalisation, weight layout, pooling) is off by 1e-1 or more. fp16 stores
# weights and activations with 2**-11 rounding.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


class ServingGraph(ServingModule):
    """``FullyConvVGG`` with the cast, normalisation, spatial mean and soft-max inside.

    The convolutions run in ``dtype``; averaging and soft-max stay in float32 whatever it is.
    """

    def __init__(
        self,
        net: FullyConvVGG,
        mean: Sequence[float],
        std: Sequence[float],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add, computed in float32.
        super().__init__(1.0 / (255.0 * std_t), -mean_t / std_t, [net.eval()])
        self.configure(dtype, channels_last=False)
        self.eval()

    @property
    def net(self) -> FullyConvVGG:
        """The fully convolutional VGG inside."""
        return self.layers[0]


def export_onnx(graph: ServingGraph, opset: int = 17, example_size: int = 224) -> bytes:
    """Serialise ``graph`` to ONNX bytes with dynamic N, H and W."""
    example = torch.zeros(1, 3, example_size, example_size, dtype=torch.uint8)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        # The TorchScript exporter: for a plain conv net it is ~15x faster than the dynamo one
        # and gives the same graph; both were checked against ONNX Runtime here.
        torch.onnx.export(
            graph,
            (example,),
            buffer,
            input_names=["image"],
            output_names=["probs", "scores"],
            dynamic_axes={
                "image": {0: "batch", 2: "height", 3: "width"},
                "probs": {0: "batch"},
                "scores": {0: "batch", 2: "map_height", 3: "map_width"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buffer.getvalue()


def relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference| (0 when both are zero)."""
    scale = float(np.max(np.abs(reference))) or 1.0
    return float(np.max(np.abs(actual.astype(np.float64) - reference))) / scale


def verify_against_torch(
    onnx_bytes: bytes,
    reference: ServingGraph,
    sizes: Sequence[tuple[int, int]] = VERIFY_SIZES,
    seed: int = 0,
) -> list[dict]:
    """Run ONNX Runtime (CPU) and the float32 PyTorch graph on random images of each size.

    Returns one row per size with the relative error of ``probs`` and ``scores``.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for height, width in sizes:
        image = torch.randint(0, 256, (1, 3, height, width), dtype=torch.uint8, generator=generator)
        with torch.no_grad():
            ref_probs, ref_scores = (t.double().numpy() for t in reference(image))
        probs, scores = session.run(["probs", "scores"], {"image": image.numpy()})
        rows.append(
            {
                "size": (height, width),
                "probs": relative_error(probs, ref_probs),
                "scores": relative_error(scores, ref_scores),
            }
        )
    return rows
