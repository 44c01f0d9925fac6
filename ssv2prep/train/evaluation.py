"""`ssv2prep eval`: score a checkpoint (ours or an official `.pth`) on a held-out split, at one or more fidelities.

Scores are the plain mean of raw logits over crops x clips (the official test protocol), computed in fp32 (no TF32)
as the official test does unless `amp` asks for autocast (the precision is recorded in `report.json`). Rank 0
writes, into the output folder: `report.json`, `per_class.csv`, `confusion.npy`, `confusion.png`, optionally the
submission file (`id;c1;c2;c3;c4;c5`, top-5 class indices; always, as `predictions.csv`, for a split without
labels), and with several settings `grid.md` / `grid.csv`. Every destination is checked for writability before the
(long) scoring starts, and a failed write removes the files written so far: an error leaves no partial report.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssv2prep.errors import CheckpointError, ConfigError, ShardError
from ssv2prep.fsutil import atomic_write_bytes, make_temp
from ssv2prep.train.config import AMP_MODES
from ssv2prep.train.dist import DistInfo, broadcast_object, init_distributed, on_main, teardown
from ssv2prep.train.loop import StepContext, evaluate
from ssv2prep.train.metrics import EvalMetrics, video_metrics
from ssv2prep.train.report import markdown_table
from ssv2prep.train.runtime import amp_dtype, check_device, exact_fp32, precision_name, use_channels_last

log = logging.getLogger(__name__)

CROPS = (1, 3, 5, 10)
CLIPS = (1, 2)


@dataclass(frozen=True, slots=True)
class EvalConfig:
    """Options of `ssv2prep eval`."""

    checkpoint: Path
    data: str
    out: Path
    index: str | None = None
    settings: tuple[tuple[int, int], ...] = ((1, 1),)  # (crops, clips) pairs; more than one = a grid
    segments: int | None = None  # None: what the model was trained with
    dense: bool = False
    full_res: bool = False
    batch_size: int = 4
    workers: int = 2
    scale_size: int | None = None  # None: as the checkpoint was trained (256 for official files)
    crop_size: int | None = None  # None: as trained (224 for official files)
    predictions: Path | None = None
    device: str = "auto"
    amp: str = "off"  # fp32 by default: autocast moves logits by about an off-by-one frame's worth
    channels_last: bool | None = None  # None: on for CUDA, as in training
    cache_dir: Path | None = None  # local copies of streamed shards (see ssv2prep.data.cache)
    cache_size_bytes: int = 100 << 30
    cache_verify: str = "md5"

    def validate(self) -> None:
        """Raise ConfigError on a bad value."""
        for crops, clips in self.settings:
            if crops not in CROPS or clips not in CLIPS:
                raise ConfigError(f"--crops must be one of {list(CROPS)} and --clips one of {list(CLIPS)}")
        if self.batch_size < 1 or self.workers < 0:
            raise ConfigError("--batch-size must be >= 1 and --workers >= 0")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp must be one of {list(AMP_MODES)}, got {self.amp!r}")


def eval_context(
    model: nn.Module, info: DistInfo, *, amp: str = "off", channels_last: bool | None = None
) -> tuple[nn.Module, StepContext]:
    """(the model in the memory layout it scores in, the StepContext of scoring) on `info.device`.

    `channels_last` None means on for CUDA, as in training (`use_channels_last`). The layout changes no logit beyond
    float rounding.
    """
    use = use_channels_last(channels_last, info.device)
    model = model.to(info.device, memory_format=torch.channels_last) if use else model.to(info.device)
    return model, StepContext(dist=info, amp_dtype=amp_dtype(amp, info.device), channels_last=use)


def load_for_eval(path: Path, segments: int | None) -> tuple[nn.Module, Any, list[str] | None]:
    """(model in eval mode on CPU, its ModelConfig, class names when the checkpoint has them).

    Our checkpoints carry their model config and classes; an official `.pth` is read by `load_official`, its
    settings taken from the file name.
    """
    from ssv2prep.models.official import build_for_checkpoint, load_official
    from ssv2prep.models.tsm import ModelConfig, load_model_state
    from ssv2prep.train.checkpoint import is_ours, load_checkpoint

    overrides = {"num_segments": segments} if segments else {}
    if not is_ours(path):  # also for a corrupt file: load_official reads it first and says what is wrong with it
        model, cfg = load_official(path, overrides)
        return model.eval(), cfg, None
    ckpt = load_checkpoint(path)
    cfg = replace(ModelConfig(**ckpt["model_config"]), weights=None, **overrides)  # type: ignore[arg-type]
    model = build_for_checkpoint(cfg)
    load_model_state(model, ckpt["model"], source=path)
    best = float(ckpt.get("best_top1", -1.0))
    log.info(
        "loaded %s: %s, %d classes, %d frames, shift %s, trained %d epochs (best val top-1 %s)",
        path,
        cfg.backbone,
        cfg.num_classes,
        cfg.num_segments,
        f"1/{cfg.shift_div} {cfg.shift_mode} {cfg.shift_place}" if cfg.shift_div else "none (TSN)",
        int(ckpt.get("epoch", 0)),
        f"{best:.2f}%" if best >= 0 else "n/a",
    )
    return model.eval(), cfg, list(ckpt["classes"])


def trained_sizes(path: Path, crop_size: int | None = None, scale_size: int | None = None) -> tuple[int, int]:
    """(crop_size, scale_size) for evaluating a checkpoint: the given ones, else those it was trained with (the
    official 224 / 256 for official files). Reads only the checkpoint's metadata."""
    from ssv2prep.train.checkpoint import load_checkpoint

    if crop_size and scale_size:
        return crop_size, scale_size
    try:
        data = load_checkpoint(path, mmap=True)["config"]["data"]
        trained = int(data["crop_size"]), int(data["scale_size"])
    except CheckpointError:
        trained = 224, 256
    return crop_size or trained[0], scale_size or trained[1]


def _data_config(cfg: EvalConfig, model_cfg: Any) -> Any:
    from ssv2prep.data.loader import DataConfig

    crop, scale = trained_sizes(cfg.checkpoint, cfg.crop_size, cfg.scale_size)
    return DataConfig(
        num_segments=model_cfg.num_segments,
        crop_size=crop,
        scale_size=scale,
        dense=cfg.dense,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        cache_dir=cfg.cache_dir,
        cache_size_bytes=cfg.cache_size_bytes,
        cache_verify=cfg.cache_verify,
    )


def _one_setting(
    cfg: EvalConfig,
    model: nn.Module,
    data_cfg: Any,
    source: Any,
    crops: int,
    clips: int,
    ctx: StepContext,
    on_batch: Callable[[int], None] | None,
) -> Any:
    from ssv2prep.data.loader import build_eval_loader

    loader = build_eval_loader(
        source,
        data_cfg,
        crops=crops,
        clips=10 if cfg.dense else clips,
        full_res=cfg.full_res,
        mode="test",  # the official test protocol (test_models.py sampling), as opposed to per-epoch validation
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
    )
    return evaluate(model, loader, ctx=ctx, on_batch=on_batch)


def _classes(source: Any, from_ckpt: list[str] | None, num_classes: int, checkpoint: Path) -> list[str]:
    """The class names to report with; ConfigError when the data's labels mean other classes than the model's,
    or when no names are known at all (never made up: the per-class report would name the wrong classes)."""
    where = source.index_url or "the data"
    if source.num_classes is not None and source.num_classes != num_classes:
        raise ConfigError(
            f"{where}: the index has {source.num_classes} classes but the checkpoint predicts {num_classes}"
        )
    data_names = list(source.classes) if source.classes else None
    classes = data_names or from_ckpt
    if classes is None:
        raise ConfigError(
            f"{where}: no class names: the index carries none (no class_names in it, no class list beside it) and "
            f"the checkpoint ({checkpoint}) has none; keep classes.json beside the index"
        )
    if len(classes) != num_classes:
        where = class_list_source(source) if data_names else str(checkpoint)
        raise ConfigError(f"the data has {len(classes)} classes ({where}) but the checkpoint predicts {num_classes}")
    if from_ckpt is not None and data_names is not None and data_names != from_ckpt:
        # Label i of the data would be scored against output i of the model: with other names there, every
        # accuracy would be silently wrong.
        first = next(i for i, (a, b) in enumerate(zip(data_names, from_ckpt, strict=True)) if a != b)
        how = "the same names in another order" if sorted(data_names) == sorted(from_ckpt) else "other names"
        raise ConfigError(
            f"the class list of the data ({class_list_source(source)}) and that of the checkpoint ({checkpoint}) "
            f"differ: {how}, first at index {first} ({data_names[first]!r} vs {from_ckpt[first]!r}); labels would "
            "be scored against the wrong classes (shard the data with the checkpoint's classes.json order)"
        )
    return classes


def class_list_source(source: Any) -> str:
    """Where a shard source's class names were read from, for messages."""
    return source.classes_from or source.index_url or "the data's class list"


CONFUSION_NAMES_UP_TO = 40  # class names on the heat map's axes up to this many classes; indices above
MOST_CONFUSED = 25  # pairs listed in most_confused.csv / .png


def confusion_figure(cm: np.ndarray, classes: list[str], title: str) -> Any:
    """A row-normalised confusion heat map (rows: true class, columns: predicted) with its colour bar, as a
    matplotlib Figure. Class names label the axes up to `CONFUSION_NAMES_UP_TO` classes, indices beyond."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    k = cm.shape[0]
    named = k <= CONFUSION_NAMES_UP_TO
    size = min(14.0, 4.0 + k * (0.3 if named else 0.06))
    fig = Figure(figsize=(size + (2.0 if named else 1.0), size + (1.5 if named else 0.0)), dpi=90, layout="constrained")
    ax = fig.add_subplot()
    rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(cm / rows, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("share of the true class (each row sums to 1)")
    if named:
        names = [textwrap.shorten(c, 45, placeholder="...") for c in classes]
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    else:
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.set_xlabel("predicted class" + ("" if named else " (index)"))
    ax.set_ylabel("true class" + ("" if named else " (index)"))
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    return fig


def most_confused(cm: np.ndarray, classes: list[str], limit: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The off-diagonal cells with the largest share of their true class, largest first (ties: more videos first):
    `true`, `predicted` (names), `videos`, `percent` of the true class's videos."""
    rows = cm.sum(axis=1)
    cells = [
        (cm[t, p] / rows[t], int(cm[t, p]), t, p)
        for t in range(cm.shape[0])
        for p in range(cm.shape[1])
        if t != p and cm[t, p] > 0
    ]
    cells.sort(key=lambda c: (-c[0], -c[1], c[2], c[3]))
    return [
        {"true": classes[t], "predicted": classes[p], "videos": n, "percent": round(100 * share, 2)}
        for share, n, t, p in cells[:limit]
    ]


def most_confused_figure(pairs: list[dict[str, Any]], title: str) -> Any:
    """Horizontal bars "true -> predicted", length = % of the true class's videos, value on every bar."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 1.2 + 0.32 * max(1, len(pairs))), dpi=90)
    ax = fig.add_subplot()
    labels = [f"{p['true']} -> {p['predicted']}" for p in pairs]
    bars = ax.barh(range(len(pairs)), [p["percent"] for p in pairs], color="tab:red")
    ax.bar_label(bars, labels=[f"{p['percent']:.1f}% ({p['videos']})" for p in pairs], fontsize=8)
    ax.set_yticks(range(len(pairs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max([p["percent"] for p in pairs], default=1) * 1.2)
    ax.set_xlabel("% of the true class's videos predicted as the other class (videos)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _most_confused_csv(pairs: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["true", "predicted", "videos", "percent_of_true"])
    writer.writerows([p["true"], p["predicted"], p["videos"], p["percent"]] for p in pairs)
    return buf.getvalue()


def _per_class_csv(m: EvalMetrics, classes: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "class", "videos", "correct", "accuracy"])
    for i, name in enumerate(classes):
        n, c = int(m.confusion[i].sum()), int(m.confusion[i, i])
        writer.writerow([i, name, n, c, f"{c / n:.4f}" if n else ""])
    return buf.getvalue()


def submission_lines(keys: list[str], scores: np.ndarray) -> str:
    """`id;c1;c2;c3;c4;c5` per video: the top-5 class indices, best first (the official SSv2 format)."""
    top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    return "".join(f"{k};{';'.join(str(int(c)) for c in row)}\n" for k, row in zip(keys, top5, strict=True))


def predictions_file(cfg: EvalConfig, rows: list[dict[str, Any]]) -> Path | None:
    """Where the per-video predictions go: `--predictions`, else `<out>/predictions.csv` when the split has no
    labels (predictions are then the only result), else nowhere."""
    if cfg.predictions is not None:
        return cfg.predictions
    if rows and rows[0]["labelled"] == 0:
        return cfg.out / "predictions.csv"
    return None


def _unwritable(target: Path, folder: Path, option: str) -> str | None:
    """Why `target` cannot be created in `folder` (a one-line message naming `option`), or None.

    Probes by creating `folder` and a temp file in it, and removes both again: it leaves nothing behind.
    """
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{option} {target}: cannot write there ({blocker} is a file, not a folder)"
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = make_temp(folder / "probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"{option} {target}: cannot write there ({exc.strerror or exc})"
    finally:
        for made in created:  # deepest first; the reports create them again when they are written
            with contextlib.suppress(OSError):
                made.rmdir()
    return None


def _check_outputs(cfg: EvalConfig, info: DistInfo) -> None:
    """ConfigError on every rank, before the scoring, when rank 0 could not write the reports at the end."""
    problem = None
    if info.is_main:
        problem = _unwritable(cfg.out, cfg.out, "--out")
        if problem is None and cfg.predictions is not None:
            problem = _unwritable(cfg.predictions, cfg.predictions.parent, "--predictions")
    problem = broadcast_object(problem, info)
    if problem:
        raise ConfigError(problem)


def _write_all(files: list[tuple[Path, bytes, str]]) -> None:
    """Write every `(path, bytes, option)` atomically; on a failure remove what this call wrote, and raise
    ConfigError naming the option and the path."""
    written: list[Path] = []
    created = {p for path, _, _ in files for p in (path.parent, *path.parent.parents) if not p.exists()}
    try:
        for path, data, option in files:
            try:
                atomic_write_bytes(path, data)
            except OSError as exc:
                raise ConfigError(f"{option} {path}: cannot write it ({exc.strerror or exc})") from exc
            written.append(path)
    except ConfigError:
        for path in written:
            path.unlink(missing_ok=True)
        for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _report_files(
    cfg: EvalConfig, rows: list[dict[str, Any]], first: tuple[Any, EvalMetrics], classes: list[str]
) -> list[tuple[Path, bytes, str]]:
    out, m = first
    npy = io.BytesIO()
    np.save(npy, m.confusion)
    predictions = predictions_file(cfg, rows)
    report = {
        "checkpoint": str(cfg.checkpoint),
        "data": cfg.data,
        "precision": rows[0]["precision"],
        "predictions": str(predictions) if predictions else None,
        "settings": rows,
    }
    row = rows[0]
    title = (
        f"{cfg.checkpoint.name} on {cfg.data.rstrip('/').rsplit('/', 1)[-1]}: top-1 {m.top1:.1f}% of "
        f"{m.num_videos} videos, {row['crops']} crop x {row['clips']} clip"
    )
    pairs = most_confused(m.confusion, classes)
    files = [
        (cfg.out / "confusion.npy", npy.getvalue(), "--out"),
        (cfg.out / "confusion.png", _png(confusion_figure(m.confusion, classes, title)), "--out"),
        (cfg.out / "most_confused.csv", _most_confused_csv(pairs).encode(), "--out"),
        (cfg.out / "most_confused.png", _png(most_confused_figure(pairs, f"most confused pairs ({title})")), "--out"),
        (cfg.out / "per_class.csv", _per_class_csv(m, classes).encode(), "--out"),
    ]
    if predictions is not None:
        option = "--predictions" if cfg.predictions is not None else "--out"
        files.append((predictions, submission_lines(out.keys, out.scores).encode(), option))
    if len(rows) > 1:
        files += [(cfg.out / name, text.encode(), "--out") for name, text in _grid_tables(rows).items()]
    files.append((cfg.out / "report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode(), "--out"))
    return files


def _grid_tables(rows: list[dict[str, Any]]) -> dict[str, str]:
    headers = ["crops", "clips", "views", "videos", "top1", "top5", "mean class acc", "s/video"]
    table = [
        [
            r["crops"],
            r["clips"],
            r["crops"] * r["clips"],
            r["videos"],
            f"{r['top1']:.2f}",
            f"{r['top5']:.2f}",
            f"{r['mean_class_accuracy']:.2f}",
            f"{r['seconds_per_video']:.4f}",
        ]
        for r in rows
    ]
    return {
        "grid.md": markdown_table(headers, table) + "\n",
        "grid.csv": ",".join(headers) + "\n" + "".join(",".join(str(c) for c in row) + "\n" for row in table),
    }


def evaluate_checkpoint(cfg: EvalConfig, *, on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate at every (crops, clips) setting; returns one result row per setting (same on every rank).

    Raises:
        ConfigError: bad options, an unwritable `--out` / `--predictions` (found before scoring), or data whose
            class list differs from the checkpoint's.
        ShardError: a split with no samples.
        CheckpointError: a checkpoint that cannot be read or built.
    """
    from ssv2prep.data.source import resolve_source

    cfg.validate()
    check_device(cfg.device)
    source = resolve_source(cfg.data, index=cfg.index)
    if not source.urls or source.num_samples == 0:
        raise ShardError(f"{cfg.data}: 0 samples to evaluate (the split is empty)")
    info = init_distributed(cfg.device)
    try:
        model, model_cfg, ckpt_classes = load_for_eval(cfg.checkpoint, cfg.segments)
        classes = _classes(source, ckpt_classes, model_cfg.num_classes, cfg.checkpoint)
        _check_outputs(cfg, info)
        return _evaluate_all(cfg, info, model, model_cfg, source, classes, on_batch)  # eval_context places it
    finally:
        teardown(info)


def _evaluate_all(
    cfg: EvalConfig,
    info: DistInfo,
    model: nn.Module,
    model_cfg: Any,
    source: Any,
    classes: list[str],
    on_batch: Callable[[int], None] | None,
) -> list[dict[str, Any]]:
    model, ctx = eval_context(model, info, amp=cfg.amp, channels_last=cfg.channels_last)
    precision = precision_name(ctx.amp_dtype)
    if cfg.amp != "off" and ctx.amp_dtype is None:
        log.info("--amp has no effect on %s: evaluating in fp32", info.device)
    log.info("evaluating on %s in %s", info.device, precision)
    rows, first = [], None
    data_cfg = _data_config(cfg, model_cfg)  # the same for every setting (it reads the checkpoint's sizes)
    for crops, clips in cfg.settings:
        with exact_fp32(ctx.amp_dtype is None):
            out = _one_setting(cfg, model, data_cfg, source, crops, clips, ctx, on_batch)
        if not out.keys:
            raise ShardError(f"{cfg.data}: 0 samples were read (the shards hold none the loader could use)")
        m = video_metrics(out.scores, out.labels, len(classes))
        first = first or (out, m)
        rows.append(
            {
                "crops": crops,
                "clips": clips,
                "segments": model_cfg.num_segments,
                "videos": len(out.keys),
                "labelled": m.num_videos,
                "top1": m.top1,
                "top5": m.top5,
                "mean_class_accuracy": m.mean_class_accuracy,
                "skipped": out.skipped,
                "seconds_per_video": out.seconds / max(1, len(out.keys)),
                "full_res": cfg.full_res,
                "dense": cfg.dense,
                "precision": precision,
            }
        )
    if first is not None:
        # Every rank leaves with rank 0's outcome: the others do not exit (and tear the process group down) while
        # rank 0 is still writing, and a failed write fails the whole job, not rank 0 alone.
        written = first
        on_main(info, "write the reports", lambda: _write_all(_report_files(cfg, rows, written, classes)))
    return rows
