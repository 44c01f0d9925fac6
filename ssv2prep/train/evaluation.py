"""`ssv2prep eval`: score a checkpoint (ours or an official `.pth`) on a held-out split, at one or more fidelities.

Scores are the plain mean of raw logits over crops x clips (the official test protocol). Rank 0 writes, into the
output folder: `report.json`, `per_class.csv`, `confusion.npy`, `confusion.png`, optionally the submission file
(`id;c1;c2;c3;c4;c5`, top-5 class indices), and with several settings `grid.md` / `grid.csv`.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from ssv2prep.train.dist import DistInfo, init_distributed, teardown
from ssv2prep.train.loop import StepContext, evaluate
from ssv2prep.train.metrics import EvalMetrics, video_metrics
from ssv2prep.train.report import markdown_table
from ssv2prep.train.run import amp_dtype

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
    amp: str = "auto"
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


def load_for_eval(path: Path, segments: int | None) -> tuple[nn.Module, Any, list[str] | None]:
    """(model in eval mode on CPU, its ModelConfig, class names when the checkpoint has them).

    Our checkpoints carry their model config and classes; an official `.pth` is read by `load_official`, its
    settings taken from the file name.
    """
    from ssv2prep.models.official import load_official
    from ssv2prep.models.tsm import ModelConfig, build_tsm, load_model_state
    from ssv2prep.train.checkpoint import is_ours, load_checkpoint

    overrides = {"num_segments": segments} if segments else {}
    if not is_ours(path):
        model, cfg = load_official(path, overrides)
        return model.eval(), cfg, None
    ckpt = load_checkpoint(path)
    cfg = replace(ModelConfig(**ckpt["model_config"]), weights=None, **overrides)  # type: ignore[arg-type]
    model = build_tsm(cfg)
    load_model_state(model, ckpt["model"], source=path)
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
    model_cfg: Any,
    source: Any,
    crops: int,
    clips: int,
    ctx: StepContext,
    on_batch: Callable[[int], None] | None,
) -> Any:
    from ssv2prep.data.loader import build_eval_loader

    loader = build_eval_loader(
        source,
        _data_config(cfg, model_cfg),
        crops=crops,
        clips=10 if cfg.dense else clips,
        full_res=cfg.full_res,
        mode="test",  # the official test protocol (test_models.py sampling), as opposed to per-epoch validation
        rank=ctx.dist.rank,
        world_size=ctx.dist.world_size,
    )
    return evaluate(model, loader, ctx=ctx, on_batch=on_batch)


def _classes(source: Any, from_ckpt: list[str] | None, num_classes: int, spec: str) -> list[str]:
    where = source.index_url or spec
    if source.num_classes is not None and source.num_classes != num_classes:
        raise ConfigError(
            f"{where}: the index has {source.num_classes} classes but the checkpoint predicts {num_classes}"
        )
    classes = list(source.classes) if source.classes else from_ckpt
    if classes is None:  # never made-up names: the per-class report would attach them to the wrong videos
        raise ConfigError(
            f"{where}: no class names: the index carries none (no class_names in it, no class list beside it) and "
            "the checkpoint has none; keep classes.json beside the index"
        )
    if len(classes) != num_classes:
        raise ConfigError(f"the data has {len(classes)} classes but the checkpoint predicts {num_classes}")
    if from_ckpt is not None and source.classes and list(source.classes) != from_ckpt:
        log.warning("the class names of the data differ from the checkpoint's; using the data's")
    return classes


def confusion_png(cm: np.ndarray, title: str) -> bytes:
    """A confusion-matrix heat map (rows: true class, columns: predicted) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = min(12.0, 3.0 + cm.shape[0] * 0.08)
    fig, ax = plt.subplots(figsize=(size, size))
    rows = np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(cm / rows, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
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


def _write_reports(
    cfg: EvalConfig, rows: list[dict[str, Any]], first: tuple[Any, EvalMetrics], classes: list[str]
) -> None:
    out, m = first
    cfg.out.mkdir(parents=True, exist_ok=True)
    np.save(cfg.out / "confusion.npy", m.confusion)
    atomic_write_bytes(cfg.out / "confusion.png", confusion_png(m.confusion, f"{cfg.checkpoint.name}"))
    atomic_write_text(cfg.out / "per_class.csv", _per_class_csv(m, classes))
    if cfg.predictions is not None:
        atomic_write_text(cfg.predictions, submission_lines(out.keys, out.scores))
    report = {"checkpoint": str(cfg.checkpoint), "data": cfg.data, "settings": rows}
    atomic_write_json(cfg.out / "report.json", report)
    if len(rows) > 1:
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
        atomic_write_text(cfg.out / "grid.md", markdown_table(headers, table) + "\n")
        atomic_write_text(
            cfg.out / "grid.csv",
            ",".join(headers) + "\n" + "".join(",".join(str(c) for c in row) + "\n" for row in table),
        )


def evaluate_checkpoint(cfg: EvalConfig, *, on_batch: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Evaluate at every (crops, clips) setting; returns one result row per setting (same on every rank)."""
    from ssv2prep.data.source import resolve_source

    cfg.validate()
    info = init_distributed(cfg.device)
    try:
        model, model_cfg, ckpt_classes = load_for_eval(cfg.checkpoint, cfg.segments)
        source = resolve_source(cfg.data, index=cfg.index)
        classes = _classes(source, ckpt_classes, model_cfg.num_classes, cfg.data)
        return _evaluate_all(cfg, info, model.to(info.device), model_cfg, source, classes, on_batch)
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
    ctx = StepContext(dist=info, amp_dtype=amp_dtype(cfg.amp, info.device))
    rows, first = [], None
    for crops, clips in cfg.settings:
        out = _one_setting(cfg, model, model_cfg, source, crops, clips, ctx, on_batch)
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
            }
        )
    if info.is_main and first is not None:
        _write_reports(cfg, rows, first, classes)
    return rows
