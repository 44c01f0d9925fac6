"""`ssv2prep verify`: re-read every shard of every index in a folder and check it against the contract.

Checks per split: the index parses; every shard exists with the recorded size and MD5; each sample has its JSON,
its `.cls` (when labelled) agreeing with the JSON and the manifest, and `num_frames` JPEGs numbered 0..n-1 that
decode (or one video member); sample counts equal `nsamples`; the manifest holds each id once, ok = sum of
`nsamples`, and every ok id is in the shard the manifest names; the stats agree with the manifest; a split has at
least one sample. Names read from an index (shard urls, the class list, the split) must be plain file names in the
folder: a `../` or absolute one is a problem, never opened. A split with shards, a manifest or work records but no
index (an unfinished `--part` run, a deleted index) is a problem too, so that a partial folder never passes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ssv2prep.errors import ShardError
from ssv2prep.prep.index import read_classes, read_index, read_manifest
from ssv2prep.prep.plan import DATASET_NAME
from ssv2prep.prep.prepare import WORK_DIR

log = logging.getLogger(__name__)

MAX_PROBLEMS_PER_SHARD = 20
_SPLIT_FILE_RE = re.compile(
    rf"^{DATASET_NAME}-(?P<split>.+?)(?:-\d{{6}}\.tar(?:\.json)?|\.manifest\.jsonl|\.stats\.json)$"
)


def _plain_name(name: object) -> str | None:
    """`name` when it is a plain file name (no folder part, not `.`/`..`), else None."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return None
    return name


@dataclass(slots=True)
class VerifyReport:
    """Problems found (one line each) and what was checked."""

    problems: list[str] = field(default_factory=list)
    splits: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    samples: int = 0
    frames: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def find_indexes(folder: Path) -> list[Path]:
    """Every `ssv2-*.json` shard index in `folder` (manifests and stats excluded)."""
    return sorted(
        p for p in folder.glob(f"{DATASET_NAME}-*.json") if not p.name.endswith((".stats.json", ".manifest.json"))
    )


def _group_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per consecutive run of members sharing a key, as WebDataset groups them."""
    key, members = None, {}
    for info in tar:
        if not info.isfile():
            continue
        k, _, suffix = info.name.partition(".")
        fh = tar.extractfile(info)
        data = fh.read() if fh else b""
        if k != key and key is not None:
            yield key, members
            members = {}
        key = k
        members[suffix] = data
    if key is not None:
        yield key, members


def _check_sample(key: str, members: dict[str, bytes], fmt: str, decode: bool) -> tuple[list[str], dict[str, Any]]:
    problems: list[str] = []
    try:
        meta = json.loads(members.get("json", b""))
    except json.JSONDecodeError:
        return [f"sample {key}: missing or unreadable .json"], {}
    if meta.get("id") != key:
        problems.append(f"sample {key}: json id is {meta.get('id')!r}")
    if meta.get("label") is not None and members.get("cls", b"").decode("ascii", "replace") != str(meta["label"]):
        problems.append(f"sample {key}: .cls {members.get('cls')!r} disagrees with json label {meta['label']}")
    n = meta.get("num_frames")
    if fmt == "frames":
        frames = sorted(s for s in members if s.endswith("jpg"))
        expected = [f"{i:06d}.jpg" for i in range(n or 0)]
        if frames != expected:
            problems.append(f"sample {key}: has {len(frames)} frames, json says {n} (numbered 000000..)")
        if decode:
            for name in frames:
                try:
                    Image.open(io.BytesIO(members[name])).load()
                except (OSError, SyntaxError) as exc:
                    problems.append(f"sample {key}: frame {name} does not decode ({exc})")
                    break
    elif not any(s in members for s in ("webm", "mp4")):
        problems.append(f"sample {key}: no video member")
    return problems, meta


def _check_shard(path: Path, entry: dict[str, Any], fmt: str, decode: bool) -> tuple[list[str], dict[str, Any]]:
    """Problems of one shard and the metadata of its samples by id."""
    if not path.is_file():
        return [f"{path.name}: missing"], {}
    data = path.read_bytes()
    problems = []
    if entry.get("filesize") is not None and len(data) != entry["filesize"]:
        problems.append(f"{path.name}: size {len(data)}, index says {entry['filesize']}")
    if entry.get("md5sum") and hashlib.md5(data).hexdigest() != entry["md5sum"]:
        problems.append(f"{path.name}: md5 differs from the index")
    metas: dict[str, Any] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for key, members in _group_samples(tar):
                sample_problems, meta = _check_sample(key, members, fmt, decode)
                problems += [f"{path.name}: {p}" for p in sample_problems]
                if key in metas:
                    problems.append(f"{path.name}: sample {key} appears twice")
                metas[key] = meta
    except tarfile.TarError as exc:
        return [*problems, f"{path.name}: not a readable tar ({exc})"], metas
    if len(metas) != entry["nsamples"]:
        problems.append(f"{path.name}: {len(metas)} samples, index says {entry['nsamples']}")
    return problems[:MAX_PROBLEMS_PER_SHARD], metas


def _check_manifest(index_file: Path, index: dict[str, Any], seen: dict[str, tuple[str, Any]]) -> list[str]:
    split = index["split"]
    path = index_file.parent / f"{DATASET_NAME}-{split}.manifest.jsonl"
    if not path.is_file():
        return [f"{path.name}: missing"]
    lines = read_manifest(path)
    problems = []
    counts = Counter(line["id"] for line in lines)
    dupes = [k for k, n in counts.items() if n > 1]
    if dupes:
        problems.append(f"{path.name}: ids listed more than once: {dupes[:10]}")
    ok = [line for line in lines if line["status"] == "ok"]
    if len(ok) != index["num_samples"] or len(ok) != sum(e["nsamples"] for e in index["shardlist"]):
        problems.append(f"{path.name}: {len(ok)} ok entries but the index holds {index['num_samples']} samples")
    for line in ok:
        where = seen.get(line["id"])
        if where is None or where[0] != line["shard"]:
            problems.append(f"{path.name}: ok entry {line['id']} is not in shard {line['shard']}")
        elif where[1].get("label") != line["label"] or where[1].get("num_frames") != line["num_frames"]:
            problems.append(f"{path.name}: entry {line['id']} disagrees with its sample (label or num_frames)")
    if set(seen) - {line["id"] for line in ok}:
        problems.append(f"{path.name}: shards hold samples the manifest does not list as ok")
    stats_file = index_file.parent / f"{DATASET_NAME}-{split}.stats.json"
    if stats_file.is_file():
        stats = json.loads(stats_file.read_text(encoding="utf-8"))
        status = Counter(line["status"] for line in lines)
        if [stats.get(k) for k in ("ok", "failed", "missing")] != [status[k] for k in ("ok", "failed", "missing")]:
            problems.append(f"{stats_file.name}: counts differ from the manifest")
    return problems[:MAX_PROBLEMS_PER_SHARD]


def verify_split(
    index_file: Path, report: VerifyReport, *, decode: bool = True, on_shard: Callable[[str], None] | None = None
) -> None:
    """Check one split's shards and files, adding what is wrong to `report`."""
    try:
        index = read_index(index_file)
    except ShardError as exc:
        report.problems.append(str(exc))
        return
    unsafe = [
        f"{key} {value!r}"
        for key, value in [("split", index.get("split")), ("classes", index.get("classes", "classes.json"))]
        + [("url", e["url"]) for e in index["shardlist"]]
        if _plain_name(value) is None
    ]
    if unsafe:
        report.problems.append(
            f"{index_file.name}: names a file outside {index_file.parent} ({', '.join(unsafe[:5])}); refusing to "
            "read it: an index may only name files beside it"
        )
        return
    try:
        classes = read_classes(index_file, index)
    except ShardError as exc:
        report.problems.append(str(exc))
        return
    if index.get("num_classes") != len(classes):
        report.problems.append(f"{index_file.name}: num_classes {index.get('num_classes')} but {len(classes)} classes")
    seen: dict[str, tuple[str, Any]] = {}
    for entry in index["shardlist"]:
        problems, metas = _check_shard(index_file.parent / entry["url"], entry, index.get("format", "frames"), decode)
        report.problems += problems
        for key, meta in metas.items():
            if key in seen:
                report.problems.append(f"sample {key} is in both {seen[key][0]} and {entry['url']}")
            seen[key] = (entry["url"], meta)
            label = meta.get("label")
            if label is not None and not 0 <= label < len(classes):
                report.problems.append(f"{entry['url']}: sample {key} has label {label} outside 0..{len(classes) - 1}")
        report.shards += 1
        report.frames += sum(m.get("num_frames") or 0 for m in metas.values())
        if on_shard:
            on_shard(entry["url"])
    report.samples += len(seen)
    report.splits[index["split"]] = len(seen)
    if not seen and index["shardlist"]:
        report.problems.append(f"{index_file.name}: split {index['split']} holds no samples at all")
    report.problems += _check_manifest(index_file, index, seen)


def verify_folder(
    folder: str | Path, *, decode: bool = True, on_shard: Callable[[str], None] | None = None
) -> VerifyReport:
    """Verify every split whose index is in `folder`; raise ShardError when there is no index at all."""
    root = Path(folder)
    indexes = find_indexes(root)
    if not indexes:
        waiting = unindexed_splits(root, indexes)
        if waiting:
            raise ShardError(
                f"{root}: no shard index (ssv2-<split>.json) found, but shards of {', '.join(sorted(waiting))}: "
                "unfinished --part runs? re-run shard without --part once all parts are done"
            )
        raise ShardError(f"{root}: no shard index (ssv2-<split>.json) found")
    report = VerifyReport()
    for split, tars in sorted(unindexed_splits(root, indexes).items()):
        report.problems.append(
            f"split {split}: {tars} shards (or its manifest) but no index {DATASET_NAME}-{split}.json (unfinished "
            "--part runs, or a deleted index); re-run shard without --part once all parts are done"
        )
    for index_file in indexes:
        verify_split(index_file, report, decode=decode, on_shard=on_shard)
    return report


def unindexed_splits(folder: Path, indexes: list[Path] | None = None) -> dict[str, int]:
    """Splits with shards, a manifest, stats or shard work records in `folder` but no index: {split: shards}."""
    indexed = {p.name.removeprefix(f"{DATASET_NAME}-").removesuffix(".json") for p in indexes or find_indexes(folder)}
    tars: Counter[str] = Counter()
    for where in (folder, folder / WORK_DIR):
        if not where.is_dir():
            continue
        for path in where.iterdir():
            match = _SPLIT_FILE_RE.match(path.name)
            if match and (where == folder or path.name.endswith(".tar.json")):
                tars[match["split"]] += where == folder and path.name.endswith(".tar")
    return {split: n for split, n in tars.items() if split not in indexed}


def count_shards(folder: str | Path) -> int:
    """How many shards the indexes in `folder` list (for a progress bar)."""
    total = 0
    for index_file in find_indexes(Path(folder)):
        try:
            total += len(read_index(index_file)["shardlist"])
        except ShardError:
            continue
    return total
