"""Shards -> batches of uint8 clips for training and evaluation (a torch DataLoader over our own IterableDataset).

The loader flow, one module per step, one flat chain per DataLoader worker:

    `source`  shard spec -> shard urls + counts; tar -> samples (bytes, undecoded; a range skips by tar header)
    `assign`  which samples each (rank, worker) slot reads (train: re-planned per epoch) or which shards (eval)
    `stream`  a worker's samples -> shuffle buffer (train) -> clips -> batches (+ skip count)
    `clip`    per sample: frame indices + crop choices (`ClipPlanner`; keeps only the sampled frames' bytes), then
              decode those frames and crop/resize in uint8 (`ClipFinisher`, with `decode`)
    `loader`  (this module) the options, the DataLoader wrappers and the builders

Exact epochs: a train epoch is `steps = num_samples // (world_size * batch_size)` batches on every rank (from the
index's `nsamples`; drop-last), so DDP ranks never wait on each other, and it reads every sample once, but for
the fewer than `world_size * batch_size` that do not fill a batch. `plan_train_epoch` lays the shards out in a
permutation seeded by `(seed, epoch)`, the same on every rank, and cuts that sequence of samples into one piece per
(rank, worker) slot, exactly the samples the slot's batches need; a shard cut between two slots is read by both,
each skipping the other's samples by tar header (no JPEG decoded, bytes seeked past). Only when samples fail to
decode does a worker run short, and it then refills from a further pass over its own ranges.
Evaluation splits shards by rank then by worker, in index order, without repeats: every sample exactly once.

Streamed shards (`s3://`, `gs://`, http, `pipe:`) go through a local shard cache when `cache_dir` is set: the
first epoch streams each shard and keeps a copy verified against the index's size and MD5, later epochs (and
evaluation passes) read the copies; `cache_size_bytes` bounds the folder (least recently used copies go first).

A sample that fails to decode is skipped, logged and counted: each batch carries `skipped`, the number of samples
its worker skipped since its previous batch, and the loader objects sum them in `.skipped`. A shard that is missing
or unreadable stops the loader with a `ShardError` naming it.

`gpu_decode` (or `decode_device=`): workers only sample and plan; the main process decodes the JPEGs on that
device with `torchvision.io.decode_jpeg` and crops there (the same `ClipFinisher` code as the CPU workers).

The names other modules use are importable from here as before (`ClipPlanner`, `decode_jpegs`, ...).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssv2prep.data.assign import (
    ShardRange,
    batches_for_worker,
    epoch_shard_order,
    eval_shards,
    plan_train_epoch,
    slot_quotas,
)
from ssv2prep.data.cache import CacheConfig
from ssv2prep.data.clip import ClipFinisher, ClipPlanner, ClipRequest, num_multiscale_pairs, predecode_video
from ssv2prep.data.decode import decode_jpegs, decode_one_jpeg, decode_video_frames
from ssv2prep.data.sampling import DENSE_WINDOW, SamplingSpec
from ssv2prep.data.source import ShardSource
from ssv2prep.data.stream import Batch, ClipStream, PendingBatch, StreamConfig, WorkerFailure, finish_pending
from ssv2prep.data.transforms import EVAL_CROPS, normalize_clips
from ssv2prep.errors import ConfigError, ShardError

__all__ = [
    "Batch",
    "ClipFinisher",
    "ClipPlanner",
    "ClipRequest",
    "DataConfig",
    "EvalLoader",
    "ShardRange",
    "TrainLoader",
    "batches_for_worker",
    "build_eval_loader",
    "build_train_loader",
    "decode_jpegs",
    "decode_one_jpeg",
    "decode_video_frames",
    "epoch_shard_order",
    "eval_shards",
    "normalize_clips",
    "num_multiscale_pairs",
    "plan_train_epoch",
    "predecode_video",
    "slot_quotas",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Loader options (defaults live here). Sizes are pixels; `batch_size` is clips per rank; `cache_dir` None =
    no shard cache (`cache_size_bytes` bounds it, `cache_verify` is how a cached copy is checked: md5 or size)."""

    num_segments: int = 8
    crop_size: int = 224
    scale_size: int = 256
    dense: bool = False
    flip: bool = False
    flip_prob: float = 0.5
    batch_size: int = 8
    num_workers: int = 2
    prefetch_factor: int = 2
    shuffle_buffer: int = 64
    gpu_decode: bool = False
    pin_memory: bool = True
    cache_dir: Path | None = None
    cache_size_bytes: int = 100 << 30
    cache_verify: str = "md5"

    def cache(self) -> CacheConfig | None:
        """The shard cache these options describe, or None without `cache_dir`."""
        if self.cache_dir is None:
            return None
        return CacheConfig(Path(self.cache_dir), self.cache_size_bytes, self.cache_verify)

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        checks = (
            ("num_segments", self.num_segments >= 1, ">= 1"),
            ("crop_size", self.crop_size >= 1, ">= 1"),
            ("scale_size", self.scale_size >= self.crop_size, f">= crop_size ({self.crop_size})"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("num_workers", self.num_workers >= 0, ">= 0"),
            ("prefetch_factor", self.prefetch_factor >= 1, ">= 1"),
            ("shuffle_buffer", self.shuffle_buffer >= 1, ">= 1 (1 = no shuffling)"),
            ("flip_prob", 0.0 <= self.flip_prob <= 1.0, "in [0, 1]"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"data: {name}={getattr(self, name)!r} is out of range; allowed: {allowed}")
        if self.dense and self.num_segments > DENSE_WINDOW:
            raise ConfigError(f"data: dense sampling takes num_segments <= {DENSE_WINDOW} (got {self.num_segments})")
        cache = self.cache()
        if cache is not None:
            cache.validate()


def _passthrough(item: Any) -> Any:
    """DataLoader collate for already-batched items (a top-level function, so spawned workers can pickle it)."""
    return item


class _LoaderBase:
    """Shared iteration: a DataLoader over a ClipStream, failures re-raised, pending batches finished, skips summed."""

    def __init__(self, stream: ClipStream, cfg: DataConfig, device: torch.device | None) -> None:
        self.stream = stream
        self.cfg = cfg
        self.decode_device = device
        self.skipped = 0

    def _batches(self) -> Iterator[Batch]:
        workers = self.cfg.num_workers
        pin = self.cfg.pin_memory and self.decode_device is None and torch.cuda.is_available()
        loader = DataLoader(
            self.stream,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            pin_memory=pin,
            collate_fn=_passthrough,
            # Workers draw from their own seeded numpy generators; a private generator keeps the DataLoader from
            # drawing its base seed from the global torch RNG, so a training run resumed mid-epoch sees the same
            # dropout masks as an uninterrupted one.
            generator=torch.Generator().manual_seed(0),
        )
        for item in loader:
            if isinstance(item, WorkerFailure):
                raise item.error
            if isinstance(item, PendingBatch):
                assert self.decode_device is not None
                item = finish_pending(item, self.stream.cfg.finisher, self.decode_device)
            self.skipped += item.skipped
            yield item


class TrainLoader(_LoaderBase):
    """Exact-epoch train batches: `len(loader)` batches of `batch_size` clips per epoch, the same on every rank.

    Call `set_epoch(e)` before each epoch (shard order, shuffling and augmentation depend on it). `skipped` is the
    running total of samples skipped for decode failures.
    """

    def __init__(self, stream: ClipStream, cfg: DataConfig, device: torch.device | None, *, steps: int) -> None:
        super().__init__(stream, cfg, device)
        self.steps = steps
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, *, skip: int = 0) -> None:
        """Select the epoch whose shard order and random draws the next iteration uses.

        `skip`: batches of this epoch already trained (resuming mid-epoch); the iteration then yields the epoch's
        remaining `len(self) - skip` batches, the same ones an uninterrupted iteration yields after those.
        """
        if not 0 <= skip < self.steps:
            raise ValueError(f"cannot skip {skip} of {self.steps} batches")
        self.epoch = epoch
        self.skip = skip

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        self.stream.epoch, self.stream.skip = self.epoch, self.skip
        count, expected = 0, self.steps - self.skip
        for batch in self._batches():
            count += 1
            yield batch
        if count != expected:
            raise ShardError(f"train loader produced {count} batches instead of {expected} in epoch {self.epoch}")


class EvalLoader(_LoaderBase):
    """Evaluation batches: every sample of this rank's shards exactly once (the last batch of a worker may be short).

    `num_samples_this_rank` is what the index says this rank holds (None without counts); `seen` counts the clips
    the last full iteration yielded, `skipped` the samples skipped for decode failures (running total).
    """

    def __init__(
        self, stream: ClipStream, cfg: DataConfig, device: torch.device | None, *, nsamples: tuple[int, ...] | None
    ) -> None:
        """Wrap an eval stream; `nsamples` are the per-shard counts of the whole source."""
        super().__init__(stream, cfg, device)
        self.nsamples = nsamples
        self.seen = 0
        rank, world = stream.cfg.rank, stream.cfg.world_size
        self.num_samples_this_rank = None if nsamples is None else sum(nsamples[rank::world])

    def __len__(self) -> int:
        """Batches per pass, from the index counts (an upper bound when samples are skipped)."""
        if self.nsamples is None:
            raise TypeError("eval loader length is unknown: the shard source has no per-shard counts (no index)")
        scfg, workers = self.stream.cfg, max(1, self.cfg.num_workers)
        total = 0
        for worker in range(workers):
            ids = eval_shards(
                len(scfg.urls), rank=scfg.rank, world_size=scfg.world_size, worker=worker, num_workers=workers
            )
            total += math.ceil(sum(self.nsamples[i] for i in ids) / self.cfg.batch_size)
        return total

    def __iter__(self) -> Iterator[Batch]:
        """Every sample of this rank once; batches emptied by skips are absorbed (their count is in `skipped`)."""
        self.seen = 0
        for batch in self._batches():
            if batch.labels.numel():
                self.seen += batch.labels.numel()
                yield batch


def _decode_device(cfg: DataConfig, decode_device: torch.device | str | None) -> torch.device | None:
    if decode_device is not None:
        return torch.device(decode_device)
    if not cfg.gpu_decode:
        return None
    if not torch.cuda.is_available():
        raise ConfigError("data: gpu_decode=True needs CUDA, and no CUDA device is available")
    return torch.device("cuda", torch.cuda.current_device())


def _check_common(source: ShardSource, cfg: DataConfig, rank: int, world_size: int) -> None:
    cfg.validate()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"data: rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
    if not source.urls:
        raise ConfigError("data: the shard source has no shards")


def build_train_loader(
    source: ShardSource,
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    decode_device: torch.device | str | None = None,
) -> TrainLoader:
    """The train loader of one rank: `len()` = `num_samples // (world_size * batch_size)` on every rank.

    Args:
        source: the shards; must carry per-shard counts (`nsamples`, from an index).
        cfg: loader options.
        rank: this process's rank; world_size: the number of ranks.
        seed: the same on every rank (shard assignment must agree); per-rank streams are derived from it.
        decode_device: decode and crop in the main process on this device instead of in the workers (the CPU twin
            of `cfg.gpu_decode`, which picks the current CUDA device).

    Raises:
        ConfigError: bad options, no counts, or fewer samples than one batch per rank.
    """
    _check_common(source, cfg, rank, world_size)
    if source.nsamples is None:
        raise ConfigError(
            f"exact epochs need per-shard sample counts, and {source.urls[0]} came without an index: pass the index "
            "(ssv2-train.json) as the source, or with index=..., or put it beside local/http shards"
        )
    total = sum(source.nsamples)
    steps = total // (world_size * cfg.batch_size)
    if steps == 0:
        raise ConfigError(f"{total} samples are fewer than one batch on each rank ({world_size} x {cfg.batch_size})")
    spec = SamplingSpec("train", cfg.num_segments, dense=cfg.dense)
    spec.validate()
    device = _decode_device(cfg, decode_device)
    stream = StreamConfig(
        urls=source.urls,
        train=True,
        planner=ClipPlanner(
            spec,
            flip_prob=cfg.flip_prob if cfg.flip else 0.0,
            flip_pairs=source.flip_pairs,
        ),
        finisher=ClipFinisher(True, cfg.num_segments, cfg.crop_size, cfg.scale_size),
        decode_in_worker=device is None,
        batch_size=cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        steps=steps,
        nsamples=source.nsamples,
        cache=cfg.cache(),
        filesizes=source.filesizes,
        md5sums=source.md5sums,
    )
    return TrainLoader(ClipStream(stream), cfg, device, steps=steps)


def build_eval_loader(
    source: ShardSource,
    cfg: DataConfig,
    *,
    crops: int = 1,
    clips: int = 1,
    full_res: bool = False,
    mode: str = "val",
    rank: int = 0,
    world_size: int = 1,
    decode_device: torch.device | str | None = None,
) -> EvalLoader:
    """The eval loader of one rank: every sample of the rank's shards once, as `crops * clips` views.

    Args:
        source: the shards (counts optional; without them `len()` and `num_samples_this_rank` are unknown).
        cfg: loader options (`num_segments`, `crop_size`, `scale_size`, `dense`, batch and worker settings).
        crops: 1 (centre), 3 (left/right/centre), 5 (corners + centre) or 10 (the 5 and their mirrors).
        clips: clips per video: 1; 2 for the official twice sample (mode `test`); with `cfg.dense`, the number of
            evenly spaced windows (official: 10; mode `test`).
        full_res: crops of `scale_size` instead of `crop_size` (the official `--full_res`).
        mode: `val` (the official validation sampler) or `test` (the official test sampler).
        rank: this process's rank; world_size: the number of ranks.
        decode_device: as in `build_train_loader`.

    Raises:
        ConfigError: bad options.
    """
    _check_common(source, cfg, rank, world_size)
    if crops not in EVAL_CROPS:
        raise ConfigError(f"data: crops must be one of {sorted(EVAL_CROPS)} (got {crops})")
    spec = SamplingSpec(mode, cfg.num_segments, dense=cfg.dense, clips=clips)
    spec.validate()
    device = _decode_device(cfg, decode_device)
    stream = StreamConfig(
        urls=source.urls,
        train=False,
        planner=ClipPlanner(spec),
        finisher=ClipFinisher(False, cfg.num_segments, cfg.crop_size, cfg.scale_size, crops, full_res),
        decode_in_worker=device is None,
        batch_size=cfg.batch_size,
        rank=rank,
        world_size=world_size,
        cache=cfg.cache(),
        filesizes=source.filesizes,
        md5sums=source.md5sums,
    )
    return EvalLoader(ClipStream(stream), cfg, device, nsamples=source.nsamples)
