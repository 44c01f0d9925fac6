"""Checkpoints: every piece of resume state, written atomically by rank 0, read with `weights_only=True`.

Layout of `last.pt` / `best.pt` (a dict of tensors and plain Python values only)::

    {"format": "ssv2prep-checkpoint-v1", "model": state_dict (no wrapper prefixes), "optimizer": ..., "scaler": ...,
     "epoch": epochs completed, "global_step": optimizer steps taken, "best_top1": float, "config": dict,
     "classes": [str, ...], "world_size": int,
     "rng": [per rank: {"torch": ByteTensor, "cuda_device": ByteTensor | None, "python": tuple, "numpy": {...}}]}

Each rank's RNG state is its own (ranks draw dropout masks from `seed + rank`), and its CUDA state is the one of the
device it trains on, so a run resumes on another number of visible GPUs (older files hold a dict, rank 0's only).
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssv2prep.errors import CheckpointError
from ssv2prep.fsutil import make_temp

log = logging.getLogger(__name__)

FORMAT = "ssv2prep-checkpoint-v1"


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The state of every RNG this process uses (the CUDA one of `device` only), for `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    on_cuda = device is not None and device.type == "cuda"
    return {
        "torch": torch.get_rng_state(),
        "cuda_device": torch.cuda.get_rng_state(device) if on_cuda else None,
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what `rng_state` captured; its CUDA state goes to `device` (when both are CUDA)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda_device") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_device"], device)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """`torch.save` to a temp file beside `path`, then rename onto it; `path` is never left half-written.

    Raises:
        CheckpointError: the folder is not writable or the file system is full (the temp file is removed).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = make_temp(target)
    except OSError as exc:
        raise CheckpointError(f"{target}: cannot write the checkpoint ({exc.strerror or exc})") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
        os.replace(tmp, target)
    except (OSError, RuntimeError) as exc:
        # torch's zip writer reports a full disk as a RuntimeError from inline_container.cc, not as ENOSPC.
        Path(tmp).unlink(missing_ok=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _write_failure(target)
        raise CheckpointError(f"{target}: cannot write the checkpoint ({reason})") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_failure(target: Path) -> str:
    free = shutil.disk_usage(target.parent).free
    amount = f"{free / 2**20:.0f} MiB" if free >= 10 * 2**20 else f"{free // 1024} KiB"
    return f"the write failed with {amount} free on that file system; is it full?"


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> dict[str, Any]:
    """Load one of our checkpoints on the CPU (weights only: no code runs from the file).

    `mmap=True` maps the file instead of reading it: tensors are read only when touched, so looking at the
    metadata (format, config) of a large checkpoint costs almost nothing."""
    from ssv2prep.models.official import unreadable_reason

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint not found")
    try:
        # mmap needs the zip format; an official file in the legacy format is then read whole (and is not ours)
        obj = torch.load(p, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(p))
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{p}: not a readable checkpoint: {unreadable_reason(exc)}") from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an ssv2prep checkpoint (an official TSM .pth? use it with eval/predict)")
    return obj


def is_ours(path: str | Path) -> bool:
    """True when `path` loads as one of our checkpoints (False for official files and others)."""
    try:
        load_checkpoint(path, mmap=True)
    except CheckpointError:
        return False
    return True


def check_compatible(saved: dict[str, Any], wanted: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Raise CheckpointError when a resumed run asks for another architecture than the checkpoint holds."""
    diff = [f"{k}: checkpoint {saved.get(k)!r}, asked {wanted.get(k)!r}" for k in keys if saved.get(k) != wanted.get(k)]
    if diff:
        raise CheckpointError("cannot resume: the run folder holds another model (" + "; ".join(diff) + ")")
