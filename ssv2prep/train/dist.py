"""Distributed set-up from the torchrun environment, and the few collectives the trainer needs.

`init_distributed()` reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun); without them it is a single process.
NCCL on CUDA, gloo on CPU (so tests run real DDP on CPU).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is in use."""
        return self.world_size > 1


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> cuda:LOCAL_RANK when CUDA is available, else cpu; `cpu` / `cuda` force one."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when its environment is present; return this process's `DistInfo`."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before init, so NCCL binds the right GPU
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        log.debug("rank %d of %d joined (%s)", rank, world_size, dev)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def teardown(info: DistInfo) -> None:
    """Leave the process group (if any)."""
    if info.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (a copy; the input is unchanged). Single process: returns a copy."""
    out = values.detach().clone()
    if info.distributed:
        backend_device = info.device if info.device.type == "cuda" else torch.device("cpu")
        out = out.to(backend_device)
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects)."""
    if not info.distributed:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    torch_dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.distributed:
        torch_dist.barrier()
