"""Write one shard: a `ShardSpec` -> an uncompressed USTAR tar of samples (see shard-format.md) + `ShardStats`.

The shard is written to a temporary name and renamed when complete, so a `.tar` that exists is whole. Member
metadata (mtime, owner, mode) is fixed, so the same inputs and settings give byte-identical shards. This module
holds the one per-sample `except Exception` of the data side: a sample that fails becomes a recorded outcome.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ssv2prep.annotations import VideoRecord
from ssv2prep.errors import ConfigError, SampleError, ShardError
from ssv2prep.fsutil import make_temp
from ssv2prep.prep.decode import (
    DEFAULT_INTERPOLATION,
    INTERPOLATIONS,
    JPEG_ENCODERS,
    Resize,
    count_video_frames,
    counts_disagree,
    decode_video,
)
from ssv2prep.prep.plan import ShardSpec

log = logging.getLogger(__name__)

FORMATS = ("frames", "video")
ON_ERROR = ("skip", "raise")
VIDEO_SUFFIXES = (".webm", ".mp4")


class SampleStatus(enum.StrEnum):
    """What became of one annotation entry."""

    OK = "ok"
    FAILED = "failed"
    MISSING = "missing"


@dataclass(frozen=True, slots=True)
class WriterSettings:
    """Everything that changes shard bytes (and therefore must match when resuming)."""

    format: str = "frames"
    quality: int = 90
    short_side: int | None = None
    decoder: str = "pyav"
    encoder: str = "ffmpeg"
    height: int | None = None  # the official recipe's `scale=-1:H` (exclusive with short_side)
    interpolation: str = DEFAULT_INTERPOLATION

    @property
    def resize(self) -> Resize:
        """The frame size rule and interpolation these settings ask for."""
        return Resize(short_side=self.short_side, height=self.height, interpolation=self.interpolation)

    def validate(self) -> None:
        """Raise ConfigError on a bad value."""
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {list(FORMATS)} (got {self.format!r})")
        if not 1 <= self.quality <= 95:
            raise ConfigError(f"--quality must be in 1..95 (got {self.quality})")
        if self.encoder not in JPEG_ENCODERS:
            raise ConfigError(f"--jpeg-encoder must be one of {list(JPEG_ENCODERS)} (got {self.encoder!r})")
        if self.short_side is not None and self.short_side < 8:
            raise ConfigError(f"--short-side must be >= 8 pixels (got {self.short_side})")
        if self.height is not None and self.height < 8:
            raise ConfigError(f"--height must be >= 8 pixels (got {self.height})")
        if self.short_side is not None and self.height is not None:
            raise ConfigError("--short-side and --height are exclusive: give one")
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"--interpolation must be one of {list(INTERPOLATIONS)} (got {self.interpolation!r})")


@dataclass(frozen=True, slots=True)
class SampleOutcome:
    """One manifest line: `id`, `label`, `status`, `error`, `reason`, `shard`, `num_frames`, plus `header_frames`
    (the container header's frame estimate, null when it gives none) and `frame_count_mismatch` (an ok video whose
    decoded count disagrees with that estimate beyond rounding: recorded, not failed)."""

    id: str
    label: int | None
    status: SampleStatus
    shard: str
    error: str | None = None
    reason: str | None = None
    num_frames: int | None = None
    header_frames: int | None = None
    frame_count_mismatch: bool = False

    def to_json(self) -> dict[str, Any]:
        """The manifest object (status as its string value)."""
        d = asdict(self)
        d["status"] = self.status.value
        return d


@dataclass(slots=True)
class ShardStats:
    """Result of writing one shard."""

    name: str
    split: str
    index: int
    filesize: int = 0
    md5sum: str = ""
    nsamples: int = 0
    num_frames: int = 0
    seconds: float = 0.0
    outcomes: list[SampleOutcome] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON form (the work record that lets a re-run skip this shard)."""
        d = {k: getattr(self, k) for k in ("name", "split", "index", "filesize", "md5sum", "nsamples", "num_frames")}
        d["seconds"] = round(self.seconds, 4)
        d["outcomes"] = [o.to_json() for o in self.outcomes]
        return d

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardStats:
        """Inverse of `to_json`."""
        outcomes = [SampleOutcome(**{**o, "status": SampleStatus(o["status"])}) for o in obj["outcomes"]]
        fields = {k: obj[k] for k in ("name", "split", "index", "filesize", "md5sum", "nsamples", "num_frames")}
        return cls(**fields, seconds=obj["seconds"], outcomes=outcomes)


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that MD5s and counts what passes through (tarfile writes sequentially)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.md5 = hashlib.md5()
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.md5.update(view)
        self.size += len(view)
        return self._raw.write(view)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def find_video(videos_dir: Path, video_id: str) -> Path | None:
    """`<videos_dir>/<id>.webm` (or `.mp4`), or None when absent."""
    for suffix in VIDEO_SUFFIXES:
        candidate = videos_dir / f"{video_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _sample_json(record: VideoRecord, meta: dict[str, Any], source: str) -> bytes:
    obj = {
        "id": record.video_id,
        "label": record.label,
        "class": record.class_name,
        "caption": record.caption,
        "template": record.template,
        "placeholders": list(record.placeholders),
        **meta,
        "source": source,
    }
    return json.dumps(obj, ensure_ascii=False, sort_keys=False).encode("utf-8")


def _encode_sample(
    record: VideoRecord, video: Path, settings: WriterSettings
) -> tuple[list[tuple[str, bytes]], int | None]:
    """Decode one video into the tar members of its sample and the header's frame estimate (raises SampleError
    subclasses)."""
    key = record.video_id
    if settings.format == "frames":
        decoded = decode_video(
            video,
            decoder=settings.decoder,
            quality=settings.quality,
            encoder=settings.encoder,
            resize=settings.resize,
        )
        meta = {"num_frames": decoded.num_frames, "fps": decoded.fps, "width": decoded.width, "height": decoded.height}
        payload = [(f"{key}.{i:06d}.jpg", jpg) for i, jpg in enumerate(decoded.jpegs)]
        header_frames = decoded.header_frames
    else:
        probed, count = count_video_frames(video)
        meta = {"num_frames": count, "fps": probed.fps, "width": probed.width, "height": probed.height}
        payload = [(f"{key}{video.suffix}", video.read_bytes())]
        header_frames = probed.expected_frames
    members = [(f"{key}.json", _sample_json(record, meta, video.name))]
    if record.label is not None:
        members.append((f"{key}.cls", str(record.label).encode("ascii")))
    return members + payload, header_frames


def _one_sample(
    record: VideoRecord, videos_dir: Path, settings: WriterSettings, shard: str, on_error: str
) -> tuple[SampleOutcome, list[tuple[str, bytes]]]:
    video = find_video(videos_dir, record.video_id)
    if video is None:
        err = f"no video file {record.video_id}.webm in {videos_dir}"
        return SampleOutcome(record.video_id, record.label, SampleStatus.MISSING, shard, err, "missing"), []
    try:
        members, header_frames = _encode_sample(record, video, settings)
    except Exception as exc:  # the per-sample boundary: a bad video must not stop the other 220k
        if on_error == "raise":
            raise
        reason = exc.reason if isinstance(exc, SampleError) else type(exc).__name__
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        log.debug("sample %s failed: %s", record.video_id, message)
        return SampleOutcome(record.video_id, record.label, SampleStatus.FAILED, shard, message, reason), []
    frames = json.loads(members[0][1])["num_frames"]
    mismatch = counts_disagree(frames, header_frames)
    if mismatch:
        log.debug("sample %s: decoded %d frames, the header suggests about %d", record.video_id, frames, header_frames)
    outcome = SampleOutcome(
        record.video_id,
        record.label,
        SampleStatus.OK,
        shard,
        num_frames=frames,
        header_frames=header_frames,
        frame_count_mismatch=mismatch,
    )
    return outcome, members


def write_shard(
    spec: ShardSpec, *, videos_dir: Path, out_dir: Path, settings: WriterSettings, on_error: str = "skip"
) -> ShardStats:
    """Write `spec` to `out_dir/spec.name` atomically and return its stats.

    Samples are written in plan order; failed and missing videos are recorded in `outcomes`, not written.
    """
    start = time.perf_counter()
    stats = ShardStats(name=spec.name, split=spec.split, index=spec.index)
    target = out_dir / spec.name
    fd, tmp = make_temp(target)
    try:
        with os.fdopen(fd, "wb") as raw:
            sink = _HashingWriter(raw)
            with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
                for record in spec.records:
                    outcome, members = _one_sample(record, videos_dir, settings, spec.name, on_error)
                    stats.outcomes.append(outcome)
                    for name, data in members:
                        _add_member(tar, name, data)
                    if outcome.status is SampleStatus.OK:
                        stats.nsamples += 1
                        stats.num_frames += outcome.num_frames or 0
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stats.filesize, stats.md5sum = sink.size, sink.md5.hexdigest()
    if target.stat().st_size != stats.filesize:
        raise ShardError(f"{target}: wrote {stats.filesize} bytes but the file has {target.stat().st_size}")
    stats.seconds = time.perf_counter() - start
    return stats
