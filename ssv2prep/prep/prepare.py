"""`ssv2prep shard`: annotations + videos -> shards of every split, in a process pool, resumable.

Order: validate settings and annotations (bad input stops everything before any work) -> plan every split ->
skip shards already complete -> write the rest in a pool -> write each split's index/manifest/stats once all of its
shards exist. A small work record per finished shard (in `OUT/.ssv2prep-work/`) is what lets a re-run, or a run of
another `--part`, skip it without reading it back.

`--out` may be an object-store prefix (`s3://bucket/prefix`). The same engine then writes each shard into a local
staging folder (`--staging-dir`, or a temp folder), uploads the finished tar as one object, then its work record
(record last: a listed record means its tar object is whole), and deletes the local copy. Resuming reads what the
store holds from one listing of OUT and one of its work folder (plus the records themselves). A run with nothing
left to encode (the assembling run after the `--part` runs) needs no `--videos`. The file lock cannot work on an
object store: remote `--part` runs must be distinct parts (two runs of the same part would write the same objects).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep import storage
from ssv2prep.annotations import SPLITS, Annotations, flip_pairs, load_annotations
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.fsutil import output_lock, output_write_error, write_problem
from ssv2prep.prep.index import WORK_DIR, SplitSummary, json_bytes, write_classes, write_split_files
from ssv2prep.prep.plan import ShardSpec, carve_holdout, plan_shards, select_part
from ssv2prep.prep.shard import ON_ERROR, ShardStats, WriterSettings, find_video, write_shard
from ssv2prep.workers import cpu_count, worker_pool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Options of `ssv2prep shard` (defaults live here and nowhere else)."""

    videos_dir: Path | None  # None: only allowed when nothing is left to encode
    labels_dir: Path
    out_dir: str | Path  # a local folder or an object-store prefix (s3://bucket/prefix)
    splits: tuple[str, ...] = SPLITS
    holdout: float = 0.0
    videos_per_shard: int = 500
    workers: int = 0  # 0 = one per core
    writer: WriterSettings = field(default_factory=WriterSettings)
    part: tuple[int, int] | None = None
    seed: int = 0
    on_error: str = "skip"
    max_failed_fraction: float = 0.01
    max_missing_fraction: float | None = None  # None: the same limit as max_failed_fraction
    staging_dir: Path | None = None  # remote --out only: where shards are written before upload (None: a temp dir)

    @property
    def remote(self) -> bool:
        """True when `out_dir` is an object-store prefix."""
        return storage.is_remote(self.out_dir)

    def validate(self) -> None:
        """Raise ConfigError on a bad value or a missing input folder (`--videos` is checked once the plan shows
        there is something to encode)."""
        self.writer.validate()
        scheme = storage.scheme_of(self.out_dir)  # ConfigError on an unknown scheme
        if scheme is not None and not storage.SCHEMES[scheme][1]:
            raise ConfigError(f"--out {self.out_dir}: {scheme}:// is read-only; use a local folder or an object store")
        if self.staging_dir is not None and scheme is None:
            raise ConfigError("--staging-dir is for an object-store --out (a local --out is written in place)")
        if self.videos_dir is not None and not self.videos_dir.is_dir():
            raise ConfigError(f"--videos {self.videos_dir}: not a folder")
        if not self.labels_dir.is_dir():
            raise ConfigError(f"--labels {self.labels_dir}: not a folder")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (got {self.workers})")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {list(ON_ERROR)} (got {self.on_error!r})")
        if self.holdout and "train" not in self.splits:
            raise ConfigError("--holdout carves from train: include train in --splits")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise ConfigError(f"--max-failed-fraction must be in [0, 1] (got {self.max_failed_fraction})")
        if self.max_missing_fraction is not None and not 0.0 <= self.max_missing_fraction <= 1.0:
            raise ConfigError(f"--max-missing-fraction must be in [0, 1] (got {self.max_missing_fraction})")

    @property
    def missing_limit(self) -> float:
        """The tolerated fraction of annotation entries without a video file."""
        return self.max_failed_fraction if self.max_missing_fraction is None else self.max_missing_fraction


@dataclass(frozen=True, slots=True)
class ShardRunResult:
    """What one `shard` run did."""

    written: list[ShardStats]
    skipped_shards: int
    summaries: dict[str, SplitSummary]
    incomplete_splits: list[str]
    wall_seconds: float


@dataclass(frozen=True, slots=True)
class ShardJob:
    """Picklable callable run in the worker processes: ShardSpec -> ShardStats."""

    videos_dir: Path
    out_dir: Path
    settings: WriterSettings
    on_error: str

    def __call__(self, spec: ShardSpec) -> ShardStats:
        return write_shard(
            spec, videos_dir=self.videos_dir, out_dir=self.out_dir, settings=self.settings, on_error=self.on_error
        )


def plan_all(cfg: ShardConfig, ann: Annotations) -> dict[str, list[ShardSpec]]:
    """The shard plan of every split (holdout carved from train first when asked)."""
    records = {s: ann.splits[s] for s in cfg.splits}
    if cfg.holdout:
        records["train"], records["holdout"] = carve_holdout(records["train"], cfg.holdout, cfg.seed)
    return {
        split: plan_shards(recs, split=split, videos_per_shard=cfg.videos_per_shard, seed=cfg.seed)
        for split, recs in records.items()
    }


def settings_record(cfg: ShardConfig, plans: dict[str, list[ShardSpec]]) -> dict[str, Any]:
    """The settings stored in every index, with a digest of the plan so a changed annotation list is noticed."""
    digest = hashlib.sha256()
    for split in sorted(plans):
        for spec in plans[split]:
            digest.update(f"{split}/{spec.index}:{','.join(r.video_id for r in spec.records)}\n".encode())
    return {
        **asdict(cfg.writer),
        "videos_per_shard": cfg.videos_per_shard,
        "seed": cfg.seed,
        "holdout": cfg.holdout,
        "plan_sha256": digest.hexdigest(),
    }


def _check_settings(out: str | Path, work_names: dict[str, int], settings: dict[str, Any]) -> bool:
    """Whether OUT already records these settings; raise ConfigError when it records others."""
    if "settings.json" not in work_names:
        return False
    old = json.loads(storage.read_bytes(storage.join(storage.join(out, WORK_DIR), "settings.json")))
    diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
    if diff:
        raise ConfigError(
            f"{out}: already holds shards written with other settings ({', '.join(diff)} differ); "
            "use another --out or delete that folder"
        )
    return True


def _done_records(
    out: str | Path, specs: list[ShardSpec], work_names: dict[str, int] | None = None
) -> dict[str, ShardStats]:
    """{shard name: its work record} of the finished shards among `specs`: record and tar both there, same size.

    One listing of OUT and one of its work folder (the latter may be passed in), then only the records that can
    count are read (concurrently from an object store): never one existence check per shard.
    """
    work = storage.join(out, WORK_DIR)
    tars = storage.list_sizes(out)
    records = storage.list_sizes(work) if work_names is None else work_names
    names = [s.name for s in specs if s.name in tars and f"{s.name}.json" in records]
    blobs = storage.read_many([storage.join(work, f"{n}.json") for n in names])
    done = {}
    for name, blob in zip(names, blobs.values(), strict=True):
        try:
            stats = ShardStats.from_json(json.loads(blob))
        except (ValueError, KeyError, TypeError):
            log.warning("%s: unreadable work record of %s; writing that shard again", work, name)
            continue
        if stats.filesize == tars[name]:
            done[name] = stats
    return done


def _remove_stale_temps(out_dir: Path, specs: list[ShardSpec] | None = None) -> None:
    """Remove temp shards left by an interrupted run: all of them, or (a `--part` run, beside other parts that may
    be writing now) those of `specs` only."""
    for tmp in out_dir.glob(".ssv2-*.tar.*.tmp"):
        if specs is not None and tmp.name[1:].split(".tar.", 1)[0] + ".tar" not in {s.name for s in specs}:
            continue
        log.info("removing %s left by an interrupted run", tmp.name)
        tmp.unlink(missing_ok=True)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop every worker now (SIGTERM, then SIGKILL for one that hangs), not after the queue has drained."""
    # The executor has no public way to stop running calls before Python 3.14; its process table is the only handle.
    processes = list(getattr(pool, "_processes", {}).values())
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)
    pool.shutdown(wait=True)


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _run_pool(
    todo: list[ShardSpec], job: ShardJob, workers: int, on_shard: Callable[[ShardStats], None]
) -> list[ShardStats]:
    """Write `todo`, calling `on_shard` for each finished shard as it finishes.

    On any exception here (Ctrl-C, SIGTERM turned into KeyboardInterrupt by the CLI, a shard that raised), the
    queued shards are cancelled, every shard already finished is still passed to `on_shard`, the workers are stopped
    at once, and the exception propagates. Shards that were being written are left as temp files, which the caller
    removes.
    """
    if workers <= 1 or len(todo) <= 1:
        results = []
        for spec in todo:
            stats = job(spec)
            try:
                on_shard(stats)
            except KeyboardInterrupt:
                # Stopped while recording a finished shard (a remote one may be uploaded but not yet recorded):
                # finish recording it, then stop.
                with _stop_signals_ignored():
                    on_shard(stats)
                raise
            results.append(stats)
        return results
    results: list[ShardStats] = []
    recorded: set[int] = set()
    pool = worker_pool(min(workers, len(todo)), preload=["ssv2prep.prep.shard"])
    futures = []
    try:
        futures = [pool.submit(job, spec) for spec in todo]
        for fut in as_completed(futures):
            stats = fut.result()
            on_shard(stats)  # a stop inside it leaves the shard unrecorded: the handler below records it again
            results.append(stats)
            recorded.add(id(fut))
    except BaseException:
        # A second Ctrl-C / SIGTERM must not cut short recording the finished shards and stopping the workers.
        with _stop_signals_ignored():
            # Stopping the workers breaks the pool, which fails every queued shard (cancelling them first would
            # trip the executor of Python 3.11 when it then fails them). Shards that finished before stay results.
            _stop_pool(pool)
            for fut in futures:
                if id(fut) not in recorded and fut.done() and not fut.cancelled() and fut.exception() is None:
                    results.append(fut.result())
                    on_shard(results[-1])
        raise
    pool.shutdown(wait=True)
    return results


def _finalize(
    cfg: ShardConfig, ann: Annotations, plans: dict[str, list[ShardSpec]], settings: dict[str, Any], wall_s: float
) -> tuple[dict[str, SplitSummary], list[str]]:
    summaries, incomplete = {}, []
    classes = list(ann.classes)
    write_classes(cfg.out_dir, classes)
    done = _done_records(cfg.out_dir, [spec for specs in plans.values() for spec in specs])
    for split, specs in plans.items():
        if any(spec.name not in done for spec in specs):
            incomplete.append(split)
            continue
        summaries[split] = write_split_files(
            cfg.out_dir,
            split,
            [done[spec.name] for spec in specs],
            classes=classes,
            flip_pairs=flip_pairs(classes),
            settings=settings,
            wall_seconds=wall_s,
        )
    return summaries, incomplete


class TooManyFailuresError(ShardError):
    """More videos failed than allowed; everything was still written. `result` holds what the run did."""

    def __init__(self, message: str, result: ShardRunResult) -> None:
        super().__init__(message)
        self.result = result


def _check_failures(result: ShardRunResult, failed_limit: float, missing_limit: float, videos_dir: Path | None) -> None:
    # the assembling run after --part runs has no --videos: the entries were missing from the parts' --videos
    videos = f"--videos {videos_dir}" if videos_dir is not None else "--videos (of the runs that wrote the shards)"
    for s in result.summaries.values():
        entries = s.ok + s.failed + s.missing
        if entries and not s.ok:
            raise TooManyFailuresError(
                f"split {s.split}: none of its {entries} videos could be used ({s.missing} not found in "
                f"{videos}, {s.failed} failed); the manifest {s.split} lists each with its reason",
                result,
            )
        if entries and s.missing / entries > missing_limit:
            raise TooManyFailuresError(
                f"split {s.split}: {s.missing} of {entries} videos are not in {videos}, more than "
                f"--max-missing-fraction {missing_limit}; check --videos, or raise that limit",
                result,
            )
        videos = s.ok + s.failed
        if videos and s.failed / videos > failed_limit:
            reasons = {k: v for k, v in s.failure_reasons.items() if k != "missing"}
            raise TooManyFailuresError(
                f"split {s.split}: {s.failed} of {videos} videos failed ({reasons}), more than "
                f"--max-failed-fraction {failed_limit}; the manifest {s.split} lists each with its reason",
                result,
            )


def _check_videos_exist(cfg: ShardConfig, plans: dict[str, list[ShardSpec]], todo: list[ShardSpec]) -> None:
    """Stop before any work when shards are left to encode and `--videos` is not given, or a split with shards to
    encode has entries but not one of its videos is in `--videos` (a wrong folder)."""
    if not todo:
        return
    splits = sorted({spec.split for spec in todo})
    if cfg.videos_dir is None:
        raise ConfigError(
            f"--videos is needed: {len(todo)} shards of {', '.join(splits)} are still to write in {cfg.out_dir} "
            "(only a run with every shard already written can do without the videos)"
        )
    for split, specs in plans.items():
        if split not in splits:
            continue
        records = [r for spec in specs for r in spec.records]
        if records and not any(find_video(cfg.videos_dir, r.video_id) is not None for r in records):
            raise ShardError(
                f"--videos {cfg.videos_dir}: none of the {len(records)} {split} videos are there "
                f"(looked for {records[0].video_id}.webm and the others); point --videos at the folder of <id>.webm"
            )


def _remove_unrecorded(work: str | Path, staging: Path, specs: list[ShardSpec], *, remote: bool) -> None:
    """After an interrupted run: remove temp files and any local tar of `specs` that has no work record (a re-run
    rewrites it anyway), so that every tar left on disk is a recorded, complete shard. With a remote OUT every
    local tar of `specs` is only a staged copy: all go."""
    _remove_stale_temps(staging, specs)
    for spec in specs:
        if remote or not storage.exists(storage.join(work, f"{spec.name}.json")):
            (staging / spec.name).unlink(missing_ok=True)


def _lock_folder(locks: contextlib.ExitStack, folder: Path, option: str, part: tuple[int, int] | None) -> None:
    # One run per folder; the --part runs of one plan may share it (they write disjoint shards), one per part.
    locks.enter_context(output_lock(folder, option=option, shared=part is not None))
    if part is not None:
        k, n = part
        name = f".ssv2prep-part-{k}-of-{n}.lock"
        locks.enter_context(output_lock(folder, option=f"--part {k}/{n} of {option}", name=name))


@contextlib.contextmanager
def _staging(cfg: ShardConfig) -> Iterator[Path]:
    """The local folder shards are written into, locked: OUT itself, `--staging-dir`, or a temp folder (removed
    afterwards)."""
    with contextlib.ExitStack() as locks:
        if not cfg.remote:
            folder = storage.local_path(cfg.out_dir)
            _lock_folder(locks, folder, "--out", cfg.part)
        elif cfg.staging_dir is not None:
            folder = cfg.staging_dir
            _lock_folder(locks, folder, "--staging-dir", cfg.part)
        else:
            folder = Path(tempfile.mkdtemp(prefix="ssv2prep-staging-"))
            locks.callback(shutil.rmtree, folder, ignore_errors=True)
        yield folder


def shard_dataset(
    cfg: ShardConfig,
    *,
    on_plan: Callable[[int, int, int], None] | None = None,
    on_shard: Callable[[ShardStats], None] | None = None,
) -> ShardRunResult:
    """Write every shard of every split (or of `cfg.part`) and the split files once a split is complete.

    Args:
        cfg: the options.
        on_plan: called once with (shards to write, videos in them, shards already complete).
        on_shard: called after each shard is written.

    Raises:
        AnnotationError: bad annotations (before any work).
        ConfigError: bad options, or OUT holds shards of other settings.
        ShardError: no video of a split is in `videos_dir` (before any work); more videos failed or are missing
            than `max_failed_fraction` / `max_missing_fraction` allow, or none is usable (after writing everything).
        OutputLockedError: another run holds OUT.
        OutputWriteError: OUT cannot be written (full, read-only, denied); finished shards stay recorded.
        StorageError: an object-store OUT cannot be listed, read or written (the message names the URL).
        KeyboardInterrupt: stopped by Ctrl-C (or SIGTERM, via the CLI); finished shards stay recorded, temp files
            and unrecorded tars are removed.
    """
    start = time.perf_counter()
    cfg.validate()
    ann = load_annotations(cfg.labels_dir, cfg.splits)
    plans = plan_all(cfg, ann)
    settings = settings_record(cfg, plans)
    try:
        with _staging(cfg) as staging:
            return _shard_locked(cfg, ann, plans, settings, start, staging, on_plan, on_shard)
    except OSError as exc:
        if write_problem(exc) is None:
            raise
        raise output_write_error(cfg.out_dir, exc, "cannot write shards") from exc


def _shard_locked(
    cfg: ShardConfig,
    ann: Annotations,
    plans: dict[str, list[ShardSpec]],
    settings: dict[str, Any],
    start: float,
    staging: Path,
    on_plan: Callable[[int, int, int], None] | None,
    on_shard: Callable[[ShardStats], None] | None,
) -> ShardRunResult:
    out = cfg.out_dir
    work = storage.join(out, WORK_DIR)
    work_names = storage.list_sizes(work)
    known = _check_settings(out, work_names, settings)
    selected = [spec for specs in plans.values() for spec in select_part(specs, cfg.part)]
    _remove_stale_temps(staging, selected if cfg.part is not None else None)
    if cfg.remote:
        # The staging folder is this run's alone (locked, or a fresh temp folder): a tar staged there by a killed
        # run is either uploaded already or written again below.
        for spec in selected:
            (staging / spec.name).unlink(missing_ok=True)
    done = _done_records(out, selected, work_names)
    todo = [spec for spec in selected if spec.name not in done]
    _check_videos_exist(cfg, plans, todo)
    if not known:
        storage.write_bytes(storage.join(work, "settings.json"), json_bytes(settings))
    for name in storage.abort_uploads(out, {spec.name for spec in todo}):
        log.info("aborted the unfinished upload of %s left by an interrupted run", name)
    if on_plan:
        on_plan(len(todo), sum(len(s.records) for s in todo), len(selected) - len(todo))

    def record(stats: ShardStats) -> None:
        if cfg.remote:
            # tar first, record last: a record in the store means its tar object is whole
            storage.upload(staging / stats.name, storage.join(out, stats.name))
        storage.write_bytes(storage.join(work, f"{stats.name}.json"), json_bytes(stats.to_json(), indent=None))
        if cfg.remote:
            (staging / stats.name).unlink(missing_ok=True)
        if on_shard:
            on_shard(stats)

    job = ShardJob(cfg.videos_dir or Path(), staging, cfg.writer, cfg.on_error)
    try:
        written = _run_pool(todo, job, cfg.workers or cpu_count(), record)
    except BaseException:
        _remove_unrecorded(work, staging, todo, remote=cfg.remote)
        raise
    summaries, incomplete = _finalize(cfg, ann, plans, settings, time.perf_counter() - start)
    result = ShardRunResult(written, len(selected) - len(todo), summaries, incomplete, time.perf_counter() - start)
    _check_failures(result, cfg.max_failed_fraction, cfg.missing_limit, cfg.videos_dir)
    return result
