"""Plain ``torch.distributed`` for synchronous data parallelism, started by ``torchrun``.

One process per device: ``torchrun --nproc-per-node N -m train ...`` on one machine, or with
``--nnodes``/``--rdzv-endpoint`` across machines. NCCL on GPUs, gloo on CPUs. Without torchrun's
environment everything here degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    """This process's place in the job."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start(device: str = "auto") -> Process:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
        torch.cuda.set_device(local_rank)
        chosen = torch.device("cuda", local_rank)
    elif device == "cpu":
        chosen = torch.device("cpu")
    else:
        raise ValueError(f"--device {device!r}: use auto, cpu or cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Process(rank, world, local_rank, local_world, chosen)


def stop() -> None:
    """Leave the process group."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _device() -> torch.device:
    backend = dist.get_backend() if dist.is_initialized() else "gloo"
    return (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )


def sum_all(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def any_process(flag: bool) -> bool:
    """True when ``flag`` is true on any process (so all stop at the same step)."""
    return sum_all([1.0 if flag else 0.0])[0] > 0


def gather_objects(value: object) -> list[object]:
    """Every process's ``value``, in rank order (just ``[value]`` without a process group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
