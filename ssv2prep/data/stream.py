"""One DataLoader worker's stream: its sample ranges -> shuffle buffer -> planned (and decoded) clips -> batches.

The batching step of the loader flow (`source` -> `assign` -> `clip` -> `decode` -> `stream` -> `loader`).
`ClipStream` is the IterableDataset each worker runs; what it yields are `Batch`es, or `PendingBatch`es that the
main process finishes on its decode device (`finish_pending`), and a final `WorkerFailure` when a shard error
stopped the worker (the main process re-raises it).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ssv2prep.data.assign import ShardRange, batches_for_worker, eval_shards, plan_train_epoch
from ssv2prep.data.cache import CacheConfig
from ssv2prep.data.clip import ClipFinisher, ClipPlanner, ClipRequest, predecode_video
from ssv2prep.data.decode import decode_jpeg_batch
from ssv2prep.data.source import RawSample, ShardCheck, iter_samples
from ssv2prep.data.transforms import stack_channels_last
from ssv2prep.errors import SampleError, ShardError, Ssv2PrepError

log = logging.getLogger(__name__)

MAX_SKIPS_IN_A_ROW = 1000  # a worker that fails this many samples in a row is reading broken shards, not bad luck


class Batch(NamedTuple):
    """What both loaders yield.

    Attributes:
        clips: uint8 RGB; train `(B, T, 3, H, W)`, eval `(B, V, T, 3, H, W)` with V = crops * clips views
            (crop-major, then clip, as the official test code). Channels-last in memory (a permuted
            `(..., H, W, 3)` buffer, no transposing copy in the workers): `normalize_clips` gives either layout.
        labels: int64 `(B,)`, -1 where unknown.
        keys: the B video ids.
        skipped: samples this batch's worker skipped (decode failures) since its previous batch.
    """

    clips: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    skipped: int


class _Skip:
    """Marker of a skipped sample in the clip stream."""


SKIP = _Skip()


@dataclass(frozen=True, slots=True)
class WorkerFailure:
    """A loader-stopping error raised in a worker, re-raised in the main process with its one-line message."""

    error: Ssv2PrepError


@dataclass(frozen=True, slots=True)
class PendingBatch:
    """A batch whose frames the main process decodes (gpu_decode)."""

    requests: list[ClipRequest]
    skipped: int


def _shard_samples(cfg: StreamConfig, shard: int, start: int = 0, stop: int | None = None) -> Iterator[RawSample]:
    """Samples `start <= i < stop` of shard number `shard`, through the shard cache when there is one."""
    check = ShardCheck(
        cfg.filesizes[shard] if cfg.filesizes is not None else None,
        cfg.md5sums[shard] if cfg.md5sums is not None else None,
    )
    return iter_samples(cfg.urls[shard], start=start, stop=stop, cache=cfg.cache, check=check)


def _range_samples(cfg: StreamConfig, ranges: Iterable[ShardRange]) -> Iterator[RawSample]:
    """The samples of `ranges` in order, each shard opened at its range (samples before it skipped undecoded)."""
    for piece in ranges:
        yield from _shard_samples(cfg, piece.shard, piece.start, piece.stop)


def _endless_passes(cfg: StreamConfig, ranges: tuple[ShardRange, ...], rng: np.random.Generator) -> Iterator[RawSample]:
    """Samples of `ranges` (in the given order, shuffled through the buffer), then further passes over the same
    ranges in fresh random orders, forever. A worker needs a further pass only when samples of its ranges failed to
    decode; the buffer drains at the end of each pass, so a sample repeats only in a later pass."""
    order = list(ranges)
    while True:
        count = 0
        for sample in _shuffled(_range_samples(cfg, order), cfg.shuffle_buffer, rng):
            count += 1
            yield sample
        if count == 0:
            raise ShardError(f"{cfg.urls[order[0].shard]}: no samples in this worker's {len(order)} shard range(s)")
        order = [order[i] for i in rng.permutation(len(order))]


def _shuffled(samples: Iterable[RawSample], size: int, rng: np.random.Generator) -> Iterator[RawSample]:
    """A shuffle buffer: hold `size` samples and emit a random one as each new one arrives."""
    if size <= 1:
        yield from samples
        return
    buffer: list[RawSample] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        k = int(rng.integers(size))
        buffer[k], sample = sample, buffer[k]
        yield sample
    for k in rng.permutation(len(buffer)):
        yield buffer[int(k)]


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """Everything one worker's stream needs (picklable: workers may be spawned)."""

    urls: tuple[str, ...]
    train: bool
    planner: ClipPlanner
    finisher: ClipFinisher
    decode_in_worker: bool
    batch_size: int
    shuffle_buffer: int = 1
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    steps: int = 0
    nsamples: tuple[int, ...] | None = None  # per-shard counts (train: the epoch plan is cut from them)
    cache: CacheConfig | None = None  # local copies of streamed shards (see ssv2prep.data.cache)
    filesizes: tuple[int | None, ...] | None = None  # per shard, from the index: what a cached copy must match
    md5sums: tuple[str | None, ...] | None = None


def _clips_from_samples(
    samples: Iterable[RawSample], cfg: StreamConfig, rng: np.random.Generator, *, replay: int = 0
) -> Iterator[Any]:
    """Samples -> finished clips (or pending requests), with SKIP for each sample that could not be used.

    The first `replay` usable samples are only planned, not decoded or yielded: this draws the same random numbers
    as producing them would, so a stream resumed mid-epoch continues exactly where the interrupted one was (unless
    one of the replayed samples would have failed to decode: that is only found by decoding).
    """
    in_a_row = 0
    for sample in samples:
        try:
            request = cfg.planner(sample, rng)
            if replay:
                replay, in_a_row = replay - 1, 0
                continue
            item = (request, cfg.finisher(request)) if cfg.decode_in_worker else (predecode_video(request), None)
        except SampleError as exc:
            log.warning("skipped sample %s of %s: %s", sample.key, sample.url, exc)
            in_a_row += 1
            if in_a_row >= MAX_SKIPS_IN_A_ROW:
                raise ShardError(f"{sample.url}: {in_a_row} samples in a row failed to decode (last: {exc})") from exc
            if not replay:  # skips in the replayed part were counted before the interruption
                yield SKIP
            continue
        in_a_row = 0
        yield item


def make_batch(items: list[tuple[ClipRequest, torch.Tensor | None]], skipped: int) -> Batch | PendingBatch:
    if items and items[0][1] is None:
        return PendingBatch([request for request, _ in items], skipped)
    clips = stack_channels_last([clip for _, clip in items]) if items else torch.zeros((0,), dtype=torch.uint8)
    labels = torch.tensor([request.label for request, _ in items], dtype=torch.int64)
    return Batch(clips, labels, [request.key for request, _ in items], skipped)


def _batched(items: Iterable[Any], batch_size: int) -> Iterator[Batch | PendingBatch]:
    """Full batches, then the remainder (possibly empty, carrying only trailing skips) when the stream ends."""
    buffer: list[Any] = []
    skipped = 0
    for item in items:
        if item is SKIP:
            skipped += 1
            continue
        buffer.append(item)
        if len(buffer) == batch_size:
            yield make_batch(buffer, skipped)
            buffer, skipped = [], 0
    if buffer or skipped:
        yield make_batch(buffer, skipped)


class ClipStream(IterableDataset):
    """The per-worker stream of batches (an IterableDataset; DataLoader runs one copy per worker).

    `epoch` and `skip` (train batches of the epoch already consumed, when resuming mid-epoch) are read when
    iteration starts: set them before creating the DataLoader iterator.
    """

    def __init__(self, cfg: StreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.epoch = 0
        self.skip = 0

    def _train_batches(self, loader_worker: int, num_workers: int) -> Iterator[Batch | PendingBatch]:
        cfg = self.cfg
        # Batch i of an epoch is the (i // W)-th batch of worker i % W. After `skip` batches the DataLoader's first
        # worker must produce batch `skip`, so loader worker j plays worker (j + skip) % W, minus what it has done.
        worker = (loader_worker + self.skip) % num_workers
        done = batches_for_worker(self.skip, worker, num_workers)
        quota = batches_for_worker(cfg.steps, worker, num_workers) - done
        if quota <= 0:
            return
        assert cfg.nsamples is not None  # build_train_loader refuses a source without counts
        plan = plan_train_epoch(
            cfg.nsamples,
            seed=cfg.seed,
            epoch=self.epoch,
            world_size=cfg.world_size,
            num_workers=num_workers,
            batch_size=cfg.batch_size,
        )
        rng = np.random.default_rng([cfg.seed, self.epoch, cfg.rank, worker])
        samples = _endless_passes(cfg, plan[cfg.rank * num_workers + worker], rng)
        batches = _batched(_clips_from_samples(samples, cfg, rng, replay=done * cfg.batch_size), cfg.batch_size)
        try:
            yield from itertools.islice(batches, quota)
        finally:
            batches.close()

    def _eval_batches(self, worker: int, num_workers: int) -> Iterator[Batch | PendingBatch]:
        cfg = self.cfg
        ids = eval_shards(
            len(cfg.urls), rank=cfg.rank, world_size=cfg.world_size, worker=worker, num_workers=num_workers
        )
        rng = np.random.default_rng([cfg.seed, cfg.rank, worker])
        samples = itertools.chain.from_iterable(_shard_samples(cfg, i) for i in ids)
        yield from _batched(_clips_from_samples(samples, cfg, rng), cfg.batch_size)

    def __iter__(self) -> Iterator[Batch | PendingBatch | WorkerFailure]:
        """Batches of this worker; a loader-stopping error comes last, as a `WorkerFailure` item."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._train_batches if self.cfg.train else self._eval_batches
        try:
            yield from batches(worker, num_workers)
        except Ssv2PrepError as exc:
            yield WorkerFailure(exc)


def finish_pending(pending: PendingBatch, finisher: ClipFinisher, device: torch.device) -> Batch:
    """Decode a pending batch on `device` (the JPEG frames of all its samples in one `decode_jpeg_batch` call); a
    sample that fails there is skipped and counted like in a worker."""
    done: list[tuple[ClipRequest, torch.Tensor]] = []
    skipped = pending.skipped
    decoded = iter(decode_jpeg_batch([r.jpegs for r in pending.requests if r.jpegs is not None], device))
    for request in pending.requests:
        try:
            if request.jpegs is not None:
                frames = next(decoded)
                if isinstance(frames, SampleError):
                    raise frames
                request = dataclasses.replace(request, jpegs=None, decoded=frames)
            done.append((request, finisher(request, device)))
        except SampleError as exc:
            log.warning("skipped sample %s: %s", request.key, exc)
            skipped += 1
    batch = make_batch(done, skipped)
    assert isinstance(batch, Batch)
    return batch
