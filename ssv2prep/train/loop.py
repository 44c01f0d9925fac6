"""One training epoch and one evaluation pass. No saving, no scheduling decisions beyond the lr per step.

Clips arrive as uint8 from the loader; they are converted and normalised on the device (`normalize_clips`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ssv2prep.errors import Ssv2PrepError
from ssv2prep.train.dist import DistInfo, all_gather_objects, all_reduce_sum
from ssv2prep.train.metrics import Meter, top_hits

log = logging.getLogger(__name__)


class NonFiniteLossError(Ssv2PrepError):
    """The loss became NaN or infinite; training stops and the last good checkpoint is kept."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """What every step needs besides the model and data."""

    dist: DistInfo
    amp_dtype: torch.dtype | None = None  # None: full precision
    channels_last: bool = False
    log_every: int = 10
    clip_grad: float | None = None


def autocast(ctx: StepContext) -> contextlib.AbstractContextManager[Any]:
    """Mixed-precision context on CUDA when asked, a no-op otherwise."""
    if ctx.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.dist.device.type, dtype=ctx.amp_dtype)


def _to_device(batch: Any, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
    from ssv2prep.data.loader import normalize_clips

    x = normalize_clips(batch.clips, ctx.dist.device, channels_last=ctx.channels_last)
    return x, batch.labels.to(ctx.dist.device, non_blocking=True)


def _step_values(
    loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, ctx: StepContext, *, epoch: int, step: int
) -> tuple[float, int, int]:
    """(loss, top-1 hits, top-5 hits) of a step, read back from the device in one transfer, with every rank's
    finite check folded in: the step's only host sync.

    Raises:
        NonFiniteLossError: the loss is NaN or infinite on any rank (every rank must agree, or the ranks that
            carry on would wait forever for the one that stopped).
    """
    loss = loss.detach().float()
    hits = top_hits(logits.detach().float(), y)
    bad = all_reduce_sum((~torch.isfinite(loss)).float().view(1), ctx.dist)
    values = torch.cat([loss.view(1), hits.float(), bad.to(loss.device)]).tolist()
    if values[3] > 0:
        raise NonFiniteLossError(
            f"the loss became {values[0]} at epoch {epoch}, step {step}; stopping (the last good checkpoint is "
            "kept). Try a lower --lr, --clip-grad, or --amp off"
        )
    return values[0], int(values[1]), int(values[2])


def _optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer: Any, scaler: Any, ctx: StepContext) -> None:
    scaler.scale(loss).backward()
    if ctx.clip_grad is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), ctx.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    criterion: nn.Module,
    *,
    epoch: int,
    start_step: int,
    set_lr: Callable[[int], float],
    ctx: StepContext,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    meter: Meter | None = None,
) -> dict[str, float]:
    """Train over `loader` once; returns the epoch's means (all-reduced over ranks).

    `set_lr(step)` sets the lr of every parameter group for optimizer step `step` and returns the base lr.
    `on_step` receives a dict per step (step, loss, top1, lr, clips/s, data wait) for progress and logging.
    `meter` accumulates the epoch's means (pass the restored one when resuming mid-epoch; a new one by default).
    """
    model.train()
    meter = meter if meter is not None else Meter()
    step = start_step
    t_prev = time.perf_counter()
    for batch in loader:
        t_data = time.perf_counter()
        lr = set_lr(step)
        x, y = _to_device(batch, ctx)
        with autocast(ctx):
            logits = model(x)
            loss = criterion(logits.float(), y)
        loss_value, top1, top5 = _step_values(loss, logits, y, ctx, epoch=epoch, step=step)
        _optimizer_step(loss, model, optimizer, scaler, ctx)
        n = y.shape[0]
        t_end = time.perf_counter()
        stats = {
            "step": step,
            "loss": loss_value,
            "top1": 100 * top1 / n,
            "top5": 100 * top5 / n,
            "lr": lr,
            "clips_per_s": n / (t_end - t_prev),
            "data_wait": (t_data - t_prev) / (t_end - t_prev),
            "skipped": batch.skipped,
        }
        for key in ("loss", "top1", "top5"):
            meter.update(key, stats[key], n)
        meter.update("data_wait", stats["data_wait"])
        meter.update("skipped", batch.skipped, 1)
        meter.update("seconds", t_end - t_prev, 1)
        step += 1
        if on_step:
            on_step(stats)
        t_prev = time.perf_counter()
    return _reduce_meter(meter, ctx.dist) | {"steps": step - start_step}


def sum_meter(meter: Meter, info: DistInfo) -> Meter:
    """`meter`'s sums and counts added over all ranks (a collective: every rank calls it with the same names)."""
    names = sorted(meter.sums)
    sums = all_reduce_sum(torch.tensor([meter.sums[k] for k in names], dtype=torch.float64), info)
    counts = all_reduce_sum(torch.tensor([meter.counts[k] for k in names], dtype=torch.float64), info)
    return Meter(dict(zip(names, sums.tolist(), strict=True)), dict(zip(names, counts.tolist(), strict=True)))


def _reduce_meter(meter: Meter, info: DistInfo) -> dict[str, float]:
    total = sum_meter(meter, info)
    out = {k: total.mean(k) for k in total.sums}
    out["skipped"] = total.sums.get("skipped", 0.0)
    return out


@dataclass(frozen=True, slots=True)
class EvalOutput:
    """Video-level scores of every sample seen by any rank, in a fixed order (sorted by key)."""

    keys: list[str]
    labels: np.ndarray  # (N,) int64, -1 where unknown
    scores: np.ndarray  # (N, K) float32: mean of raw logits over views
    skipped: int
    seconds: float


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: Iterable[Any], *, ctx: StepContext, on_batch: Callable[[int], None] | None = None
) -> EvalOutput:
    """Score every sample of `loader` (eval batches: clips (B, V, T, 3, H, W)); gather all ranks' results."""
    model.eval()
    keys, labels, scores, skipped = [], [], [], 0
    start = time.perf_counter()
    for batch in loader:
        b, v = batch.clips.shape[:2]
        clips = batch.clips.reshape(b * v, *batch.clips.shape[2:])
        x, y = _to_device(batch._replace(clips=clips), ctx)
        with autocast(ctx):
            logits = model(x)
        scores.append(logits.float().view(b, v, -1).mean(dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
        keys.extend(batch.keys)
        skipped += batch.skipped
        if on_batch:
            on_batch(b)
    seconds = time.perf_counter() - start
    local = (
        keys,
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(scores) if scores else np.zeros((0, 0), np.float32),
        skipped,
        seconds,
    )
    return _merge(all_gather_objects(local, ctx.dist))


def _merge(parts: list[tuple[Any, ...]]) -> EvalOutput:
    keys = [k for p in parts for k in p[0]]
    if len(set(keys)) != len(keys):
        raise Ssv2PrepError("evaluation saw a video more than once across ranks; the shards overlap")
    labels = np.concatenate([p[1] for p in parts if len(p[1])]) if keys else np.zeros(0, np.int64)
    scores = np.concatenate([p[2] for p in parts if len(p[2])]) if keys else np.zeros((0, 0), np.float32)
    order = np.argsort(np.array(keys, dtype=object), kind="stable") if keys else np.zeros(0, np.int64)
    return EvalOutput(
        keys=[keys[i] for i in order],
        labels=labels[order].astype(np.int64) if keys else labels,
        scores=scores[order] if keys else scores,
        skipped=sum(p[3] for p in parts),
        seconds=max(p[4] for p in parts),
    )
