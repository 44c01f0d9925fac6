"""Commands of the data side: synth, download, extract, shard, verify and report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from ssv2prep.cli.app import config_default, jpeg_encoder_option, main, out, progress_bars, split_list

# ---------------------------------------------------------------------------------------------------------- synth


def _synth_default(name: str) -> Any:
    from ssv2prep.prep.synth import SynthConfig

    return config_default(SynthConfig, name)


@main.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--pairs",
    "num_pairs",
    type=int,
    default=_synth_default("num_pairs"),
    show_default=True,
    help="Mirror pairs of classes (2 classes each).",
)
@click.option(
    "--train-per-class",
    type=int,
    default=_synth_default("train_per_class"),
    show_default=True,
    help="Train videos per class.",
)
@click.option(
    "--validation-per-class",
    type=int,
    default=_synth_default("validation_per_class"),
    show_default=True,
    help="Validation videos per class.",
)
@click.option(
    "--test-per-class",
    type=int,
    default=_synth_default("test_per_class"),
    show_default=True,
    help="Test videos per class.",
)
@click.option(
    "--height",
    type=int,
    default=_synth_default("height"),
    show_default=True,
    help="Frame height in pixels (SSv2: 240).",
)
@click.option(
    "--min-frames", type=int, default=_synth_default("min_frames"), show_default=True, help="Fewest frames per video."
)
@click.option(
    "--max-frames", type=int, default=_synth_default("max_frames"), show_default=True, help="Most frames per video."
)
@click.option(
    "--seed",
    type=int,
    default=_synth_default("seed"),
    show_default=True,
    help="Random seed; the same seed gives identical files.",
)
@click.option("--package", is_flag=True, help="Also write the distribution form (split gzip tar, labels zip).")
@click.option(
    "--parts",
    "num_parts",
    type=int,
    default=_synth_default("num_parts"),
    show_default=True,
    help="With --package: number of archive parts.",
)
@click.option("--zip-parts", is_flag=True, help="With --package: wrap each part in a zip, as one SSv2 release did.")
@click.pass_context
def synth(ctx: click.Context, out_dir: Path, **opts: Any) -> None:
    """Make a synthetic dataset in the exact SSv2 form: VP9 webm videos and the annotation files.

    Each class is a motion that only frame order reveals, in mirror pairs named like real SSv2 classes.

    \b
    Examples:
      ssv2prep synth data/synth
      ssv2prep synth data/synth --pairs 3 --train-per-class 40 --height 120 --package --parts 3
    """
    from ssv2prep.prep.synth import SynthConfig, synthesize

    if not opts["package"]:
        for flag, name in (("--parts", "num_parts"), ("--zip-parts", "zip_parts")):
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
                raise click.UsageError(f"{flag} shapes the package: it needs --package")
    cfg = SynthConfig(**opts)
    cfg.validate()
    with progress_bars() as progress:
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


DEFAULT_MANIFEST = "ssv2"  # the shipped manifests/ssv2.json, from a checkout or an installed wheel alike


@main.command()
@click.option("--dest", required=True, type=click.Path(file_okay=False, path_type=Path), help="Download folder.")
@click.option(
    "--manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Download manifest: a file, or the name of a shipped one (ssv2, ssv2-20parts). Default: ssv2, the real "
    "dataset as packaged now.",
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
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Seconds to wait for the server (to connect, and for each read) before an attempt fails [default: 60].",
)
def download(
    dest: Path,
    manifest: Path | None,
    base_url: str | None,
    headers: tuple[str, ...],
    cookies: Path | None,
    jobs: int,
    retries: int,
    timeout_s: float | None,
) -> None:
    """Download every file of a manifest: resumable, verified by checksum, several at once.

    Files already in --dest (complete and verified, or put there by hand) are not downloaded again.
    A file is kept only if its size and first bytes fit the manifest: a login page or a short body is an error.
    The SSv2 files need an accepted research licence: pass your session with --cookies or --header (they go
    only to the host of each file's URL, never to another host it redirects to).

    \b
    Examples:
      ssv2prep download --dest dl --base-url https://example.org/ssv2 --cookies cookies.txt
      ssv2prep download --dest dl --manifest data/synth/package/manifest.json --base-url http://127.0.0.1:8000
    """
    from ssv2prep.prep.download import DownloadConfig, download_manifest, parse_header_option
    from ssv2prep.prep.manifest import load_manifest
    from ssv2prep.resources import find_manifest, shipped_file

    man = load_manifest(find_manifest(manifest) if manifest else shipped_file("manifests", DEFAULT_MANIFEST))
    cfg = DownloadConfig(
        dest=dest,
        base_url=base_url,
        headers=tuple(parse_header_option(h) for h in headers),
        cookies_file=cookies,
        jobs=jobs,
        retries=retries,
        **({"timeout_s": timeout_s} if timeout_s is not None else {}),
    )
    cfg.validate()
    from ssv2prep.fsutil import output_lock

    with output_lock(dest, option="--dest"), progress_bars(transfer=True) as progress:
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

    with progress_bars(transfer=True) as progress:
        task = progress.add_task("extracting", total=None)
        result = extract_dataset(
            src, dest, on_progress=lambda done, total: progress.update(task, completed=done, total=total)
        )
    out.print(f"extract: layout {result.layout}; {result.written} videos written, {result.skipped} already there")
    out.print(f"videos: {result.videos_dir}\nlabels: {result.labels_dir}")


# ---------------------------------------------------------------------------------------------------------- shard


def _print_summaries(summaries: dict[str, Any], out_dir: str | Path) -> None:
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
    mismatched = sum(s.frame_count_mismatch for s in summaries.values())
    if mismatched:
        out.print(
            f"{mismatched} videos decoded fully to a frame count their header disagrees with "
            "(kept; see frame_count_mismatch in the manifests)"
        )


@main.command()
@click.option(
    "--videos",
    "videos_dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of <id>.webm files (not needed by a run with every shard already written, e.g. the run that "
    "writes the indexes after the --part runs).",
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
    help="Output folder for shards and their index files: a local folder or an object-store prefix "
    "(s3://bucket/prefix, gs://...; credentials from the store's usual environment).",
)
@click.option(
    "--staging-dir",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="With an object-store --out: local folder where shards are written before upload (default: a temp folder).",
)
@click.option("--splits", default="train,validation,test", show_default=True, help="Comma-separated splits.")
@click.option(
    "--holdout",
    type=float,
    default=0.0,
    show_default=True,
    help="Carve this stratified, seeded fraction of train into a 'holdout' split.",
)
@click.option(
    "--videos-per-shard",
    type=int,
    default=500,
    show_default=True,
    help="Videos per tar shard (a shard is the unit of resume, of --part work and of the loader's dealing).",
)
@click.option("--workers", type=int, default=0, show_default=True, help="Decoding processes (0 = one per core).")
@click.option("--quality", type=int, default=90, show_default=True, help="JPEG quality on libjpeg's 1..95 scale.")
@jpeg_encoder_option(
    "ffmpeg: FFmpeg's mjpeg from the YUV planes, --quality mapped to its quantizer (90 -> q:v 2, as the official "
    "recipe); pillow: libjpeg at exactly --quality (slower)."
)
@click.option("--short-side", type=int, default=None, help="Scale frames so the short side has S pixels.")
@click.option(
    "--height",
    type=int,
    default=None,
    help="Scale frames to H pixels high, width from the aspect ratio: the official recipe's scale=-1:H "
    "(differs from --short-side on portrait videos; give one of the two).",
)
@click.option(
    "--interpolation",
    type=click.Choice(["bicubic", "bilinear", "area", "lanczos", "point"]),
    default="bicubic",
    show_default=True,
    help="libswscale scaling method; bicubic is ffmpeg's scale filter default, so frames equal the official recipe's.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["frames", "video"]),
    default="frames",
    show_default=True,
    help="frames: JPEG per frame; video: the original webm bytes.",
)
@click.option("--decoder", type=click.Choice(["pyav", "ffmpeg"]), default="pyav", show_default=True)
@click.option(
    "--part",
    default=None,
    help="K/N: write only part K of N of the shard plan (array jobs); auto: K and N from the array job's "
    "variables (AWS Batch, Slurm, Kubernetes indexed jobs with SSV2PREP_PARTS).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shard plan and holdout.")
@click.option(
    "--max-failed-fraction",
    type=float,
    default=0.01,
    show_default=True,
    help="Exit non-zero when more videos than this fraction fail to decode.",
)
@click.option(
    "--max-missing-fraction",
    type=float,
    default=None,
    help="Exit non-zero when more annotation entries than this fraction have no video in --videos "
    "(default: --max-failed-fraction). A split with no usable video is always an error.",
)
def shard(
    videos_dir: Path | None,
    labels_dir: Path,
    out_dir: str,
    staging_dir: Path | None,
    splits: str,
    holdout: float,
    videos_per_shard: int,
    workers: int,
    quality: int,
    jpeg_encoder: str,
    short_side: int | None,
    height: int | None,
    interpolation: str,
    fmt: str,
    decoder: str,
    part: str | None,
    seed: int,
    max_failed_fraction: float,
    max_missing_fraction: float | None,
) -> None:
    """Write WebDataset tar shards of JPEG frames (or videos) with index, manifest and stats per split.

    Re-running resumes: complete shards are skipped and the result is byte-identical to an uninterrupted run.

    \b
    Examples:
      ssv2prep shard --videos data/20bn-something-something-v2 --labels data/labels --out shards
      ssv2prep shard ... --short-side 256 --holdout 0.05 --workers 16
      ssv2prep shard ... --part 3/8      # machine 3 of 8; re-run without --part to write the indexes
      ssv2prep shard ... --out s3://bucket/ssv2 --part 3/8   # parts share only the bucket
      ssv2prep shard --labels data/labels --out s3://bucket/ssv2   # after all parts: indexes, no videos needed

    With an object-store --out there is no lock: give each machine a distinct --part.
    """
    from ssv2prep.prep.plan import parse_part
    from ssv2prep.prep.prepare import ShardConfig, TooManyFailuresError, shard_dataset
    from ssv2prep.prep.shard import WriterSettings

    cfg = ShardConfig(
        videos_dir=videos_dir,
        labels_dir=labels_dir,
        out_dir=out_dir if "://" in out_dir else Path(out_dir),
        staging_dir=staging_dir,
        splits=split_list(splits),
        holdout=holdout,
        videos_per_shard=videos_per_shard,
        workers=workers,
        part=parse_part(part),
        seed=seed,
        writer=WriterSettings(
            format=fmt,
            quality=quality,
            short_side=short_side,
            height=height,
            interpolation=interpolation,
            decoder=decoder,
            encoder=jpeg_encoder,
        ),
        max_failed_fraction=max_failed_fraction,
        max_missing_fraction=max_missing_fraction,
    )
    with progress_bars() as progress:
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
@click.argument("shard_dir")
@click.option("--no-decode", is_flag=True, help="Skip decoding every JPEG (faster; checksums still checked).")
@click.option(
    "--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Processes (0 = one per core)."
)
def verify(shard_dir: str, no_decode: bool, workers: int) -> None:
    """Re-read every shard of every index in SHARD_DIR: checksums, counts, JPEGs, manifest invariants.

    SHARD_DIR is a local folder or an object-store prefix (s3://bucket/prefix); remote shards are streamed.

    \b
    Examples:
      ssv2prep verify shards
      ssv2prep verify s3://bucket/ssv2 --workers 8
    """
    from ssv2prep import storage
    from ssv2prep.errors import ShardError
    from ssv2prep.prep.verify import count_shards, verify_folder

    if not storage.is_remote(shard_dir) and not storage.local_path(shard_dir).is_dir():
        raise click.BadParameter(f"{shard_dir}: not a folder", param_hint="SHARD_DIR")
    with progress_bars() as progress:
        task = progress.add_task("verifying", total=count_shards(shard_dir), rate="")
        report = verify_folder(
            shard_dir, decode=not no_decode, workers=workers, on_shard=lambda _: progress.advance(task)
        )
    splits = ", ".join(f"{k} {v}" for k, v in report.splits.items())
    if not report.ok:
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
        raise ShardError(f"{shard_dir}: {len(report.problems)} problems found ({report.shards} shards checked)")
    out.print(f"verify: OK: {report.shards} shards, {report.samples} samples ({splits}), {report.frames} frames")


# --------------------------------------------------------------------------------------------------------- report


@main.command()
@click.argument("shard_dir")
@click.option(
    "--out",
    "out_dir",
    metavar="DIR|URL",
    default=None,
    help="Folder or object-store prefix (s3://, gs://) for the page and PNGs (default: SHARD_DIR-report beside a "
    "local SHARD_DIR; ./NAME-report in the current folder for a remote one, NAME being the prefix's last part).",
)
@click.option("--videos-per-class", type=int, default=2, show_default=True, help="Videos per class on contact sheets.")
@click.option("--segments", type=int, default=8, show_default=True, help="Frames the loader samples per clip.")
@click.option("--crop-size", type=int, default=224, show_default=True)
@click.option("--scale-size", type=int, default=256, show_default=True)
@click.option(
    "--max-shards-scanned",
    type=int,
    default=None,
    help="Frame sizes from the first N shards per split (default: all of a local folder, 2 of a remote one).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def report(
    shard_dir: str,
    out_dir: str | None,
    videos_per_class: int,
    segments: int,
    crop_size: int,
    scale_size: int,
    max_shards_scanned: int | None,
    seed: int,
) -> None:
    """Write a Markdown page with plots and contact sheets of a shard folder (counts, frames, sizes, failures).

    SHARD_DIR is a local folder, an object-store prefix (s3://bucket/prefix, gs://...) or one shard index
    (.../ssv2-train.json; the only way in over http(s)). Remote shards are not downloaded whole: byte counts come
    from the index and the listing, only --max-shards-scanned shards per split are scanned, contact-sheet videos
    come from those first, and another shard is read only up to a video a class needs. The contact sheets show the
    frames the loader samples, with and without the training augmentation.

    \b
    Examples:
      ssv2prep report shards --videos-per-class 2
      ssv2prep report s3://bucket/ssv2 --out ssv2-report
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
