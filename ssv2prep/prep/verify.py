"""`ssv2prep verify`: re-read every shard of every index in a folder and check it against the contract.

Checks per split: the index parses; every shard exists with the recorded size and MD5; each sample has its JSON,
its `.cls` (when labelled) agreeing with the JSON and the manifest, and `num_frames` JPEGs numbered 0..n-1 that
decode (`decode_check`; or one video member); sample counts equal `nsamples`; the manifest holds each id once,
ok = sum of `nsamples`, and every ok id is in the shard the manifest names; the stats agree with the manifest; a
split has at least one sample. Names read from an index (shard urls, the class list, the split) must be plain file
names in the folder: a `../` or absolute one is a problem, never opened. A split with shards, a manifest or work
records but no index (an unfinished `--part` run, a deleted index) is a problem too, so that a partial folder never
passes.

The folder may be an object-store prefix (`s3://bucket/prefix`): everything is read through `ssv2prep.storage`,
shards as streams (never a whole shard in memory). Shards are checked in a process pool (`workers`); the report
is assembled in index order afterwards, so it is the same whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image, UnidentifiedImageError

from ssv2prep import storage
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.prep.plan import DATASET_NAME, manifest_name, stats_name
from ssv2prep.workers import cpu_count, worker_pool

log = logging.getLogger(__name__)

# ssv2prep.prep.index is imported inside the parent-side functions only: it pulls in the shard writer (PyAV,
# numpy: ~0.3 s), and a fork server imports this module before its first worker starts, so a module-level import
# made every pool start that much later. The workers need tarfile, hashlib, PIL and storage, nothing more.

MAX_PROBLEMS_PER_SHARD = 20
READ_CHUNK_BYTES = 1 << 20
# tarfile's stream buffer: every read copies what is left of the buffer, so with 1 MiB and ~10 KB JPEG members the
# copying cost more than the tar parsing itself; a few members' worth keeps reads few and copies small
TAR_BUFFER_BYTES = 32 << 10
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


def index_names(names: list[str]) -> list[str]:
    """The shard-index names (`ssv2-*.json`, manifests and stats excluded) among file names, sorted."""
    return sorted(
        n
        for n in names
        if n.startswith(f"{DATASET_NAME}-")
        and n.endswith(".json")
        and not n.endswith((".stats.json", ".manifest.json"))
    )


def find_indexes(folder: Path) -> list[Path]:
    """Every `ssv2-*.json` shard index in a local `folder` (manifests and stats excluded)."""
    return [folder / n for n in index_names(storage.list_names(folder))]


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
                    decode_check(members[name])
                except (OSError, SyntaxError) as exc:
                    # PIL names the in-memory stream (with its address) when it cannot identify the bytes: the
                    # report must not depend on which process read them
                    why = "not an image PIL can identify" if isinstance(exc, UnidentifiedImageError) else exc
                    problems.append(f"sample {key}: frame {name} does not decode ({why})")
                    break
    elif not any(s in members for s in ("webm", "mp4")):
        problems.append(f"sample {key}: no video member")
    return problems, meta


def decode_check(data: bytes) -> None:
    """Decode one image as `verify` does; raises what PIL raises (OSError, SyntaxError) when it does not decode.

    A JPEG is decoded at 1/8 scale (PIL's `draft`): libjpeg still parses every marker and entropy-decodes every
    coefficient of the whole scan, which is where a damaged or truncated frame fails, and skips only the full-size
    inverse DCT and colour conversion, which cannot fail. The errors are the same as a full-size decode's (the tests
    compare both on corrupted frames); the work is about a quarter. Other formats are decoded in full.
    """
    image = Image.open(io.BytesIO(data))
    image.draft(image.mode, (1, 1))
    image.load()


class _HashingReader:
    """A read-only stream wrapper that MD5s and counts every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.md5 = hashlib.md5()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._raw.read(n)
        self.md5.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        """Read to the end (tar padding after the end-of-archive blocks still counts for the size and MD5)."""
        while self.read(READ_CHUNK_BYTES):
            pass


@dataclass(frozen=True, slots=True)
class ShardTask:
    """One shard to check (picklable: it crosses to the worker processes)."""

    url: str
    entry: dict[str, Any]
    fmt: str
    decode: bool


@dataclass(frozen=True, slots=True)
class ShardCheck:
    """What checking one shard found: problems, and `(label, num_frames)` per sample id in shard order."""

    problems: list[str]
    samples: dict[str, tuple[Any, Any]]


def check_shard(task: ShardTask) -> ShardCheck:
    """Stream one shard (local file or object) and check its size, MD5, samples and count against its entry."""
    name, entry = storage.basename(task.url), task.entry
    try:
        fh = storage.open_read(task.url)
    except (storage.StorageError, OSError) as exc:
        gone = isinstance(exc, IsADirectoryError) or str(exc).endswith(": not found")
        return ShardCheck([f"{name}: missing" if gone else f"{name}: cannot be read ({exc})"], {})
    sample_problems: list[str] = []
    samples: dict[str, tuple[Any, Any]] = {}
    tar_error = None
    with fh:
        reader = _HashingReader(fh)
        try:
            with tarfile.open(fileobj=reader, mode="r|", bufsize=TAR_BUFFER_BYTES) as tar:  # type: ignore[call-overload]
                for key, members in _group_samples(tar):
                    problems, meta = _check_sample(key, members, task.fmt, task.decode)
                    sample_problems += [f"{name}: {p}" for p in problems]
                    if key in samples:
                        sample_problems.append(f"{name}: sample {key} appears twice")
                    samples[key] = (meta.get("label"), meta.get("num_frames"))
        except tarfile.TarError as exc:
            tar_error = f"{name}: not a readable tar ({exc})"
        try:
            reader.drain()
        except (OSError, storage.StorageError) as exc:
            tar_error = tar_error or f"{name}: cannot read to the end ({exc})"
    problems = []
    if entry.get("filesize") is not None and reader.size != entry["filesize"]:
        problems.append(f"{name}: size {reader.size}, index says {entry['filesize']}")
    if entry.get("md5sum") and reader.md5.hexdigest() != entry["md5sum"]:
        problems.append(f"{name}: md5 differs from the index")
    problems += sample_problems
    if tar_error is not None:
        return ShardCheck([*problems, tar_error], samples)
    if len(samples) != entry["nsamples"]:
        problems.append(f"{name}: {len(samples)} samples, index says {entry['nsamples']}")
    return ShardCheck(problems[:MAX_PROBLEMS_PER_SHARD], samples)


def _check_manifest(
    folder: str, names: set[str], index: dict[str, Any], seen: dict[str, tuple[str, tuple[Any, Any]]]
) -> list[str]:
    from ssv2prep.prep.index import read_manifest

    split = index["split"]
    manifest = manifest_name(split)
    if manifest not in names:
        return [f"{manifest}: missing"]
    lines = read_manifest(storage.join(folder, manifest))
    problems = []
    counts = Counter(line["id"] for line in lines)
    dupes = [k for k, n in counts.items() if n > 1]
    if dupes:
        problems.append(f"{manifest}: ids listed more than once: {dupes[:10]}")
    ok = [line for line in lines if line["status"] == "ok"]
    if len(ok) != index["num_samples"] or len(ok) != sum(e["nsamples"] for e in index["shardlist"]):
        problems.append(f"{manifest}: {len(ok)} ok entries but the index holds {index['num_samples']} samples")
    for line in ok:
        where = seen.get(line["id"])
        if where is None or where[0] != line["shard"]:
            problems.append(f"{manifest}: ok entry {line['id']} is not in shard {line['shard']}")
        elif where[1] != (line["label"], line["num_frames"]):
            problems.append(f"{manifest}: entry {line['id']} disagrees with its sample (label or num_frames)")
    if set(seen) - {line["id"] for line in ok}:
        problems.append(f"{manifest}: shards hold samples the manifest does not list as ok")
    stats_file = stats_name(split)
    if stats_file in names:
        stats = json.loads(storage.read_bytes(storage.join(folder, stats_file)))
        status = Counter(line["status"] for line in lines)
        if [stats.get(k) for k in ("ok", "failed", "missing")] != [status[k] for k in ("ok", "failed", "missing")]:
            problems.append(f"{stats_file}: counts differ from the manifest")
    return problems[:MAX_PROBLEMS_PER_SHARD]


@dataclass(slots=True)
class _Split:
    """One index, read and checked up to its shards: what it names and the problems found so far."""

    index_name: str
    index: dict[str, Any] | None = None
    classes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _open_split(folder: str, names: set[str], index_name: str) -> _Split:
    """Read an index and its class list; `index` stays None when its shards must not (or cannot) be read."""
    from ssv2prep.prep.index import read_classes, read_index

    split = _Split(index_name)
    index_url = storage.join(folder, index_name)
    try:
        index = read_index(index_url)
    except ShardError as exc:
        split.problems.append(str(exc))
        return split
    unsafe = [
        f"{key} {value!r}"
        for key, value in [("split", index.get("split")), ("classes", index.get("classes", "classes.json"))]
        + [("url", e["url"]) for e in index["shardlist"]]
        if _plain_name(value) is None
    ]
    if unsafe:
        split.problems.append(
            f"{index_name}: names a file outside {folder} ({', '.join(unsafe[:5])}); refusing to "
            "read it: an index may only name files beside it"
        )
        return split
    try:
        split.classes = read_classes(index_url, index)
    except ShardError as exc:
        split.problems.append(str(exc))
        return split
    classes_file = str(index.get("classes", "classes.json"))
    if "class_names" in index and classes_file in names:
        try:
            beside = read_classes(index_url, {"classes": classes_file})
        except ShardError as exc:
            beside = None
            split.problems.append(str(exc))
        if beside is not None and beside != split.classes:
            split.problems.append(f"{index_name}: class_names differ from {classes_file} beside it")
    if index.get("num_classes") != len(split.classes):
        split.problems.append(f"{index_name}: num_classes {index.get('num_classes')} but {len(split.classes)} classes")
    split.index = index
    return split


def _close_split(folder: str, names: set[str], split: _Split, checks: list[ShardCheck], report: VerifyReport) -> None:
    """Add one split's problems and counts to `report`, in index order."""
    report.problems += split.problems
    index = split.index
    if index is None:
        return
    seen: dict[str, tuple[str, tuple[Any, Any]]] = {}
    for entry, check in zip(index["shardlist"], checks, strict=True):
        report.problems += check.problems
        for key, meta in check.samples.items():
            if key in seen:
                report.problems.append(f"sample {key} is in both {seen[key][0]} and {entry['url']}")
            seen[key] = (entry["url"], meta)
            label = meta[0]
            if label is not None and not 0 <= label < len(split.classes):
                report.problems.append(
                    f"{entry['url']}: sample {key} has label {label} outside 0..{len(split.classes) - 1}"
                )
        report.shards += 1
        report.frames += sum(m[1] or 0 for m in check.samples.values())
    report.samples += len(seen)
    report.splits[index["split"]] = len(seen)
    if not seen and index["shardlist"]:
        report.problems.append(f"{split.index_name}: split {index['split']} holds no samples at all")
    report.problems += _check_manifest(folder, names, index, seen)


def _run_checks(tasks: list[ShardTask], workers: int, on_shard: Callable[[str], None] | None) -> list[ShardCheck]:
    """`check_shard` over `tasks`, in a process pool when `workers` > 1; results in task order."""
    results: list[ShardCheck | None] = [None] * len(tasks)
    if workers <= 1 or len(tasks) <= 1:
        for i, task in enumerate(tasks):
            results[i] = check_shard(task)
            if on_shard:
                on_shard(storage.basename(task.url))
    else:
        pool = worker_pool(min(workers, len(tasks)), preload=[__name__])
        # largest shards first: the last shards to finish are then small ones, so no worker idles long at the end
        order = sorted(range(len(tasks)), key=lambda i: -(tasks[i].entry.get("filesize") or 0))
        try:
            futures = {pool.submit(check_shard, tasks[i]): i for i in order}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                if on_shard:
                    on_shard(storage.basename(tasks[futures[fut]].url))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [r for r in results if r is not None]


def verify_folder(
    folder: str | Path,
    *,
    decode: bool = True,
    on_shard: Callable[[str], None] | None = None,
    workers: int = 1,
) -> VerifyReport:
    """Verify every split whose index is in `folder` (a local folder or an object-store prefix).

    Args:
        folder: where the indexes are.
        decode: decode every JPEG (else sizes, MD5s, counts and metadata only).
        on_shard: called with each shard's name once it is checked (in completion order).
        workers: processes checking shards at once (0 = one per core); the report does not depend on it.

    Raises:
        ShardError: the folder holds no index at all.
        ConfigError: `workers` < 0, or an unknown URL scheme.
        StorageError: the folder cannot be listed.
    """
    from ssv2prep.prep.index import WORK_DIR

    if workers < 0:
        raise ConfigError(f"--workers must be >= 0 (got {workers})")
    root = os.fspath(folder)
    names = storage.list_names(root)
    work_names = storage.list_names(storage.join(root, WORK_DIR))
    indexes = index_names(names)
    waiting = unindexed_splits(names, work_names, indexes)
    if not indexes:
        if waiting:
            raise ShardError(
                f"{root}: no shard index (ssv2-<split>.json) found, but shards of {', '.join(sorted(waiting))}: "
                "unfinished --part runs? re-run shard without --part once all parts are done"
            )
        raise ShardError(f"{root}: no shard index (ssv2-<split>.json) found")
    report = VerifyReport()
    for split_name, tars in sorted(waiting.items()):
        report.problems.append(
            f"split {split_name}: {tars} shards (or its manifest) but no index {DATASET_NAME}-{split_name}.json "
            "(unfinished --part runs, or a deleted index); re-run shard without --part once all parts are done"
        )
    listed = set(names)
    splits = [_open_split(root, listed, name) for name in indexes]
    tasks = [
        ShardTask(storage.join(root, e["url"]), e, split.index.get("format", "frames"), decode)
        for split in splits
        if split.index is not None
        for e in split.index["shardlist"]
    ]
    checks = iter(_run_checks(tasks, workers or cpu_count(), on_shard))
    for split in splits:
        n = len(split.index["shardlist"]) if split.index is not None else 0
        _close_split(root, listed, split, [next(checks) for _ in range(n)], report)
    return report


def unindexed_splits(names: list[str], work_names: list[str], indexes: list[str]) -> dict[str, int]:
    """Splits with shards, a manifest, stats (among `names`) or shard work records (among `work_names`) but no
    index among `indexes`: {split: shards}."""
    indexed = {n.removeprefix(f"{DATASET_NAME}-").removesuffix(".json") for n in indexes}
    tars: Counter[str] = Counter()
    for name in names:
        match = _SPLIT_FILE_RE.match(name)
        if match:
            tars[match["split"]] += name.endswith(".tar")
    for name in work_names:
        match = _SPLIT_FILE_RE.match(name)
        if match and name.endswith(".tar.json"):
            tars[match["split"]] += 0
    return {split: n for split, n in tars.items() if split not in indexed}


def count_shards(folder: str | Path) -> int:
    """How many shards the indexes in `folder` list (for a progress bar)."""
    from ssv2prep.prep.index import read_index

    root = os.fspath(folder)
    total = 0
    for name in index_names(storage.list_names(root)):
        try:
            total += len(read_index(storage.join(root, name))["shardlist"])
        except ShardError:
            continue
    return total
