"""Frame-index sampling against hand-computed values of the official rules (0-based here, 1-based there)."""

from __future__ import annotations

import numpy as np
import pytest

from ssv2prep.data import sampling
from ssv2prep.data.sampling import SamplingSpec, sample_clips
from ssv2prep.errors import ConfigError, TooFewFramesError


def _draws(fn, num_frames: int, t: int, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.array([fn(num_frames, t, rng) for _ in range(n)])


def test_train_draws_one_frame_inside_each_equal_segment() -> None:
    # 20 frames, T=8: segments of 20 // 8 = 2 frames; frames 16..19 are never drawn (official `avg` rule)
    draws = _draws(sampling.segment_random_indices, 20, 8)
    assert draws.shape == (400, 8)
    for t in range(8):
        assert set(draws[:, t]) == {2 * t, 2 * t + 1}


def test_train_large_video_covers_each_segment() -> None:
    draws = _draws(sampling.segment_random_indices, 1000, 8)
    for t in range(8):
        assert draws[:, t].min() >= 125 * t and draws[:, t].max() <= 125 * t + 124
    assert draws.max() > 990 and draws.min() < 10  # the whole range is reachable


@pytest.mark.parametrize(("num_frames", "expected"), [(8, list(range(8))), (5, [0] * 8), (1, [0] * 8)])
def test_train_short_videos(num_frames: int, expected: list[int]) -> None:
    # == T: one frame per segment, no randomness; < T: frame 0 repeated (official: all offsets 0, +1)
    draws = _draws(sampling.segment_random_indices, num_frames, 8, n=20)
    assert (draws == np.array(expected)).all()


@pytest.mark.parametrize(
    ("num_frames", "expected"),
    [
        (20, [1, 3, 6, 8, 11, 13, 16, 18]),  # tick 2.5: int(1.25 + 2.5 t)
        (9, [0, 1, 2, 3, 5, 6, 7, 8]),  # tick 1.125
        (8, [0] * 8),  # the official val guard: num_frames <= T -> frame 0 repeated
        (3, [0] * 8),
        (1, [0] * 8),
        (1000, [62, 187, 312, 437, 562, 687, 812, 937]),
    ],
)
def test_val_centres(num_frames: int, expected: list[int]) -> None:
    assert sampling.segment_centre_indices(num_frames, 8) == expected


@pytest.mark.parametrize(
    ("num_frames", "expected"),
    [
        (20, [1, 3, 6, 8, 11, 13, 16, 18]),
        (8, list(range(8))),  # no guard in the test sampler
        (4, [0, 0, 1, 1, 2, 2, 3, 3]),  # tick 0.5 repeats frames
        (1, [0] * 8),
    ],
)
def test_test_centres_without_guard(num_frames: int, expected: list[int]) -> None:
    assert sampling.centre_clips(num_frames, 8) == [expected]


def test_twice_sample_adds_segment_starts() -> None:
    assert sampling.centre_clips(20, 8, clips=2) == [[1, 3, 6, 8, 11, 13, 16, 18], [0, 2, 5, 7, 10, 12, 15, 17]]
    assert sampling.centre_clips(4, 8, clips=2)[1] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_dense_short_video_wraps_inside_one_window() -> None:
    # 30 frames <= 64: start 0, stride 64 // 8 = 8, indices modulo 30
    rng = np.random.default_rng(0)
    assert sampling.dense_random_indices(30, 8, rng) == [0, 8, 16, 24, 2, 10, 18, 26]
    assert sampling.dense_clips(30, 8, clips=10) == [[0, 8, 16, 24, 2, 10, 18, 26]] * 10
    assert sampling.dense_random_indices(1, 8, rng) == [0] * 8


def test_dense_train_start_range_and_test_starts() -> None:
    # 100 frames: sample_pos = 37; train start = randint(0, 36) -> 0..35; test starts linspace(0, 36, 10)
    starts = {sampling.dense_random_indices(100, 8, np.random.default_rng(s))[0] for s in range(600)}
    assert starts == set(range(36))
    clip = sampling.dense_random_indices(100, 8, np.random.default_rng(1))
    assert np.diff(clip).tolist() == [8] * 7
    assert sampling.dense_clips(100, 8) == [[4 * k + 8 * t for t in range(8)] for k in range(10)]


def test_dense_16_segments_stride_4() -> None:
    assert sampling.dense_clips(64, 16, clips=1) == [[4 * t for t in range(16)]]


def test_sample_clips_dispatches_by_mode() -> None:
    rng = np.random.default_rng(3)
    train = sample_clips(20, SamplingSpec("train", 8), rng)
    assert len(train) == 1 and all(2 * t <= i <= 2 * t + 1 for t, i in enumerate(train[0]))
    assert sample_clips(8, SamplingSpec("val", 8)) == [[0] * 8]
    assert sample_clips(8, SamplingSpec("test", 8)) == [list(range(8))]
    assert sample_clips(20, SamplingSpec("test", 8, clips=2))[1] == [0, 2, 5, 7, 10, 12, 15, 17]
    assert sample_clips(100, SamplingSpec("test", 8, dense=True, clips=10))[9][0] == 36
    assert sample_clips(100, SamplingSpec("val", 8, dense=True)) == [[8 * t for t in range(8)]]


@pytest.mark.parametrize(
    "spec",
    [
        SamplingSpec("bogus", 8),
        SamplingSpec("train", 0),
        SamplingSpec("val", 8, clips=2),
        SamplingSpec("test", 8, clips=3),
        SamplingSpec("train", 65, dense=True),
    ],
)
def test_invalid_specs_are_config_errors(spec: SamplingSpec) -> None:
    with pytest.raises(ConfigError):
        spec.validate()


def test_zero_frames_is_a_sample_error() -> None:
    with pytest.raises(TooFewFramesError, match="0 frames"):
        sample_clips(0, SamplingSpec("val", 8))
