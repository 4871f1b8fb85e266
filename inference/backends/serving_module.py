"""The served graph as a PyTorch module: uint8 image in, posterior and class score map out.

One class for every PyTorch twin of ``model.onnx``: the exporter builds it around a fully
convolutional VGG (``export.graph.ServingGraph``) and traces it to ONNX; the torch backend
reads an exported graph back into it (:mod:`inference.backends.onnx_reader`); training
validation runs it in memory. The pre-processing belongs to the graph, so all three send the
same uint8 batches.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class ServingModule(nn.Module):
    """uint8 (N, 3, H, W) -> (probs (N, C) float32, scores (N, C, h, w) float32).

    The same computation as the exported graph: normalisation in float32 (``x * scale +
    shift``, i.e. ``(x / 255 - mean) / std``), the conv stack ``layers`` in
    :attr:`compute_dtype`, spatial mean and soft-max in float32. Both outputs are contiguous
    (NCHW) whatever the conv stack's layout.
    """

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, layers: Iterable[nn.Module]):
        super().__init__()
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("shift", shift.to(torch.float32))
        self.layers = nn.Sequential(*layers)
        self.compute_dtype = torch.float32
        self.channels_last = False

    def configure(self, dtype: torch.dtype, channels_last: bool) -> ServingModule:
        """Conv stack in ``dtype`` (normalisation buffers stay float32), optionally NHWC."""
        self.layers.to(dtype)
        if channels_last:
            self.layers.to(memory_format=torch.channels_last)
        self.compute_dtype = dtype
        self.channels_last = channels_last
        return self

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = image.to(torch.float32) * self.scale + self.shift
        x = x.to(self.compute_dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        # Back to NCHW here, not after the call: compiled, the layout change fuses with the cast
        # instead of costing a copy of its own before the scores leave the device.
        scores = self.layers(x).to(torch.float32).contiguous()
        probs = torch.softmax(scores.mean(dim=(2, 3)), dim=1)
        return probs, scores
