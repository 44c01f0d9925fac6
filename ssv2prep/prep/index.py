"""The per-split files beside the shards: index, manifest, stats and classes (shard-format.md).

- `ssv2-{split}.json`: the shard index, a superset of the WebDataset wids descriptor.
- `ssv2-{split}.manifest.jsonl`: one line per annotation entry, whatever became of it.
- `ssv2-{split}.stats.json`: counts, failure reasons, bytes, time, throughput.
- `classes.json`: class names in index order.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ssv2prep
from ssv2prep.errors import ShardError
from ssv2prep.fsutil import atomic_write_json, atomic_write_text
from ssv2prep.prep.plan import DATASET_NAME
from ssv2prep.prep.shard import SampleStatus, ShardStats

INDEX_KIND = "wids-shard-index-v1"


def index_path(out_dir: Path, split: str) -> Path:
    """`OUT/ssv2-{split}.json`."""
    return out_dir / f"{DATASET_NAME}-{split}.json"


def manifest_path(out_dir: Path, split: str) -> Path:
    """`OUT/ssv2-{split}.manifest.jsonl`."""
    return out_dir / f"{DATASET_NAME}-{split}.manifest.jsonl"


def stats_path(out_dir: Path, split: str) -> Path:
    """`OUT/ssv2-{split}.stats.json`."""
    return out_dir / f"{DATASET_NAME}-{split}.stats.json"


@dataclass(frozen=True, slots=True)
class SplitSummary:
    """What a finished split holds; the CLI prints it."""

    split: str
    num_shards: int
    ok: int
    failed: int
    missing: int
    num_frames: int
    bytes: int
    failure_reasons: dict[str, int]
    frame_count_mismatch: int = 0  # ok videos whose decoded count disagrees with their header's estimate


def build_index(
    split: str, shards: list[ShardStats], *, classes: list[str], flip_pairs: list[list[int]], settings: dict[str, Any]
) -> dict[str, Any]:
    """The index object for one split, shards in index order."""
    return {
        "__kind__": INDEX_KIND,
        "wids_version": 1,
        "name": f"{DATASET_NAME}-{split}",
        "shardlist": [
            {"url": s.name, "nsamples": s.nsamples, "filesize": s.filesize, "md5sum": s.md5sum} for s in shards
        ],
        "split": split,
        "format": settings["format"],
        "num_samples": sum(s.nsamples for s in shards),
        "num_frames": sum(s.num_frames for s in shards),
        "num_classes": len(classes),
        "classes": "classes.json",
        "jpeg_quality": settings["quality"] if settings["format"] == "frames" else None,
        "short_side": settings["short_side"],
        "flip_pairs": flip_pairs,
        "created_by": f"ssv2prep {ssv2prep.__version__}",
        "settings": settings,
    }


def summarize(split: str, shards: list[ShardStats]) -> SplitSummary:
    """Counts over all outcomes of a split."""
    outcomes = [o for s in shards for o in s.outcomes]
    status = Counter(o.status for o in outcomes)
    reasons = Counter(o.reason or "unknown" for o in outcomes if o.status is not SampleStatus.OK)
    return SplitSummary(
        split=split,
        num_shards=len(shards),
        ok=status[SampleStatus.OK],
        failed=status[SampleStatus.FAILED],
        missing=status[SampleStatus.MISSING],
        num_frames=sum(s.num_frames for s in shards),
        bytes=sum(s.filesize for s in shards),
        failure_reasons=dict(sorted(reasons.items())),
        frame_count_mismatch=sum(o.frame_count_mismatch for o in outcomes),
    )


def build_stats(summary: SplitSummary, shards: list[ShardStats], *, wall_seconds: float) -> dict[str, Any]:
    """The stats object: counts, reasons, bytes, and throughput from the summed per-shard worker time."""
    worker_s = sum(s.seconds for s in shards)
    videos = summary.ok + summary.failed
    return {
        "split": summary.split,
        "entries": summary.ok + summary.failed + summary.missing,
        "ok": summary.ok,
        "failed": summary.failed,
        "missing": summary.missing,
        "failure_reasons": summary.failure_reasons,
        "frame_count_mismatch": summary.frame_count_mismatch,
        "num_shards": summary.num_shards,
        "num_frames": summary.num_frames,
        "bytes": summary.bytes,
        "worker_seconds": round(worker_s, 3),
        "wall_seconds_last_run": round(wall_seconds, 3),
        "videos_per_worker_second": round(videos / worker_s, 3) if worker_s else None,
        "frames_per_worker_second": round(summary.num_frames / worker_s, 3) if worker_s else None,
    }


def write_split_files(
    out_dir: Path,
    split: str,
    shards: list[ShardStats],
    *,
    classes: list[str],
    flip_pairs: list[list[int]],
    settings: dict[str, Any],
    wall_seconds: float,
) -> SplitSummary:
    """Write manifest, stats and index (index last: its presence means the split is complete)."""
    summary = summarize(split, shards)
    lines = [json.dumps(o.to_json(), ensure_ascii=False) for s in shards for o in s.outcomes]
    atomic_write_text(manifest_path(out_dir, split), "".join(line + "\n" for line in lines))
    atomic_write_json(stats_path(out_dir, split), build_stats(summary, shards, wall_seconds=wall_seconds))
    atomic_write_json(
        index_path(out_dir, split),
        build_index(split, shards, classes=classes, flip_pairs=flip_pairs, settings=settings),
    )
    return summary


def write_classes(out_dir: Path, classes: list[str]) -> None:
    """`classes.json`: a JSON list of class names in index order."""
    atomic_write_json(out_dir / "classes.json", list(classes))


def check_index(obj: Any, where: str) -> dict[str, Any]:
    """Sanity-check a parsed shard index (from a file or a URL named by `where`); return it."""
    if not isinstance(obj, dict) or obj.get("__kind__") != INDEX_KIND or not isinstance(obj.get("shardlist"), list):
        raise ShardError(f"{where}: not a shard index (expected __kind__ {INDEX_KIND!r} and a shardlist)")
    for entry in obj["shardlist"]:
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not isinstance(entry.get("nsamples"), int):
            raise ShardError(f"{where}: every shardlist entry needs a url and an integer nsamples")
    return obj


def read_index(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a local shard index; raise ShardError naming the file."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ShardError(f"{p}: shard index not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{p}: not a readable shard index ({exc})") from exc
    return check_index(obj, str(p))


def read_classes(index_file: str | Path, index: dict[str, Any]) -> list[str]:
    """The class list an index points at (`classes.json` beside it)."""
    path = Path(index_file).parent / str(index.get("classes", "classes.json"))
    try:
        classes = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: cannot read the class list ({exc})") from exc
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ShardError(f"{path}: expected a JSON list of class names")
    return classes


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The manifest lines of a split as dicts."""
    p = Path(path)
    try:
        return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{p}: cannot read the manifest ({exc})") from exc
