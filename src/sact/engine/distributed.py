"""``torchrun`` process-group setup (gloo on CPU, NCCL on CUDA) and small helpers.

Only rank 0 writes checkpoints, logs and metrics; every rank trains on its own shard
of the data (``DistributedSampler``) and ``DistributedDataParallel`` averages the
gradients, so all ranks hold the same weights after every step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "all_reduce_sum", "resolve_device", "global_rank",
           "local_rank", "is_rank_zero"]


def global_rank() -> int:
    """This process's rank under ``torchrun`` (``RANK``); 0 in a single process."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine under ``torchrun`` (``LOCAL_RANK``); 0 in a single process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_rank_zero() -> bool:
    """True in the process that writes files and prints summaries (rank 0, or no ``torchrun``)."""
    return global_rank() == 0


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size``; ``is_main`` for rank 0."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

    Raises:
        InputError: not a device name, or a CUDA device that is not available.
    """
    from ..errors import InputError

    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={name!r} but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
        elif device.index >= torch.cuda.device_count():
            raise InputError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type not in ("cpu", "mps"):
        raise InputError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"device={name!r} but MPS is not available")
    return device


def setup_distributed(device: torch.device) -> DistInfo:
    """Joins the ``torchrun`` process group if ``WORLD_SIZE > 1`` (else a no-op).

    Uses NCCL for CUDA devices and gloo for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=global_rank(), world_size=world, local_rank=local_rank())


def cleanup_distributed(info: DistInfo) -> None:
    """Leaves the process group (if this module joined one)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (``t`` itself when not distributed)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
