"""The `ssv2prep` command line: the only module that talks to the terminal.

Each command validates its options, calls one library function and turns its progress callbacks into rich
progress bars. Known errors (`Ssv2PrepError`) become one line on stderr and the error's exit code; `--debug`
shows the traceback too. Heavy imports (torch, av) happen inside command bodies so `--help` stays fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from ssv2prep import __version__
from ssv2prep.errors import Ssv2PrepError
from ssv2prep.malloc import ENV_VAR as MALLOC_ENV_VAR
from ssv2prep.malloc import KEPT, configure_malloc
from ssv2prep.malloc import MODES as MALLOC_MODES

console = Console(stderr=True)
out = Console(soft_wrap=True)


class _Group(click.Group):
    """A click group that turns `Ssv2PrepError` into a one-line message and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Ssv2PrepError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                console.print_exception()
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 0 else logging.INFO
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)
    # Library modules log at INFO; third-party chatter stays at WARNING.
    for noisy in ("urllib3", "PIL", "matplotlib", "libav"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextmanager
def _progress(*, transfer: bool = False) -> Iterator[Progress]:
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn()]
    columns += [TransferSpeedColumn()] if transfer else [MofNCompleteColumn(), TextColumn("{task.fields[rate]}")]
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as progress:
        yield progress


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="ssv2prep")
@click.option("-v", "--verbose", count=True, help="More log output (-v: debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--debug", is_flag=True, help="Show tracebacks for known errors too.")
@click.option(
    "--malloc",
    "malloc",
    type=click.Choice(MALLOC_MODES),
    default=KEPT,
    show_default=True,
    envvar=MALLOC_ENV_VAR,
    help="CPU allocator: 'kept' reuses freed memory instead of page-faulting fresh pages on every forward pass "
    "(measured: TSN-ResNet-50 batch 8 on CPU 1.8x faster); 'system' keeps the C library's defaults.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool, debug: bool, malloc: str) -> None:
    """Prepare Something-Something-V2 as WebDataset shards and train/evaluate TSM models on them.

    \b
    The data side, in order:
      ssv2prep synth OUT                      a synthetic dataset in the exact SSv2 form (no download needed)
      ssv2prep download --dest DL             the real files of manifests/ssv2.json (resumable)
      ssv2prep extract --src DL --dest DATA   join parts as a stream, untar safely, gather labels
      ssv2prep shard --videos DATA/20bn-something-something-v2 --labels DATA/labels --out SHARDS
      ssv2prep verify SHARDS                  re-read every shard against its index
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging(verbose, quiet)
    configure_malloc(malloc)
    os.environ[MALLOC_ENV_VAR] = malloc  # stages that `run` and `demo` start as subprocesses follow the choice


# ---------------------------------------------------------------------------------------------------------- synth


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--pairs", "num_pairs", type=int, default=None, help="Mirror pairs of classes (2 classes each).")
@click.option("--train-per-class", type=int, default=None, help="Train videos per class.")
@click.option("--validation-per-class", type=int, default=None, help="Validation videos per class.")
@click.option("--test-per-class", type=int, default=None, help="Test videos per class.")
@click.option("--height", type=int, default=None, help="Frame height in pixels (SSv2: 240).")
@click.option("--min-frames", type=int, default=None, help="Fewest frames per video.")
@click.option("--max-frames", type=int, default=None, help="Most frames per video.")
@click.option("--seed", type=int, default=None, help="Random seed; the same seed gives identical files.")
@click.option("--package", is_flag=True, help="Also write the distribution form (split gzip tar, labels zip).")
@click.option("--parts", "num_parts", type=int, default=None, help="With --package: number of archive parts.")
@click.option("--zip-parts", is_flag=True, help="With --package: wrap each part in a zip, as one SSv2 release did.")
def synth(out_dir: Path, **opts: Any) -> None:
    """Make a synthetic dataset in the exact SSv2 form: VP9 webm videos and the annotation files.

    Each class is a motion that only frame order reveals, in mirror pairs named like real SSv2 classes.

    \b
    Examples:
      ssv2prep synth data/synth
      ssv2prep synth data/synth --pairs 3 --train-per-class 40 --height 120 --package --parts 3
    """
    from ssv2prep.prep.synth import SynthConfig, synthesize

    given = {k: v for k, v in opts.items() if v is not None and v is not False}  # 0 is a value, not 'unset'
    cfg = SynthConfig(**given)
    cfg.validate()
    with _progress() as progress:
        task = progress.add_task("encoding videos", total=None, rate="")
        result = synthesize(
            out_dir, cfg, on_progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    out.print(f"synth: {len(result.classes)} classes; {counts} videos in {result.videos_dir}")
    out.print(f"labels: {result.labels_dir}")
    if result.package_dir:
        out.print(f"package: {result.package_dir} (manifest {result.manifest_path})")


# ------------------------------------------------------------------------------------------------------- download


DEFAULT_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "ssv2.json"


@main.command()
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path), help="Download folder.")
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Download manifest (default: manifests/ssv2.json, the real dataset).",
)
@click.option("--base-url", default=None, help="Where the files are served (the manifest leaves this to you).")
@click.option("--header", "headers", multiple=True, help="Extra HTTP header 'Name: value' (repeatable).")
@click.option(
    "--cookies",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="cookies.txt exported from a logged-in browser session.",
)
@click.option("--jobs", type=int, default=2, show_default=True, help="Files downloaded in parallel.")
@click.option("--retries", type=int, default=5, show_default=True, help="Retries per file on errors and 5xx.")
def download(
    dest: Path,
    manifest: Path | None,
    base_url: str | None,
    headers: tuple[str, ...],
    cookies: Path | None,
    jobs: int,
    retries: int,
) -> None:
    """Download every file of a manifest: resumable, verified by checksum, several at once.

    Files already in --dest (complete and verified, or put there by hand) are not downloaded again.
    The SSv2 files need an accepted research licence: pass your session with --cookies or --header.

    \b
    Examples:
      ssv2prep download --dest dl --base-url https://example.org/ssv2 --cookies cookies.txt
      ssv2prep download --dest dl --manifest data/synth/package/manifest.json --base-url http://127.0.0.1:8000
    """
    from ssv2prep.prep.download import DownloadConfig, download_manifest, parse_header_option
    from ssv2prep.prep.manifest import load_manifest

    man = load_manifest(manifest or DEFAULT_MANIFEST)
    cfg = DownloadConfig(
        dest=dest,
        base_url=base_url,
        headers=tuple(parse_header_option(h) for h in headers),
        cookies_file=cookies,
        jobs=jobs,
        retries=retries,
    )
    cfg.validate()
    with _progress(transfer=True) as progress:
        tasks: dict[str, Any] = {}

        def on_progress(name: str, done: int, total: int | None) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done, total=total)

        results = download_manifest(man, cfg, on_progress=on_progress)
    for r in results:
        out.print(f"{r.status.name.lower():>18}  {r.name}  {r.size_bytes} bytes")
    out.print(f"download: {len(results)} files complete in {dest}")


# -------------------------------------------------------------------------------------------------------- extract


@main.command()
@click.option(
    "--src",
    required=True,
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Folder with the downloaded parts (any SSv2 layout) and labels.",
)
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
def extract(src: Path, dest: Path) -> None:
    """Join the archive parts as a stream and untar the videos safely; gather the label files.

    Accepts 20 or 2 raw parts, zip-wrapped parts (detected by their bytes), a joined .tar.gz or an extracted
    folder, and both label naming schemes. Writes DEST/20bn-something-something-v2/<id>.webm and DEST/labels/.

    \b
    Example:
      ssv2prep extract --src dl --dest data
    """
    from ssv2prep.prep.extract import extract_dataset

    with _progress(transfer=True) as progress:
        task = progress.add_task("extracting", total=None)
        result = extract_dataset(
            src, dest, on_progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    out.print(f"extract: layout {result.layout}; {result.written} videos written, {result.skipped} already there")
    out.print(f"videos: {result.videos_dir}\nlabels: {result.labels_dir}")


# ---------------------------------------------------------------------------------------------------------- shard


def _split_list(value: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in value.split(",") if s.strip())


def _int_list(option: str, value: str) -> tuple[int, ...]:
    """A comma-separated list of integers, or a one-line usage error naming the option."""
    try:
        return tuple(int(v) for v in _split_list(value))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None


def _print_summaries(summaries: dict[str, Any], out_dir: Path) -> None:
    table = Table(title=f"shards in {out_dir}")
    for col in ("split", "shards", "ok", "failed", "missing", "frames", "MB", "failure reasons"):
        table.add_column(col, justify="left" if col in ("split", "failure reasons") else "right")
    for s in summaries.values():
        reasons = ", ".join(f"{k} {v}" for k, v in s.failure_reasons.items()) or "-"
        table.add_row(
            s.split,
            str(s.num_shards),
            str(s.ok),
            str(s.failed),
            str(s.missing),
            str(s.num_frames),
            f"{s.bytes / 1e6:.1f}",
            reasons,
        )
    out.print(table)


F = TypeVar("F", bound=Callable[..., Any])


def _jpeg_encoder_option(help_text: str) -> Callable[[F], F]:
    """The `--jpeg-encoder ffmpeg|pillow` option (shard and bench shard)."""
    return click.option(
        "--jpeg-encoder", type=click.Choice(["ffmpeg", "pillow"]), default="ffmpeg", show_default=True, help=help_text
    )


@main.command()
@click.option(
    "--videos",
    "videos_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <id>.webm files.",
)
@click.option(
    "--labels",
    "labels_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder with labels.json, train.json, ... (either naming scheme).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder for shards and their index files.",
)
@click.option("--splits", default="train,validation,test", show_default=True, help="Comma-separated splits.")
@click.option(
    "--holdout",
    type=float,
    default=0.0,
    show_default=True,
    help="Carve this stratified, seeded fraction of train into a 'holdout' split.",
)
@click.option("--videos-per-shard", type=int, default=500, show_default=True)
@click.option("--workers", type=int, default=0, show_default=True, help="Decoding processes (0 = one per core).")
@click.option("--quality", type=int, default=90, show_default=True, help="JPEG quality on libjpeg's 1..95 scale.")
@_jpeg_encoder_option(
    "ffmpeg: FFmpeg's mjpeg from the YUV planes, --quality mapped to its quantizer (90 -> q:v 2, as the official "
    "recipe); pillow: libjpeg at exactly --quality (slower)."
)
@click.option("--short-side", type=int, default=None, help="Scale frames so the short side has S pixels.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["frames", "video"]),
    default="frames",
    show_default=True,
    help="frames: JPEG per frame; video: the original webm bytes.",
)
@click.option("--decoder", type=click.Choice(["pyav", "ffmpeg"]), default="pyav", show_default=True)
@click.option("--part", default=None, help="K/N: write only part K of N of the shard plan (array jobs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shard plan and holdout.")
@click.option(
    "--max-failed-fraction",
    type=float,
    default=0.01,
    show_default=True,
    help="Exit non-zero when more videos than this fraction fail to decode.",
)
def shard(
    videos_dir: Path,
    labels_dir: Path,
    out_dir: Path,
    splits: str,
    holdout: float,
    videos_per_shard: int,
    workers: int,
    quality: int,
    jpeg_encoder: str,
    short_side: int | None,
    fmt: str,
    decoder: str,
    part: str | None,
    seed: int,
    max_failed_fraction: float,
) -> None:
    """Write WebDataset tar shards of JPEG frames (or videos) with index, manifest and stats per split.

    Re-running resumes: complete shards are skipped and the result is byte-identical to an uninterrupted run.

    \b
    Examples:
      ssv2prep shard --videos data/20bn-something-something-v2 --labels data/labels --out shards
      ssv2prep shard ... --short-side 256 --holdout 0.05 --workers 16
      ssv2prep shard ... --part 3/8      # machine 3 of 8; re-run without --part to write the indexes
    """
    from ssv2prep.prep.plan import parse_part
    from ssv2prep.prep.prepare import ShardConfig, TooManyFailuresError, shard_dataset
    from ssv2prep.prep.shard import WriterSettings

    cfg = ShardConfig(
        videos_dir=videos_dir,
        labels_dir=labels_dir,
        out_dir=out_dir,
        splits=_split_list(splits),
        holdout=holdout,
        videos_per_shard=videos_per_shard,
        workers=workers,
        part=parse_part(part),
        seed=seed,
        writer=WriterSettings(
            format=fmt, quality=quality, short_side=short_side, decoder=decoder, encoder=jpeg_encoder
        ),
        max_failed_fraction=max_failed_fraction,
    )
    with _progress() as progress:
        task = progress.add_task("sharding", total=None, rate="")
        counts = {"videos": 0}

        def on_plan(shards: int, videos: int, skipped: int) -> None:
            if skipped:
                logging.getLogger("ssv2prep").info("%d shards already complete; skipping them", skipped)
            progress.update(task, total=videos, description=f"{shards} shards")

        def on_shard(stats: Any) -> None:
            counts["videos"] += len(stats.outcomes)
            rate = f"{len(stats.outcomes) / stats.seconds:.1f} videos/s/worker" if stats.seconds else ""
            progress.update(task, completed=counts["videos"], rate=rate)

        try:
            result = shard_dataset(cfg, on_plan=on_plan, on_shard=on_shard)
        except TooManyFailuresError as exc:
            _print_summaries(exc.result.summaries, out_dir)
            raise
    if result.summaries:
        _print_summaries(result.summaries, out_dir)
    if result.incomplete_splits:
        out.print(
            f"shard: wrote {len(result.written)} shards; splits still waiting for other parts: "
            f"{', '.join(result.incomplete_splits)} (re-run without --part once all parts are in {out_dir})"
        )
    else:
        out.print(
            f"shard: {len(result.written)} shards written, {result.skipped_shards} already complete, "
            f"{result.wall_seconds:.1f} s"
        )


# --------------------------------------------------------------------------------------------------------- verify


@main.command()
@click.argument("shard_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--no-decode", is_flag=True, help="Skip decoding every JPEG (faster; checksums still checked).")
def verify(shard_dir: Path, no_decode: bool) -> None:
    """Re-read every shard of every index in SHARD_DIR: checksums, counts, JPEGs, manifest invariants.

    \b
    Example:
      ssv2prep verify shards
    """
    from ssv2prep.errors import ShardError
    from ssv2prep.prep.verify import count_shards, verify_folder

    with _progress() as progress:
        task = progress.add_task("verifying", total=count_shards(shard_dir), rate="")
        report = verify_folder(shard_dir, decode=not no_decode, on_shard=lambda _: progress.advance(task))
    splits = ", ".join(f"{k} {v}" for k, v in report.splits.items())
    if not report.ok:
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
        raise ShardError(f"{shard_dir}: {len(report.problems)} problems found ({report.shards} shards checked)")
    out.print(f"verify: OK: {report.shards} shards, {report.samples} samples ({splits}), {report.frames} frames")


# ---------------------------------------------------------------------------------------------------------- bench


@main.group()
def bench() -> None:
    """Benchmarks: ours against a baseline and a bound, in one run, with ratios."""


def _emit_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is not None:
        from ssv2prep.fsutil import atomic_write_json

        atomic_write_json(path, result)
        out.print(f"wrote {path}")


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
@_jpeg_encoder_option("The JPEG encoder of `shard` and the bound.")
@click.option("--repeats", type=int, default=2, show_default=True, help="Interleaved runs; the best is reported.")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Scratch folder (default: a temp folder, removed afterwards).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the results as JSON.",
)
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
        workers=_int_list("--workers", workers_list),
    )
    with console.status("benchmarking shard ..."):
        result = run_shard_bench(cfg, on_step=lambda msg: logging.getLogger("ssv2prep.bench").info(msg))
    out.print(format_shard_bench(result))
    _emit_json(json_path, result)


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
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
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
            workers=_int_list("--workers", workers_list),
            on_progress=log.info,
        )
    out.print(format_loader_bench(result), markup=False)
    _emit_json(json_path, result)


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
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
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

    with _progress() as progress:
        task = progress.add_task("timing", total=None, rate="")
        result = run_shift_bench(
            backbones=_split_list(backbones),
            segments=segments,
            size=size,
            batch_sizes=_int_list("--batch-sizes", batch_sizes),
            repeats=repeats,
            device=device,
            shift_divs=_int_list("--shift-divs", shift_divs),
            shift_modes=tuple(_split_list(modes)),
            shift_places=tuple(_split_list(places)),
            malloc_modes=tuple(_split_list(malloc_modes)) if malloc_modes else None,
            on_progress=lambda d, t: progress.update(task, completed=d, total=t),
        )
    out.print(format_table(result), markup=False)
    _emit_json(json_path, result)


# ----------------------------------------------------------------------------------------------------------- demo


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Output folder: synthetic data, downloads, shards, runs, report.md.",
)
@click.option("--small", is_flag=True, help="A very small run (for tests and a quick look); targets do not apply.")
@click.option("--set", "overrides", multiple=True, help="Override a pipeline option: STAGE.OPTION=value.")
def demo(out_dir: Path, small: bool, overrides: tuple[str, ...]) -> None:
    """Run the main job on built-in synthetic data, end to end through the real code paths.

    synth --package, served from a loopback HTTP server, download, extract, shard, verify; then a TSM and a TSN of
    the same small backbone are trained, evaluated on validation and on test, and compared (pipelines/demo.toml).

    \b
    Example:
      ssv2prep demo --out demo-out
    """
    from ssv2prep.demo import run_demo

    log = logging.getLogger("ssv2prep.demo")
    report, _ = run_demo(
        out_dir,
        small=small,
        overrides=list(overrides),
        on_stage=lambda stage, status: log.info("stage %s (%s)", stage.key, status),
    )
    text = report.read_text()
    out.print(text.split("\n\n![comparison]")[0], markup=False)
    out.print(f"report: {report}")


# ---------------------------------------------------------------------------------------------------------- train


def _model_options(f: Any) -> Any:
    """Model options shared by train (and sweeps): backbone, weights and every shift option."""
    options = [
        click.option(
            "--backbone",
            default="resnet50",
            show_default=True,
            type=click.Choice(["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v2"]),
        ),
        click.option(
            "--weights",
            default=None,
            help="none (default), 'imagenet' (torchvision weights), a torchvision weights name, or a file.",
        ),
        click.option("--segments", type=int, default=8, show_default=True, help="Frames per clip (T)."),
        click.option(
            "--shift-div",
            type=int,
            default=8,
            show_default=True,
            help="1/div of the channels shift each way; 0 = no shift (TSN); 1 = all channels (naive).",
        ),
        click.option(
            "--shift-mode",
            type=click.Choice(["bidirectional", "unidirectional"]),
            default="bidirectional",
            show_default=True,
        ),
        click.option("--shift-place", type=click.Choice(["blockres", "block"]), default="blockres", show_default=True),
        click.option("--dropout", type=float, default=0.5, show_default=True),
        click.option("--partial-bn", is_flag=True, help="Freeze every BatchNorm but the first (official pBN)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _train_sources(data: Path | None, train: str | None, val: str | None) -> tuple[str, str | None]:
    from ssv2prep.errors import ConfigError
    from ssv2prep.train.config import sources_from_data_dir

    if data is not None:
        if train:
            raise ConfigError("give either --data DIR or --train/--val, not both")
        return sources_from_data_dir(data)
    if not train:
        raise ConfigError("give --data DIR (a shard folder) or --train INDEX_OR_PATTERN")
    return train, val


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


@main.command()
@click.option(
    "--data",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Shard folder with ssv2-train.json (and ssv2-validation.json).",
)
@click.option("--train", "train_spec", default=None, help="Train shards: an index file/URL or a brace pattern.")
@click.option("--val", "val_spec", default=None, help="Validation shards: an index file/URL or a brace pattern.")
@click.option("--train-index", default=None, help="Index for a --train pattern (needed for pipe: patterns).")
@click.option("--val-index", default=None, help="Index for a --val pattern.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@_model_options
@click.option("--batch-size", type=int, default=8, show_default=True, help="Clips per GPU (per process).")
@click.option("--workers", type=int, default=None, help="Loader workers per process (default: from the machine).")
@click.option("--crop-size", type=int, default=224, show_default=True)
@click.option("--scale-size", type=int, default=256, show_default=True, help="Eval: resize short side to this.")
@click.option("--dense", is_flag=True, help="Dense sampling (64-frame window) instead of segments.")
@click.option("--flip", is_flag=True, help="Horizontal flip with the label swap of the index's flip_pairs.")
@click.option("--gpu-decode", is_flag=True, help="Decode JPEGs on the GPU (nvjpeg via torchvision); CUDA only.")
@click.option("--epochs", type=int, default=50, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True, help="Per 64 clips of total batch.")
@click.option("--no-lr-scaling", is_flag=True, help="Use --lr as is instead of scaling it by total batch / 64.")
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default="step", show_default=True)
@click.option("--lr-steps", default="20,40", show_default=True, help="Epochs where the step schedule decays x0.1.")
@click.option("--warmup-epochs", type=float, default=0.0, show_default=True)
@click.option("--wd", type=float, default=1e-4, show_default=True, help="Weight decay (not on BN and biases).")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--clip-grad", type=float, default=20.0, show_default=True, help="Global grad-norm clip (0 = off).")
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--eval-every", type=int, default=1, show_default=True, help="Evaluate every N epochs (and at the end).")
@click.option("--log-every", type=int, default=10, show_default=True, help="Steps between metrics.jsonl lines.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", type=click.Choice(["auto", "off", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--channels-last/--no-channels-last", default=None, help="Default: on for CUDA.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
def train(**opts: Any) -> None:
    """Train a TSM (or TSN) from shards; resumes when the run folder already has last.pt.

    \b
    Examples:
      ssv2prep train --data shards --out runs/tsm-r50 --backbone resnet50 --weights imagenet --batch-size 8
      torchrun --nproc-per-node 8 -m ssv2prep train --data shards --out runs/r50 --weights imagenet
      ssv2prep train --train 'pipe:aws s3 cp s3://b/ssv2-train-{000000..000337}.tar -' \\
          --train-index s3-train.json --val shards/ssv2-validation.json --out runs/s3
    """
    cfg = _train_config(opts)
    from ssv2prep.train.run import fit

    with _TrainProgress(enabled=_is_main_process()) as progress:
        result = fit(cfg, on_event=progress.event)
    if _is_main_process():
        best = f"{result.best_top1:.2f}%" if result.best_top1 is not None else "n/a (no validation)"
        out.print(
            f"train: {result.epochs} epochs, {result.global_step} steps; best val top-1 {best}; "
            f"run folder {result.run_dir}"
        )


def _train_config(opts: dict[str, Any]) -> Any:
    from ssv2prep.data.loader import DataConfig
    from ssv2prep.models.tsm import ModelConfig
    from ssv2prep.train.config import OptimConfig, RuntimeConfig, TrainConfig, default_num_workers

    train_spec, val_spec = _train_sources(opts["data"], opts["train_spec"], opts["val_spec"])
    model = ModelConfig(
        backbone=opts["backbone"],
        num_segments=opts["segments"],
        shift_div=opts["shift_div"],
        shift_mode=opts["shift_mode"],
        shift_place=opts["shift_place"],
        dropout=opts["dropout"],
        weights=None if opts["weights"] in (None, "none") else opts["weights"],
        partial_bn=opts["partial_bn"],
    )
    workers = opts["workers"] if opts["workers"] is not None else default_num_workers()
    data = DataConfig(
        num_segments=opts["segments"],
        crop_size=opts["crop_size"],
        scale_size=opts["scale_size"],
        dense=opts["dense"],
        flip=opts["flip"],
        gpu_decode=opts["gpu_decode"],
        batch_size=opts["batch_size"],
        num_workers=workers,
    )
    optim = OptimConfig(
        epochs=opts["epochs"],
        lr=opts["lr"],
        scale_lr=not opts["no_lr_scaling"],
        momentum=opts["momentum"],
        weight_decay=opts["wd"],
        lr_schedule=opts["lr_schedule"],
        lr_steps=tuple(float(s) for s in _split_list(opts["lr_steps"])),
        warmup_epochs=opts["warmup_epochs"],
        clip_grad=opts["clip_grad"] or None,
        label_smoothing=opts["label_smoothing"],
    )
    runtime = RuntimeConfig(
        device=opts["device"],
        amp=opts["amp"],
        channels_last=opts["channels_last"],
        compile=opts["use_compile"],
        log_every=opts["log_every"],
        eval_every=opts["eval_every"],
        seed=opts["seed"],
    )
    return TrainConfig(
        train=train_spec,
        val=val_spec,
        train_index=opts["train_index"],
        val_index=opts["val_index"],
        out=opts["out"],
        model=model,
        data=data,
        optim=optim,
        runtime=runtime,
    )


class _TrainProgress:
    """Rich progress for `fit` events: one bar per epoch with loss, top-1, lr, clips/s and data wait."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.enabled,
        )
        self.task: Any = None
        self.steps = 0
        self.log = logging.getLogger("ssv2prep.train")

    def __enter__(self) -> _TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if not _is_main_process():
            return
        getattr(self, f"_on_{kind}")(data)

    def _on_start(self, d: dict[str, Any]) -> None:
        self.steps = d["steps_per_epoch"]
        self.log.info(
            "training on %s x %d (amp %s): %d clips per process, %d in total, base lr %.5f, "
            "%d steps per epoch, epochs %d..%d",
            d["device"],
            d["world_size"],
            d["amp"],
            d["batch_size"],
            d["batch_size"] * d["world_size"],
            d["base_lr"],
            self.steps,
            d["start_epoch"] + 1,
            d["epochs"],
        )

    def _on_step(self, d: dict[str, Any]) -> None:
        if self.task is None:
            self.task = self.progress.add_task(f"epoch {d['epoch'] + 1}", total=self.steps, info="")
        info = (
            f"loss {d['loss']:.3f} top1 {d['top1']:.1f} lr {d['lr']:.2e} {d['clips_per_s']:.1f} clips/s "
            f"data {100 * d['data_wait']:.0f}%"
        )
        self.progress.update(self.task, advance=1, info=info)

    def _on_epoch(self, d: dict[str, Any]) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        skipped = f", {int(d['skipped'])} corrupt samples skipped" if d.get("skipped") else ""
        self.log.info(
            "epoch %d: loss %.4f, train top-1 %.2f%%, %.0f%% of step time waiting for data%s",
            d["epoch"],
            d["loss"],
            d["top1"],
            100 * d["data_wait"],
            skipped,
        )

    def _on_eval(self, d: dict[str, Any]) -> None:
        self.log.info(
            "epoch %d validation: top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% (%d videos)",
            d["epoch"],
            d["top1"],
            d["top5"],
            d["mean_class_accuracy"],
            d["videos"],
        )


# ----------------------------------------------------------------------------------------------------------- eval


def _parse_grid(grid: str | None, crops: int, clips: int) -> tuple[tuple[int, int], ...]:
    """`crops=1,3;clips=1,2` -> every combination; no grid -> ((crops, clips),)."""
    if not grid:
        return ((crops, clips),)
    axes = {"crops": [crops], "clips": [clips]}
    for part in grid.split(";"):
        name, _, values = part.partition("=")
        if name.strip() not in axes:
            raise click.BadParameter(f"unknown axis {name.strip()!r} (use crops= and clips=)", param_hint="--grid")
        axes[name.strip()] = [int(v) for v in values.split(",") if v.strip()]
    return tuple((c, k) for c in axes["crops"] for k in axes["clips"])


@main.command("eval")
@click.option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Our best.pt/last.pt, or an official TSM .pth (settings read from its file name).",
)
@click.option(
    "--data",
    "data_spec",
    required=True,
    help="A shard index (ssv2-validation.json), a shard URL pattern, or a shard folder with --split.",
)
@click.option("--split", default="validation", show_default=True, help="With a shard folder: which split.")
@click.option("--index", default=None, help="Index for a pattern given as --data (needed for pipe: patterns).")
@click.option("--segments", type=int, default=None, help="Frames per clip (default: as trained).")
@click.option("--crops", type=click.Choice(["1", "3", "5", "10"]), default="1", show_default=True)
@click.option(
    "--clips",
    type=click.Choice(["1", "2"]),
    default="1",
    show_default=True,
    help="2 = the official twice sample (segment centres and starts).",
)
@click.option("--grid", default=None, help="Several settings, e.g. 'crops=1,3,5,10;clips=1,2'.")
@click.option("--dense", is_flag=True, help="Dense sampling: 10 clips from a 64-frame window.")
@click.option("--full-res", is_flag=True, help="Crops of the full scale size (256) instead of the crop size (224).")
@click.option("--crop-size", type=int, default=None, help="Default: as trained (224 for official checkpoints).")
@click.option("--scale-size", type=int, default=None, help="Resize short side to this (default: as trained).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Videos per batch per process.")
@click.option("--workers", type=int, default=2, show_default=True)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report folder (default: eval-<split> beside the checkpoint).",
)
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write per-video top-5 class indices (id;c1;c2;c3;c4;c5) for submission.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def eval_cmd(
    checkpoint: Path,
    data_spec: str,
    split: str,
    index: str | None,
    segments: int | None,
    crops: str,
    clips: str,
    grid: str | None,
    dense: bool,
    full_res: bool,
    crop_size: int | None,
    scale_size: int | None,
    batch_size: int,
    workers: int,
    out_dir: Path | None,
    predictions: Path | None,
    device: str,
) -> None:
    """Evaluate a checkpoint on a held-out split: top-1/top-5, per-class, confusion, seconds per video.

    \b
    Examples:
      ssv2prep eval --checkpoint runs/r50/best.pt --data shards/ssv2-validation.json --crops 3 --clips 2
      ssv2prep eval --checkpoint TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth --data shards
      ssv2prep eval --checkpoint runs/r50/best.pt --data shards --grid 'crops=1,3,5,10;clips=1,2'
      torchrun --nproc-per-node 4 -m ssv2prep eval --checkpoint runs/r50/best.pt --data shards
    """
    from ssv2prep.train.evaluation import EvalConfig, evaluate_checkpoint

    spec = data_spec
    if Path(data_spec).is_dir():
        spec = str(Path(data_spec) / f"ssv2-{split}.json")
    cfg = EvalConfig(
        checkpoint=checkpoint,
        data=spec,
        index=index,
        settings=_parse_grid(grid, int(crops), int(clips)),
        segments=segments,
        dense=dense,
        full_res=full_res,
        crop_size=crop_size,
        scale_size=scale_size,
        batch_size=batch_size,
        workers=workers,
        out=out_dir or checkpoint.parent / f"eval-{split}",
        predictions=predictions,
        device=device,
    )
    with _progress() as progress:
        task = progress.add_task("evaluating", total=None, rate="")
        rows = evaluate_checkpoint(cfg, on_batch=lambda n: progress.advance(task, n))
    if not _is_main_process():
        return
    for r in rows:
        out.print(
            f"eval: {r['crops']} crops x {r['clips']} clips, {r['segments']} frames: top-1 {r['top1']:.2f}%, "
            f"top-5 {r['top5']:.2f}%, mean class {r['mean_class_accuracy']:.2f}% on {r['labelled']} videos, "
            f"{r['seconds_per_video']:.3f} s/video"
        )
    out.print(f"reports in {cfg.out}")


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the exported file (default: beside the checkpoint).",
)
@click.option("--dataset", default="somethingv2", show_default=True, help="Dataset name in the official file name.")
def export(checkpoint: Path, out_dir: Path | None, dataset: str) -> None:
    """Export one of our checkpoints in the official TSM layout and file name (module.base_model..., new_fc).

    \b
    Example:
      ssv2prep export runs/r50/best.pt --out exported/
    """
    from ssv2prep.models.official import export_official
    from ssv2prep.train.checkpoint import load_checkpoint
    from ssv2prep.train.evaluation import load_for_eval

    model, _, _ = load_for_eval(checkpoint, None)
    ckpt = load_checkpoint(checkpoint)
    path = export_official(
        model,
        out_dir or checkpoint.parent,
        dataset=dataset,
        epochs=int(ckpt["epoch"]),
        best_prec1=max(0.0, float(ckpt["best_top1"])),
    )
    out.print(f"export: {path}")


@main.command()
@click.argument("shard_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the page and PNGs go (default: SHARD_DIR/report).",
)
@click.option("--videos-per-class", type=int, default=2, show_default=True, help="Videos per class on contact sheets.")
@click.option("--segments", type=int, default=8, show_default=True, help="Frames the loader samples per clip.")
@click.option("--crop-size", type=int, default=224, show_default=True)
@click.option("--scale-size", type=int, default=256, show_default=True)
@click.option("--max-shards-scanned", type=int, default=None, help="Frame sizes from at most N shards per split.")
@click.option("--seed", type=int, default=0, show_default=True)
def report(
    shard_dir: Path,
    out_dir: Path | None,
    videos_per_class: int,
    segments: int,
    crop_size: int,
    scale_size: int,
    max_shards_scanned: int | None,
    seed: int,
) -> None:
    """Write a Markdown page with plots and contact sheets of a shard folder (counts, frames, sizes, failures).

    The contact sheets show the frames the loader samples, with and without the training augmentation.

    \b
    Example:
      ssv2prep report shards --videos-per-class 2
    """
    from ssv2prep.report import ReportConfig, write_report

    cfg = ReportConfig(
        shard_dir=shard_dir,
        out_dir=out_dir,
        videos_per_class=videos_per_class,
        num_segments=segments,
        crop_size=crop_size,
        scale_size=scale_size,
        max_shards_scanned=max_shards_scanned,
        seed=seed,
    )
    log = logging.getLogger("ssv2prep.report")
    result = write_report(cfg, on_progress=log.info)
    for split, c in result.counts.items():
        out.print(f"{split}: {c['ok']} ok, {c['failed']} failed, {c['missing']} missing in {c['shards']} shards")
    out.print(f"report: {result.page} ({len(result.images)} images)")


# -------------------------------------------------------------------------------------------------------- predict


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--classes",
    "classes_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="classes.json or labels.json (needed for official checkpoints).",
)
@click.option("--crops", type=click.Choice(["1", "3", "5", "10"]), default="1", show_default=True)
@click.option("--clips", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--scale-size", type=int, default=None, help="Resize short side (default: as trained).")
@click.option("--crop-size", type=int, default=None, help="Crop size (default: as trained).")
@click.option("--online", is_flag=True, help="Frame by frame with a unidirectional model; print as it evolves.")
def predict(
    checkpoint: Path,
    videos: tuple[Path, ...],
    classes_file: Path | None,
    crops: str,
    clips: str,
    scale_size: int | None,
    crop_size: int | None,
    online: bool,
) -> None:
    """Classify webm/mp4 files directly and print the top-5 classes with probabilities.

    \b
    Examples:
      ssv2prep predict runs/r50/best.pt clip1.webm clip2.webm
      ssv2prep predict TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth a.webm --classes labels.json
      ssv2prep predict runs/online/best.pt a.webm --online
    """
    from ssv2prep.train.predict import predict_online, predict_videos

    if online:
        for video in videos:
            out.print(f"{video} (online):")

            def show(i: int, top: list[tuple[str, float]]) -> None:
                out.print(f"  frame {i + 1:4d}: {top[0][0]} ({100 * top[0][1]:.1f}%)", markup=False)

            predict_online(
                checkpoint, video, classes_file=classes_file, scale_size=scale_size, crop_size=crop_size, on_frame=show
            )
        return
    predictions = predict_videos(
        checkpoint,
        list(videos),
        classes_file=classes_file,
        crops=int(crops),
        clips=int(clips),
        scale_size=scale_size,
        crop_size=crop_size,
    )
    for p in predictions:
        out.print(f"{p.video}:", markup=False)
        for rank, (name, prob) in enumerate(p.top5, 1):
            out.print(f"  {rank}. {name}  {100 * prob:.1f}%", markup=False)


# ------------------------------------------------------------------------------------------------------------ run


@main.command("run")
@click.argument("pipeline_file", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--set", "overrides", multiple=True, help="Override an option: STAGE.OPTION=value (repeatable).")
@click.option("--from", "from_stage", default=None, help="Re-run from this stage on.")
@click.option("--only", default=None, help="Run only this stage.")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, commands, what is done) and stop.")
def run_cmd(
    pipeline_file: Path, overrides: tuple[str, ...], from_stage: str | None, only: str | None, dry_run: bool
) -> None:
    """Run a pipeline file: its stages in order, skipping the ones already finished.

    \b
    Examples:
      ssv2prep run pipelines/ssv2-tsm-r50-8f.toml --set download.base_url=https://example.org/ssv2
      ssv2prep run pipelines/ssv2-shift-study.toml --dry-run
      ssv2prep run pipelines/demo.toml --only train@tsm --set train.epochs=2
    """
    import shlex

    from ssv2prep.pipeline import load_pipeline, run_pipeline, select_stages, stage_status

    pipeline = load_pipeline(pipeline_file, list(overrides))
    if dry_run:
        out.print(f"pipeline {pipeline.name}: work folder {pipeline.work_dir}")
        for stage in select_stages(pipeline, from_stage=from_stage, only=only):
            status = stage_status(pipeline, stage)
            out.print(f"  [{status:>7}] {stage.key}: {shlex.join(stage.argv())}", soft_wrap=True, markup=False)
        return
    log = logging.getLogger("ssv2prep.run")

    def on_stage(stage: Any, status: str) -> None:
        forced = from_stage is not None or only is not None
        verb = "skipping (done)" if status == "done" and not forced else f"running ({status})"
        log.info("stage %s: %s", stage.key, verb)

    results = run_pipeline(pipeline, from_stage=from_stage, only=only, on_stage=on_stage)
    if pipeline.variants and any(s.variant for s, _ in results):
        from ssv2prep.sweep import compare_variants

        compare_variants(pipeline.run_dir(), pipeline.variants)
        out.print((pipeline.run_dir() / "comparison.md").read_text())
    ran = sum(1 for _, what in results if what == "ran")
    out.print(f"run: {ran} stages ran, {len(results) - ran} already done; outputs in {pipeline.work_dir}")
