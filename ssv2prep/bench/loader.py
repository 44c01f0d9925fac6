"""`bench loader`: clips/s of our shard loader's train transform against a folder-of-JPEGs loader in the official
style and against the decode bound, on the same frames and the same sampled indices and crops, in one run.

- ours: stream the shards (tar, bytes), decode only the sampled JPEGs (libjpeg-turbo via torchvision), multi-scale
  crop and resize in uint8; the clip stays uint8 (the trainer normalises on the device). This is the code path of
  `ssv2prep.data.loader` (`ClipFinisher`), not a copy.
- folder: the official TSM way: the same frames written as `<dir>/<id>/000001.jpg ...`; per clip, PIL opens the T
  sampled files, crops and resizes each in PIL (bilinear), stacks them, converts to float and normalises in the
  worker.
- bound: decoding the T sampled JPEGs alone, from bytes already in memory.

Each method runs in N worker processes (one thread each) for each N in `workers`; a process takes every N-th shard
and cycles over its shards' samples, and all methods get the same per-process list of (video, frame indices, crop).
Repetitions are interleaved (rep 1 of every method and N, then rep 2, ...) and the best run is reported. The
published reference for what a GPU consumes is the 0.55 s per 64-clip TSM-R50 8-frame training step of the fork's
logs (tsm.md section 8), about 116 clips/s.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ssv2prep.data.clip import ClipFinisher, ClipRequest, num_multiscale_pairs
from ssv2prep.data.decode import decode_one_jpeg
from ssv2prep.data.sampling import segment_random_indices
from ssv2prep.data.source import RawSample, iter_samples, resolve_source
from ssv2prep.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TrainCrop, draw_train_crop, train_crop_box
from ssv2prep.errors import ConfigError, Ssv2PrepError

log = logging.getLogger(__name__)

GPU_REFERENCE_CLIPS_PER_S = 116.0
GPU_REFERENCE_SOURCE = "published: TSM-R50 8f, batch 64 in 0.55 s per step (fork logs, tsm.md section 8)"
GOAL_VS_FOLDER = 2.0
METHODS = ("ours", "folder", "bound")
LABELS = {
    "ours": "ours: shards, decode sampled JPEGs, uint8 crop+resize",
    "folder": "folder (official style): PIL open + crop + resize, float normalise",
    "bound": "bound: decode the sampled JPEGs only",
}


class BenchError(Ssv2PrepError):
    """A benchmark run that failed."""


@dataclass(frozen=True, slots=True)
class ClipJob:
    """One sampled clip of the schedule: the video, its T frame indices (0-based) and the crop choices."""

    key: str
    indices: tuple[int, ...]
    crop: TrainCrop


@dataclass(frozen=True, slots=True)
class ProcessJob:
    """What one benchmark process does: a method over its shards / frames with its clip schedule."""

    method: str
    urls: tuple[str, ...]
    schedule: tuple[ClipJob, ...]
    frames_dir: str
    segments: int
    crop: int
    scale: int


# ------------------------------------------------------------------------------------------------------- inputs
def _synth_index(work: Path, num_videos: int, seed: int) -> Path:
    """A small synthetic train split at 256 px high (the official extraction size), sharded; its index path."""
    from ssv2prep.bench.data import synth_shards
    from ssv2prep.prep.synth import SynthConfig

    per_class = max(1, -(-num_videos // 4))
    scfg = SynthConfig(
        num_pairs=2,
        train_per_class=per_class,
        validation_per_class=0,
        test_per_class=0,
        height=256,
        min_frames=24,
        max_frames=48,
        seed=seed,
    )
    return synth_shards(work, scfg, videos_per_shard=2) / "ssv2-train.json"


def _write_frame_folders(urls: Sequence[str], frames_dir: Path) -> dict[str, list[tuple[str, int]]]:
    """Write every frame as `<frames_dir>/<id>/000001.jpg ...` (1-based, the official layout), same bytes as the
    shards; return {url: [(key, num_frames), ...]} in stored order."""
    contents: dict[str, list[tuple[str, int]]] = {}
    for url in urls:
        contents[url] = []
        for sample in iter_samples(url):
            jpgs = sorted(name for name in sample.members if name.endswith(".jpg"))
            if not jpgs:
                raise ConfigError(f"{url}: sample {sample.key} has no JPEG frames; bench loader needs frames shards")
            folder = frames_dir / sample.key
            folder.mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(jpgs):
                (folder / f"{i + 1:06d}.jpg").write_bytes(sample.members[name])
            contents[url].append((sample.key, len(jpgs)))
    return contents


def _frame_size(frames_dir: Path, key: str) -> tuple[int, int]:
    with Image.open(frames_dir / key / "000001.jpg") as img:
        return img.size


def _schedules(
    contents: dict[str, list[tuple[str, int]]], *, n: int, num_clips: int, cfg: dict
) -> list[tuple[tuple[str, ...], tuple[ClipJob, ...]]]:
    """Per process: its shards (every n-th) and its clips, cycling over those shards' samples in stored order."""
    urls = list(contents)
    out = []
    for k in range(n):
        mine = urls[k::n] or [urls[k % len(urls)]]
        quota = num_clips // n + (1 if k < num_clips % n else 0)
        rng = np.random.default_rng([cfg["seed"], n, k])
        samples = [s for url in mine for s in contents[url]]
        jobs = []
        for i in range(quota):
            key, num_frames = samples[i % len(samples)]
            indices = tuple(segment_random_indices(num_frames, cfg["segments"], rng))
            jobs.append(ClipJob(key, indices, draw_train_crop(rng, num_pairs=num_multiscale_pairs(), flip_prob=0.0)))
        out.append((tuple(mine), tuple(jobs)))
    return out


# ------------------------------------------------------------------------------------------------------ methods
def _cycled(urls: Sequence[str]) -> Iterator[RawSample]:
    while True:
        for url in urls:
            yield from iter_samples(url)


def ours_clip(sample: RawSample, job: ClipJob, finisher: ClipFinisher) -> torch.Tensor:
    """Our train clip of `job` from a shard sample: uint8 `(T, 3, crop, crop)`."""
    frames = tuple(sorted(set(job.indices)))
    where = {f: k for k, f in enumerate(frames)}
    jpegs = tuple(sample.members[f"{i:06d}.jpg"] for i in frames)
    request = ClipRequest(job.key, -1, frames, tuple(where[i] for i in job.indices), job.crop, jpegs=jpegs)
    return finisher(request)


def folder_clip(frames_dir: Path, job: ClipJob, *, crop: int, scale: int) -> torch.Tensor:
    """The official-style clip of `job`: float32 normalised `(T * 3, crop, crop)` (frames stacked on channels)."""
    images = [Image.open(frames_dir / job.key / f"{i + 1:06d}.jpg").convert("RGB") for i in job.indices]
    x, y, w, h = train_crop_box(*images[0].size, job.crop, crop_size=crop, scale_size=scale)
    arrays = [np.asarray(img.crop((x, y, x + w, y + h)).resize((crop, crop), Image.BILINEAR)) for img in images]
    stacked = torch.from_numpy(np.concatenate(arrays, axis=2)).permute(2, 0, 1).contiguous().float().div(255.0)
    mean = torch.tensor(IMAGENET_MEAN * len(arrays)).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD * len(arrays)).view(-1, 1, 1)
    return stacked.sub_(mean).div_(std)


def _run_ours(job: ProcessJob) -> int:
    finisher = ClipFinisher(True, job.segments, job.crop, job.scale)
    count = 0
    for sample, clip_job in zip(_cycled(job.urls), job.schedule, strict=False):
        assert sample.key == clip_job.key, "schedule and shard order disagree"
        ours_clip(sample, clip_job, finisher)
        count += 1
    return count


def _run_folder(job: ProcessJob) -> int:
    for clip_job in job.schedule:
        folder_clip(Path(job.frames_dir), clip_job, crop=job.crop, scale=job.scale)
    return len(job.schedule)


def _bound_inputs(job: ProcessJob) -> list[list[bytes]]:
    members = {s.key: s.members for url in job.urls for s in iter_samples(url)}
    return [[members[c.key][f"{i:06d}.jpg"] for i in c.indices] for c in job.schedule]


RUNNERS: dict[str, Callable[[ProcessJob], int]] = {"ours": _run_ours, "folder": _run_folder}


def _process_entry(job: ProcessJob) -> tuple[int, float]:
    """Run one process's share, one thread; (clips, seconds of the timed part)."""
    torch.set_num_threads(1)
    if job.method == "bound":
        inputs = _bound_inputs(job)  # reading is not part of the bound
        start = time.perf_counter()
        for jpegs in inputs:
            for data in jpegs:
                decode_one_jpeg(data)
        return len(inputs), time.perf_counter() - start
    start = time.perf_counter()
    clips = RUNNERS[job.method](job)
    return clips, time.perf_counter() - start


def _noop(_: int) -> int:
    torch.set_num_threads(1)
    return 0


# --------------------------------------------------------------------------------------------------- the run
def _measure(pool: ProcessPoolExecutor, jobs: list[ProcessJob]) -> dict[str, float]:
    results = list(pool.map(_process_entry, jobs))
    clips = sum(c for c, _ in results)
    seconds = max(s for _, s in results)
    return {"clips": clips, "seconds": seconds, "clips_per_s": clips / seconds if seconds > 0 else float("inf")}


def _pixel_check(frames_dir: Path, url: str, job: ClipJob, cfg: dict) -> float:
    """Mean |ours - folder| over the first clip, on the 0..255 scale: the two methods compute the same clip."""
    sample = next(s for s in iter_samples(url) if s.key == job.key)
    ours = ours_clip(sample, job, ClipFinisher(True, cfg["segments"], cfg["crop"], cfg["scale"])).float()
    folder = folder_clip(frames_dir, job, crop=cfg["crop"], scale=cfg["scale"]).view(-1, 3, cfg["crop"], cfg["crop"])
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return float((folder * std + mean).mul(255.0).sub(ours).abs().mean())


def _rows(runs: dict[tuple[str, int], list[dict[str, float]]], num_clips: int) -> list[dict[str, Any]]:
    rows = []
    for (method, n), measured in runs.items():
        best = max(m["clips_per_s"] for m in measured)
        rows.append(
            {
                "method": method,
                "label": LABELS[method],
                "workers": n,
                "clips": num_clips,
                "clips_per_s": round(best, 2),
                "clips_per_s_per_worker": round(best / n, 2),
                "runs_clips_per_s": [round(m["clips_per_s"], 2) for m in measured],
            }
        )
    return rows


def _ratios(rows: list[dict[str, Any]], workers: Sequence[int]) -> list[dict[str, Any]]:
    out = []
    for n in workers:
        by = {r["method"]: r["clips_per_s"] for r in rows if r["workers"] == n}
        vs_folder = by["ours"] / by["folder"]
        out.append(
            {
                "workers": n,
                "ours_vs_folder": round(vs_folder, 3),
                "ours_vs_bound": round(by["ours"] / by["bound"], 3),
                "folder_vs_bound": round(by["folder"] / by["bound"], 3),
                "goal_vs_folder": GOAL_VS_FOLDER,
                "meets_goal": vs_folder >= GOAL_VS_FOLDER,
                "ours_vs_gpu_reference": round(by["ours"] / GPU_REFERENCE_CLIPS_PER_S, 3),
                "folder_vs_gpu_reference": round(by["folder"] / GPU_REFERENCE_CLIPS_PER_S, 3),
            }
        )
    return out


def _validate(num_clips: int, workers: Sequence[int], segments: int, crop: int, scale: int, repeats: int) -> None:
    if num_clips < 1 or repeats < 1 or segments < 1 or not workers or min(workers) < 1:
        raise ConfigError("bench loader needs num_clips, repeats, segments and worker counts >= 1")
    if not 1 <= crop <= scale:
        raise ConfigError(f"bench loader needs 1 <= crop <= scale (got crop {crop}, scale {scale})")
    if max(workers) > num_clips:
        raise ConfigError(f"bench loader: {max(workers)} workers need at least as many clips (got {num_clips})")


def run_loader_bench(
    shard_index: Path | None,
    *,
    num_clips: int = 256,
    workers: Sequence[int] = (1, 2),
    segments: int = 8,
    crop: int = 224,
    scale: int = 256,
    repeats: int = 3,
    num_videos: int = 16,
    seed: int = 0,
    work_dir: Path | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure ours / folder / bound for every worker count (interleaved repetitions) and return rows and ratios.

    Args:
        shard_index: a frames-format shard index to read; None synthesizes `num_videos` videos 256 px high.
        num_clips: clips per measurement (split over the worker processes).
        workers: worker process counts to measure.
        segments, crop, scale: T, the crop size and the short side the multi-scale crop is computed for.
        repeats: interleaved repetitions; the best is reported, all are kept.
        work_dir: where to write the frame folders (and synthetic data); a temp dir (removed) by default.
        on_progress: called with a short message before each step.
    """
    _validate(num_clips, workers, segments, crop, scale, repeats)
    step = on_progress or (lambda _msg: None)
    owned = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="ssv2prep-bench-loader-")) if work_dir is None else Path(work_dir)
    cfg = {"segments": segments, "crop": crop, "scale": scale, "seed": seed}
    try:
        if shard_index is None:
            step(f"synthesizing {num_videos} videos (256 px high) and sharding them")
        index = shard_index or _synth_index(work, num_videos, seed)
        source = resolve_source(str(index))
        frames_dir = work / "frames"
        step(f"writing the frames of {len(source.urls)} shards as JPEG folders")
        contents = _write_frame_folders(source.urls, frames_dir)
        keys = [key for url in source.urls for key, _ in contents[url]]
        sizes = {key: _frame_size(frames_dir, key) for key in keys}
        plans = {n: _schedules(contents, n=n, num_clips=num_clips, cfg=cfg) for n in workers}
        first_url, first_jobs = plans[workers[0]][0]
        pixel_diff = _pixel_check(frames_dir, first_url[0], first_jobs[0], cfg)
        runs = _interleaved(plans, frames_dir, workers, repeats, cfg, step)
        rows = _rows(runs, num_clips)
        return {
            "benchmark": "loader",
            "config": {**cfg, "num_clips": num_clips, "workers": list(workers), "repeats": repeats},
            "index": None if shard_index is None else str(shard_index),
            "videos": len(keys),
            "shards": len(source.urls),
            "frame_size": list(sizes[keys[0]]),
            "rows": rows,
            "ratios": _ratios(rows, workers),
            "gpu_reference": {"clips_per_s": GPU_REFERENCE_CLIPS_PER_S, "source": GPU_REFERENCE_SOURCE},
            "pixel_check_mean_abs_diff": round(pixel_diff, 4),
        }
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)


def _interleaved(
    plans: dict[int, list[tuple[tuple[str, ...], tuple[ClipJob, ...]]]],
    frames_dir: Path,
    workers: Sequence[int],
    repeats: int,
    cfg: dict,
    step: Callable[[str], None],
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Run rep 1 of every (method, N), then rep 2, ...; one warm process pool per N for the whole run."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # import torch once in the server, not in every worker it forks
    pools = {n: ProcessPoolExecutor(max_workers=n, mp_context=ctx) for n in workers}
    runs: dict[tuple[str, int], list[dict[str, float]]] = {(m, n): [] for n in workers for m in METHODS}
    try:
        for n, pool in pools.items():
            list(pool.map(_noop, range(n)))  # start and import before the clock
        for rep in range(repeats):
            for n in workers:
                for method in METHODS:
                    step(f"rep {rep + 1}/{repeats}: {method}, {n} workers")
                    jobs = [
                        ProcessJob(method, urls, schedule, str(frames_dir), cfg["segments"], cfg["crop"], cfg["scale"])
                        for urls, schedule in plans[n]
                    ]
                    try:
                        runs[(method, n)].append(_measure(pools[n], jobs))
                    except Ssv2PrepError as exc:
                        raise BenchError(f"bench loader: {method} with {n} workers failed: {exc}") from exc
    finally:
        for pool in pools.values():
            pool.shutdown()
    return runs


def format_loader_bench(result: dict[str, Any]) -> str:
    """Markdown tables of a `run_loader_bench` result."""
    cfg = result["config"]
    width, height = result["frame_size"]
    bound = {r["workers"]: r["clips_per_s"] for r in result["rows"] if r["method"] == "bound"}
    lines = [
        f"{result['videos']} videos in {result['shards']} shards, frames {width}x{height}; "
        f"T={cfg['segments']}, crop {cfg['crop']}, {cfg['num_clips']} clips per run, best of {cfg['repeats']}; "
        f"ours vs folder pixel check: mean |diff| {result['pixel_check_mean_abs_diff']} (0..255)",
        "",
        "| method | workers | clips/s | clips/s per worker | fraction of bound |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        frac = r["clips_per_s"] / bound[r["workers"]]
        lines.append(
            f"| {r['label']} | {r['workers']} | {r['clips_per_s']:.1f} | {r['clips_per_s_per_worker']:.1f} | "
            f"{frac:.2f} |"
        )
    ref = result["gpu_reference"]
    lines += [
        "",
        f"| workers | ours / folder (goal >= {GOAL_VS_FOLDER:g}) | ours / bound | ours / GPU reference | "
        "folder / GPU reference |",
        "|---:|---:|---:|---:|---:|",
    ]
    for q in result["ratios"]:
        lines.append(
            f"| {q['workers']} | {q['ours_vs_folder']:.2f} | {q['ours_vs_bound']:.2f} | "
            f"{q['ours_vs_gpu_reference']:.2f} | {q['folder_vs_gpu_reference']:.2f} |"
        )
    lines += ["", f"GPU reference: {ref['clips_per_s']:g} clips/s ({ref['source']})."]
    return "\n".join(lines)
