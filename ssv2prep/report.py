"""`ssv2prep report DIR`: a Markdown page with plots and contact sheets describing a prepared shard folder.

Everything the page states comes from the folder's own files (shard-format.md): the indexes (`ssv2-<split>.json`)
give shards, samples, frames and bytes; the manifests give entries, failures and their reasons, labels and frames
per video; `classes.json` gives class names and, with the index, the flip pairs; the sample JSON members (read from
the tars by random access, never decoding a JPEG) give frame sizes. Without a manifest the stats file and the
scanned sample JSONs stand in for it.

The folder may be local or remote (`s3://bucket/prefix`, `gs://...`, or one index over `https://`): every read
goes through `ssv2prep.storage`, and a remote report fetches only what it states. Bytes come from the index (or one
listing), the manifests and stats are small, only `max_shards_scanned` shards per split are scanned (2 by default
for a remote folder: scanning costs about a shard's size), and the contact-sheet videos are drawn from the scanned
shards first and read in the same pass; another shard is opened only for a class those lack, and read only up to
its last wanted sample.

Contact sheets show, per split (train and validation when present), a few seeded videos of every class. Each video
is a block of a caption (class name, video id, frame count, wrapped to the sheet's width) and two rows of T tiles:

- `val`: the frames the validation loader samples (segment centres) after the eval transform (short side to
  `scale_size`, centre crop of `crop_size`);
- `train`: one train-mode draw (random frame per segment + the multi-scale crop), seeded by `seed` and the video id.

Both rows go through the loader's own `ClipPlanner` and `ClipFinisher`, so they are what training and validation
see; each tile is then downscaled to `tile_px` and stamped with its 0-based frame number in the top-left corner.
Sheet geometry (see `contact_sheet_size`): width `ROW_LABEL_PX + T * tile_px`, height the sum over videos of
`lines * LINE_PX + CAPTION_PAD_PX + 2 * tile_px + GAP_PX`, at most `MAX_VIDEOS_PER_SHEET` videos per PNG.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import textwrap
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ssv2prep import storage
from ssv2prep.data.loader import ClipFinisher, ClipPlanner
from ssv2prep.data.sampling import SamplingSpec
from ssv2prep.data.source import RawSample
from ssv2prep.errors import ConfigError, SampleError, ShardError
from ssv2prep.fsutil import atomic_write_bytes, atomic_write_text, output_write_error, write_problem
from ssv2prep.prep.index import read_classes, read_index, read_manifest
from ssv2prep.prep.plan import DATASET_NAME, manifest_name, stats_name
from ssv2prep.prep.verify import index_names

log = logging.getLogger(__name__)

CONTACT_SPLITS = ("train", "validation")
TILE_PX = 96
CAPTION_PAD_PX = 2  # below the caption's last line
ROW_LABEL_PX = 44
GAP_PX = 4
MAX_VIDEOS_PER_SHEET = 32
PLOT_DPI = 100
PNG_COMPRESS_LEVEL = 3  # video frames barely compress; higher levels cost seconds per sheet for ~5%
MAX_FAILURE_EXAMPLES = 10
MAX_SIZES_LISTED = 10
MAX_FRAME_BINS = 100  # one bin per frame count up to this range, then this many bins
CLASSES_PER_PANEL = 60  # rows of one videos-per-class panel; 174 SSv2 classes -> 3 panels of 58
CLASS_ROW_IN = 0.17  # inches per class row: room for a CLASS_LABEL_PT label
CLASS_LABEL_PT = 8
CLASS_LABEL_CHARS = 100  # only longer names are shortened (SSv2's longest has 84 characters)
PANEL_WIDTH_IN = 8.5
BYTES_BINS = 30
LINE_PX = 12  # one line of contact-sheet caption text in PIL's default font
UNLABELLED = "(unlabelled)"
COUNT_KEYS = ("entries", "ok", "failed", "missing", "shards", "frames", "bytes")
PLOT_NAMES = ("videos_per_class.png", "frames_per_video.png", "frame_sizes.png", "bytes.png", "failures.png")
REMOTE_SHARDS_SCANNED = 2  # default --max-shards-scanned for remote shards (see ReportConfig.max_shards_scanned)
SAFE_NAME_RE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True, slots=True)
class ReportConfig:
    """What to report on and how to draw the contact sheets.

    Attributes:
        shard_dir: the prepared folder (indexes, manifests, stats, classes.json, shards): a local folder or a
            store prefix (`s3://bucket/prefix`, `gs://...`), or one shard index file or URL (`.../ssv2-train.json`,
            also `https://...`: an http folder cannot be listed), read through `ssv2prep.storage`.
        out_dir: the local folder where report.md and its PNGs go, or an object-store prefix they are uploaded to
            (`out_url`); default `<name>-report` (see `resolved_out_dir`), never inside the shard folder, so syncing
            the shards to a bucket does not carry the report along.
        videos_per_class: videos per class on the contact sheets (0: no contact sheets).
        num_segments: T, frames per clip (as the loader's `DataConfig.num_segments`).
        crop_size: crop side in pixels (as `DataConfig.crop_size`).
        scale_size: short side before cropping (as `DataConfig.scale_size`).
        seed: picks the contact-sheet videos and their train-mode draws.
        max_shards_scanned: frame sizes come from the sample JSONs of the first N shards of each split; None:
            every shard of a local folder, the first `REMOTE_SHARDS_SCANNED` of a remote one (reading the sample
            JSONs of a shard over the network costs about its whole size).
    """

    shard_dir: str | Path
    out_dir: str | Path | None = None
    videos_per_class: int = 2
    num_segments: int = 8
    crop_size: int = 224
    scale_size: int = 256
    seed: int = 0
    max_shards_scanned: int | None = None

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field (or a shard_dir of an unknown scheme)."""
        checks = (
            ("videos_per_class", self.videos_per_class >= 0, ">= 0 (0 = no contact sheets)"),
            ("num_segments", self.num_segments >= 1, ">= 1"),
            ("crop_size", self.crop_size >= 1, ">= 1"),
            ("scale_size", self.scale_size >= self.crop_size, f">= crop_size ({self.crop_size})"),
            ("max_shards_scanned", self.max_shards_scanned is None or self.max_shards_scanned >= 0, "None or >= 0"),
        )
        for name, ok, allowed in checks:
            if not ok:
                flag = "--segments" if name == "num_segments" else "--" + name.replace("_", "-")
                allowed = allowed.replace("crop_size", "--crop-size")
                raise ConfigError(f"report: {flag} {getattr(self, name)!r} is out of range; allowed: {allowed}")
        storage.scheme_of(self.source)  # an unknown scheme is a ConfigError naming it
        out_scheme = None if self.out_dir is None else storage.scheme_of(self.out_dir)
        if out_scheme is not None and not storage.SCHEMES[out_scheme][1]:
            raise ConfigError(
                f"report: --out {os.fspath(self.out_dir or '')}: {out_scheme}:// is read-only; give a local folder "
                "or an object-store prefix (s3://, gs://)"
            )

    @property
    def source(self) -> str:
        """`shard_dir` as `ssv2prep.storage` takes it (a path or a URL)."""
        return os.fspath(self.shard_dir)

    @property
    def is_remote(self) -> bool:
        """Whether the shards are read from a store or over http."""
        return storage.is_remote(self.source)

    @property
    def name(self) -> str:
        """The shard folder's (or prefix's) last component; the folder's name for a single index."""
        source = self.source
        if source.endswith(".json"):
            source = storage.parent(source)
        if not self.is_remote:
            return storage.local_path(source).resolve().name or "shards"
        return storage.basename(source) or "shards"

    @property
    def scan_limit(self) -> int | None:
        """Shards scanned per split for frame sizes: `max_shards_scanned`, or its default for the source."""
        if self.max_shards_scanned is not None:
            return self.max_shards_scanned
        return REMOTE_SHARDS_SCANNED if self.is_remote else None

    @property
    def out_url(self) -> str | None:
        """`out_dir` when it is an object-store prefix (the report is then written locally and uploaded)."""
        return os.fspath(self.out_dir) if self.out_dir is not None and storage.is_remote(self.out_dir) else None

    @property
    def resolved_out_dir(self) -> Path:
        """`out_dir`; when unset, `<name>-report` beside a local shard folder, or in the current folder for a
        remote one (beside it would be the bucket)."""
        if self.out_dir is not None:
            return storage.local_path(self.out_dir)
        if self.is_remote:
            return Path.cwd() / f"{SAFE_NAME_RE.sub('_', self.name)}-report"
        source = storage.local_path(self.source).resolve()
        shard_dir = source.parent if self.source.endswith(".json") else source
        return shard_dir.with_name(f"{shard_dir.name}-report")


@dataclass(frozen=True, slots=True)
class ReportResult:
    """What `write_report` wrote.

    Attributes:
        page: `out_dir/report.md` (a URL for an object-store `out_dir`).
        images: every PNG written (plots, then contact sheets), all beside the page.
        counts: per split: `entries`, `ok`, `failed`, `missing`, `shards`, `frames`, `bytes` (as the page states).
    """

    page: Path | str
    images: list[Path] | list[str]
    counts: dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class _Entry:
    """One annotation entry of a split (a manifest line, or a scanned sample JSON when there is no manifest)."""

    id: str
    label: int | None
    status: str
    shard: str
    num_frames: int | None
    reason: str | None = None
    error: str | None = None


@dataclass(slots=True)
class _Split:
    """What the report knows about one split."""

    name: str
    index_file: str | Path
    index: dict[str, Any]
    classes: list[str]
    entries: list[_Entry]
    from_manifest: bool
    stats: dict[str, Any] | None
    sizes: Counter[tuple[int, int]] = field(default_factory=Counter)
    shards_scanned: int = 0
    notes: list[str] = field(default_factory=list)
    folder: _Folder | None = None  # where the index lies, with its listing (None: only in tests of the plots)
    scanned: set[str] = field(default_factory=set)  # shard urls scanned
    chosen: list[_Entry] | None = None  # the contact-sheet videos, once chosen
    samples: dict[str, RawSample] = field(default_factory=dict)  # members of chosen videos read so far, by id

    @property
    def ok(self) -> list[_Entry]:
        """The entries that are in the shards."""
        return [e for e in self.entries if e.status == "ok"]


@dataclass(frozen=True, slots=True)
class _Block:
    """One video of a contact sheet: its caption and two rows of tiles with their frame numbers."""

    caption: str
    val_tiles: list[Image.Image]
    val_frames: list[int]
    train_tiles: list[Image.Image]
    train_frames: list[int]


Progress = Callable[[str], None] | None


def _say(on_progress: Progress, message: str) -> None:
    log.debug("%s", message)
    if on_progress is not None:
        on_progress(message)


# ------------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True, slots=True)
class _Folder:
    """The shard folder or prefix being reported on, with one listing of what it holds.

    Attributes:
        root: a local folder or a store prefix (`s3://bucket/prefix`), as `ssv2prep.storage` takes it.
        sizes: {file name: bytes} of the files directly inside `root`, from one listing; None where the store
            cannot list (http), so presence is then asked per file.
    """

    root: str
    sizes: dict[str, int] | None

    def url(self, name: str) -> str:
        """The file `name` inside the folder (storage.join refuses names that leave it)."""
        return storage.join(self.root, name)

    def has(self, name: str) -> bool:
        """Whether the file `name` is in the folder (from the listing when there is one)."""
        if self.sizes is not None:
            return name in self.sizes
        try:
            return storage.exists(self.url(name))
        except storage.StorageError:
            return False


def _shard_url(split: _Split, url: str) -> str:
    """The file or object of an index's shard url; only files inside the index's folder are read."""
    folder = storage.parent(split.index_file)
    if not url.startswith("pipe:"):
        with contextlib.suppress(ConfigError):  # a scheme, an absolute path or a `..` that leaves the folder
            return storage.join(folder, url)
    raise ShardError(
        f"{split.index_file}: shard url {url!r} is not a file in {folder}; an index may only name files beside it"
    )


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    """A shard as a tarfile: random access where the stream can seek (a local file, a ranged object read), so a
    skipped member costs a seek, not its bytes; forward-only otherwise (an http stream without ranges)."""
    with storage.open_read(url) as fh:
        seekable = bool(getattr(fh, "seekable", lambda: False)())
        with tarfile.open(fileobj=fh, mode="r:" if seekable else "r|") as tar:
            yield tar


def _split_member(name: str) -> tuple[str, str]:
    """`78687.000003.jpg` -> (`78687`, `000003.jpg`): the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{folder}/{key}" if folder else key), suffix


def _read_shard(url: str, keys: set[str], *, metas: bool) -> tuple[list[dict[str, Any]], dict[str, RawSample]]:
    """One pass over a shard by random access: the sample JSON objects (when `metas`) and the members (bytes,
    undecoded) of the samples `keys`. Other members are skipped, not read; without `metas` reading stops once every
    key was read, so a remote shard is fetched only up to its last wanted sample."""
    found_metas: list[dict[str, Any]] = []
    found: dict[str, dict[str, bytes]] = {}
    with _open_tar(url) as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, suffix = _split_member(info.name)
            wanted = key in keys
            if not wanted and not metas and len(found) == len(keys):
                break
            if not wanted and (not metas or suffix != "json"):
                continue
            fh = tar.extractfile(info)
            data = fh.read() if fh is not None else b""
            if wanted:
                found.setdefault(key, {})[suffix] = data
            if metas and suffix == "json":
                meta = json.loads(data)
                if isinstance(meta, dict):
                    found_metas.append(meta)
    return found_metas, {key: RawSample(key, members, url) for key, members in found.items()}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _entry_from_manifest(line: dict[str, Any]) -> _Entry:
    return _Entry(
        id=str(line.get("id")),
        label=_int_or_none(line.get("label")),
        status=str(line.get("status", "ok")),
        shard=str(line.get("shard") or ""),
        num_frames=_int_or_none(line.get("num_frames")),
        reason=line.get("reason") or (None if line.get("status", "ok") == "ok" else "unknown"),
        error=line.get("error"),
    )


def _entry_from_meta(meta: dict[str, Any], shard_url: str) -> _Entry:
    return _Entry(
        str(meta.get("id")), _int_or_none(meta.get("label")), "ok", shard_url, _int_or_none(meta.get("num_frames"))
    )


def _read_stats(url: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(storage.read_bytes(url).decode("utf-8"))
    except (storage.StorageError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{url}: cannot read the stats ({exc})") from exc
    return obj if isinstance(obj, dict) else None


def _split_stem(index_name: str) -> str:
    """`ssv2-train.json` -> `train`: the split part of an index's file name (names its manifest and stats)."""
    return index_name[len(DATASET_NAME) + 1 : -len(".json")]


def _split_name(index_name: str) -> str:
    # the file name, not the index's own `split` field, names the outputs: it is known to be a plain file name
    return SAFE_NAME_RE.sub("_", _split_stem(index_name)) or "split"


def _load_split(folder: _Folder, index_name: str) -> _Split:
    """Index, classes, manifest and stats of one split (manifest/stats optional)."""
    index_url = folder.url(index_name)
    index = read_index(index_url)
    stem = _split_stem(index_name)
    manifest_file, stats_file = manifest_name(stem), stats_name(stem)
    entries, from_manifest, notes = [], folder.has(manifest_file), []
    if from_manifest:
        lines = read_manifest(folder.url(manifest_file))
        entries = [_entry_from_manifest(line) for line in lines if isinstance(line, dict)]
    else:
        notes.append(f"no manifest ({manifest_file}): entries and labels come from the scanned sample JSONs")
    return _Split(
        name=_split_name(index_name),
        index_file=index_url,
        index=index,
        classes=read_classes(index_url, index),
        entries=entries,
        from_manifest=from_manifest,
        stats=_read_stats(folder.url(stats_file)) if folder.has(stats_file) else None,
        notes=notes,
        folder=folder,
    )


def _scan_urls(split: _Split, limit: int | None) -> list[str]:
    """The shard urls scanned for frame sizes: the first `limit` (all without a manifest: they are the entries)."""
    urls = [str(e["url"]) for e in split.index["shardlist"]]
    return urls if (limit is None or not split.from_manifest) else urls[:limit]


def _scan_split(split: _Split, todo: list[str], on_progress: Progress) -> None:
    """Frame sizes (and, without a manifest, the entries) from the sample JSONs of the shards `todo`; the members
    of the contact-sheet videos chosen so far (`split.chosen`) are kept from the same pass."""
    keys = {e.id for e in split.chosen or []}
    for k, url in enumerate(todo, start=1):
        shard = _shard_url(split, url)
        try:
            metas, samples = _read_shard(shard, keys, metas=True)
        except (OSError, storage.StorageError, tarfile.TarError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            split.notes.append(f"shard {url} could not be scanned ({' '.join(str(exc).split())[:160]})")
            log.warning("%s: cannot scan shard (%s)", shard, exc)
            continue
        split.shards_scanned += 1
        split.scanned.add(url)
        split.samples.update(samples)
        for meta in metas:
            width, height = _int_or_none(meta.get("width")), _int_or_none(meta.get("height"))
            if width and height:
                split.sizes[(width, height)] += 1
        if not split.from_manifest:
            split.entries.extend(_entry_from_meta(m, url) for m in metas)
        _say(on_progress, f"{split.name}: scanned shard {k}/{len(todo)} ({url})")


# ------------------------------------------------------------------------------------------------------- counts
def _split_counts(split: _Split) -> dict[str, int]:
    """Counts of one split: entries/ok/failed/missing from the manifest, shards/frames/bytes from the index."""
    status = Counter(e.status for e in split.entries)
    shardlist = split.index["shardlist"]
    frames = split.index.get("num_frames")
    if not isinstance(frames, int):
        frames = sum(e.num_frames or 0 for e in split.ok)
    sizes = [e.get("filesize") for e in shardlist]
    if all(isinstance(s, int) for s in sizes):
        total_bytes = sum(sizes)
    else:
        total_bytes = sum(_shard_size(split, str(e["url"])) for e in shardlist)
    return {
        "entries": len(split.entries),
        "ok": status["ok"],
        "failed": status["failed"],
        "missing": status["missing"],
        "shards": len(shardlist),
        "frames": frames,
        "bytes": total_bytes,
    }


def _shard_size(split: _Split, url: str) -> int:
    """Bytes of a shard the index gives no filesize for: from the folder's listing, else asked (0 if absent)."""
    listing = split.folder.sizes if split.folder is not None else None
    if listing is not None and url in listing:
        return listing[url]
    try:
        return storage.size(_shard_url(split, url))
    except storage.StorageError:
        return 0


def _consistency_notes(split: _Split, counts: dict[str, int]) -> list[str]:
    """Disagreements between the split's files (the manifest/index invariants of shard-format.md)."""
    notes = []
    nsamples = sum(int(e["nsamples"]) for e in split.index["shardlist"])
    if split.from_manifest and counts["ok"] != nsamples:
        notes.append(f"manifest ok count {counts['ok']} differs from the index's {nsamples} samples")
    if split.stats is not None:
        for key in ("entries", "ok", "failed", "missing"):
            if key in split.stats and split.stats[key] != counts[key]:
                notes.append(f"stats say {key}={split.stats[key]}, the manifest {counts[key]}")
    if split.shards_scanned == counts["shards"] and sum(split.sizes.values()) not in (0, nsamples):
        notes.append(f"the shards hold {sum(split.sizes.values())} sample JSONs with sizes, the index {nsamples}")
    return notes


def _class_name(classes: Sequence[str], label: int | None) -> str:
    if label is None:
        return UNLABELLED
    return classes[label] if 0 <= label < len(classes) else f"class {label}"


def _failure_counts(split: _Split) -> Counter[tuple[str, str]]:
    """(status, reason) -> count over the entries that are not ok (stats reasons when there is no manifest)."""
    if split.from_manifest or split.stats is None:
        return Counter((e.status, e.reason or "unknown") for e in split.entries if e.status != "ok")
    reasons = split.stats.get("failure_reasons") or {}
    return Counter({("failed", str(r)): int(n) for r, n in reasons.items()})


# -------------------------------------------------------------------------------------------------------- plots
def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width_in, height_in), dpi=PLOT_DPI)


def _integer_axis(axis: Any) -> None:
    """Whole-number ticks on an axis of counts."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def videos_per_class_figure(splits: list[_Split], classes: list[str]) -> Any:
    """Horizontal grouped bars: ok videos per class (rows), one bar per labelled split (a matplotlib Figure).

    Classes are laid out in side-by-side panels of at most `CLASSES_PER_PANEL` rows, so at SSv2's 174 classes the
    names stay at `CLASS_LABEL_PT` points, whole (the end of a name is what tells "..., so it slides down" from
    "..., so it stays where it is"), and the image stays about twice as wide as it is tall.
    """
    labelled = [s for s in splits if any(e.label is not None for e in s.ok)]
    num = max(1, len(classes))
    panels = math.ceil(num / CLASSES_PER_PANEL)
    rows = math.ceil(num / panels)
    bars = max(1, len(labelled))
    fig = _figure(PANEL_WIDTH_IN * panels, 1.2 + rows * max(CLASS_ROW_IN, 0.06 * bars))
    per_split = [Counter(e.label for e in s.ok if e.label is not None) for s in labelled]
    top = max([max(per.values(), default=0) for per in per_split], default=0)
    height = 0.8 / bars
    for p in range(panels):
        ax = fig.add_subplot(1, panels, p + 1)
        ids = list(range(p * rows, min(num, (p + 1) * rows)))
        ys = np.arange(len(ids))
        for k, (split, per) in enumerate(zip(labelled, per_split, strict=True)):
            ax.barh(ys + k * height, [per.get(c, 0) for c in ids], height=height, label=split.name)
        names = [textwrap.shorten(_class_name(classes, c), CLASS_LABEL_CHARS, placeholder="...") for c in ids]
        ax.set_yticks(ys + height * (bars - 1) / 2, names, fontsize=CLASS_LABEL_PT)
        ax.set_ylim(rows - 0.5, -0.5)  # same row height in every panel, first class on top
        ax.set_xlim(0, max(1, top) * 1.05)
        ax.set_xlabel("videos (ok)")
        _integer_axis(ax.xaxis)
        if p == 0 and labelled:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"videos per class and split ({len(classes)} classes)")
    return fig


def _plot_videos_per_class(splits: list[_Split], classes: list[str], path: Path) -> Path:
    return _save(videos_per_class_figure(splits, classes), path)


def _plot_frames(splits: list[_Split], path: Path) -> Path:
    """Histogram of frames per video (ok entries), one outline per split, one bin per frame count."""
    fig = _figure(8.0, 4.0)
    ax = fig.add_subplot()
    for split in splits:
        values = [e.num_frames for e in split.ok if e.num_frames is not None]
        if values:
            lo, hi = min(values), max(values)
            bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < MAX_FRAME_BINS else MAX_FRAME_BINS
            ax.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{split.name} ({len(values)})")
    ax.set_xlabel("frames per video")
    ax.set_ylabel("videos")
    _integer_axis(ax.yaxis)
    ax.set_title("frames per video")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_sizes(splits: list[_Split], path: Path) -> Path:
    """Scatter of distinct (width, height) frame sizes; marker area grows with the number of videos."""
    fig = _figure(7.0, 5.0)
    ax = fig.add_subplot()
    for split in splits:
        if split.sizes:
            counts = list(split.sizes.values())
            ws, hs = zip(*split.sizes.keys(), strict=True)
            area = [12 + 30 * math.log10(n) for n in counts]
            ax.scatter(ws, hs, s=area, alpha=0.5, label=f"{split.name} ({sum(counts)} videos)")
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("frame sizes (from the sample JSONs)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_bytes(splits: list[_Split], counts: dict[str, dict[str, int]], path: Path) -> Path:
    """Left: a histogram of shard sizes per split, from 0 MB. Right: MB per split, one bar each."""
    fig = _figure(11.0, 4.0)
    per_shard, per_split = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    sizes = {s.name: [(e.get("filesize") or 0) / 1e6 for e in s.index["shardlist"]] for s in splits}
    top = max((max(mb, default=0.0) for mb in sizes.values()), default=0.0)
    bins = np.linspace(0.0, max(top, 1e-6) * 1.02, BYTES_BINS + 1)
    for name, mb in sizes.items():
        if mb:
            per_shard.hist(mb, bins=bins, alpha=0.6, label=f"{name} ({len(mb)} shards)")
    per_shard.set_xlim(left=0)
    per_shard.set_xlabel("MB per shard")
    per_shard.set_ylabel("shards")
    _integer_axis(per_shard.yaxis)
    per_shard.set_title("shard sizes")
    per_shard.legend(fontsize=8)
    names = [s.name for s in splits]
    values = [counts[n]["bytes"] / 1e6 for n in names]
    bars = per_split.bar(names, values)
    per_split.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.1f}" for v in values], fontsize=8)
    per_split.set_ylim(bottom=0)
    per_split.set_ylabel("MB")
    per_split.set_title("bytes per split")
    return _save(fig, path)


def _plot_failures(failures: dict[str, Counter[tuple[str, str]]], path: Path) -> Path:
    """Horizontal grouped bars: entries per (status: reason), one bar per split."""
    keys = sorted({key for per in failures.values() for key in per})
    names = [n for n, per in failures.items() if per]
    fig = _figure(8.0, 1.5 + len(keys) * (0.2 + 0.15 * len(names)))
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(names))
    ys = np.arange(len(keys))
    for k, name in enumerate(names):
        ax.barh(ys + k * height, [failures[name].get(key, 0) for key in keys], height=height, label=name)
    ax.set_yticks(ys + height * (len(names) - 1) / 2, [f"{s}: {r}" for s, r in keys], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("entries")
    _integer_axis(ax.xaxis)
    ax.set_title("failures by reason and split")
    ax.legend(fontsize=8)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- contact sheets
def contact_sheet_size(caption_lines: Sequence[int], num_segments: int, tile_px: int = TILE_PX) -> tuple[int, int]:
    """(width, height) in pixels of a contact sheet with one video per entry of `caption_lines` (the number of
    text lines of its wrapped caption), `num_segments` tiles per row."""
    blocks = sum(lines * LINE_PX + CAPTION_PAD_PX + 2 * tile_px + GAP_PX for lines in caption_lines)
    return ROW_LABEL_PX + num_segments * tile_px, blocks


def sheet_tile_px(crop_size: int) -> int:
    """Tile side on the contact sheets: the crop, downscaled to at most `TILE_PX`."""
    return min(TILE_PX, crop_size)


def _train_rng(seed: int, key: str) -> np.random.Generator:
    # one generator per video, so a video's train draw does not depend on which other videos were chosen
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def sheet_clips(sample: RawSample, cfg: ReportConfig) -> tuple[torch.Tensor, list[int], torch.Tensor, list[int]]:
    """The two clips a contact sheet shows for one sample, made by the loader's own planner and finisher.

    Returns:
        (val clip, val frame numbers, train clip, train frame numbers): clips are uint8 `(T, 3, crop_size,
        crop_size)`; val is segment centres + short side to `scale_size` + centre crop; train is one seeded draw of
        random frames per segment + the multi-scale crop. Frame numbers are 0-based, one per clip frame.

    Raises:
        SampleError: the sample cannot be planned or decoded (as in the loader).
    """
    t = cfg.num_segments
    val_req = ClipPlanner(SamplingSpec("val", t))(sample, np.random.default_rng(cfg.seed))
    val = ClipFinisher(False, t, cfg.crop_size, cfg.scale_size)(val_req)[0]
    train_req = ClipPlanner(SamplingSpec("train", t))(sample, _train_rng(cfg.seed, sample.key))
    train = ClipFinisher(True, t, cfg.crop_size, cfg.scale_size)(train_req)
    return (
        val,
        [val_req.frames[i] for i in val_req.order],
        train,
        [train_req.frames[i] for i in train_req.order],
    )


def _tiles(clip_tchw: torch.Tensor, tile_px: int) -> list[Image.Image]:
    """uint8 `(T, 3, H, W)` -> T RGB images of `tile_px` squared (PIL bilinear, which antialiases when shrinking)."""
    frames = clip_tchw.permute(0, 2, 3, 1).contiguous().numpy()
    return [Image.fromarray(f, "RGB").resize((tile_px, tile_px), Image.Resampling.BILINEAR) for f in frames]


def _choose(split: _Split, per_class: int, seed: int, preferred: set[str] | None = None) -> list[_Entry]:
    """`per_class` ok entries of every class (fewer where a class has fewer), seeded; ordered by class, then id.

    Entries in the shards `preferred` (those scanned anyway) are drawn first and others only for classes those
    shards hold too few of, so a remote report reads few other shards; with every shard preferred (a local folder
    scanned whole) the draw is a plain seeded choice.
    """
    by_class: dict[int, list[_Entry]] = defaultdict(list)
    for entry in split.ok:
        by_class[-1 if entry.label is None else entry.label].append(entry)
    rng = np.random.default_rng([seed, zlib.crc32(split.name.encode("utf-8"))])
    chosen = []
    for label in sorted(by_class):
        pool = sorted(by_class[label], key=lambda e: (len(e.id), e.id))
        near = [k for k, e in enumerate(pool) if preferred is None or e.shard in preferred]
        far = [k for k, e in enumerate(pool) if preferred is not None and e.shard not in preferred]
        picks = _draw(rng, near, per_class)
        if len(picks) < per_class and far:
            picks += _draw(rng, far, per_class - len(picks))
        chosen.extend(pool[k] for k in sorted(picks))
    return chosen


def _draw(rng: np.random.Generator, items: list[int], count: int) -> list[int]:
    """`count` of `items` (all of them when fewer), drawn without replacement."""
    return [items[int(i)] for i in rng.choice(len(items), size=min(count, len(items)), replace=False)]


def _sheet_splits(splits: list[_Split]) -> list[_Split]:
    """The splits that get contact sheets: train and validation where present, else the first."""
    return [s for s in splits if s.name in CONTACT_SPLITS] or splits[:1]


def _blocks(split: _Split, cfg: ReportConfig, on_progress: Progress) -> tuple[list[_Block], list[_Entry]]:
    """The contact-sheet blocks of the chosen videos of a split (in `_choose` order) and the entries shown."""
    if split.chosen is None:
        split.chosen = _choose(split, cfg.videos_per_class, cfg.seed, split.scanned)
    chosen = split.chosen
    by_shard: dict[str, set[str]] = defaultdict(set)
    for entry in chosen:
        if entry.id not in split.samples:
            by_shard[entry.shard].add(entry.id)
    samples = dict(split.samples)
    for shard, keys in sorted(by_shard.items()):
        try:
            samples.update(_read_shard(_shard_url(split, shard), keys, metas=False)[1])
        except (OSError, storage.StorageError, tarfile.TarError) as exc:
            split.notes.append(f"contact sheet: shard {shard} could not be read ({' '.join(str(exc).split())[:160]})")
    tile = sheet_tile_px(cfg.crop_size)
    blocks, shown = [], []
    for entry in chosen:
        sample = samples.get(entry.id)
        if sample is None:
            split.notes.append(f"contact sheet: video {entry.id} not found in {entry.shard}")
            continue
        try:
            val, val_frames, train, train_frames = sheet_clips(sample, cfg)
        except SampleError as exc:
            split.notes.append(f"contact sheet: video {entry.id} skipped ({exc})")
            continue
        count = entry.num_frames if entry.num_frames is not None else "?"
        caption = f"{_class_name(split.classes, entry.label)} | id {entry.id} | {count} frames"
        blocks.append(_Block(caption, _tiles(val, tile), val_frames, _tiles(train, tile), train_frames))
        shown.append(entry)
    _say(on_progress, f"{split.name}: contact sheet of {len(blocks)} videos")
    return blocks, shown


def wrap_caption(text: str, width_px: int) -> list[str]:
    """`text` broken at spaces into lines that fit `width_px` in PIL's default font (a word too long for a line
    gets a line of its own, cut with an ellipsis). Class names are never cut short: their last words tell SSv2's
    mirror pairs apart."""
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate) <= width_px:
            lines[-1] = candidate
            continue
        while draw.textlength(word) > width_px and len(word) > 1:
            word = word[:-2] + "…"
        lines.append(word)
    return lines or [""]


def _draw_row(
    sheet: Image.Image, draw: ImageDraw.ImageDraw, top: int, tiles: list[Image.Image], frames: list[int]
) -> None:
    """Paste one row of tiles at height `top`, each stamped with its frame number."""
    for k, (tile, frame) in enumerate(zip(tiles, frames, strict=True)):
        x = ROW_LABEL_PX + k * tile.width
        sheet.paste(tile, (x, top))
        label = str(frame)
        draw.rectangle((x, top, x + draw.textlength(label) + 3, top + 11), fill=(0, 0, 0))
        draw.text((x + 2, top), label, fill=(255, 255, 0))


def _compose(blocks: Sequence[_Block], num_segments: int, tile_px: int) -> Image.Image:
    """One contact-sheet image: per block the wrapped caption, a `val` row and a `train` row of tiles."""
    width = ROW_LABEL_PX + num_segments * tile_px
    captions = [wrap_caption(block.caption, width - 4) for block in blocks]
    width, height = contact_sheet_size([len(c) for c in captions], num_segments, tile_px)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    top = 0
    for block, lines in zip(blocks, captions, strict=True):
        for k, line in enumerate(lines):
            draw.text((2, top + 1 + k * LINE_PX), line, fill=(0, 0, 0))
        rows_top = top + len(lines) * LINE_PX + CAPTION_PAD_PX
        for row, (name, tiles, frames) in enumerate(
            (("val", block.val_tiles, block.val_frames), ("train", block.train_tiles, block.train_frames))
        ):
            y = rows_top + row * tile_px
            draw.text((3, y + tile_px // 2 - 6), name, fill=(60, 60, 60))
            _draw_row(sheet, draw, y, tiles, frames)
        top = rows_top + 2 * tile_px + GAP_PX
    return sheet


def _write_sheets(
    split: _Split, cfg: ReportConfig, out_dir: Path, on_progress: Progress
) -> list[tuple[Path, list[_Entry]]]:
    """Contact-sheet PNGs of one split (`contact-<split>-NN.png`), each with the entries it shows (top to bottom)."""
    blocks, shown = _blocks(split, cfg, on_progress)
    written = []
    tile = sheet_tile_px(cfg.crop_size)
    for k, start in enumerate(range(0, len(blocks), MAX_VIDEOS_PER_SHEET)):
        image = _compose(blocks[start : start + MAX_VIDEOS_PER_SHEET], cfg.num_segments, tile)
        buf = io.BytesIO()
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        path = out_dir / f"contact-{split.name}-{k:02d}.png"
        atomic_write_bytes(path, buf.getvalue())
        written.append((path, shown[start : start + MAX_VIDEOS_PER_SHEET]))
    return written


# ----------------------------------------------------------------------------------------------------- markdown
def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _counts_section(splits: list[_Split], counts: dict[str, dict[str, int]]) -> list[str]:
    rows = []
    for s in splits:
        c = counts[s.name]
        rows.append([s.name, *(c[k] for k in COUNT_KEYS), f"{c['bytes'] / 1e6:.2f}"])
    return ["## Counts", "", *_table(["split", *COUNT_KEYS, "MB"], rows)]


def _classes_section(classes: list[str], flip_pairs: list[list[int]]) -> list[str]:
    lines = ["## Classes", "", f"classes: {len(classes)}", ""]
    if flip_pairs:
        pairs = [f"{_class_name(classes, a)} <-> {_class_name(classes, b)} ({a}/{b})" for a, b in flip_pairs]
        lines += [f"flip pairs: {len(flip_pairs)}", "", *(f"- {_cell(p)}" for p in pairs), ""]
    else:
        lines += ["flip pairs: none", ""]
    return lines


def _failures_section(splits: list[_Split], failures: dict[str, Counter[tuple[str, str]]]) -> list[str]:
    lines = ["## Failures", ""]
    rows = [[name, status, reason, n] for name, per in failures.items() for (status, reason), n in sorted(per.items())]
    if not rows:
        return [*lines, "No failures: every entry of every split is in the shards.", ""]
    lines += [*_table(["split", "status", "reason", "count"], rows), "![failures](failures.png)", ""]
    examples = [(s.name, e) for s in splits for e in s.entries if e.status != "ok"][:MAX_FAILURE_EXAMPLES]
    if examples:
        lines += ["Examples:", ""]
        lines += [f"- {name} `{e.id}` ({e.status}, {e.reason}): {_cell(e.error or '')}" for name, e in examples]
        lines.append("")
    return lines


def _sizes_section(splits: list[_Split], counts: dict[str, dict[str, int]]) -> list[str]:
    lines = ["## Frame sizes", ""]
    for s in splits:
        scanned = f"{s.shards_scanned} of {counts[s.name]['shards']} shards scanned"
        top = ", ".join(f"{w}x{h}: {n}" for (w, h), n in s.sizes.most_common(MAX_SIZES_LISTED)) or "none"
        lines.append(f"- {s.name} ({scanned}, {len(s.sizes)} distinct sizes): {top}")
    return [*lines, "", "![frame sizes](frame_sizes.png)", ""]


def _sheets_section(sheets: list[tuple[str, Path, list[_Entry]]], cfg: ReportConfig, classes: list[str]) -> list[str]:
    if not sheets:
        return []
    lines = [
        "## Contact sheets",
        "",
        f"Per video: `val` = the {cfg.num_segments} segment-centre frames after resize (short side "
        f"{cfg.scale_size}) + centre crop {cfg.crop_size}; `train` = one train-mode draw (random frame per segment "
        f"+ multi-scale crop, seed {cfg.seed}). Tiles are downscaled to {sheet_tile_px(cfg.crop_size)} px and show "
        "their 0-based frame number.",
        "",
    ]
    for split_name, path, entries in sheets:
        rows = "; ".join(f"`{e.id}` {_class_name(classes, e.label)}" for e in entries)
        lines += [f"### {split_name}: {path.name}", "", f"Rows, top to bottom: {_cell(rows)}", ""]
        lines += [f"![contact sheet {split_name}]({path.name})", ""]
    return lines


def _notes_section(splits: list[_Split], counts: dict[str, dict[str, int]]) -> list[str]:
    notes = [(s.name, n) for s in splits for n in [*_consistency_notes(s, counts[s.name]), *s.notes]]
    if not notes:
        return []
    return ["## Notes", "", *(f"- {name}: {_cell(note)}" for name, note in notes), ""]


# ------------------------------------------------------------------------------------------------- orchestrator
def _is_report_image(name: str) -> bool:
    """Whether `name` is a PNG name this module writes (the only files a re-run removes)."""
    return name in PLOT_NAMES or (name.startswith("contact-") and name.endswith(".png"))


def _remove_stale(out_dir: Path, written: list[Path]) -> None:
    """Delete PNGs of an earlier report in `out_dir` that this run did not write (only names this module uses)."""
    keep = {p.name for p in written}
    for path in out_dir.iterdir():
        if _is_report_image(path.name) and path.name not in keep and path.is_file():
            path.unlink()


def _publish(local: ReportResult, out_url: str, on_progress: Progress) -> ReportResult:
    """Upload a report written locally to the prefix `out_url`: the images, then the page (so the page never links
    an image not there yet), then remove the images of an earlier report there that this one did not write."""
    images = []
    for path in local.images:
        images.append(storage.join(out_url, path.name))
        storage.upload(path, images[-1])
    keep = {p.name for p in local.images}
    stale = [n for n in storage.list_names(out_url) if _is_report_image(n) and n not in keep]
    page = storage.join(out_url, "report.md")
    storage.upload(local.page, page)
    for name in stale:
        storage.remove(storage.join(out_url, name))
    _say(on_progress, f"uploaded {page} and {len(images)} images")
    return ReportResult(page=page, images=images, counts=local.counts)


def _find_splits(source: str) -> tuple[_Folder, list[str]]:
    """The folder and the index names to report on: every `ssv2-*.json` of a folder or prefix (one listing, which
    also gives the shard sizes), or the one index a `.json` source names (the only way into an http folder)."""
    http = storage.scheme_of(source) in ("http", "https")
    if source.endswith(".json"):
        folder, name = storage.parent(source), storage.basename(source)
        if not index_names([name]):
            raise ShardError(f"{source}: not a shard index name ({DATASET_NAME}-<split>.json)")
        return _Folder(folder, None if http else storage.list_sizes(folder)), [name]
    if http:
        raise ConfigError(
            f"{source}: an http(s) folder cannot be listed; give the URL of a shard index "
            f"({source.rstrip('/')}/{DATASET_NAME}-<split>.json)"
        )
    folder = _Folder(source, storage.list_sizes(source))
    return folder, index_names(list(folder.sizes or {}))


def _load_all(cfg: ReportConfig, on_progress: Progress) -> list[_Split]:
    folder, names = _find_splits(cfg.source)
    if not names:
        raise ShardError(f"{cfg.source}: no shard index ({DATASET_NAME}-<split>.json) found; is this a shard folder?")
    splits = [_load_split(folder, name) for name in names]
    sheets = {id(s) for s in _sheet_splits(splits)} if cfg.videos_per_class > 0 else set()
    for split in splits:
        todo = _scan_urls(split, cfg.scan_limit)
        if id(split) in sheets and split.from_manifest:  # chosen before the scan, which then reads them too
            split.chosen = _choose(split, cfg.videos_per_class, cfg.seed, set(todo))
        _scan_split(split, todo, on_progress)
    return splits


def _write_plots(
    splits: list[_Split],
    counts: dict[str, dict[str, int]],
    failures: dict[str, Counter[tuple[str, str]]],
    out_dir: Path,
) -> list[Path]:
    """The plot PNGs (the failures plot only when something failed)."""
    images = [
        _plot_videos_per_class(splits, splits[0].classes, out_dir / "videos_per_class.png"),
        _plot_frames(splits, out_dir / "frames_per_video.png"),
        _plot_sizes(splits, out_dir / "frame_sizes.png"),
        _plot_bytes(splits, counts, out_dir / "bytes.png"),
    ]
    if any(failures.values()):
        images.append(_plot_failures(failures, out_dir / "failures.png"))
    return images


def _page(
    cfg: ReportConfig,
    splits: list[_Split],
    counts: dict[str, dict[str, int]],
    failures: dict[str, Counter[tuple[str, str]]],
    sheets: list[tuple[str, Path, list[_Entry]]],
) -> str:
    """The Markdown text of report.md (images linked by file name: they sit beside it)."""
    classes = splits[0].classes
    lines = [
        f"# Dataset report: {cfg.name}",
        "",
        f"Folder: `{cfg.source}`; splits: {', '.join(s.name for s in splits)}.",
        "",
        *_counts_section(splits, counts),
        *_classes_section(classes, splits[0].index.get("flip_pairs") or []),
        "## Videos per class",
        "",
        "![videos per class](videos_per_class.png)",
        "",
        "## Frames per video",
        "",
        "![frames per video](frames_per_video.png)",
        "",
        *_sizes_section(splits, counts),
        "## Bytes",
        "",
        "![bytes](bytes.png)",
        "",
        *_failures_section(splits, failures),
        *_sheets_section(sheets, cfg, classes),
        *_notes_section(splits, counts),
    ]
    return "\n".join(lines)


def write_report(cfg: ReportConfig, *, on_progress: Callable[[str], None] | None = None) -> ReportResult:
    """Write `report.md` and its PNGs (plots and contact sheets) for the shard folder `cfg.shard_dir`.

    Re-running overwrites the page and its images (atomically) and removes images of an earlier run that no longer
    apply. Nothing is written outside `out_dir` (an object-store `out_dir` gets the files of a local temporary
    folder, one upload each); shards are read only inside the folder. Without a manifest, every
    shard of that split is scanned whatever `max_shards_scanned` says (the sample JSONs are then the only entries).

    Args:
        cfg: what to report on and the contact-sheet settings.
        on_progress: called with a one-line message per scanned shard and per written file.

    Returns:
        The page, the PNGs written and the per-split counts the page states.

    Raises:
        ConfigError: a bad setting.
        ShardError: the folder holds no shard index, or an index/manifest/class list that cannot be read, or an
            index that lists a shard outside the folder.
        OutputWriteError: `out_dir` cannot be written (full, read-only, denied).
        StorageError: an object-store `out_dir` cannot be written.
    """
    cfg.validate()
    splits = _load_all(cfg, on_progress)
    counts = {s.name: _split_counts(s) for s in splits}
    failures = {s.name: _failure_counts(s) for s in splits}
    out_url = cfg.out_url
    out_dir = cfg.resolved_out_dir if out_url is None else Path(tempfile.gettempdir())
    try:
        if out_url is None:
            return _write_outputs(cfg, out_dir, splits, counts, failures, on_progress)
        with tempfile.TemporaryDirectory(prefix="ssv2prep-report-") as tmp:  # the files to upload
            local = _write_outputs(cfg, Path(tmp), splits, counts, failures, on_progress)
            return _publish(local, out_url, on_progress)
    except OSError as exc:
        if write_problem(exc) is None:
            raise
        raise output_write_error(out_dir, exc, "cannot write the report") from exc


def _write_outputs(
    cfg: ReportConfig,
    out_dir: Path,
    splits: list[_Split],
    counts: dict[str, dict[str, int]],
    failures: dict[str, Counter[tuple[str, str]]],
    on_progress: Callable[[str], None] | None,
) -> ReportResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _write_plots(splits, counts, failures, out_dir)
    _say(on_progress, f"wrote {len(images)} plots to {out_dir}")
    sheets: list[tuple[str, Path, list[_Entry]]] = []
    if cfg.videos_per_class > 0:
        for split in _sheet_splits(splits):
            sheets += [(split.name, path, shown) for path, shown in _write_sheets(split, cfg, out_dir, on_progress)]
    images += [path for _, path, _ in sheets]
    page = out_dir / "report.md"
    atomic_write_text(page, _page(cfg, splits, counts, failures, sheets) + "\n")
    _remove_stale(out_dir, images)
    _say(on_progress, f"wrote {page}")
    return ReportResult(page=page, images=images, counts=counts)
