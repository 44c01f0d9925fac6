"""`ssv2prep shard`: annotations + videos -> shards of every split, in a process pool, resumable.

Order: validate settings and annotations (bad input stops everything before any work) -> plan every split ->
skip shards already complete -> write the rest in a pool -> write each split's index/manifest/stats once all of its
shards exist. A small work record per finished shard (in `OUT/.ssv2prep-work/`) is what lets a re-run, or a run of
another `--part`, skip it without reading it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.annotations import SPLITS, Annotations, flip_pairs, load_annotations
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.fsutil import atomic_write_json, output_lock, output_write_error, write_problem
from ssv2prep.prep.decode import cpu_count
from ssv2prep.prep.index import SplitSummary, write_classes, write_split_files
from ssv2prep.prep.plan import ShardSpec, carve_holdout, plan_shards, select_part
from ssv2prep.prep.shard import ON_ERROR, ShardStats, WriterSettings, find_video, write_shard

log = logging.getLogger(__name__)

WORK_DIR = ".ssv2prep-work"


@dataclass(frozen=True, slots=True)
class ShardConfig:
    """Options of `ssv2prep shard` (defaults live here and nowhere else)."""

    videos_dir: Path
    labels_dir: Path
    out_dir: Path
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

    def validate(self) -> None:
        """Raise ConfigError on a bad value or a missing input folder."""
        self.writer.validate()
        if not self.videos_dir.is_dir():
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


def _check_settings(work: Path, settings: dict[str, Any]) -> None:
    path = work / "settings.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if diff:
            raise ConfigError(
                f"{path.parent.parent}: already holds shards written with other settings ({', '.join(diff)} differ); "
                "use another --out or delete that folder"
            )
    else:
        atomic_write_json(path, settings)


def _load_done(work: Path, out_dir: Path, spec: ShardSpec) -> ShardStats | None:
    """The work record of a finished shard, if the record and the tar both exist and agree on size."""
    record = work / f"{spec.name}.json"
    tar = out_dir / spec.name
    if not record.is_file() or not tar.is_file():
        return None
    stats = ShardStats.from_json(json.loads(record.read_text(encoding="utf-8")))
    return stats if tar.stat().st_size == stats.filesize else None


def _remove_stale_temps(out_dir: Path, specs: list[ShardSpec] | None = None) -> None:
    """Remove temp shards left by an interrupted run: all of them, or (a `--part` run, beside other parts that may
    be writing now) those of `specs` only."""
    for tmp in out_dir.glob(".ssv2-*.tar.*.tmp"):
        if specs is not None and tmp.name[1:].split(".tar.", 1)[0] + ".tar" not in {s.name for s in specs}:
            continue
        log.info("removing %s left by an interrupted run", tmp.name)
        tmp.unlink(missing_ok=True)


def _ignore_sigint() -> None:
    # Pool workers leave Ctrl-C to the parent, which stops them itself: a worker that took the terminal's SIGINT
    # would die with a traceback or turn its shard into a failed result.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
            results.append(job(spec))
            on_shard(results[-1])
        return results
    ctx = multiprocessing.get_context("forkserver")
    results: list[ShardStats] = []
    recorded: set[int] = set()
    pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_ignore_sigint)
    futures = []
    try:
        futures = [pool.submit(job, spec) for spec in todo]
        for fut in as_completed(futures):
            results.append(fut.result())
            recorded.add(id(fut))
            on_shard(results[-1])
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
    work = cfg.out_dir / WORK_DIR
    summaries, incomplete = {}, []
    classes = list(ann.classes)
    write_classes(cfg.out_dir, classes)
    for split, specs in plans.items():
        done = [_load_done(work, cfg.out_dir, spec) for spec in specs]
        if any(d is None for d in done):
            incomplete.append(split)
            continue
        summaries[split] = write_split_files(
            cfg.out_dir,
            split,
            [d for d in done if d is not None],
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


def _check_failures(result: ShardRunResult, failed_limit: float, missing_limit: float, videos_dir: Path) -> None:
    for s in result.summaries.values():
        entries = s.ok + s.failed + s.missing
        if entries and not s.ok:
            raise TooManyFailuresError(
                f"split {s.split}: none of its {entries} videos could be used ({s.missing} not found in --videos "
                f"{videos_dir}, {s.failed} failed); the manifest {s.split} lists each with its reason",
                result,
            )
        if entries and s.missing / entries > missing_limit:
            raise TooManyFailuresError(
                f"split {s.split}: {s.missing} of {entries} videos are not in --videos {videos_dir}, more than "
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


def _check_videos_exist(cfg: ShardConfig, plans: dict[str, list[ShardSpec]]) -> None:
    """Stop before any work when a split has entries but not one of its videos is in `--videos` (a wrong folder)."""
    for split, specs in plans.items():
        records = [r for spec in specs for r in spec.records]
        if records and not any(find_video(cfg.videos_dir, r.video_id) is not None for r in records):
            raise ShardError(
                f"--videos {cfg.videos_dir}: none of the {len(records)} {split} videos are there "
                f"(looked for {records[0].video_id}.webm and the others); point --videos at the folder of <id>.webm"
            )


def _remove_unrecorded(work: Path, out_dir: Path, specs: list[ShardSpec]) -> None:
    """After an interrupted run: remove temp files and any tar of `specs` that has no work record (a re-run
    rewrites it anyway), so that every tar left on disk is a recorded, complete shard."""
    _remove_stale_temps(out_dir, specs)
    for spec in specs:
        if not (work / f"{spec.name}.json").is_file():
            (out_dir / spec.name).unlink(missing_ok=True)


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
        KeyboardInterrupt: stopped by Ctrl-C (or SIGTERM, via the CLI); finished shards stay recorded, temp files
            and unrecorded tars are removed.
    """
    start = time.perf_counter()
    cfg.validate()
    ann = load_annotations(cfg.labels_dir, cfg.splits)
    plans = plan_all(cfg, ann)
    _check_videos_exist(cfg, plans)
    settings = settings_record(cfg, plans)
    try:
        with contextlib.ExitStack() as locks:
            # One run per --out; the --part runs of one plan may share it (they write disjoint shards), one per part.
            locks.enter_context(output_lock(cfg.out_dir, option="--out", shared=cfg.part is not None))
            if cfg.part is not None:
                k, n = cfg.part
                name = f".ssv2prep-part-{k}-of-{n}.lock"
                locks.enter_context(output_lock(cfg.out_dir, option=f"--part {k}/{n} of --out", name=name))
            return _shard_locked(cfg, ann, plans, settings, start, on_plan, on_shard)
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
    on_plan: Callable[[int, int, int], None] | None,
    on_shard: Callable[[ShardStats], None] | None,
) -> ShardRunResult:
    work = cfg.out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(work, settings)
    selected = [spec for specs in plans.values() for spec in select_part(specs, cfg.part)]
    _remove_stale_temps(cfg.out_dir, selected if cfg.part is not None else None)
    todo = [spec for spec in selected if _load_done(work, cfg.out_dir, spec) is None]
    if on_plan:
        on_plan(len(todo), sum(len(s.records) for s in todo), len(selected) - len(todo))

    def record(stats: ShardStats) -> None:
        atomic_write_json(work / f"{stats.name}.json", stats.to_json(), indent=None)
        if on_shard:
            on_shard(stats)

    job = ShardJob(cfg.videos_dir, cfg.out_dir, cfg.writer, cfg.on_error)
    try:
        written = _run_pool(todo, job, cfg.workers or cpu_count(), record)
    except BaseException:
        _remove_unrecorded(work, cfg.out_dir, todo)
        raise
    summaries, incomplete = _finalize(cfg, ann, plans, settings, time.perf_counter() - start)
    result = ShardRunResult(written, len(selected) - len(todo), summaries, incomplete, time.perf_counter() - start)
    _check_failures(result, cfg.max_failed_fraction, cfg.missing_limit, cfg.videos_dir)
    return result
