"""One sample -> one clip: choose frames and crops without decoding (`ClipPlanner`), then decode and crop them
(`ClipFinisher`).

The per-sample step of the loader flow (`source` -> `assign` -> `clip` -> `decode` -> `stream` -> `loader`). The
planner keeps only the sampled frames' JPEG bytes, so the rest of a video is never decoded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ssv2prep.data.decode import CPU, decode_jpegs, decode_video_frames
from ssv2prep.data.sampling import SamplingSpec, sample_clips
from ssv2prep.data.source import RawSample
from ssv2prep.data.transforms import (
    MAX_DISTORT,
    MULTISCALE_SCALES,
    TrainCrop,
    apply_train_crop,
    draw_train_crop,
    eval_views,
    flip_label,
    resize_short_side,
    stack_channels_last,
)
from ssv2prep.errors import DecodeError

VIDEO_MEMBERS = ("webm", "mp4")


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
