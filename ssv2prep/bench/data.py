"""The synthetic shard sets the benches measure on: synthesize videos, then shard them, under one work folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def synth_shards(
    work: Path,
    synth: Any,
    *,
    splits: tuple[str, ...] = ("train",),
    videos_per_shard: int,
    workers: int = 1,
    **shard: Any,
) -> Path:
    """Synthesize `synth` (a SynthConfig) into `work/synth` and shard `splits` into `work/shards`, returned.

    `shard` passes further ShardConfig fields (`writer`, `max_failed_fraction`, ...)."""
    from ssv2prep.prep.prepare import ShardConfig, shard_dataset
    from ssv2prep.prep.synth import synthesize

    made = synthesize(work / "synth", synth)
    out = work / "shards"
    shard_dataset(
        ShardConfig(
            videos_dir=made.videos_dir,
            labels_dir=made.labels_dir,
            out_dir=out,
            splits=splits,
            videos_per_shard=videos_per_shard,
            workers=workers,
            **shard,
        )
    )
    return out
