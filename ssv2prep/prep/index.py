"""The per-split files beside the shards: index, manifest, stats and classes (shard-format.md).

- `ssv2-{split}.json`: the shard index, a superset of the WebDataset wids descriptor.
- `ssv2-{split}.manifest.jsonl`: one line per annotation entry, whatever became of it.
- `ssv2-{split}.stats.json`: counts, failure reasons, bytes, time, throughput.
- `classes.json`: class names in index order.

Every writer and reader here goes through `ssv2prep.storage`, so an output folder may be a local path or an
object-store prefix (`s3://bucket/prefix`). An index is self-contained: it carries the class names
(`class_names`) as well as naming `classes.json` (kept for the shard-format contract and for older readers).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ssv2prep
from ssv2prep import storage
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.prep.plan import DATASET_NAME, manifest_name, stats_name
from ssv2prep.prep.shard import SampleStatus, ShardStats

INDEX_KIND = "wids-shard-index-v1"
WORK_DIR = ".ssv2prep-work"  # OUT/.ssv2prep-work/: settings.json and one work record per finished shard


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
        "class_names": list(classes),
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


def json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    """`obj` as UTF-8 JSON and a newline: the bytes fsutil.atomic_write_json writes, in an object store too."""
    return (json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")


def write_split_files(
    out_dir: str | Path,
    split: str,
    shards: list[ShardStats],
    *,
    classes: list[str],
    flip_pairs: list[list[int]],
    settings: dict[str, Any],
    wall_seconds: float,
) -> SplitSummary:
    """Write manifest, stats and index into a folder or prefix, each atomically (index last: its presence means
    the split is complete)."""
    summary = summarize(split, shards)
    lines = [json.dumps(o.to_json(), ensure_ascii=False) for s in shards for o in s.outcomes]
    base = f"{DATASET_NAME}-{split}"
    storage.write_bytes(storage.join(out_dir, manifest_name(split)), "".join(x + "\n" for x in lines).encode())
    stats = build_stats(summary, shards, wall_seconds=wall_seconds)
    storage.write_bytes(storage.join(out_dir, stats_name(split)), json_bytes(stats))
    index = build_index(split, shards, classes=classes, flip_pairs=flip_pairs, settings=settings)
    storage.write_bytes(storage.join(out_dir, f"{base}.json"), json_bytes(index))
    return summary


def write_classes(out_dir: str | Path, classes: list[str]) -> None:
    """`classes.json`: a JSON list of class names in index order."""
    storage.write_bytes(storage.join(out_dir, "classes.json"), json_bytes(list(classes)))


def check_index(obj: Any, where: str) -> dict[str, Any]:
    """Sanity-check a parsed shard index (from a file or a URL named by `where`); return it."""
    if not isinstance(obj, dict) or obj.get("__kind__") != INDEX_KIND or not isinstance(obj.get("shardlist"), list):
        raise ShardError(f"{where}: not a shard index (expected __kind__ {INDEX_KIND!r} and a shardlist)")
    for entry in obj["shardlist"]:
        url = entry.get("url") if isinstance(entry, dict) else None
        if not isinstance(url, str) or not isinstance(entry.get("nsamples"), int):
            raise ShardError(f"{where}: every shardlist entry needs a url and an integer nsamples")
    return obj


def _read_text(url: str | Path, what: str) -> str:
    try:
        return storage.read_bytes(url).decode("utf-8")
    except storage.StorageError as exc:
        raise ShardError(f"{exc} ({what})") from exc
    except UnicodeDecodeError as exc:
        raise ShardError(f"{url}: not a readable {what} ({exc})") from exc


def read_index(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a shard index (a local file or an object URL); raise ShardError naming it."""
    text = _read_text(path, "shard index")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not a readable shard index ({exc})") from exc
    return check_index(obj, str(path))


def _class_list(obj: Any, where: str) -> list[str]:
    if not isinstance(obj, list) or not all(isinstance(c, str) for c in obj):
        raise ShardError(f"{where}: expected a JSON list of class names")
    return list(obj)


def read_classes(index_file: str | Path, index: dict[str, Any]) -> list[str]:
    """The class names of an index: its own `class_names`, else the `classes` file it names, read beside it.

    Never made up: an index that carries no names and whose class file is absent, unreadable or outside its folder
    raises.

    Raises:
        ShardError: no usable class list; the message names the index.
    """
    if "class_names" in index:
        return _class_list(index["class_names"], f"{index_file}: class_names")
    name = str(index.get("classes", "classes.json"))
    try:
        url = storage.join(storage.parent(index_file), name)
    except ConfigError as exc:
        raise ShardError(f"{index_file}: no class_names, and its class list {exc}") from exc
    try:
        obj = json.loads(_read_text(url, "class list"))
    except (ShardError, json.JSONDecodeError) as exc:
        raise ShardError(
            f"{index_file}: the index carries no class_names and its class list {name} cannot be read ({exc})"
        ) from exc
    return _class_list(obj, str(url))


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """The manifest lines of a split as dicts (a local file or an object URL)."""
    text = _read_text(path, "manifest")
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: cannot read the manifest ({exc})") from exc
