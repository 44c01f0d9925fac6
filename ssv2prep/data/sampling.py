"""Which frames of a video make a clip: pure functions returning 0-based frame indices.

The rules are those of the official TSM dataset code (tsm.md section 3), which numbers frames from 1; here frames
are numbered from 0, as in the shards (`<id>.000000.jpg` is the first frame), so every index is the official one
minus 1. `num_frames` is the number of frames the video has; T is `num_segments`.

- train: one uniformly random frame in each of T equal segments of `num_frames // T` frames (frames past
  `T * (num_frames // T)` are never drawn); a video with fewer than T frames repeats its first frame T times.
- val (the official `main.py` validation): the centre of each segment, `int(tick / 2 + tick * t)` with
  `tick = num_frames / T`; a video with at most T frames repeats its first frame (the official guard).
- test (the official `test_models.py`): the same centres without that guard (short videos repeat frames where
  `tick < 1`); `clips=2` adds a second clip of segment starts `int(tick * t)` (the official `twice_sample`).
- dense: T frames `64 // T` apart inside a 64-frame window, wrapping modulo `num_frames`; the window starts at a
  random frame in train, and at `clips` evenly spaced starts in test (the official uses 10). The official
  validation draws a random dense start too; here val uses the first start of the test rule (0), so that
  evaluation is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ssv2prep.errors import ConfigError, TooFewFramesError

MODES = ("train", "val", "test")
DENSE_WINDOW = 64
DENSE_TEST_CLIPS = 10


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """How to sample clips: `mode` (train/val/test), T, dense or segment sampling, and clips per video."""

    mode: str
    num_segments: int
    dense: bool = False
    clips: int = 1

    def validate(self) -> None:
        """Raise ConfigError on a combination the official protocol does not define."""
        if self.mode not in MODES:
            raise ConfigError(f"sampling mode must be one of {list(MODES)} (got {self.mode!r})")
        if self.num_segments < 1:
            raise ConfigError(f"num_segments must be >= 1 (got {self.num_segments})")
        if self.dense and self.num_segments > DENSE_WINDOW:
            raise ConfigError(f"dense sampling takes at most {DENSE_WINDOW} segments (got {self.num_segments})")
        if self.mode != "test" and self.clips != 1:
            raise ConfigError(f"{self.mode} sampling gives one clip per video (got clips={self.clips}); use test")
        if self.mode == "test" and not self.dense and self.clips not in (1, 2):
            raise ConfigError(f"test sampling takes clips 1 or 2 (twice sample), or dense (got clips={self.clips})")
        if self.clips < 1:
            raise ConfigError(f"clips must be >= 1 (got {self.clips})")


def _check(num_frames: int) -> None:
    if num_frames < 1:
        raise TooFewFramesError(f"video has {num_frames} frames; a clip needs at least 1")


def segment_random_indices(num_frames: int, num_segments: int, rng: np.random.Generator) -> list[int]:
    """Train: one random frame per equal segment (frame 0 repeated when `num_frames < num_segments`)."""
    _check(num_frames)
    avg = num_frames // num_segments
    if avg == 0:
        return [0] * num_segments
    offsets = np.arange(num_segments) * avg + rng.integers(avg, size=num_segments)
    return [int(i) for i in offsets]


def segment_centre_indices(num_frames: int, num_segments: int) -> list[int]:
    """Val: segment centres (frame 0 repeated when `num_frames <= num_segments`, the official guard)."""
    _check(num_frames)
    if num_frames <= num_segments:
        return [0] * num_segments
    tick = num_frames / num_segments
    return [int(tick / 2.0 + tick * t) for t in range(num_segments)]


def centre_clips(num_frames: int, num_segments: int, *, clips: int = 1) -> list[list[int]]:
    """Test: segment centres (no short-video guard); `clips=2` adds a clip of segment starts."""
    _check(num_frames)
    tick = num_frames / num_segments
    centres = [int(tick / 2.0 + tick * t) for t in range(num_segments)]
    if clips == 1:
        return [centres]
    return [centres, [int(tick * t) for t in range(num_segments)]]


def _dense_clip(num_frames: int, num_segments: int, start: int) -> list[int]:
    stride = DENSE_WINDOW // num_segments
    return [(t * stride + start) % num_frames for t in range(num_segments)]


def _dense_last_start(num_frames: int) -> int:
    """`sample_pos - 1` of the official code: the last window start (0 for videos of at most 64 frames)."""
    return max(1, 1 + num_frames - DENSE_WINDOW) - 1


def dense_random_indices(num_frames: int, num_segments: int, rng: np.random.Generator) -> list[int]:
    """Dense train: a 64-frame window at a random start (as the official, the last start is never drawn)."""
    _check(num_frames)
    last = _dense_last_start(num_frames)
    start = 0 if last == 0 else int(rng.integers(0, last))
    return _dense_clip(num_frames, num_segments, start)


def dense_clips(num_frames: int, num_segments: int, *, clips: int = DENSE_TEST_CLIPS) -> list[list[int]]:
    """Dense test: `clips` windows at evenly spaced starts from 0 to the last start."""
    _check(num_frames)
    starts = np.linspace(0, _dense_last_start(num_frames), num=clips, dtype=int)
    return [_dense_clip(num_frames, num_segments, int(s)) for s in starts]


def _train(num_frames: int, spec: SamplingSpec, rng: np.random.Generator | None) -> list[list[int]]:
    if rng is None:
        raise ValueError("train sampling needs a random generator")
    if spec.dense:
        return [dense_random_indices(num_frames, spec.num_segments, rng)]
    return [segment_random_indices(num_frames, spec.num_segments, rng)]


def _val(num_frames: int, spec: SamplingSpec, rng: np.random.Generator | None) -> list[list[int]]:
    if spec.dense:
        return dense_clips(num_frames, spec.num_segments, clips=1)
    return [segment_centre_indices(num_frames, spec.num_segments)]


def _test(num_frames: int, spec: SamplingSpec, rng: np.random.Generator | None) -> list[list[int]]:
    if spec.dense:
        return dense_clips(num_frames, spec.num_segments, clips=spec.clips)
    return centre_clips(num_frames, spec.num_segments, clips=spec.clips)


SAMPLERS: dict[str, Callable[[int, SamplingSpec, np.random.Generator | None], list[list[int]]]] = {
    "train": _train,
    "val": _val,
    "test": _test,
}


def sample_clips(num_frames: int, spec: SamplingSpec, rng: np.random.Generator | None = None) -> list[list[int]]:
    """Frame indices of every clip of one video: `spec.clips` lists of `spec.num_segments` 0-based indices.

    Args:
        num_frames: frames in the video (>= 1).
        spec: the sampling rule (validated by the caller).
        rng: the random generator (train only).

    Raises:
        TooFewFramesError: `num_frames < 1`.
    """
    return SAMPLERS[spec.mode](num_frames, spec, rng)
