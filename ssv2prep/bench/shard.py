"""`ssv2prep bench shard`: our shard writer against the official recipe and against the bound, on the same videos.

- ours: `shard_dataset` (PyAV decode, FFmpeg's mjpeg or Pillow JPEG, tar shards + index), short side 256 like the
  official recipe; and the same with `--format video` (no decoding to JPEG, only validation).
- official: the official TSM extraction, one `ffmpeg -threads 1 -vf scale=-1:256:flags=bicubic -q:v 0 DIR/%06d.jpg`
  process per video into one folder per video, W processes at a time; the same ffmpeg binary `--decoder ffmpeg`
  would use. bicubic is the scale filter's default (the official recipe as written); it is spelled out so both sides
  always scale with the same `interpolation`.
- bound: a bare loop of our decoder + JPEG encoder in W processes, writing nothing.

Every method runs on the same videos with the same number of worker processes; the result holds videos/s and
frames/s, bytes and file counts on disk, and the ratios ours/official and ours/bound.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ssv2prep.errors import ConfigError, Ssv2PrepError
from ssv2prep.prep.decode import Resize, decode_video, ffmpeg_binary
from ssv2prep.prep.prepare import ShardConfig, shard_dataset
from ssv2prep.prep.shard import WriterSettings

log = logging.getLogger(__name__)

GOAL_VS_OFFICIAL = 1.3
GOAL_VS_BOUND = 0.85
KINDS = ("ours-frames", "ours-video", "official", "bound")


class BenchError(Ssv2PrepError):
    """A benchmark run that failed."""


@dataclass(frozen=True, slots=True)
class ShardBenchConfig:
    """Options of `bench shard`."""

    videos_dir: Path | None = None  # None: synthesize `num_videos` videos of `height` px
    num_videos: int = 300
    height: int = 240
    workers: tuple[int, ...] = (1, 2)
    short_side: int = 256
    quality: int = 90
    encoder: str = "ffmpeg"
    interpolation: str = "bicubic"  # both ours and the official baseline scale with it
    repeats: int = 1  # interleaved repetitions; the fastest of each method is reported, all are kept
    work_dir: Path | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError on a bad value."""
        if self.num_videos < 1 or self.repeats < 1 or not self.workers or min(self.workers) < 1:
            raise ConfigError("bench shard needs --num-videos, --repeats and worker counts >= 1")


def _synth_videos(work: Path, cfg: ShardBenchConfig) -> Path:
    from ssv2prep.prep.synth import SynthConfig, synthesize

    per_class = math.ceil(cfg.num_videos / 8)
    scfg = SynthConfig(
        num_pairs=4,
        train_per_class=per_class,
        validation_per_class=0,
        test_per_class=0,
        height=cfg.height,
        seed=cfg.seed,
    )
    return synthesize(work / "synth", scfg).videos_dir


def _bench_inputs(work: Path, cfg: ShardBenchConfig) -> tuple[Path, Path, list[Path]]:
    """(videos_dir, labels_dir, videos): the chosen videos and a one-class labels folder naming them as train."""
    videos_dir = cfg.videos_dir or _synth_videos(work, cfg)
    videos = sorted(videos_dir.glob("*.webm"), key=lambda p: (len(p.stem), p.stem))[: cfg.num_videos]
    if not videos:
        raise ConfigError(f"{videos_dir}: no .webm videos to benchmark")
    labels = work / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "labels.json").write_text(json.dumps({"Benchmarking something": "0"}))
    entries = [{"id": v.stem, "label": "", "template": "Benchmarking [something]", "placeholders": []} for v in videos]
    (labels / "train.json").write_text(json.dumps(entries))
    return videos_dir, labels, videos


def _disk_usage(folder: Path, pattern: str) -> tuple[int, int]:
    files = [p for p in folder.rglob(pattern) if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _row(
    kind: str, method: str, workers: int, seconds: float, videos: int, frames: int, files: int, size: int
) -> dict[str, Any]:
    return {
        "kind": kind,
        "method": method,
        "workers": workers,
        "seconds": round(seconds, 3),
        "videos_per_s": round(videos / seconds, 2),
        "frames_per_s": round(frames / seconds, 1),
        "frames": frames,
        "files": files,
        "bytes": size,
    }


def _run_ours(videos_dir: Path, labels: Path, out: Path, workers: int, n: int, cfg: ShardBenchConfig, fmt: str):
    short_side = cfg.short_side if fmt == "frames" else None
    writer = WriterSettings(
        format=fmt, quality=cfg.quality, short_side=short_side, encoder=cfg.encoder, interpolation=cfg.interpolation
    )
    scfg = ShardConfig(
        videos_dir=videos_dir,
        labels_dir=labels,
        out_dir=out,
        splits=("train",),
        workers=workers,
        videos_per_shard=max(1, n // (8 * workers)),  # several shards per worker: a short tail
        writer=writer,
        max_failed_fraction=1.0,
    )
    start = time.perf_counter()
    result = shard_dataset(scfg)
    seconds = time.perf_counter() - start
    summary = result.summaries["train"]
    files, size = _disk_usage(out, "ssv2-*")
    return _row(
        f"ours-{fmt}", f"ours: shard --format {fmt}", workers, seconds, summary.ok, summary.num_frames, files, size
    )


def _official_one(args: tuple[str, Path, Path, int, str]) -> None:
    binary, video, out_dir, short_side, interpolation = args
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary,
        "-nostdin",
        "-loglevel",
        "error",
        "-i",
        str(video),
        "-threads",
        "1",
        "-vf",
        f"scale=-1:{short_side}:flags={interpolation}",
        "-q:v",
        "0",
        str(out_dir / "%06d.jpg"),
    ]
    subprocess.run(cmd, check=True, capture_output=True)


def _run_official(videos: list[Path], out: Path, workers: int, cfg: ShardBenchConfig) -> dict[str, Any]:
    binary = ffmpeg_binary()
    jobs = [(binary, v, out / v.stem, cfg.short_side, cfg.interpolation) for v in videos]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_official_one, jobs))
    seconds = time.perf_counter() - start
    files, size = _disk_usage(out, "*.jpg")
    return _row(
        "official", "official: ffmpeg per video -> JPEG folders", workers, seconds, len(videos), files, files, size
    )


def _bound_chunk(args: tuple[list[Path], int, int, str, str]) -> int:
    videos, short_side, quality, encoder, interpolation = args
    resize = Resize(short_side=short_side, interpolation=interpolation)
    return sum(decode_video(v, resize=resize, quality=quality, encoder=encoder).num_frames for v in videos)


def _noop(_: int) -> int:
    return 0


def _run_bound(videos: list[Path], workers: int, cfg: ShardBenchConfig) -> dict[str, Any]:
    chunks = [(videos[i::workers], cfg.short_side, cfg.quality, cfg.encoder, cfg.interpolation) for i in range(workers)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        list(pool.map(_noop, range(workers)))  # start the workers before the clock
        start = time.perf_counter()
        frames = sum(pool.map(_bound_chunk, chunks))
        seconds = time.perf_counter() - start
    return _row("bound", "bound: decode + JPEG encode, no I/O", workers, seconds, len(videos), frames, 0, 0)


def _ffmpeg_version(binary: str) -> str:
    try:
        first = subprocess.run([binary, "-version"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return first[0] if first else "unknown"


def _ratios(rows: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    by = {r["kind"]: r for r in rows if r["workers"] == workers}
    ours, official, bound = by["ours-frames"], by["official"], by["bound"]
    vs_official = ours["videos_per_s"] / official["videos_per_s"]
    vs_bound = ours["videos_per_s"] / bound["videos_per_s"]
    return {
        "workers": workers,
        "ours_vs_official": round(vs_official, 3),
        "ours_vs_bound": round(vs_bound, 3),
        "goal_vs_official": GOAL_VS_OFFICIAL,
        "goal_vs_bound": GOAL_VS_BOUND,
        "meets_goals": vs_official >= GOAL_VS_OFFICIAL and vs_bound >= GOAL_VS_BOUND,
        "bytes_ours_vs_official": round(ours["bytes"] / official["bytes"], 3) if official["bytes"] else None,
        "files_ours_vs_official": round(ours["files"] / official["files"], 5) if official["files"] else None,
    }


def _measure_child() -> None:
    """Entry of the measuring child process: read a job from stdin, pin to its cores, print one JSON row."""
    job = json.loads(sys.stdin.read())
    os.sched_setaffinity(0, set(job["cores"]))
    cfg = ShardBenchConfig(**{**job["cfg"], "videos_dir": None, "work_dir": None})
    videos, w, out = [Path(v) for v in job["videos"]], job["workers"], Path(job["out"])
    kind = job["kind"]
    if kind.startswith("ours-"):
        row = _run_ours(Path(job["videos_dir"]), Path(job["labels"]), out, w, len(videos), cfg, kind[5:])
    elif kind == "official":
        row = _run_official(videos, out, w, cfg)
    else:
        row = _run_bound(videos, w, cfg)
    sys.stdout.write(json.dumps(row))


def _measure(kind: str, workers: int, cores: list[int], cfg: ShardBenchConfig, paths: dict[str, Any]) -> dict:
    """Run one method in a fresh process restricted to `cores`, so every method gets the same CPUs (ffmpeg would
    otherwise start decoder and pipeline threads on every core of the machine)."""
    job = {
        "kind": kind,
        "workers": workers,
        "cores": cores,
        "cfg": {**asdict(cfg), "videos_dir": None, "work_dir": None},
        **paths,
        "out": str(Path(paths["work"]) / f"{kind}-{workers}"),
    }
    code = "from ssv2prep.bench.shard import _measure_child; _measure_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(job), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-400:]
        raise BenchError(f"bench shard: the {kind} run with {workers} workers failed: {tail}")
    row = json.loads(proc.stdout)
    row["cores"] = cores
    shutil.rmtree(job["out"], ignore_errors=True)
    return row


def run_shard_bench(cfg: ShardBenchConfig, *, on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every method for every worker count and return rows, ratios and the environment."""
    cfg.validate()
    step = on_step or (lambda _msg: None)
    allowed = sorted(os.sched_getaffinity(0))
    if max(cfg.workers) > len(allowed):
        raise ConfigError(f"bench shard: {max(cfg.workers)} workers but only {len(allowed)} cores are available")
    owned = cfg.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ssv2prep-bench-")) if owned else Path(cfg.work_dir)  # type: ignore[arg-type]
    try:
        videos_dir, labels, videos = _bench_inputs(work, cfg)
        paths = {
            "videos_dir": str(videos_dir),
            "labels": str(labels),
            "videos": [str(v) for v in videos],
            "work": str(work),
        }
        runs: list[dict[str, Any]] = []
        for r in range(cfg.repeats):
            for w in cfg.workers:
                for kind in KINDS:
                    step(f"{kind}, {w} workers on cores {allowed[:w]} (repeat {r + 1}/{cfg.repeats})")
                    runs.append({**_measure(kind, w, allowed[:w], cfg, paths), "repeat": r})
        rows = [
            max((x for x in runs if (x["kind"], x["workers"]) == (kind, w)), key=lambda x: x["videos_per_s"])
            for w in cfg.workers
            for kind in KINDS
        ]
        binary = ffmpeg_binary()
        return {
            "benchmark": "shard",
            "config": {**asdict(cfg), "videos_dir": str(videos_dir), "work_dir": None if owned else str(work)},
            "videos": len(videos),
            "ffmpeg": {"path": binary, "version": _ffmpeg_version(binary)},
            "rows": rows,
            "runs": runs,
            "ratios": [_ratios(rows, w) for w in cfg.workers],
        }
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def format_shard_bench(result: dict[str, Any]) -> str:
    """Markdown tables of a `run_shard_bench` result."""
    repeats = result["config"]["repeats"]
    lines = [
        f"{result['videos']} videos, best of {repeats}; "
        f"ffmpeg: {result['ffmpeg']['path']} ({result['ffmpeg']['version']})",
        "",
        "| method | workers | videos/s | frames/s | files | MB on disk |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        files = str(r["files"]) if r["files"] else "-"
        lines.append(
            f"| {r['method']} | {r['workers']} | {r['videos_per_s']:.2f} | {r['frames_per_s']:.0f} | {files} | {mb} |"
        )
    lines += [
        "",
        "| workers | ours / official (goal >= 1.3) | ours / bound (goal >= 0.85) | bytes ours / official |",
        "|---:|---:|---:|---:|",
    ]
    for q in result["ratios"]:
        lines.append(
            f"| {q['workers']} | {q['ours_vs_official']:.2f} | {q['ours_vs_bound']:.2f} | "
            f"{q['bytes_ours_vs_official']} |"
        )
    return "\n".join(lines)
