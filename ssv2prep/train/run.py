"""`fit(cfg)`: the training orchestrator.

Order: dist init -> seed -> loaders -> model -> optimizer -> DDP wrap -> resume -> epoch loop (train, evaluate,
checkpoint, plots) -> teardown. Only rank 0 writes files; every rank runs the same number of steps.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.fsutil import atomic_write_json, make_temp
from ssv2prep.train.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ssv2prep.train.config import TrainConfig
from ssv2prep.train.dist import DistInfo, barrier, init_distributed, teardown
from ssv2prep.train.loop import StepContext, evaluate, sum_meter, train_one_epoch
from ssv2prep.train.metrics import Meter, video_metrics
from ssv2prep.train.report import MetricsLog, plot_run
from ssv2prep.train.schedule import lr_factor, scaled_lr

log = logging.getLogger(__name__)

ARCH_KEYS = ("backbone", "num_classes", "num_segments", "shift_div", "shift_mode", "shift_place")


@dataclass(slots=True)
class FitState:
    """Mutable progress of a run (what a checkpoint restores)."""

    epoch: int = 0  # epochs completed
    global_step: int = 0
    best_top1: float = -1.0
    epoch_step: int = 0  # steps of the current epoch done (a mid-epoch checkpoint; 0 at epoch boundaries)
    epoch_meter: dict[str, dict[str, float]] | None = None  # that epoch's running sums, to finish its means
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FitResult:
    """What `fit` produced."""

    run_dir: Path
    epochs: int
    global_step: int
    best_top1: float | None
    last_eval: dict[str, Any] | None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None on CPU or when off; bf16 where CUDA supports it, else fp16 (needs a scaler)."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_loaders(cfg: TrainConfig, info: DistInfo) -> tuple[Any, Any, Any]:
    """(train loader, val loader or None, train source) for this rank."""
    from ssv2prep.data.loader import build_eval_loader, build_train_loader
    from ssv2prep.data.source import resolve_source

    source = resolve_source(cfg.train, index=cfg.train_index)
    train = build_train_loader(source, cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.runtime.seed)
    train_classes(source, cfg.train)
    val = None
    if cfg.val:
        val_source = resolve_source(cfg.val, index=cfg.val_index)
        check_val_classes(source, val_source, cfg.val)
        val = build_eval_loader(val_source, cfg.data, rank=info.rank, world_size=info.world_size)
    return train, val, source


def train_classes(source: Any, spec: str) -> list[str]:
    """The train index's class names, one head output each; a `ConfigError` naming the index when it has none
    (names are never made up: a head of the wrong size would train, and its labels would mean nothing)."""
    if not source.classes:
        raise ConfigError(
            f"{source.index_url or spec}: the index does not carry its classes (no class_names in it and no class "
            "list beside it): keep classes.json beside the index, or re-shard with this version"
        )
    return list(source.classes)


def check_val_classes(train: Any, val: Any, spec: str) -> None:
    """Validation labels are indices into the train head: refuse a validation index of other classes (before
    the first step rather than after an epoch)."""
    where = val.index_url or spec
    if val.num_classes is not None and val.num_classes != train.num_classes:
        raise ConfigError(
            f"--val {where}: {val.num_classes} classes, but the train index {train.index_url} has "
            f"{train.num_classes} (the size of the head); give the validation index of the same shard folder"
        )
    if val.classes and train.classes and tuple(val.classes) != tuple(train.classes):
        first = next(i for i, (a, b) in enumerate(zip(val.classes, train.classes, strict=True)) if a != b)
        raise ConfigError(
            f"--val {where}: class {first} is {val.classes[first]!r} there but {train.classes[first]!r} in the train "
            f"index {train.index_url}; give the validation index of the same shard folder"
        )


def build_model(cfg: TrainConfig, classes: list[str] | None, info: DistInfo) -> nn.Module:
    """The TSM of `cfg.model` with K = the index's class count, on this rank's device."""
    from dataclasses import replace

    from ssv2prep.models.tsm import build_tsm

    model_cfg = cfg.model if classes is None else replace(cfg.model, num_classes=len(classes))
    model = build_tsm(model_cfg).to(info.device)
    if cfg.runtime.channels_last or (cfg.runtime.channels_last is None and info.device.type == "cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: TrainConfig, model: nn.Module, info: DistInfo) -> tuple[torch.optim.Optimizer, float]:
    """SGD over the official parameter groups; returns (optimizer, base lr after batch scaling)."""
    from ssv2prep.models.tsm import param_groups

    total_batch = cfg.data.batch_size * info.world_size
    base_lr = scaled_lr(cfg.optim.lr, total_batch) if cfg.optim.scale_lr else cfg.optim.lr
    fc_lr5 = cfg.optim.fc_lr5 if cfg.optim.fc_lr5 is not None else cfg.model.weights is not None
    groups = param_groups(model, lr=base_lr, weight_decay=cfg.optim.weight_decay, fc_lr5=fc_lr5)  # type: ignore[arg-type]
    optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    return optimizer, base_lr


def _lr_setter(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, base_lr: float, steps: int
) -> Callable[[int], float]:
    o = cfg.optim

    def set_lr(step: int) -> float:
        lr = base_lr * lr_factor(
            step,
            steps_per_epoch=steps,
            epochs=o.epochs,
            schedule=o.lr_schedule,
            lr_steps=o.lr_steps,
            warmup_epochs=o.warmup_epochs,
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
            group["weight_decay"] = o.weight_decay * group.get("decay_mult", 1.0)
        return lr

    return set_lr


def _checkpoint_state(
    model: nn.Module,
    optimizer: Any,
    scaler: Any,
    state: FitState,
    cfg: TrainConfig,
    classes: list[str],
    *,
    steps_per_epoch: int,
) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": state.epoch,
        "global_step": state.global_step,
        "best_top1": state.best_top1,
        "epoch_step": state.epoch_step,
        "epoch_meter": state.epoch_meter,
        "steps_per_epoch": steps_per_epoch,
        "config": cfg.to_dict(),
        "model_config": model.cfg.to_dict(),  # type: ignore[union-attr]
        "classes": classes,
        "rng": rng_state(),
    }


def _resume(
    run_dir: Path, model: nn.Module, optimizer: Any, scaler: Any, metrics: MetricsLog, *, steps_per_epoch: int
) -> FitState:
    path = run_dir / "last.pt"
    if not path.is_file():
        return FitState()
    ckpt = load_checkpoint(path)
    check_compatible(ckpt["model_config"], model.cfg.to_dict(), ARCH_KEYS)  # type: ignore[union-attr]
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({' '.join(str(exc).split())[:300]})") from exc
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    epoch_step, global_step, meter = int(ckpt.get("epoch_step", 0)), int(ckpt["global_step"]), ckpt.get("epoch_meter")
    saved_steps = int(ckpt.get("steps_per_epoch", steps_per_epoch))
    metrics.truncate_after(global_step if saved_steps == steps_per_epoch else global_step - epoch_step)
    if saved_steps != steps_per_epoch:
        # Another world size or batch size: steps mean something else now. Count the lr schedule in the new
        # steps from the last finished epoch, and restart an interrupted epoch from its beginning.
        log.warning(
            "%s was saved with %d steps per epoch, this run has %d (world size or batch size changed): continuing "
            "from the start of epoch %d (the lr schedule counts in the new steps)",
            path,
            saved_steps,
            steps_per_epoch,
            ckpt["epoch"] + 1,
        )
        epoch_step, global_step, meter = 0, ckpt["epoch"] * steps_per_epoch, None
    log.info(
        "resuming %s at epoch %d, step %d of it (step %d overall)",
        run_dir,
        ckpt["epoch"],
        epoch_step,
        global_step,
    )
    return FitState(
        epoch=ckpt["epoch"],
        global_step=global_step,
        best_top1=ckpt["best_top1"],
        epoch_step=epoch_step,
        epoch_meter=meter,
    )


def _save(run_dir: Path, ckpt: dict[str, Any], *, best: bool) -> None:
    save_checkpoint(run_dir / "last.pt", ckpt)
    if best:
        fd, tmp = make_temp(run_dir / "best.pt")
        os.close(fd)
        os.unlink(tmp)
        os.link(run_dir / "last.pt", tmp)  # a hard link: the next last.pt is a new file, best.pt keeps this one
        os.replace(tmp, run_dir / "best.pt")


def _eval_record(out: Any, classes: list[str], epoch: int, step: int) -> dict[str, Any]:
    m = video_metrics(out.scores, out.labels, len(classes))
    return {
        "kind": "eval",
        "epoch": epoch,
        "step": step,
        "top1": m.top1,
        "top5": m.top5,
        "mean_class_accuracy": m.mean_class_accuracy,
        "videos": m.num_videos,
        "skipped": out.skipped,
        "seconds": out.seconds,
    }


def fit(cfg: TrainConfig, *, on_event: Callable[[str, dict[str, Any]], None] | None = None) -> FitResult:
    """Train (or resume) the run in `cfg.out`. `on_event(kind, data)`: "start", "step", "epoch", "eval"."""
    emit = on_event or (lambda _kind, _data: None)
    cfg.validate()
    info = init_distributed(cfg.runtime.device)
    try:
        return _fit(cfg, info, emit)
    finally:
        teardown(info)


def _fit(cfg: TrainConfig, info: DistInfo, emit: Callable[[str, dict[str, Any]], None]) -> FitResult:
    _seed_everything(cfg.runtime.seed)
    train_loader, val_loader, source = build_loaders(cfg, info)
    classes = train_classes(source, cfg.train)
    model = build_model(cfg, classes, info)
    optimizer, base_lr = build_optimizer(cfg, model, info)
    dtype = amp_dtype(cfg.runtime.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)
    run_dir = cfg.out
    metrics = MetricsLog(run_dir, enabled=info.is_main)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", cfg.to_dict() | {"classes": classes, "base_lr": base_lr})
    state = _resume(run_dir, model, optimizer, scaler, metrics, steps_per_epoch=len(train_loader))
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None
        )
    if cfg.runtime.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    ctx = StepContext(
        dist=info,
        amp_dtype=dtype,
        log_every=cfg.runtime.log_every,
        clip_grad=cfg.optim.clip_grad,
        channels_last=cfg.runtime.channels_last or (cfg.runtime.channels_last is None and info.device.type == "cuda"),
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    set_lr = _lr_setter(cfg, optimizer, base_lr, len(train_loader))
    emit(
        "start",
        {
            "epochs": cfg.optim.epochs,
            "start_epoch": state.epoch,
            "steps_per_epoch": len(train_loader),
            "world_size": info.world_size,
            "batch_size": cfg.data.batch_size,
            "base_lr": base_lr,
            "device": str(info.device),
            "amp": str(dtype),
            "classes": len(classes),
        },
    )
    last_eval = None
    for epoch in range(state.epoch, cfg.optim.epochs):
        last_eval = (
            _run_epoch(
                epoch,
                net,
                model,
                train_loader,
                val_loader,
                optimizer,
                scaler,
                criterion,
                set_lr,
                ctx,
                state,
                metrics,
                cfg,
                classes,
                emit,
            )
            or last_eval
        )
    metrics.close()
    barrier(info)
    return FitResult(
        run_dir, state.epoch, state.global_step, state.best_top1 if state.best_top1 >= 0 else None, last_eval
    )


def _run_epoch(
    epoch: int,
    net: nn.Module,
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    optimizer: Any,
    scaler: Any,
    criterion: nn.Module,
    set_lr: Callable[[int], float],
    ctx: StepContext,
    state: FitState,
    metrics: MetricsLog,
    cfg: TrainConfig,
    classes: list[str],
    emit: Callable[[str, dict[str, Any]], None],
) -> dict[str, Any] | None:
    skip, state.epoch_step = state.epoch_step, 0  # resuming mid-epoch: the steps of this epoch already done
    train_loader.set_epoch(epoch, skip=skip)
    # The saved sums are already totals over all ranks: one rank carries them on, or they would count twice.
    saved, state.epoch_meter = (state.epoch_meter if skip else None), None
    meter = Meter(**saved) if saved is not None and ctx.dist.is_main else Meter()
    epoch_start = state.global_step - skip
    every = cfg.runtime.checkpoint_every

    def on_step(stats: dict[str, Any]) -> None:
        emit("step", stats | {"epoch": epoch})
        if (stats["step"] + 1) % cfg.runtime.log_every == 0:
            metrics.write({"kind": "train", "epoch": epoch, **stats})
        done = stats["step"] + 1 - epoch_start
        if every and done % every == 0 and done < len(train_loader):
            total = sum_meter(meter, ctx.dist)  # every rank takes part; rank 0 saves
            if ctx.dist.is_main:
                mid = FitState(
                    epoch=epoch,
                    global_step=stats["step"] + 1,
                    best_top1=state.best_top1,
                    epoch_step=done,
                    epoch_meter={"sums": total.sums, "counts": total.counts},
                )
                steps = len(train_loader)
                ckpt = _checkpoint_state(model, optimizer, scaler, mid, cfg, classes, steps_per_epoch=steps)
                _save(cfg.out, ckpt, best=False)

    summary = train_one_epoch(
        net,
        train_loader,
        optimizer,
        scaler,
        criterion,
        epoch=epoch,
        start_step=state.global_step,
        set_lr=set_lr,
        ctx=ctx,
        on_step=on_step,
        meter=meter,
    )
    state.global_step += int(summary["steps"])
    summary["steps"] = float(skip + summary["steps"])  # the whole epoch's, also when it was resumed
    state.epoch = epoch + 1
    record = {"kind": "epoch", "epoch": epoch + 1, "step": state.global_step, **summary}
    metrics.write(record)
    emit("epoch", record)
    evaluation = None
    is_eval_epoch = (epoch + 1) % cfg.runtime.eval_every == 0 or epoch + 1 == cfg.optim.epochs
    if val_loader is not None and is_eval_epoch:
        out = evaluate(net, val_loader, ctx=ctx)
        evaluation = _eval_record(out, classes, epoch + 1, state.global_step)
        metrics.write(evaluation)
        emit("eval", evaluation)
    improved = evaluation is not None and evaluation["top1"] > state.best_top1
    if improved:
        state.best_top1 = evaluation["top1"]  # type: ignore[index]
    if ctx.dist.is_main:
        ckpt = _checkpoint_state(model, optimizer, scaler, state, cfg, classes, steps_per_epoch=len(train_loader))
        _save(cfg.out, ckpt, best=improved)
        plot_run(cfg.out)
    barrier(ctx.dist)
    return evaluation
