"""Layers that make a data-parallel step equal to one process's step on the same global batch.

Synchronous data parallelism averages gradients, which equals the single-process gradient only
when nothing else depends on how the batch is split. Two things in VGG do:

* **dropout** draws a mask per process from that process's RNG. :class:`BatchDropout` draws the
  mask of the *global* batch from a generator seeded with (seed, epoch, step, layer) and keeps
  its own rows, so masks are the same however the batch is split, and are reproducible on resume;
* **batch-norm** (the ``_bn`` variants) normalises with local batch statistics.
  :func:`convert_sync_batchnorm` uses ``torch.nn.SyncBatchNorm`` on GPUs and
  :class:`CpuSyncBatchNorm` on CPUs, where torch's version refuses to run.

Both keep the state-dict keys of the layers they replace, so checkpoints stay torchvision-shaped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass
class StepClock:
    """Where the current step is: the key of its random draws and this process's rows."""

    key: tuple[int, ...] = (0,)
    global_batch: int = 1
    offset: int = 0


def _seed_of(key: tuple[int, ...]) -> int:
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


class BatchDropout(nn.Module):
    """Dropout with the mask of the whole global batch drawn from ``clock.key`` and ``layer``."""

    def __init__(self, p: float, layer: int, clock: StepClock) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.layer, self.clock = p, layer, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        clock = self.clock
        generator = torch.Generator().manual_seed(_seed_of((*clock.key, self.layer)))
        draws = torch.rand((clock.global_batch, *x.shape[1:]), generator=generator)
        keep = draws[clock.offset : clock.offset + x.shape[0]] >= self.p
        return x * keep.to(device=x.device, dtype=x.dtype) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer}"


def use_batch_dropout(model: nn.Module, clock: StepClock) -> int:
    """Replace every ``nn.Dropout`` in ``model`` by a :class:`BatchDropout`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, BatchDropout(child.p, count, clock))
                count += 1
    return count


class _GlobalBatchNorm(torch.autograd.Function):
    """y = (x - mean) * invstd * weight + bias with mean and invstd of the global batch."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total):  # noqa: ANN001 - autograd signature
        shape = (1, -1, 1, 1)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd)
        ctx.total = total
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        xhat, weight, invstd = ctx.saved_tensors
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        grad_bias = grad.sum(dims)
        grad_weight = (grad * xhat).sum(dims)
        # The normalisation couples every sample of the global batch: sum over all processes.
        sums = torch.cat([grad_bias, grad_weight]).double()
        dist.all_reduce(sums)
        mean_grad, mean_grad_xhat = (sums / ctx.total).to(grad.dtype).chunk(2)
        grad_x = (weight * invstd).view(shape) * (
            grad - mean_grad.view(shape) - xhat * mean_grad_xhat.view(shape)
        )
        return grad_x, grad_weight, grad_bias, None, None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` over the global batch of a gloo process group (CPU training).

    Statistics are summed in float64 across processes; the running averages are updated as
    ``nn.BatchNorm2d`` does (unbiased variance). Outside distributed training it is plain
    ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        with torch.no_grad():
            local = x.double()
            count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float64)
            stats = torch.cat([local.sum(dims), (local * local).sum(dims), count])
            dist.all_reduce(stats)
            channels = x.shape[1]
            total = float(stats[-1])
            mean = stats[:channels] / total
            var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)
            invstd = torch.rsqrt(var + self.eps)
            if self.track_running_stats:
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * total / max(total - 1, 1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.to(x.dtype))
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.to(x.dtype))
        return _GlobalBatchNorm.apply(
            x, self.weight, self.bias, mean.to(x.dtype), invstd.to(x.dtype), total
        )


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm over the global batch: torch's ``SyncBatchNorm`` on GPU, ours on CPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.BatchNorm2d:
                replacement = CpuSyncBatchNorm(
                    child.num_features,
                    child.eps,
                    child.momentum,
                    child.affine,
                    child.track_running_stats,
                )
                replacement.load_state_dict(child.state_dict())
                setattr(parent, name, replacement)
    return model
