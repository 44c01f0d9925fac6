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


class _DeviceTally:
    """Loss sum, top-1/top-5 hits and the first non-finite step since the last `read`, kept on the device, so a
    training step queues its metrics without waiting for the device; `read` is the one host sync per sync point.

    The first bad step is recorded on the device (`torch.where` on a step counter that lives there too), so the
    error can name it even when it is read steps later.
    """

    def __init__(self, device: torch.device, first_step: int) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss * clips, top-1 hits, top-5 hits
        self.step = torch.tensor(first_step, dtype=torch.int64, device=device)
        self.first_bad = torch.tensor(-1, dtype=torch.int64, device=device)
        self.bad_loss = torch.tensor(0.0, dtype=torch.float32, device=device)
        self.clips = 0  # known on the host: the batch sizes
        self.steps = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Queue one step's loss (a scalar mean over the batch) and hits; no host sync."""
        loss = loss.detach().float()
        hits = top_hits(logits.detach().float(), y)
        n = y.shape[0]
        self.sums += torch.cat([(loss.double() * n).view(1), hits.double()])
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(newly_bad, self.step, self.first_bad)
        self.bad_loss = torch.where(newly_bad, loss, self.bad_loss)
        self.step += 1
        self.clips += n
        self.steps += 1

    def read(self, ctx: StepContext, *, epoch: int) -> tuple[float, float, float, int, int]:
        """(loss sum, top-1 hits, top-5 hits, clips, steps) since the previous read, then start afresh.

        A collective: every rank calls it at the same steps (the non-finite flag is all-reduced here), so the ranks
        stop together or not at all.

        Raises:
            NonFiniteLossError: a loss since the last read was NaN or infinite on some rank; names the first such
                step (over all ranks) and its loss.
        """
        bad = all_reduce_sum((self.first_bad >= 0).double().view(1), ctx.dist).to(self.sums.device)
        values = torch.cat([self.sums, bad, self.first_bad.double().view(1), self.bad_loss.double().view(1)]).tolist()
        if values[3] > 0:
            first = [(s, v) for s, v in all_gather_objects((int(values[4]), values[5]), ctx.dist) if s >= 0]
            step, loss = min(first)
            raise NonFiniteLossError(
                f"the loss became {loss} at epoch {epoch}, step {step}; stopping (the last good checkpoint is "
                "kept). Try a lower --lr, --clip-grad, or --amp off"
            )
        out = (values[0], values[1], values[2], self.clips, self.steps)
        self.sums.zero_()
        self.clips = self.steps = 0
        return out


@dataclass(slots=True)
class _LogWindow:
    """Host-side sums over the steps since the last train record: the device values as read at sync points, the
    timings per step."""

    loss: float = 0.0  # loss * clips
    top1: float = 0.0  # hits
    top5: float = 0.0
    synced_clips: int = 0
    clips: int = 0
    seconds: float = 0.0
    wait_s: float = 0.0
    skipped: int = 0

    def add_step(self, clips: int, seconds: float, wait_s: float, skipped: int) -> None:
        self.clips += clips
        self.seconds += seconds
        self.wait_s += wait_s
        self.skipped += skipped

    def add_synced(self, loss_sum: float, top1: float, top5: float, clips: int) -> None:
        self.loss += loss_sum
        self.top1 += top1
        self.top5 += top5
        self.synced_clips += clips

    def means(self) -> dict[str, float]:
        """Loss and accuracies (percent) per clip over the window's synced steps."""
        n = max(1, self.synced_clips)
        return {"loss": self.loss / n, "top1": 100 * self.top1 / n, "top5": 100 * self.top5 / n}

    def record(self) -> dict[str, Any]:
        """The window as a train record's fields (all of its steps synced)."""
        return self.means() | {
            "clips_per_s": self.clips / self.seconds if self.seconds > 0 else 0.0,
            "data_wait": self.wait_s / self.seconds if self.seconds > 0 else 0.0,
            "skipped": self.skipped,
        }


def _sync(tally: _DeviceTally, window: _LogWindow, meter: Meter, ctx: StepContext, *, epoch: int) -> None:
    """Read the device tally (the host sync; raises NonFiniteLossError) into the log window and the epoch meter."""
    loss_sum, top1, top5, clips, _ = tally.read(ctx, epoch=epoch)
    window.add_synced(loss_sum, top1, top5, clips)
    if clips:
        meter.update("loss", loss_sum / clips, clips)
        meter.update("top1", 100 * top1 / clips, clips)
        meter.update("top5", 100 * top5 / clips, clips)


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
    sync_at: Callable[[int], bool] | None = None,
) -> dict[str, float]:
    """Train over `loader` once; returns the epoch's means (all-reduced over ranks).

    `set_lr(step)` sets the lr of every parameter group for optimizer step `step` and returns the base lr.
    `meter` accumulates the epoch's means (pass the restored one when resuming mid-epoch; a new one by default).

    Loss and accuracy stay on the device between sync points, so steps queue without waiting for the device. A
    sync point is: a global step `s` with `(s + 1) % ctx.log_every == 0` (a log point), the epoch's first step (so
    progress has a loss to show at once), a step `sync_at(s)` holds for (mid-epoch checkpoints), and the end of the
    epoch. There every rank all-reduces its non-finite flag (a collective at the same steps on every rank), and the
    steps since the previous sync go into `meter`. A checkpoint taken after a synced step's `on_step` therefore never
    holds weights from a non-finite step.

    `on_step` receives a dict per step: step, lr, `synced`, `logged`, and loss / top1 / top5 as known at the latest
    sync (means over the log window so far), with this step's clips_per_s, data_wait and skipped. At a log point
    (`logged`) every field is the log window's (the steps since the previous log point of this epoch): that dict,
    less the two flags, is the train record.

    Raises:
        NonFiniteLossError: at the first sync point after a loss became NaN or infinite on any rank; it names the
            epoch and the first bad step.
    """
    model.train()
    meter = meter if meter is not None else Meter()
    tally = _DeviceTally(ctx.dist.device, start_step)
    window = _LogWindow()
    known = window.means()
    step = start_step
    t_prev = time.perf_counter()
    for batch in loader:
        t_data = time.perf_counter()
        lr = set_lr(step)
        x, y = _to_device(batch, ctx)
        with autocast(ctx):
            logits = model(x)
            loss = criterion(logits.float(), y)
        tally.add(loss, logits, y)
        _optimizer_step(loss, model, optimizer, scaler, ctx)
        n = y.shape[0]
        t_end = time.perf_counter()
        seconds, wait_s = t_end - t_prev, t_data - t_prev
        window.add_step(n, seconds, wait_s, batch.skipped)
        meter.update("data_wait", wait_s / seconds)
        meter.update("skipped", batch.skipped, 1)
        meter.update("seconds", seconds, 1)
        logged = (step + 1) % ctx.log_every == 0
        synced = logged or step == start_step or (sync_at is not None and sync_at(step))
        if synced:
            _sync(tally, window, meter, ctx, epoch=epoch)
            known = window.means() if window.synced_clips else known
        stats: dict[str, Any] = {"step": step, "lr": lr, "synced": synced, "logged": logged}
        if logged:
            stats |= window.record()
            window = _LogWindow()
        else:
            stats |= known | {"clips_per_s": n / seconds, "data_wait": wait_s / seconds, "skipped": batch.skipped}
        step += 1
        if on_step:
            on_step(stats)
        t_prev = time.perf_counter()
    if tally.steps:
        _sync(tally, window, meter, ctx, epoch=epoch)
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
