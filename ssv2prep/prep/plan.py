"""Annotation records -> a deterministic shard plan.

The plan (which video goes into which shard) is a pure function of the records, the seed and the number of videos
per shard, so an interrupted run can resume, and `--part K/N` runs on different machines write disjoint shards
without talking to each other.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from collections.abc import Mapping
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


def manifest_name(split: str) -> str:
    """`ssv2-{split}.manifest.jsonl`: every video of the split with its status."""
    return f"{DATASET_NAME}-{split}.manifest.jsonl"


def stats_name(split: str) -> str:
    """`ssv2-{split}.stats.json`: the split's counts and timings."""
    return f"{DATASET_NAME}-{split}.stats.json"


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


# Array-job schedulers and the variables that give a task its index (0-based) and the array's size.
ARRAY_JOB_ENV: dict[str, tuple[str, str]] = {
    "AWS Batch": ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"),
    "Slurm": ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
    "Kubernetes indexed job": ("JOB_COMPLETION_INDEX", "SSV2PREP_PARTS"),
}


def part_from_env(env: Mapping[str, str]) -> tuple[int, int]:
    """(K, N) of this task of an array job, from the scheduler's variables (1-based K, as `--part K/N`).

    AWS Batch and Slurm give both the index and the size. A Kubernetes indexed job gives only
    `JOB_COMPLETION_INDEX`; its size (the job's `completions`) must be passed as `SSV2PREP_PARTS`. Slurm arrays
    that do not start at 0 (`--array=1-8`) are shifted by `SLURM_ARRAY_TASK_MIN`.

    Raises:
        ConfigError: no scheduler's variables are set, or they are not consistent numbers.
    """
    for scheduler, (index_var, size_var) in ARRAY_JOB_ENV.items():
        if index_var not in env:
            continue
        if size_var not in env:
            raise ConfigError(f"--part auto: {scheduler} sets {index_var} but {size_var} is not set")
        try:
            index, size = int(env[index_var]), int(env[size_var])
            index -= int(env.get("SLURM_ARRAY_TASK_MIN", "0")) if scheduler == "Slurm" else 0
        except ValueError as exc:
            raise ConfigError(f"--part auto: {index_var}/{size_var} are not integers") from exc
        if not 0 <= index < size:
            raise ConfigError(f"--part auto: {scheduler} task index {index} is outside an array of {size}")
        return index + 1, size
    names = ", ".join(index_var for index_var, _ in ARRAY_JOB_ENV.values())
    raise ConfigError(f"--part auto: not inside an array job (none of {names} is set)")


def parse_part(text: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """`"2/4"` -> (2, 4) (1-based part K of N); `"auto"` reads the array job's variables; None stays None."""
    if text is None:
        return None
    if text == "auto":
        return part_from_env(os.environ if env is None else env)
    try:
        k_s, n_s = text.split("/")
        k, n = int(k_s), int(n_s)
    except ValueError as exc:
        raise ConfigError(f"--part must look like K/N, e.g. 2/4, or auto (got {text!r})") from exc
    if not 1 <= k <= n:
        raise ConfigError(f"--part K/N needs 1 <= K <= N (got {text!r})")
    return k, n


def select_part(specs: list[ShardSpec], part: tuple[int, int] | None) -> list[ShardSpec]:
    """The shards of part K of N: shard i belongs to part (i mod N) + 1. None selects all."""
    if part is None:
        return list(specs)
    k, n = part
    return [s for s in specs if s.index % n == k - 1]
