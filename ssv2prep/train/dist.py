"""Distributed set-up from the torchrun environment, and the few collectives the trainer needs.

`init_distributed()` reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), or Slurm's SLURM_PROCID / SLURM_LOCALID /
SLURM_STEP_NUM_TASKS for `srun` launches (with MASTER_ADDR / MASTER_PORT set); without them it is a single process.
NCCL on CUDA, gloo on CPU (so tests run real DDP on CPU). The process group gets an explicit timeout, so a rank
that stops answering ends the job after `timeout_s` instead of the backend's default.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

from ssv2prep.errors import ConfigError, Ssv2PrepError

log = logging.getLogger(__name__)
T = TypeVar("T")


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


DEFAULT_TIMEOUT_S = 900.0


def world_from_env(env: Mapping[str, str]) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables, else from Slurm's (an `srun` launch), else (0, 0, 1).

    Raises:
        ConfigError: Slurm started several tasks but MASTER_ADDR / MASTER_PORT (where they meet) are not set.
    """
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"])
    # The step's task count, not the allocation's (SLURM_NTASKS): a batch script itself runs as one task.
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if ntasks > 1:
        if "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
            raise ConfigError(
                f"Slurm started {ntasks} tasks: set MASTER_ADDR and MASTER_PORT (or launch with torchrun), or the "
                "tasks would train side by side into the same --out"
            )
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", "0")), ntasks
    return 0, 0, 1


def device_index(local_rank: int, device_count: int) -> int:
    """The CUDA device of a process: its local rank among the GPUs it can see.

    With every GPU of the node visible that is `cuda:LOCAL_RANK`; with one GPU per process (Slurm
    `--gpus-per-task`, Kubernetes device plugins) it is `cuda:0`; in between, ranks share GPUs round-robin.
    """
    if device_count < 1:
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    return local_rank % device_count


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto` -> this process's GPU (`device_index`) when CUDA is available, else cpu; `cpu` / `cuda` force one."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))


def init_distributed(device: str = "auto", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join the process group when a launcher's environment is present; return this process's `DistInfo`.

    `timeout_s` bounds every collective: a rank that waits longer for the others fails instead of hanging."""
    rank, local_rank, world_size = world_from_env(os.environ)
    dev = pick_device(device, local_rank)
    if world_size > 1 and not torch_dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # before init, so NCCL binds the right GPU
        for key, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
            os.environ.setdefault(key, str(value))  # an srun launch: the env:// rendezvous reads these
        torch_dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s)
        )
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


def all_ok(ok: bool, info: DistInfo) -> bool:
    """True when `ok` holds on every rank (a collective: every rank must call it).

    Rank 0 alone writes files; it passes whether that worked, so the other ranks stop with it instead of
    waiting at the next collective until the timeout."""
    failed = all_reduce_sum(torch.tensor([0.0 if ok else 1.0]), info)
    return failed.item() == 0


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if info.distributed:
        torch_dist.barrier()


def on_main(info: DistInfo, what: str, fn: Callable[[], T]) -> T | None:
    """Run `fn` on rank 0 only (it writes the files) and let every rank know whether it worked.

    When it fails, whatever the error, rank 0 raises it and the other ranks stop at once with a pointer to it,
    instead of waiting at the next collective until the timeout. An OSError becomes one line naming the path."""
    error: Exception | None = None
    result = None
    if info.is_main:
        try:
            result = fn()
        except Exception as exc:  # any error: the other ranks must learn of it (a plot's ValueError too)
            error = exc
    if all_ok(error is None, info):
        return result
    if error is None:
        raise Ssv2PrepError(f"rank 0 failed to {what} (its error is in its log); stopping")
    if isinstance(error, OSError):
        raise Ssv2PrepError(f"{error.filename or '--out'}: cannot {what} ({error.strerror or error})") from error
    raise error
