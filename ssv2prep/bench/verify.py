"""`ssv2prep bench verify`: `verify` with N workers against itself with one, the decode floor and the core bound.

- verify-1: `verify_folder(workers=1)`, the baseline: this code, one process.
- verify-N: `verify_folder(workers=N)` on the same shards.
- reference-full / reference-draft: a bare single-process loop over the same shards with stock `tarfile`, decoding
  every JPEG with PIL at full size / as `verify` does (`decode_check`): the per-frame floor, no checks, no hashing.
- ceiling: a pure-Python CPU loop, once in one process and then in N processes at once; N x (time alone / time
  together) is the speed-up this machine gives N processes at the moment (below N when cores are shared, throttled
  or hyper-threads).

Each measurement runs in a fresh process pinned to its cores (the first core for the one-process ones, the first N
for the others), so pool start-up counts and every method sees the same CPUs. Runs are interleaved `repeats` times
and the median of each is reported, all kept. The ratios: speed-up = verify-N / verify-1 frames per second, against
N (ideal) and against the measured ceiling.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ssv2prep.errors import ConfigError, Ssv2PrepError

GOAL_SPEEDUP = 1.8  # issue 12: on 2 cores, >= 1.8x the one-worker speed
KINDS = ("verify-1", "verify-N", "reference-full", "reference-draft", "ceiling")
SPIN_STEPS = 4_000_000  # one ceiling chunk: ~0.2-0.4 s of pure Python


class BenchError(Ssv2PrepError):
    """A benchmark run that failed."""


@dataclass(frozen=True, slots=True)
class VerifyBenchConfig:
    """Options of `bench verify`."""

    shards_dir: Path | None = None  # None: synthesize `num_videos` videos and shard them
    num_videos: int = 200
    frames: int = 36  # frames per synthesized video
    height: int = 240
    short_side: int = 256  # as the official recipe extracts
    videos_per_shard: int = 0  # 0: enough shards for 8 per worker
    workers: int = 0  # 0: every core this process may use
    repeats: int = 3
    work_dir: Path | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the flag of a bad value."""
        for flag, value, low in (
            ("--videos", self.num_videos, 1),
            ("--frames", self.frames, 1),
            ("--repeats", self.repeats, 1),
            ("--workers", self.workers, 0),
            ("--videos-per-shard", self.videos_per_shard, 0),
        ):
            if value < low:
                raise ConfigError(f"bench verify: {flag} must be >= {low} (got {value})")


def _make_shards(work: Path, cfg: VerifyBenchConfig, workers: int) -> Path:
    """Synthesize `num_videos` train videos of `frames` frames and shard them (8 shards per worker by default)."""
    from ssv2prep.bench.data import synth_shards
    from ssv2prep.prep.shard import WriterSettings
    from ssv2prep.prep.synth import SynthConfig

    per_class = math.ceil(cfg.num_videos / 8)
    per_shard = cfg.videos_per_shard or max(1, math.ceil(8 * per_class / (8 * workers)))
    return synth_shards(
        work,
        SynthConfig(
            num_pairs=4,
            train_per_class=per_class,
            validation_per_class=0,
            test_per_class=0,
            height=cfg.height,
            min_frames=cfg.frames,
            max_frames=cfg.frames,
            seed=cfg.seed,
        ),
        videos_per_shard=per_shard,
        workers=workers,
        writer=WriterSettings(short_side=cfg.short_side),
    )


def _shard_paths(folder: Path) -> list[Path]:
    """The shards the indexes in `folder` list, in index order."""
    from ssv2prep.prep.index import read_index
    from ssv2prep.prep.verify import find_indexes

    return [folder / e["url"] for ix in find_indexes(folder) for e in read_index(ix)["shardlist"]]


def _reference(shards: list[Path], draft: bool) -> tuple[int, int]:
    """(shards, JPEGs) after decoding every `.jpg` member of `shards` in this process."""
    from PIL import Image

    from ssv2prep.prep.verify import decode_check

    frames = 0
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if draft:
                        decode_check(data)
                    else:
                        Image.open(io.BytesIO(data)).load()
                    frames += 1
    return len(shards), frames


def _spin(steps: int) -> int:
    """Pure-Python integer work (no I/O, no C calls that release the GIL)."""
    total = 0
    for i in range(steps):
        total += i * i
    return total


def _ceiling(workers: int) -> dict[str, Any]:
    """N x (one chunk alone / N chunks at once) in a pool of `workers` forked processes."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("fork")) as pool:
        list(pool.map(_spin, [1000] * workers))  # start the workers before the clock
        start = time.perf_counter()
        pool.submit(_spin, SPIN_STEPS).result()
        alone = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(_spin, [SPIN_STEPS] * workers))
        together = time.perf_counter() - start
    return {"seconds": together, "seconds_alone": round(alone, 3), "speedup": workers * alone / together}


def _measure_child() -> None:
    """Entry of the measuring child process: read a job from stdin, pin to its cores, print one JSON row."""
    job = json.loads(sys.stdin.read())
    os.sched_setaffinity(0, set(job["cores"]))
    kind, folder, workers = job["kind"], Path(job["folder"]), job["workers"]
    row: dict[str, Any] = {"kind": kind, "workers": workers}
    if kind == "ceiling":
        row.update(_ceiling(workers))
    elif kind.startswith("verify-"):
        from ssv2prep.prep.verify import verify_folder

        start = time.perf_counter()
        report = verify_folder(folder, workers=workers)
        row["seconds"] = time.perf_counter() - start
        if not report.ok:
            raise BenchError(f"{folder}: verify found problems: {report.problems[:3]}")
        row.update(shards=report.shards, frames=report.frames)
    else:
        shards = _shard_paths(folder)
        start = time.perf_counter()
        row["shards"], row["frames"] = _reference(shards, draft=kind == "reference-draft")
        row["seconds"] = time.perf_counter() - start
    sys.stdout.write(json.dumps(row))


def _measure(kind: str, workers: int, cores: list[int], folder: Path) -> dict[str, Any]:
    job = {"kind": kind, "workers": workers, "cores": cores, "folder": str(folder)}
    code = "from ssv2prep.bench.verify import _measure_child; _measure_child()"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-400:]
        raise BenchError(f"bench verify: the {kind} run with {workers} workers failed: {tail}")
    row = json.loads(proc.stdout)
    row["process_seconds"] = round(time.perf_counter() - start, 3)  # with interpreter start-up and imports
    row["cores"] = cores
    return row


def _median_row(runs: list[dict[str, Any]], kind: str, methods: dict[str, str]) -> dict[str, Any]:
    mine = [r for r in runs if r["kind"] == kind]
    seconds = statistics.median(r["seconds"] for r in mine)
    row = {
        "kind": kind,
        "method": methods[kind],
        "workers": mine[0]["workers"],
        "seconds": round(seconds, 3),
        "process_seconds": round(statistics.median(r["process_seconds"] for r in mine), 3),
    }
    if kind == "ceiling":
        row["speedup"] = round(statistics.median(r["speedup"] for r in mine), 3)
    else:
        row.update(
            shards=mine[0]["shards"], frames=mine[0]["frames"], frames_per_s=round(mine[0]["frames"] / seconds, 1)
        )
    return row


def run_verify_bench(cfg: VerifyBenchConfig, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or take) a shard set, run every method `repeats` times interleaved; rows, runs and ratios."""
    cfg.validate()
    step = on_step or (lambda _msg: None)
    allowed = sorted(os.sched_getaffinity(0))
    workers = cfg.workers or len(allowed)
    if workers > len(allowed):
        raise ConfigError(f"bench verify: --workers {workers} but only {len(allowed)} cores are available")
    owned = cfg.work_dir is None and cfg.shards_dir is None  # a temp folder of ours, removed afterwards
    work = Path(tempfile.mkdtemp(prefix="ssv2prep-bench-")) if owned else cfg.work_dir
    try:
        if cfg.shards_dir is not None:
            folder = cfg.shards_dir
        else:
            assert work is not None
            step(f"making {cfg.num_videos} videos of {cfg.frames} frames and their shards in {work}")
            folder = _make_shards(work, cfg, workers)
        methods = {
            "verify-1": "verify, 1 worker (baseline)",
            "verify-N": f"verify, {workers} workers",
            "reference-full": "reference: tarfile + PIL full decode, 1 process",
            "reference-draft": "reference: tarfile + verify's decode, 1 process",
            "ceiling": f"ceiling: CPU loop in {workers} processes",
        }
        plan = {
            "verify-1": (1, allowed[:1]),
            "verify-N": (workers, allowed[:workers]),
            "reference-full": (1, allowed[:1]),
            "reference-draft": (1, allowed[:1]),
            "ceiling": (workers, allowed[:workers]),
        }
        runs: list[dict[str, Any]] = []
        for r in range(cfg.repeats):
            for kind in KINDS:
                w, cores = plan[kind]
                step(f"{methods[kind]} on cores {cores} (repeat {r + 1}/{cfg.repeats})")
                runs.append({**_measure(kind, w, cores, folder), "repeat": r})
        rows = {kind: _median_row(runs, kind, methods) for kind in KINDS}
        one, many, ceiling = rows["verify-1"], rows["verify-N"], rows["ceiling"]["speedup"]
        speedup = many["frames_per_s"] / one["frames_per_s"]
        return {
            "benchmark": "verify",
            "config": {
                **asdict(cfg),
                "shards_dir": str(folder),
                "work_dir": None if owned or work is None else str(work),
                "workers": workers,
            },
            "cores": len(allowed),
            "shards": one["shards"],
            "frames": one["frames"],
            "rows": list(rows.values()),
            "runs": runs,
            "ratios": {
                "workers": workers,
                "speedup_vs_1_worker": round(speedup, 3),
                "ceiling_speedup": ceiling,
                "speedup_vs_ideal": round(speedup / workers, 3),
                "speedup_vs_ceiling": round(speedup / ceiling, 3),
                "verify_1_vs_reference_full": round(one["frames_per_s"] / rows["reference-full"]["frames_per_s"], 3),
                "verify_1_vs_reference_draft": round(one["frames_per_s"] / rows["reference-draft"]["frames_per_s"], 3),
                "goal_speedup": GOAL_SPEEDUP,
                "meets_goal": speedup >= GOAL_SPEEDUP,
            },
        }
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def format_verify_bench(result: dict[str, Any]) -> str:
    """Markdown tables of a `run_verify_bench` result."""
    q = result["ratios"]
    lines = [
        f"{result['shards']} shards, {result['frames']} frames, {result['cores']} cores, "
        f"median of {result['config']['repeats']}",
        "",
        "| method | workers | seconds | with start-up | frames/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        fps = f"{r['frames_per_s']:.0f}" if "frames_per_s" in r else f"x{r['speedup']:.2f}"
        lines.append(f"| {r['method']} | {r['workers']} | {r['seconds']:.2f} | {r['process_seconds']:.2f} | {fps} |")
    lines += [
        "",
        f"| workers | speed-up vs 1 worker (goal >= {q['goal_speedup']}) | vs ideal {q['workers']}x | "
        f"vs ceiling x{q['ceiling_speedup']:.2f} | 1 worker / reference (full, draft) |",
        "|---:|---:|---:|---:|---:|",
        f"| {q['workers']} | {q['speedup_vs_1_worker']:.2f} | {q['speedup_vs_ideal']:.2f} | "
        f"{q['speedup_vs_ceiling']:.2f} | {q['verify_1_vs_reference_full']:.2f}, "
        f"{q['verify_1_vs_reference_draft']:.2f} |",
    ]
    return "\n".join(lines)
