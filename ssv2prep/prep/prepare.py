"""`ssv2prep shard`: annotations + videos -> shards of every split, in a process pool, resumable.

Order: validate settings and annotations (bad input stops everything before any work) -> plan every split ->
skip shards already complete -> write the rest in a pool -> write each split's index/manifest/stats once all of its
shards exist. A small work record per finished shard (in `OUT/.ssv2prep-work/`) is what lets a re-run, or a run of
another `--part`, skip it without reading it back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.annotations import SPLITS, Annotations, flip_pairs, load_annotations
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.fsutil import atomic_write_json
from ssv2prep.prep.decode import cpu_count
from ssv2prep.prep.index import SplitSummary, write_classes, write_split_files
from ssv2prep.prep.plan import ShardSpec, carve_holdout, plan_shards, select_part
from ssv2prep.prep.shard import ON_ERROR, ShardStats, WriterSettings, write_shard

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


def _remove_stale_temps(out_dir: Path) -> None:
    for tmp in out_dir.glob(".ssv2-*.tar.*.tmp"):
        log.info("removing %s left by an interrupted run", tmp.name)
        tmp.unlink(missing_ok=True)


def _run_pool(
    todo: list[ShardSpec], job: ShardJob, workers: int, on_shard: Callable[[ShardStats], None]
) -> list[ShardStats]:
    if workers <= 1 or len(todo) <= 1:
        results = []
        for spec in todo:
            results.append(job(spec))
            on_shard(results[-1])
        return results
    ctx = multiprocessing.get_context("forkserver")
    results = []
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        futures = [pool.submit(job, spec) for spec in todo]
        for fut in as_completed(futures):
            results.append(fut.result())
            on_shard(results[-1])
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


def _check_failures(result: ShardRunResult, limit: float) -> None:
    for s in result.summaries.values():
        videos = s.ok + s.failed
        if videos and s.failed / videos > limit:
            reasons = {k: v for k, v in s.failure_reasons.items() if k != "missing"}
            raise TooManyFailuresError(
                f"split {s.split}: {s.failed} of {videos} videos failed ({reasons}), more than "
                f"--max-failed-fraction {limit}; the manifest {s.split} lists each with its reason",
                result,
            )


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
        ShardError: more videos failed than `max_failed_fraction` allows (after writing everything).
    """
    start = time.perf_counter()
    cfg.validate()
    ann = load_annotations(cfg.labels_dir, cfg.splits)
    plans = plan_all(cfg, ann)
    settings = settings_record(cfg, plans)
    work = cfg.out_dir / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(work, settings)
    _remove_stale_temps(cfg.out_dir)
    selected = [spec for specs in plans.values() for spec in select_part(specs, cfg.part)]
    todo = [spec for spec in selected if _load_done(work, cfg.out_dir, spec) is None]
    if on_plan:
        on_plan(len(todo), sum(len(s.records) for s in todo), len(selected) - len(todo))

    def record(stats: ShardStats) -> None:
        atomic_write_json(work / f"{stats.name}.json", stats.to_json(), indent=None)
        if on_shard:
            on_shard(stats)

    job = ShardJob(cfg.videos_dir, cfg.out_dir, cfg.writer, cfg.on_error)
    written = _run_pool(todo, job, cfg.workers or cpu_count(), record)
    summaries, incomplete = _finalize(cfg, ann, plans, settings, time.perf_counter() - start)
    result = ShardRunResult(written, len(selected) - len(todo), summaries, incomplete, time.perf_counter() - start)
    _check_failures(result, cfg.max_failed_fraction)
    return result
