"""Shards -> batches of uint8 clips for training and evaluation (a torch DataLoader over our own IterableDataset).

Stages, one flat chain per DataLoader worker:

    sample ranges of this rank and worker (train: re-planned per epoch) or its shards (eval) -> tar samples
    (bytes, undecoded) -> shuffle buffer (train) -> frame indices + crop choices (`ClipPlanner`; keeps only the
    sampled frames' bytes) -> decode those frames and crop/resize in uint8 (`ClipFinisher`) -> batch (+ skip count)

Exact epochs: a train epoch is `steps = num_samples // (world_size * batch_size)` batches on every rank (from the
index's `nsamples`; drop-last), so DDP ranks never wait on each other, and it reads every sample once, but for
the fewer than `world_size * batch_size` that do not fill a batch. `plan_train_epoch` lays the shards out in a
permutation seeded by `(seed, epoch)`, the same on every rank, and cuts that sequence of samples into one piece per
(rank, worker) slot, exactly the samples the slot's batches need; a shard cut between two slots is read by both,
each skipping the other's samples by tar header (no JPEG decoded, bytes seeked past). Only when samples fail to
decode does a worker run short, and it then refills from a further pass over its own ranges.
Evaluation splits shards by rank then by worker, in index order, without repeats: every sample exactly once.

A sample that fails to decode is skipped, logged and counted: each batch carries `skipped`, the number of samples
its worker skipped since its previous batch, and the loader objects sum them in `.skipped`. A shard that is missing
or unreadable stops the loader with a `ShardError` naming it.

`gpu_decode` (or `decode_device=`): workers only sample and plan; the main process decodes the JPEGs on that
device with `torchvision.io.decode_jpeg` and crops there (the same `ClipFinisher` code as the CPU workers).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from ssv2prep.data.sampling import DENSE_WINDOW, SamplingSpec, sample_clips
from ssv2prep.data.source import RawSample, ShardSource, iter_samples
from ssv2prep.data.transforms import (
    EVAL_CROPS,
    MAX_DISTORT,
    MULTISCALE_SCALES,
    TrainCrop,
    apply_train_crop,
    draw_train_crop,
    eval_views,
    flip_label,
    normalize_clips,
    resize_short_side,
    stack_channels_last,
)
from ssv2prep.errors import ConfigError, DecodeError, SampleError, ShardError, Ssv2PrepError

__all__ = [
    "Batch",
    "DataConfig",
    "EvalLoader",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "normalize_clips",
]

log = logging.getLogger(__name__)

VIDEO_MEMBERS = ("webm", "mp4")
MAX_SKIPS_IN_A_ROW = 1000  # a worker that fails this many samples in a row is reading broken shards, not bad luck
CPU = torch.device("cpu")


@dataclass(frozen=True, slots=True)
class DataConfig:
    """Loader options (defaults live here). Sizes are pixels; `batch_size` is clips per rank."""

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


# ---------------------------------------------------------------------------------------------------- decoding
@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    # torchvision 0.29 marks its image codecs deprecated in favour of torchcodec (not a dependency here); they are
    # still the fastest libjpeg-turbo/nvjpeg binding we have, so keep the per-call warning out of users' logs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


def decode_one_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB `(3, H, W)` on the CPU (libjpeg-turbo through torchvision)."""
    with _torchvision_io():
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_jpegs(jpegs: Sequence[bytes], device: torch.device = CPU) -> torch.Tensor:
    """JPEG frames of one video -> uint8 `(N, 3, H, W)`, channels-last in memory, on `device` (nvjpeg on CUDA).

    Raises:
        DecodeError: a frame that is not a decodable JPEG, or frames of different sizes.
    """
    try:
        if device.type == "cpu":
            frames = [decode_one_jpeg(b) for b in jpegs]
        else:
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
            with _torchvision_io():
                frames = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return stack_channels_last(frames)
    except (RuntimeError, ValueError) as exc:
        raise DecodeError(f"JPEG frame does not decode ({' '.join(str(exc).split())[:200]})") from exc


def decode_video_frames(data: bytes, frames: Sequence[int]) -> torch.Tensor:
    """Video bytes -> uint8 `(len(frames), 3, H, W)` of the frames numbered `frames` (sorted, 0-based).

    Decodes up to the last wanted frame and converts only the wanted ones. Containers can count a frame or two more
    than decode; wanted frames past the decodable end repeat the last decoded frame.

    Raises:
        DecodeError: the bytes are not a decodable video, or it has no frames.
    """
    wanted, last = set(frames), max(frames)
    got: dict[int, np.ndarray] = {}
    prev, count = None, 0
    try:
        with av.open(io.BytesIO(data)) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 in wanted:
                    got[count - 1] = frame.to_ndarray(format="rgb24")
                prev = frame
                if count - 1 >= last:
                    break
            if prev is None:
                raise DecodeError("video has no decodable frames", reason="no_frames")
            tail = prev.to_ndarray(format="rgb24") if len(got) < len(wanted) else None
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise DecodeError(f"video does not decode ({' '.join(str(exc).split())[:200]})") from exc
    if tail is not None:
        log.debug("video decodes to %d frames; frames %s repeat the last one", count, sorted(wanted - set(got)))
    rgb = np.stack([got.get(i, tail) for i in frames])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------------ per sample
@dataclass(frozen=True, slots=True)
class ClipRequest:
    """One sample after sampling and cropping choices, before decoding.

    `frames` are the sorted distinct frame indices the clip(s) use; `order` maps every output frame (clips * T,
    clip-major) to a position in `frames`. Exactly one of `jpegs` (bytes of `frames` only), `video` (the whole
    video file) and `decoded` (uint8 `(len(frames), 3, H, W)`) is set.
    """

    key: str
    label: int
    frames: tuple[int, ...]
    order: tuple[int, ...]
    crop: TrainCrop | None = None
    jpegs: tuple[bytes, ...] | None = None
    video: bytes | None = None
    decoded: torch.Tensor | None = None


def _meta(sample: RawSample) -> dict[str, Any]:
    raw = sample.members.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DecodeError(f"unreadable {sample.key}.json ({exc})") from exc
    if not isinstance(meta, dict):
        raise DecodeError(f"{sample.key}.json is not a JSON object")
    return meta


def _label(sample: RawSample, meta: dict[str, Any]) -> int:
    raw = sample.members.get("cls")
    if raw is not None:
        try:
            return int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise DecodeError(f"{sample.key}.cls is not an integer ({raw[:20]!r})") from exc
    label = meta.get("label")
    return label if isinstance(label, int) else -1


def _num_frames(sample: RawSample, meta: dict[str, Any], video: str | None) -> int:
    if video is None:
        return sum(1 for name in sample.members if name.endswith(".jpg"))
    count = meta.get("num_frames")
    if not isinstance(count, int):
        raise DecodeError(f"{sample.key}.json has no integer num_frames for its .{video}")
    return count


def _jpeg(sample: RawSample, index: int) -> bytes:
    data = sample.members.get(f"{index:06d}.jpg")
    if data is None:
        raise DecodeError(f"sample {sample.key} has no frame {index:06d}.jpg", reason="missing_frame")
    return data


def num_multiscale_pairs(num_scales: int = len(MULTISCALE_SCALES), max_distort: int = MAX_DISTORT) -> int:
    """How many (width, height) crop pairs the multi-scale crop draws from (10 for the official settings)."""
    return sum(1 for i in range(num_scales) for j in range(num_scales) if abs(i - j) <= max_distort)


@dataclass(frozen=True, slots=True)
class ClipPlanner:
    """RawSample -> ClipRequest: frame indices, crop choices and (for a mirrored clip) the swapped label."""

    spec: SamplingSpec
    flip_prob: float = 0.0
    flip_pairs: tuple[tuple[int, int], ...] = ()

    def __call__(self, sample: RawSample, rng: np.random.Generator) -> ClipRequest:
        """Plan one sample (raises SampleError subclasses for a sample that cannot be used)."""
        meta = _meta(sample)
        label = _label(sample, meta)
        video = next((name for name in VIDEO_MEMBERS if name in sample.members), None)
        flat = [i for clip in sample_clips(_num_frames(sample, meta, video), self.spec, rng) for i in clip]
        frames = tuple(sorted(set(flat)))
        where = {f: k for k, f in enumerate(frames)}
        order = tuple(where[i] for i in flat)
        crop = None
        if self.spec.mode == "train":
            crop = draw_train_crop(rng, num_pairs=num_multiscale_pairs(), flip_prob=self.flip_prob)
            if crop.flip and label >= 0:
                label = flip_label(label, self.flip_pairs)
        if video is not None:
            return ClipRequest(sample.key, label, frames, order, crop, video=sample.members[video])
        return ClipRequest(sample.key, label, frames, order, crop, jpegs=tuple(_jpeg(sample, i) for i in frames))


def predecode_video(request: ClipRequest) -> ClipRequest:
    """A video request with its frames decoded on the CPU (workers do this when JPEGs are left to the GPU)."""
    if request.video is None:
        return request
    decoded = decode_video_frames(request.video, request.frames)
    return ClipRequest(request.key, request.label, request.frames, request.order, request.crop, decoded=decoded)


def _in_order(frames: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """`frames[order]` (repeats allowed), skipping the copy when `order` is 0, 1, 2, ... (the usual case)."""
    if order == tuple(range(frames.shape[0])):
        return frames
    return stack_channels_last([frames[i] for i in order])


@dataclass(frozen=True, slots=True)
class ClipFinisher:
    """ClipRequest -> uint8 clip on a device: train `(T, 3, C, C)`, eval `(V, T, 3, S, S)`."""

    train: bool
    num_segments: int
    crop_size: int
    scale_size: int
    crops: int = 1
    full_res: bool = False

    def frames(self, request: ClipRequest, device: torch.device) -> torch.Tensor:
        """The distinct sampled frames, decoded: uint8 `(len(request.frames), 3, H, W)`."""
        if request.decoded is not None:
            return request.decoded.to(device)
        if request.video is not None:
            return decode_video_frames(request.video, request.frames).to(device)
        return decode_jpegs(request.jpegs or (), device)

    def __call__(self, request: ClipRequest, device: torch.device = CPU) -> torch.Tensor:
        """Decode and transform one clip (raises DecodeError for frames that do not decode)."""
        frames = self.frames(request, device)
        if self.train:
            assert request.crop is not None
            cropped = apply_train_crop(frames, request.crop, crop_size=self.crop_size, scale_size=self.scale_size)
            return _in_order(cropped, request.order)
        clip = _in_order(resize_short_side(frames, self.scale_size), request.order)
        views = eval_views(
            clip, crops=self.crops, crop_size=self.crop_size, scale_size=self.scale_size, full_res=self.full_res
        )
        return views.reshape(-1, self.num_segments, *views.shape[-3:])


# ------------------------------------------------------------------------------------------- shard assignment
def epoch_shard_order(num_shards: int, *, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one train epoch (the same on every rank)."""
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


@dataclass(frozen=True, slots=True)
class ShardRange:
    """Samples `start <= i < stop` (0-based, in stored order) of shard number `shard` of the source."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        """How many samples the range holds."""
        return self.stop - self.start


def slot_quotas(num_samples: int, *, world_size: int, num_workers: int, batch_size: int) -> list[int]:
    """Samples each (rank, worker) slot yields in one train epoch, slot `rank * num_workers + worker` at index k.

    Every rank takes `num_samples // (world_size * batch_size)` batches, shared by its workers as the DataLoader
    takes them (`batches_for_worker`); `num_workers` 0 counts as 1 (the main process is the one worker).
    """
    workers = max(1, num_workers)
    steps = num_samples // (world_size * batch_size)
    per_worker = [batches_for_worker(steps, w, workers) * batch_size for w in range(workers)]
    return per_worker * world_size


def plan_train_epoch(
    nsamples: Sequence[int], *, seed: int, epoch: int, world_size: int, num_workers: int, batch_size: int
) -> list[tuple[ShardRange, ...]]:
    """Which samples each (rank, worker) slot reads in one train epoch: a pure function of its arguments.

    The epoch's shards, in the order `epoch_shard_order` gives (the same on every rank), form one sequence of
    `sum(nsamples)` samples; it is cut into consecutive pieces of `slot_quotas` samples, slot 0 first. So every
    sample belongs to at most one slot, and all but the last `sum(nsamples) % (world_size * batch_size)` (fewer
    than one batch per rank, at the end of the sequence, so different ones each epoch) to exactly one. A shard
    cut between two slots is read by both, each skipping the other's samples by their tar headers.

    Returns:
        `world_size * max(1, num_workers)` tuples of ranges in reading order; slot k = `rank * workers + worker`.
    """
    quotas = slot_quotas(sum(nsamples), world_size=world_size, num_workers=num_workers, batch_size=batch_size)
    shards = iter(epoch_shard_order(len(nsamples), seed=seed, epoch=epoch))
    shard, pos, size = -1, 0, 0
    plan: list[tuple[ShardRange, ...]] = []
    for quota in quotas:
        ranges: list[ShardRange] = []
        while quota:
            if pos == size:  # this shard is used up: open the next one (sum(quotas) <= sum(nsamples))
                shard, pos = next(shards), 0
                size = nsamples[shard]
                continue
            take = min(quota, size - pos)
            ranges.append(ShardRange(shard, pos, pos + take))
            pos, quota = pos + take, quota - take
        plan.append(tuple(ranges))
    return plan


def eval_shards(num_shards: int, *, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Shard indices of one (rank, worker) in evaluation: by rank, then by worker, in index order."""
    return list(range(num_shards))[rank::world_size][worker::num_workers]


def batches_for_worker(steps: int, worker: int, num_workers: int) -> int:
    """A worker's share of a rank's `steps` batches (DataLoader takes batches from workers in turn)."""
    return steps // num_workers + (1 if worker < steps % num_workers else 0)


# ---------------------------------------------------------------------------------------------- worker stages
class _Skip:
    """Marker of a skipped sample in the clip stream."""


SKIP = _Skip()


@dataclass(frozen=True, slots=True)
class _Failure:
    """A loader-stopping error raised in a worker, re-raised in the main process with its one-line message."""

    error: Ssv2PrepError


@dataclass(frozen=True, slots=True)
class _Pending:
    """A batch whose frames the main process decodes (gpu_decode)."""

    requests: list[ClipRequest]
    skipped: int


def _range_samples(urls: Sequence[str], ranges: Iterable[ShardRange]) -> Iterator[RawSample]:
    """The samples of `ranges` in order, each shard opened at its range (samples before it skipped undecoded)."""
    for piece in ranges:
        yield from iter_samples(urls[piece.shard], start=piece.start, stop=piece.stop)


def _passes(
    urls: Sequence[str], ranges: tuple[ShardRange, ...], shuffle_buffer: int, rng: np.random.Generator
) -> Iterator[RawSample]:
    """Samples of `ranges` (in the given order, shuffled through the buffer), then further passes over the same
    ranges in fresh random orders, forever. A worker needs a further pass only when samples of its ranges failed to
    decode; the buffer drains at the end of each pass, so a sample repeats only in a later pass."""
    order = list(ranges)
    while True:
        count = 0
        for sample in _shuffled(_range_samples(urls, order), shuffle_buffer, rng):
            count += 1
            yield sample
        if count == 0:
            raise ShardError(f"{urls[order[0].shard]}: no samples in this worker's {len(order)} shard range(s)")
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


def _prepared(
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


def _make_batch(items: list[tuple[ClipRequest, torch.Tensor | None]], skipped: int) -> Batch | _Pending:
    if items and items[0][1] is None:
        return _Pending([request for request, _ in items], skipped)
    clips = stack_channels_last([clip for _, clip in items]) if items else torch.zeros((0,), dtype=torch.uint8)
    labels = torch.tensor([request.label for request, _ in items], dtype=torch.int64)
    return Batch(clips, labels, [request.key for request, _ in items], skipped)


def _batched(items: Iterable[Any], batch_size: int) -> Iterator[Batch | _Pending]:
    """Full batches, then the remainder (possibly empty, carrying only trailing skips) when the stream ends."""
    buffer: list[Any] = []
    skipped = 0
    for item in items:
        if item is SKIP:
            skipped += 1
            continue
        buffer.append(item)
        if len(buffer) == batch_size:
            yield _make_batch(buffer, skipped)
            buffer, skipped = [], 0
    if buffer or skipped:
        yield _make_batch(buffer, skipped)


class ClipStream(IterableDataset):
    """The per-worker stream of batches (an IterableDataset; DataLoader runs one copy per worker).

    `epoch` and `skip` (train batches of the epoch already consumed, when resuming mid-epoch) are read when
    iteration starts: set them before creating the DataLoader iterator.
    """

    def __init__(self, cfg: StreamConfig) -> None:
        """Wrap a stream configuration."""
        super().__init__()
        self.cfg = cfg
        self.epoch = 0
        self.skip = 0

    def _train_batches(self, loader_worker: int, num_workers: int) -> Iterator[Batch | _Pending]:
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
        samples = _passes(cfg.urls, plan[cfg.rank * num_workers + worker], cfg.shuffle_buffer, rng)
        batches = _batched(_prepared(samples, cfg, rng, replay=done * cfg.batch_size), cfg.batch_size)
        try:
            yield from itertools.islice(batches, quota)
        finally:
            batches.close()

    def _eval_batches(self, worker: int, num_workers: int) -> Iterator[Batch | _Pending]:
        cfg = self.cfg
        ids = eval_shards(
            len(cfg.urls), rank=cfg.rank, world_size=cfg.world_size, worker=worker, num_workers=num_workers
        )
        rng = np.random.default_rng([cfg.seed, cfg.rank, worker])
        samples = itertools.chain.from_iterable(iter_samples(cfg.urls[i]) for i in ids)
        yield from _batched(_prepared(samples, cfg, rng), cfg.batch_size)

    def __iter__(self) -> Iterator[Batch | _Pending | _Failure]:
        """Batches of this worker; a loader-stopping error comes last, as a `_Failure` item."""
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self._train_batches if self.cfg.train else self._eval_batches
        try:
            yield from batches(worker, num_workers)
        except Ssv2PrepError as exc:
            yield _Failure(exc)


# -------------------------------------------------------------------------------------------- main-process side
def _passthrough(item: Any) -> Any:
    """DataLoader collate for already-batched items (a top-level function, so spawned workers can pickle it)."""
    return item


def _finish_pending(pending: _Pending, finisher: ClipFinisher, device: torch.device) -> Batch:
    """Decode a pending batch on `device`; a sample that fails there is skipped and counted like in a worker."""
    done: list[tuple[ClipRequest, torch.Tensor]] = []
    skipped = pending.skipped
    for request in pending.requests:
        try:
            done.append((request, finisher(request, device)))
        except SampleError as exc:
            log.warning("skipped sample %s: %s", request.key, exc)
            skipped += 1
    batch = _make_batch(done, skipped)
    assert isinstance(batch, Batch)
    return batch


class _LoaderBase:
    """Shared iteration: a DataLoader over a ClipStream, failures re-raised, pending batches finished, skips summed."""

    def __init__(self, stream: ClipStream, cfg: DataConfig, device: torch.device | None) -> None:
        self.stream = stream
        self.cfg = cfg
        self.decode_device = device
        self.skipped = 0

    def _items(self) -> Iterator[Batch]:
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
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, _Pending):
                assert self.decode_device is not None
                item = _finish_pending(item, self.stream.cfg.finisher, self.decode_device)
            self.skipped += item.skipped
            yield item


class TrainLoader(_LoaderBase):
    """Exact-epoch train batches: `len(loader)` batches of `batch_size` clips per epoch, the same on every rank.

    Call `set_epoch(e)` before each epoch (shard order, shuffling and augmentation depend on it). `skipped` is the
    running total of samples skipped for decode failures.
    """

    def __init__(self, stream: ClipStream, cfg: DataConfig, device: torch.device | None, *, steps: int) -> None:
        """Wrap a train stream of `steps` batches per epoch."""
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
        """Batches per epoch."""
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        """The batches of the current epoch."""
        self.stream.epoch, self.stream.skip = self.epoch, self.skip
        count, expected = 0, self.steps - self.skip
        for batch in self._items():
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
        for batch in self._items():
            if batch.labels.numel():
                self.seen += batch.labels.numel()
                yield batch


# ------------------------------------------------------------------------------------------------------ builders
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
    )
    return EvalLoader(ClipStream(stream), cfg, device, nsamples=source.nsamples)
