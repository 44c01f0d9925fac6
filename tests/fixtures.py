"""Generated fixtures shared by the tests: tiny synthetic datasets and shard folders."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssv2prep.prep.prepare import ShardConfig, shard_dataset
from ssv2prep.prep.shard import WriterSettings
from ssv2prep.prep.synth import SynthConfig, SynthResult, synthesize

TINY = SynthConfig(
    num_pairs=2, train_per_class=3, validation_per_class=1, test_per_class=1, height=48, min_frames=10, max_frames=14
)


def make_synth(root: Path, cfg: SynthConfig = TINY) -> SynthResult:
    """A synthetic dataset under `root` (videos + labels)."""
    return synthesize(root, cfg)


def copy_dataset(src: SynthResult, dst: Path) -> tuple[Path, Path]:
    """A private, writable copy of a synthetic dataset: (videos_dir, labels_dir)."""
    videos, labels = dst / "videos", dst / "labels"
    shutil.copytree(src.videos_dir, videos)
    shutil.copytree(src.labels_dir, labels)
    return videos, labels


def shard_config(videos: Path, labels: Path, out: Path, **kw: object) -> ShardConfig:
    """A ShardConfig with test-friendly defaults (small shards, one worker)."""
    writer = kw.pop("writer", WriterSettings())
    base = {"videos_per_shard": 3, "workers": 1, "max_failed_fraction": 1.0}
    return ShardConfig(videos_dir=videos, labels_dir=labels, out_dir=out, writer=writer, **{**base, **kw})  # type: ignore[arg-type]


def make_shards(videos: Path, labels: Path, out: Path, **kw: object) -> Path:
    """Run the shard stage into `out` and return it."""
    shard_dataset(shard_config(videos, labels, out, **kw))
    return out


def folder_bytes(folder: Path, pattern: str = "ssv2-*") -> dict[str, bytes]:
    """{file name: bytes} of the contract files in `folder`, except the stats (they hold timings)."""
    return {
        p.name: p.read_bytes()
        for p in sorted(folder.glob(pattern))
        if p.is_file() and not p.name.endswith(".stats.json")
    }


def read_json(path: Path) -> object:
    """Parse a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `path` (needs root; the test is skipped without)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
