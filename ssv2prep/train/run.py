"""`fit(cfg)`: the training orchestrator.

Order: dist init -> seed -> loaders -> model -> optimizer -> DDP wrap -> resume -> epoch loop (train, evaluate,
checkpoint, plots) -> teardown. Only rank 0 writes files; every rank runs the same number of steps.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssv2prep.errors import CheckpointError, ConfigError
from ssv2prep.fsutil import atomic_write_json, make_temp
from ssv2prep.train.checkpoint import check_compatible, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ssv2prep.train.config import TrainConfig, run_record
from ssv2prep.train.dist import (
    DistInfo,
    all_gather_objects,
    barrier,
    broadcast_object,
    init_distributed,
    on_main,
    teardown,
)
from ssv2prep.train.loop import StepContext, evaluate, sum_meter, train_one_epoch
from ssv2prep.train.metrics import Meter, video_metrics
from ssv2prep.train.report import MetricsLog, plot_run
from ssv2prep.train.runtime import amp_dtype, rank_seed, seed_everything, set_training_flags, use_channels_last
from ssv2prep.train.schedule import lr_factor, scaled_lr

log = logging.getLogger(__name__)

ARCH_KEYS = ("backbone", "num_classes", "num_segments", "shift_div", "shift_mode", "shift_place")
# Options a resumed run may change freely: where things are and how fast they run, not what is trained.
FREE_KEYS = frozenset(
    {
        "out",
        "train",
        "val",
        "train_index",
        "val_index",
        "allow_changes",
        "data.num_workers",
        "data.gpu_decode",
        "runtime.device",
        "runtime.amp",  # `auto` resolves by GPU anyway (fp16 on V100, bf16 on A100); the loss scaler adapts
        "runtime.channels_last",
        "runtime.compile",
        "runtime.log_every",
        "runtime.eval_every",
        "runtime.checkpoint_every",
        "runtime.dist_timeout_s",
    }
)
NOTED_KEYS = frozenset({"optim.epochs"})  # allowed (training longer is common), but said and kept in the history


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


def build_loaders(cfg: TrainConfig, info: DistInfo) -> tuple[Any, Any, Any]:
    """(train loader, val loader or None, train source) for this rank."""
    from ssv2prep.data.loader import build_eval_loader, build_train_loader
    from ssv2prep.data.source import resolve_source

    source = resolve_source(cfg.train, index=cfg.train_index)
    train_classes(source, cfg.train)
    val_source = resolve_source(cfg.val, index=cfg.val_index) if cfg.val else None
    if val_source is not None:
        check_same_classes(source, val_source)
        check_val_num_classes(source, val_source, cfg.val or "")
    train = build_train_loader(source, cfg.data, rank=info.rank, world_size=info.world_size, seed=cfg.runtime.seed)
    val = None
    if val_source is not None:
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


def check_val_num_classes(train: Any, val: Any, spec: str) -> None:
    """Validation labels are indices into the train head: refuse a validation index of another class count
    (before the first step rather than after an epoch), also when it carries no names to compare."""
    if val.num_classes is not None and val.num_classes != train.num_classes:
        raise ConfigError(
            f"--val {val.index_url or spec}: {val.num_classes} classes, but the train index {train.index_url} has "
            f"{train.num_classes} (the size of the head); give the validation index of the same shard folder"
        )


def check_same_classes(train: Any, val: Any) -> None:
    """Raise ConfigError when the validation shards label other classes (or in another order) than the train ones:
    their metrics (and best.pt) would be silently wrong, or fail after a whole epoch on a label out of range."""
    if train.classes is None or val.classes is None or tuple(train.classes) == tuple(val.classes):
        return
    a, b = list(train.classes), list(val.classes)
    if sorted(a) == sorted(b):
        i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
        what = f"the same {len(a)} classes in another order (label {i}: {a[i]!r} vs {b[i]!r})"
    else:
        extra, missing = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        what = f"{len(a)} vs {len(b)} classes"
        what += f"; only in --val: {extra[:3]}" if extra else ""
        what += f"; only in --train: {missing[:3]}" if missing else ""
    val_from, train_from = val.classes_from or val.index_url, train.classes_from or train.index_url
    raise ConfigError(
        f"--val and --train label different classes: {val_from} vs {train_from}: {what}. "
        "Shard both splits with the same labels (classes.json)"
    )


def build_model(cfg: TrainConfig, classes: list[str] | None, info: DistInfo) -> nn.Module:
    """The TSM of `cfg.model` with K = the index's class count, on this rank's device."""
    from dataclasses import replace

    from ssv2prep.models.tsm import build_tsm

    model_cfg = cfg.model if classes is None else replace(cfg.model, num_classes=len(classes))
    model = build_tsm(model_cfg).to(info.device)
    if use_channels_last(cfg.runtime.channels_last, info.device):
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


def _checkpoint_state(p: _Parts, at: FitState, rngs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": p.model.state_dict(),
        "optimizer": p.optimizer.state_dict(),
        "scaler": p.scaler.state_dict(),
        "epoch": at.epoch,
        "global_step": at.global_step,
        "best_top1": at.best_top1,
        "epoch_step": at.epoch_step,
        "epoch_meter": at.epoch_meter,
        "steps_per_epoch": p.steps,
        "config": p.cfg.to_dict(),
        "model_config": p.model.cfg.to_dict(),  # type: ignore[union-attr]
        "classes": p.classes,
        "world_size": len(rngs),
        "rng": rngs,
    }


def _peek(path: Path) -> tuple[int, int] | str:
    """(epoch, global_step) of the checkpoint at `path` as this rank sees it, or why there is none."""
    if not path.is_file():
        return "no checkpoint"
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError:
        return "an unreadable checkpoint"
    return int(ckpt["epoch"]), int(ckpt["global_step"])


def _resume_checkpoint(cfg: TrainConfig, info: DistInfo, classes: list[str], base_lr: float) -> dict[str, Any] | None:
    """Rank 0's `last.pt` (or None for a new run), the same on every rank.

    Rank 0 decides: it reads the file, refuses changed options without `--allow-changes` and writes config.json
    (with the history of changes). The checkpoint is then broadcast, so ranks with their own disks (or a stale
    network file system) cannot resume other epochs; a rank whose own view differs says so."""
    path = cfg.out / "last.pt"

    def decide() -> dict[str, Any] | None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        ckpt = load_checkpoint(path) if path.is_file() else None
        record = run_record(cfg, classes=classes, base_lr=base_lr, history=_config_history(cfg, ckpt))
        atomic_write_json(cfg.out / "config.json", record)
        return ckpt

    ckpt = on_main(info, "write the run folder", decide)
    if not info.distributed:
        return ckpt
    mine = _peek(path) if not info.is_main else None
    ckpt = broadcast_object(ckpt, info)
    if mine is not None:
        chosen = "no checkpoint" if ckpt is None else (int(ckpt["epoch"]), int(ckpt["global_step"]))
        if mine != chosen:
            log.warning(
                "rank %d sees %s at %s (epoch, step), rank 0 %s: resuming from rank 0's (is the folder shared?)",
                info.rank,
                mine,
                path,
                chosen,
            )
    return ckpt


def config_changes(saved: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    """{dotted key: [saved value, wanted value]} of every option that differs between two `TrainConfig.to_dict()`s."""
    out: dict[str, list[Any]] = {}
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        name = prefix + key
        if isinstance(a, dict) and isinstance(b, dict):
            out |= config_changes(a, b, name + ".")
        elif a != b:
            out[name] = [a, b]
    return out


def _config_history(cfg: TrainConfig, ckpt: dict[str, Any] | None) -> list[Any]:
    """The option changes for config.json's history: earlier ones plus this resume's; raises ConfigError on changes
    the user did not allow (`--allow-changes`)."""
    if ckpt is None:
        return []
    try:
        history = json.loads((cfg.out / "config.json").read_text(encoding="utf-8")).get("history", [])
    except (OSError, ValueError, AttributeError):
        history = []
    changes = {k: v for k, v in config_changes(ckpt["config"], cfg.to_dict()).items() if k not in FREE_KEYS}
    if not changes:
        return history
    said = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if not cfg.allow_changes and set(changes) - NOTED_KEYS:
        raise ConfigError(
            f"{cfg.out} was trained with other options ({said}); resume with the same ones, or pass "
            "--allow-changes to switch here (config.json keeps the history), or use a new --out"
        )
    log.warning("resuming %s with changed options: %s", cfg.out, said)
    entry = {"epoch": int(ckpt["epoch"]), "global_step": int(ckpt["global_step"]), "changes": changes}
    return [*history, entry]


def _load_scaler(scaler: Any, state: dict[str, Any]) -> None:
    """Restore the loss scaler, or start a fresh one when the checkpoint was saved under another `--amp` (a disabled
    scaler saves an empty state, which GradScaler refuses to load)."""
    if scaler.is_enabled() and not state:
        log.warning("the checkpoint was saved without an fp16 loss scaler (another --amp): starting a fresh one")
        return
    scaler.load_state_dict(state)


def _resume(
    ckpt: dict[str, Any] | None,
    model: nn.Module,
    optimizer: Any,
    scaler: Any,
    metrics: MetricsLog,
    *,
    info: DistInfo,
    steps_per_epoch: int,
    path: Path,
    num_workers: int | None = None,
) -> FitState:
    if ckpt is None:
        return FitState()
    check_compatible(ckpt["model_config"], model.cfg.to_dict(), ARCH_KEYS)  # type: ignore[union-attr]
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({' '.join(str(exc).split())[:300]})") from exc
    _load_scaler(scaler, ckpt["scaler"])
    epoch_step, global_step, meter = int(ckpt.get("epoch_step", 0)), int(ckpt["global_step"]), ckpt.get("epoch_meter")
    saved_steps = int(ckpt.get("steps_per_epoch", steps_per_epoch))
    saved_world = int(ckpt.get("world_size", info.world_size))  # older files do not say
    same_layout = saved_steps == steps_per_epoch and saved_world == info.world_size
    rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # older files: rank 0's state only
    if len(rngs) == info.world_size or (len(rngs) == 1 and info.is_main):
        set_rng_state(rngs[info.rank], info.device)  # else: the seeds of this run's ranks (another world size)
    metrics.truncate_after(global_step if same_layout else global_step - epoch_step)
    if not same_layout:
        # Another world size or batch size: steps mean something else now. Count the lr schedule in the new
        # steps from the last finished epoch, and restart an interrupted epoch from its beginning.
        log.warning(
            "%s was saved by %d processes with %d steps per epoch, this run has %d with %d (world size or batch "
            "size changed): continuing from the start of epoch %d (the lr schedule counts in the new steps)",
            path,
            saved_world,
            saved_steps,
            info.world_size,
            steps_per_epoch,
            ckpt["epoch"] + 1,
        )
        epoch_step, global_step, meter = 0, ckpt["epoch"] * steps_per_epoch, None
    saved_workers = ckpt.get("config", {}).get("data", {}).get("num_workers")
    if epoch_step and num_workers is not None and saved_workers is not None and saved_workers != num_workers:
        # The epoch's clips are dealt to rank x worker slots: with another worker count the rest of this epoch
        # would be cut differently (clips repeated or missed), so the interrupted epoch starts again.
        log.warning(
            "%s was saved with %d loader workers per rank, this run has %d: restarting epoch %d from its beginning",
            path,
            saved_workers,
            num_workers,
            ckpt["epoch"] + 1,
        )
        metrics.truncate_after(global_step - epoch_step)
        epoch_step, global_step, meter = 0, global_step - epoch_step, None
    log.info(
        "resuming %s in epoch %d after %d of its steps (%d steps done overall)",
        path.parent,
        ckpt["epoch"] + 1,
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
    info = init_distributed(cfg.runtime.device, timeout_s=cfg.runtime.dist_timeout_s)
    try:
        return _fit(cfg, info, emit)
    finally:
        teardown(info)


@dataclass(slots=True)
class _Parts:
    """What the epoch loop works with, built once by `_build_parts` (the orchestrator's state in one place)."""

    cfg: TrainConfig
    info: DistInfo
    emit: Callable[[str, dict[str, Any]], None]
    model: nn.Module  # the bare model: state_dict, evaluation
    net: nn.Module  # what trains: the model, or its DDP / compiled wrapper
    optimizer: torch.optim.Optimizer
    scaler: Any
    criterion: nn.Module
    set_lr: Callable[[int], float]
    ctx: StepContext
    train_loader: Any
    val_loader: Any
    classes: list[str]
    base_lr: float
    metrics: MetricsLog
    state: FitState

    @property
    def steps(self) -> int:
        """Train steps per epoch."""
        return len(self.train_loader)


def _fit(cfg: TrainConfig, info: DistInfo, emit: Callable[[str, dict[str, Any]], None]) -> FitResult:
    p = _build_parts(cfg, info, emit)
    emit("start", _start_event(p))
    last_eval = None
    for epoch in range(p.state.epoch, cfg.optim.epochs):
        last_eval = _run_epoch(p, epoch) or last_eval
    p.metrics.close()
    barrier(info)
    best = p.state.best_top1 if p.state.best_top1 >= 0 else None
    return FitResult(cfg.out, p.state.epoch, p.state.global_step, best, last_eval)


def _build_parts(cfg: TrainConfig, info: DistInfo, emit: Callable[[str, dict[str, Any]], None]) -> _Parts:
    """Loaders, model, optimizer, loss scaler and the resumed state, in the order the seeds need."""
    seed_everything(cfg.runtime.seed)  # the model's initial weights: the same on every rank
    train_loader, val_loader, source = build_loaders(cfg, info)
    classes = train_classes(source, cfg.train)
    model = build_model(cfg, classes, info)
    optimizer, base_lr = build_optimizer(cfg, model, info)
    seed_everything(rank_seed(cfg.runtime.seed, info.rank))  # dropout: each rank draws its own masks
    dtype = amp_dtype(cfg.runtime.amp, info.device)
    scaler = torch.amp.GradScaler(info.device.type, enabled=dtype == torch.float16)
    ckpt = _resume_checkpoint(cfg, info, classes, base_lr)
    metrics = on_main(info, "write the run folder", lambda: MetricsLog(cfg.out)) or MetricsLog(cfg.out, enabled=False)
    state = _resume(
        ckpt,
        model,
        optimizer,
        scaler,
        metrics,
        info=info,
        steps_per_epoch=len(train_loader),
        path=cfg.out / "last.pt",
        num_workers=cfg.data.num_workers,
    )
    del ckpt
    set_training_flags(info.device)
    return _Parts(
        cfg=cfg,
        info=info,
        emit=emit,
        model=model,
        net=_wrap(model, cfg, info),
        optimizer=optimizer,
        scaler=scaler,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
        set_lr=_lr_setter(cfg, optimizer, base_lr, len(train_loader)),
        ctx=_step_context(cfg, info, dtype),
        train_loader=train_loader,
        val_loader=val_loader,
        classes=classes,
        base_lr=base_lr,
        metrics=metrics,
        state=state,
    )


def _step_context(cfg: TrainConfig, info: DistInfo, dtype: torch.dtype | None) -> StepContext:
    return StepContext(
        dist=info,
        amp_dtype=dtype,
        log_every=cfg.runtime.log_every,
        clip_grad=cfg.optim.clip_grad,
        channels_last=use_channels_last(cfg.runtime.channels_last, info.device),
    )


def _wrap(model: nn.Module, cfg: TrainConfig, info: DistInfo) -> nn.Module:
    """The module that trains: DDP over the model when distributed, compiled with `--compile`."""
    net: nn.Module = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None
        )
    if cfg.runtime.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    return net


def _start_event(p: _Parts) -> dict[str, Any]:
    return {
        "epochs": p.cfg.optim.epochs,
        "start_epoch": p.state.epoch,
        "steps_per_epoch": p.steps,
        "world_size": p.info.world_size,
        "batch_size": p.cfg.data.batch_size,
        "base_lr": p.base_lr,
        "device": str(p.info.device),
        "amp": str(p.ctx.amp_dtype),
        "classes": len(p.classes),
    }


def _run_epoch(p: _Parts, epoch: int) -> dict[str, Any] | None:
    """Train one epoch, evaluate when due, save the checkpoint; returns the evaluation record (None if none)."""
    skip = p.state.epoch_step  # resuming mid-epoch: the steps of this epoch already done
    summary = _train_epoch(p, epoch)
    p.state.global_step += int(summary["steps"])
    summary["steps"] = float(skip + summary["steps"])  # the whole epoch's, also when it was resumed
    p.state.epoch = epoch + 1
    record = {"kind": "epoch", "epoch": epoch + 1, "step": p.state.global_step, **summary}
    p.metrics.write(record)
    p.emit("epoch", record)
    evaluation = _evaluate_if_due(p, epoch)
    improved = evaluation is not None and evaluation["top1"] > p.state.best_top1
    if improved:
        p.state.best_top1 = evaluation["top1"]  # type: ignore[index]
    _save_checkpoint(p, p.state, best=improved, plots=True)
    return evaluation


def _train_epoch(p: _Parts, epoch: int) -> dict[str, float]:
    """`train_one_epoch` with this run's logging and mid-epoch checkpoints (every `checkpoint_every` steps)."""
    skip, p.state.epoch_step = p.state.epoch_step, 0
    p.train_loader.set_epoch(epoch, skip=skip)
    # The saved sums are already totals over all ranks: one rank carries them on, or they would count twice.
    saved, p.state.epoch_meter = (p.state.epoch_meter if skip else None), None
    meter = Meter(**saved) if saved is not None and p.info.is_main else Meter()
    epoch_start, every = p.state.global_step - skip, p.cfg.runtime.checkpoint_every

    def checkpoint_due(step: int) -> bool:
        done = step + 1 - epoch_start
        return bool(every) and done % every == 0 and done < p.steps

    def on_step(stats: dict[str, Any]) -> None:
        p.emit("step", stats | {"epoch": epoch})
        if stats["logged"]:
            record = {k: v for k, v in stats.items() if k not in ("synced", "logged")}
            p.metrics.write({"kind": "train", **record, "epoch": epoch + 1})  # 1-based, as epoch and eval records
        if checkpoint_due(stats["step"]):  # a sync point: the loop has checked this step's loss is finite
            total = sum_meter(meter, p.info)  # every rank takes part; rank 0 saves
            mid = replace(
                p.state,
                epoch=epoch,
                global_step=stats["step"] + 1,
                epoch_step=stats["step"] + 1 - epoch_start,
                epoch_meter={"sums": total.sums, "counts": total.counts},
            )
            _save_checkpoint(p, mid, best=False, plots=False)

    return train_one_epoch(
        p.net,
        p.train_loader,
        p.optimizer,
        p.scaler,
        p.criterion,
        epoch=epoch,
        start_step=p.state.global_step,
        set_lr=p.set_lr,
        ctx=p.ctx,
        on_step=on_step,
        meter=meter,
        sync_at=checkpoint_due,
    )


def _evaluate_if_due(p: _Parts, epoch: int) -> dict[str, Any] | None:
    due = (epoch + 1) % p.cfg.runtime.eval_every == 0 or epoch + 1 == p.cfg.optim.epochs
    if p.val_loader is None or not due:
        return None
    # The bare model, not the DDP wrapper: its first forward after training broadcasts BN buffers, a
    # collective that a rank without validation shards (fewer shards than ranks) would never join.
    out = evaluate(p.model, p.val_loader, ctx=p.ctx)
    evaluation = _eval_record(out, p.classes, epoch + 1, p.state.global_step)
    p.metrics.write(evaluation)
    p.emit("eval", evaluation)
    return evaluation


def _save_checkpoint(p: _Parts, at: FitState, *, best: bool, plots: bool) -> None:
    """Save `at` as last.pt (and best.pt): every rank takes part (its own RNG state goes in the file); rank 0 writes."""
    rngs = all_gather_objects(rng_state(p.info.device), p.info)

    def write() -> None:
        _save(p.cfg.out, _checkpoint_state(p, at, rngs), best=best)
        if plots:
            plot_run(p.cfg.out)

    on_main(p.info, "save the checkpoint", write)
