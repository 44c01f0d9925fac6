"""`ssv2prep bench ...`: ours against a baseline and a bound in one run, with ratios."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from ssv2prep.cli.app import console, emit_json, int_list, jpeg_encoder_option, main, out, progress_bars, split_list

_json_option = click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the results as JSON.",
)


@main.group()
def bench() -> None:
    """Benchmarks: ours against a baseline and a bound, in one run, with ratios."""


@bench.command("shard")
@click.option(
    "--videos",
    "videos_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of webm files (default: synthesize a set).",
)
@click.option(
    "--num-videos", type=int, default=300, show_default=True, help="Videos to use (enough to amortize pool start-up)."
)
@click.option("--workers", "workers_list", default="1,2", show_default=True, help="Worker counts to compare.")
@click.option("--height", type=int, default=240, show_default=True, help="Height of synthesized videos.")
@jpeg_encoder_option("The JPEG encoder of `shard` and the bound.")
@click.option("--repeats", type=int, default=2, show_default=True, help="Interleaved runs; the best is reported.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Scratch folder (default: a temp folder, removed afterwards).",
)
@_json_option
def bench_shard(
    videos_dir: Path | None,
    num_videos: int,
    workers_list: str,
    height: int,
    jpeg_encoder: str,
    repeats: int,
    work_dir: Path | None,
    json_path: Path | None,
) -> None:
    """Shard throughput against the official recipe (one ffmpeg per video into JPEG folders) and the bound.

    \b
    Example:
      ssv2prep bench shard --num-videos 300 --workers 1,2 --json bench-shard.json
    """
    from ssv2prep.bench.shard import ShardBenchConfig, format_shard_bench, run_shard_bench

    cfg = ShardBenchConfig(
        videos_dir=videos_dir,
        num_videos=num_videos,
        height=height,
        encoder=jpeg_encoder,
        repeats=repeats,
        work_dir=work_dir,
        workers=int_list("--workers", workers_list),
    )
    with console.status("benchmarking shard ..."):
        result = run_shard_bench(cfg, on_step=lambda msg: logging.getLogger("ssv2prep.bench").info(msg))
    out.print(format_shard_bench(result))
    emit_json(json_path, result)


@bench.command("verify")
@click.option(
    "--shards",
    "shards_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Shard folder to verify (default: synthesize and shard --videos videos).",
)
@click.option("--videos", "num_videos", type=int, default=200, show_default=True, help="Videos to synthesize.")
@click.option("--frames", type=int, default=36, show_default=True, help="Frames per synthesized video.")
@click.option("--height", type=int, default=240, show_default=True, help="Height of synthesized videos.")
@click.option("--videos-per-shard", type=int, default=0, show_default=True, help="0 = enough shards for 8 per worker.")
@click.option("--workers", type=int, default=0, show_default=True, help="Workers to compare with 1 (0 = all cores).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Interleaved runs; medians.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the generated shards under this folder, reused by the next run (default: a temp folder, removed).",
)
@_json_option
def bench_verify(
    shards_dir: Path | None,
    num_videos: int,
    frames: int,
    height: int,
    videos_per_shard: int,
    workers: int,
    repeats: int,
    work_dir: Path | None,
    json_path: Path | None,
) -> None:
    """verify with N workers against 1 worker, a bare decode loop (the floor) and the CPU ceiling of N processes.

    \b
    Examples:
      ssv2prep bench verify --videos 200 --workers 2 --json bench-verify.json
      ssv2prep bench verify --shards shards --repeats 5
    """
    from ssv2prep.bench.verify import VerifyBenchConfig, format_verify_bench, run_verify_bench

    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    cfg = VerifyBenchConfig(
        shards_dir=shards_dir,
        num_videos=num_videos,
        frames=frames,
        height=height,
        videos_per_shard=videos_per_shard,
        workers=workers,
        repeats=repeats,
        work_dir=work_dir,
    )
    with console.status("benchmarking verify ..."):
        result = run_verify_bench(cfg, on_step=lambda msg: logging.getLogger("ssv2prep.bench").info(msg))
    out.print(format_verify_bench(result), markup=False)
    emit_json(json_path, result)


@bench.command("loader")
@click.option(
    "--index",
    "shard_index",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Train shard index to read (default: synthesize a small set at 256 px).",
)
@click.option("--num-clips", type=int, default=256, show_default=True, help="Clips per measurement.")
@click.option("--workers", "workers_list", default="1,2", show_default=True, help="Worker counts to compare.")
@click.option("--segments", type=int, default=8, show_default=True)
@click.option("--crop", type=int, default=224, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True, help="Interleaved repetitions (best is kept).")
@_json_option
def bench_loader(
    shard_index: Path | None,
    num_clips: int,
    workers_list: str,
    segments: int,
    crop: int,
    repeats: int,
    json_path: Path | None,
) -> None:
    """Train-clip throughput from shards against a folder-of-JPEGs loader (official style) and the decode bound.

    \b
    Example:
      ssv2prep bench loader --num-clips 256 --workers 1,2 --json bench-loader.json
    """
    from ssv2prep.bench.loader import format_loader_bench, run_loader_bench

    log = logging.getLogger("ssv2prep.bench")
    with console.status("benchmarking the loader ..."):
        result = run_loader_bench(
            shard_index,
            num_clips=num_clips,
            segments=segments,
            crop=crop,
            repeats=repeats,
            workers=int_list("--workers", workers_list),
            on_progress=log.info,
        )
    out.print(format_loader_bench(result), markup=False)
    emit_json(json_path, result)


@bench.command("shift")
@click.option("--backbones", default="resnet50", show_default=True, help="Comma-separated backbones.")
@click.option("--segments", type=int, default=8, show_default=True)
@click.option("--size", type=int, default=224, show_default=True, help="Frame size in pixels.")
@click.option("--batch-sizes", default="1,8", show_default=True, help="Clips per forward call.")
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed rounds per variant (medians).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (also run on CUDA when present).")
@click.option("--shift-divs", default="8,4,2,1", show_default=True, help="Shift amounts to time (1 = all channels).")
@click.option("--modes", default="bidirectional,unidirectional", show_default=True, help="Shift modes to time.")
@click.option("--places", default="blockres,block", show_default=True, help="Shift places to time.")
@click.option(
    "--malloc-modes",
    default=None,
    help="Allocator modes to time, e.g. kept,system (default: the one this process runs with, see --malloc).",
)
@_json_option
def bench_shift(
    backbones: str,
    segments: int,
    size: int,
    batch_sizes: str,
    repeats: int,
    device: str,
    shift_divs: str,
    modes: str,
    places: str,
    malloc_modes: str | None,
    json_path: Path | None,
) -> None:
    """Latency per clip of every shift variant, ours against the official zeros-then-copy shift.

    \b
    Examples:
      ssv2prep bench shift --backbones resnet50 --batch-sizes 1,8 --repeats 10 --json bench-shift.json
      ssv2prep bench shift --shift-divs 8 --modes bidirectional --places blockres --malloc-modes kept,system
    """
    from ssv2prep.bench.shift import format_table, run_shift_bench

    with progress_bars() as progress:
        task = progress.add_task("timing", total=None, rate="")
        result = run_shift_bench(
            backbones=split_list(backbones),
            segments=segments,
            size=size,
            batch_sizes=int_list("--batch-sizes", batch_sizes),
            repeats=repeats,
            device=device,
            shift_divs=int_list("--shift-divs", shift_divs),
            shift_modes=tuple(split_list(modes)),
            shift_places=tuple(split_list(places)),
            malloc_modes=tuple(split_list(malloc_modes)) if malloc_modes else None,
            on_progress=lambda d, t: progress.update(task, completed=d, total=t),
        )
    out.print(format_table(result), markup=False)
    emit_json(json_path, result)


@bench.command("train")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True, help="Where to train.")
@click.option("--steps", type=int, default=20, show_default=True, help="Training steps per variant.")
@click.option("--backbone", default=None, help="Default: resnet50 on CUDA, resnet18 on CPU.")
@click.option("--segments", type=int, default=None, help="Frames per clip (default: 8 on CUDA, 2 on CPU).")
@click.option("--crop", type=int, default=None, help="Crop size in pixels (default: 224 on CUDA, 32 on CPU).")
@click.option("--batch-size", type=int, default=None, help="Clips per step (default: 16 on CUDA, 4 on CPU).")
@click.option("--workers", type=int, default=None, help="Loader workers (default: from the machine on CUDA, 1 on CPU).")
@click.option(
    "--lr", type=float, default=None, help="Learning rate, not scaled by batch (default: 0.01 CUDA, 0.003 CPU)."
)
@click.option("--compile/--no-compile", "use_compile", default=True, show_default=True, help="Run the compile rows.")
@click.option("--ddp/--no-ddp", default=None, help="The 2-process torchrun row (default: with 2+ GPUs).")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the generated shards and runs under this folder (default: a temp folder, removed afterwards).",
)
@_json_option
def bench_train(
    device: str,
    steps: int,
    backbone: str | None,
    segments: int | None,
    crop: int | None,
    batch_size: int | None,
    workers: int | None,
    lr: float | None,
    use_compile: bool,
    ddp: bool | None,
    work_dir: Path | None,
    json_path: Path | None,
) -> None:
    """The GPU check: short training runs per precision / compile / channels_last / GPU-decode variant on generated
    shards, with finite and falling losses, clips/s, data-wait share, host syncs and CPU-vs-device eval parity.
    Exits 1 when a row fails; 0 with one "skipped: no CUDA" line when --device cuda has no CUDA.

    \b
    Examples:
      ssv2prep bench train --device cuda --json gpu-check.json
      ssv2prep bench train --device cpu --steps 6
    """
    from ssv2prep.bench.train import TrainBenchConfig, format_train_bench, run_train_bench

    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    cfg = TrainBenchConfig(
        device=device,
        steps=steps,
        backbone=backbone,
        segments=segments,
        crop=crop,
        batch_size=batch_size,
        workers=workers,
        lr=lr,
        compile=use_compile,
        ddp=ddp,
        work_dir=work_dir,
    )
    log = logging.getLogger("ssv2prep.bench")
    with console.status("bench train ...") as status:
        result = run_train_bench(cfg, on_progress=lambda msg: (log.info(msg), status.update(msg)))
    out.print(format_train_bench(result), markup=False)
    emit_json(json_path, result)
    if result.get("status") == "FAIL":
        raise SystemExit(1)
