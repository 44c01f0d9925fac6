"""Annotation records -> a deterministic shard plan.

The plan (which video goes into which shard) is a pure function of the records, the seed and the number of videos
per shard, so an interrupted run can resume, and `--part K/N` runs on different machines write disjoint shards
without talking to each other.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

from ssv2prep.annotations import VideoRecord
from ssv2prep.errors import ConfigError

DATASET_NAME = "ssv2"


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One shard to write: its split, number and the records it holds, in order."""

    split: str
    index: int
    records: tuple[VideoRecord, ...]

    @property
    def name(self) -> str:
        """File name of the shard, e.g. `ssv2-train-000012.tar`."""
        return shard_name(self.split, self.index)


def shard_name(split: str, index: int) -> str:
    """`ssv2-{split}-{index:06d}.tar`."""
    return f"{DATASET_NAME}-{split}-{index:06d}.tar"


def _rng(seed: int, *parts: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across runs and Python versions.
    return random.Random("/".join([str(seed), *parts]))


def plan_shards(records: list[VideoRecord], *, split: str, videos_per_shard: int, seed: int) -> list[ShardSpec]:
    """Shuffle the records of one split with a seeded RNG and cut them into shards of `videos_per_shard`.

    The input order does not matter: records are sorted by id before the seeded shuffle.
    """
    if videos_per_shard < 1:
        raise ConfigError(f"--videos-per-shard must be >= 1 (got {videos_per_shard})")
    ordered = sorted(records, key=lambda r: (len(r.video_id), r.video_id))
    _rng(seed, "plan", split).shuffle(ordered)
    return [
        ShardSpec(split=split, index=i, records=tuple(ordered[start : start + videos_per_shard]))
        for i, start in enumerate(range(0, len(ordered), videos_per_shard))
    ]


def carve_holdout(train: list[VideoRecord], fraction: float, seed: int) -> tuple[list[VideoRecord], list[VideoRecord]]:
    """Split `train` into (train, holdout): per class, a seeded `round(fraction * n)` videos go to holdout.

    Stratified by label so every class keeps its share; holdout records get `split="holdout"`.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"--holdout must be in [0, 1) (got {fraction})")
    if fraction == 0.0:
        return list(train), []
    by_label: dict[int | None, list[VideoRecord]] = defaultdict(list)
    for r in sorted(train, key=lambda r: (len(r.video_id), r.video_id)):
        by_label[r.label].append(r)
    held: set[str] = set()
    for label in sorted(by_label, key=lambda x: -1 if x is None else x):
        group = by_label[label]
        _rng(seed, "holdout", str(label)).shuffle(group)
        held.update(r.video_id for r in group[: round(fraction * len(group))])
    keep = [r for r in train if r.video_id not in held]
    hold = [_with_split(r, "holdout") for r in train if r.video_id in held]
    return keep, hold


def _with_split(record: VideoRecord, split: str) -> VideoRecord:
    return VideoRecord(
        video_id=record.video_id,
        split=split,
        label=record.label,
        class_name=record.class_name,
        template=record.template,
        caption=record.caption,
        placeholders=record.placeholders,
    )


def parse_part(text: str | None) -> tuple[int, int] | None:
    """`"2/4"` -> (2, 4) (1-based part K of N); None stays None."""
    if text is None:
        return None
    try:
        k_s, n_s = text.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError as exc:
        raise ConfigError(f"--part must look like K/N, e.g. 2/4 (got {text!r})") from exc
    if not 1 <= k <= n:
        raise ConfigError(f"--part K/N needs 1 <= K <= N (got {text!r})")
    return k, n


def select_part(specs: list[ShardSpec], part: tuple[int, int] | None) -> list[ShardSpec]:
    """The shards of part K of N: shard i belongs to part (i mod N) + 1. None selects all."""
    if part is None:
        return list(specs)
    k, n = part
    return [s for s in specs if s.index % n == k - 1]
