"""Commands of the model side: train, eval, export and predict."""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ssv2prep.cli.app import config_default, console, float_list, main, out, progress_bars
from ssv2prep.train.config import AMP_MODES, OptimConfig, RuntimeConfig


def _optim(name: str) -> Any:
    return config_default(OptimConfig, name)


def _runtime(name: str) -> Any:
    return config_default(RuntimeConfig, name)


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


def _cache_options(f: Any) -> Any:
    """The shard cache options of train and eval (used only for streamed shards: s3://, gs://, http, pipe:)."""
    options = [
        click.option(
            "--cache-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Keep verified local copies of streamed shards here: epoch 1 streams, later epochs read the disk.",
        ),
        click.option("--cache-size", default="100G", show_default=True, help="Bound of --cache-dir (LRU eviction)."),
        click.option(
            "--cache-verify",
            type=click.Choice(["md5", "size"]),
            default="md5",
            show_default=True,
            help="How a cached copy is checked against the index before use.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _cache_fields(cache_dir: Path | None, cache_size: str, cache_verify: str) -> dict[str, Any]:
    from ssv2prep.data.cache import parse_size

    return {"cache_dir": cache_dir, "cache_size_bytes": parse_size(cache_size), "cache_verify": cache_verify}


def _is_main_process() -> bool:

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
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Run folder (required unless --config gives one).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Start from the options of a run's config.json (replay or vary a run); every flag given on the "
    "command line overrides its key, the others keep the file's values (not the defaults shown here).",
)
@_model_options
@click.option("--batch-size", type=int, default=8, show_default=True, help="Clips per GPU (per process).")
@click.option("--workers", type=int, default=None, help="Loader workers per process (default: from the machine).")
@click.option("--crop-size", type=int, default=224, show_default=True)
@click.option("--scale-size", type=int, default=256, show_default=True, help="Eval: resize short side to this.")
@click.option("--dense", is_flag=True, help="Dense sampling (64-frame window) instead of segments.")
@click.option("--flip", is_flag=True, help="Horizontal flip with the label swap of the index's flip_pairs.")
@click.option("--gpu-decode", is_flag=True, help="Decode JPEGs on the GPU (nvjpeg via torchvision); CUDA only.")
@_cache_options
@click.option("--epochs", type=int, default=_optim("epochs"), show_default=True)
@click.option(
    "--lr",
    type=float,
    default=_optim("lr"),
    show_default=True,
    help="Learning rate for a total batch of 64 clips, scaled linearly to the real total batch (ranks x "
    "--batch-size), as the official TSM recipe states it; --no-lr-scaling uses it as given.",
)
@click.option("--no-lr-scaling", is_flag=True, help="Use --lr as is instead of scaling it by total batch / 64.")
@click.option("--lr-schedule", type=click.Choice(["step", "cosine"]), default=_optim("lr_schedule"), show_default=True)
@click.option(
    "--lr-steps",
    default=",".join(f"{e:g}" for e in _optim("lr_steps")),
    show_default=True,
    help="Epochs where the step schedule decays x0.1.",
)
@click.option("--warmup-epochs", type=float, default=_optim("warmup_epochs"), show_default=True)
@click.option(
    "--wd", type=float, default=_optim("weight_decay"), show_default=True, help="Weight decay (not on BN and biases)."
)
@click.option("--momentum", type=float, default=_optim("momentum"), show_default=True)
@click.option(
    "--clip-grad", type=float, default=_optim("clip_grad"), show_default=True, help="Global grad-norm clip (0 = off)."
)
@click.option("--label-smoothing", type=float, default=_optim("label_smoothing"), show_default=True)
@click.option(
    "--eval-every",
    type=int,
    default=_runtime("eval_every"),
    show_default=True,
    help="Evaluate every N epochs (and at the end).",
)
@click.option(
    "--log-every",
    type=int,
    default=_runtime("log_every"),
    show_default=True,
    help="Steps between metrics.jsonl lines (and progress lines off a terminal, or every 60 s).",
)
@click.option(
    "--checkpoint-every",
    type=int,
    default=_runtime("checkpoint_every"),
    show_default=True,
    help="Also save last.pt every N steps inside an epoch, so a killed run (a spot instance) resumes mid-epoch "
    "and loses at most N steps (0: only at the end of each epoch).",
)
@click.option("--seed", type=int, default=_runtime("seed"), show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=_runtime("device"), show_default=True)
@click.option("--amp", type=click.Choice(AMP_MODES), default=_runtime("amp"), show_default=True)
@click.option("--channels-last/--no-channels-last", default=None, help="Default: on for CUDA.")
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the model.")
@click.option(
    "--allow-changes",
    is_flag=True,
    help="Resume with other options (--lr, --dropout, ...) than the run folder was trained with; config.json "
    "records what changed (without it such a resume is refused).",
)
@click.option(
    "--dist-timeout",
    type=float,
    default=_runtime("dist_timeout_s"),
    show_default=True,
    help="Seconds a rank waits for the others before the job fails (a rank died or hangs).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write progress and log records as JSON lines here (rank 0), for machines.",
)
def train(**opts: Any) -> None:
    """Train a TSM (or TSN) from shards; resumes when the run folder already has last.pt.

    \b
    Examples:
      ssv2prep train --data shards --out runs/tsm-r50 --backbone resnet50 --weights imagenet --batch-size 8
      torchrun --nproc-per-node 8 -m ssv2prep train --data shards --out runs/r50 --weights imagenet
      ssv2prep train --train 'pipe:aws s3 cp s3://b/ssv2-train-{000000..000337}.tar -' \\
          --train-index s3-train.json --val shards/ssv2-validation.json --out runs/s3
      ssv2prep train --config runs/r50/config.json --out runs/r50-lr02 --lr 0.02
    """
    import contextlib

    main_process = _is_main_process()
    log = logging.getLogger("ssv2prep.train")
    spinner = main_process and console.is_terminal
    if main_process and not spinner:
        log.info("setting up: importing torch, reading the options ...")
    with console.status("importing torch, reading the options") if spinner else contextlib.nullcontext():
        cfg = _train_config(opts, click.get_current_context())
        from ssv2prep.train.run import fit

    json_log = _open_log_file(opts["log_file"])
    try:
        progress = _TrainProgress(
            enabled=_is_main_process(),
            every_steps=cfg.runtime.log_every,
            json=json_log,
            lr=cfg.optim.lr,
            scale_lr=cfg.optim.scale_lr,
            workers=cfg.data.num_workers,
            shuffle_buffer=cfg.data.shuffle_buffer,
        )
        with progress:
            result = fit(cfg, on_event=progress.event)
    finally:
        if json_log is not None:
            logging.getLogger().removeHandler(json_log)
            json_log.close()
    if _is_main_process():
        best = f"{result.best_top1:.2f}%" if result.best_top1 is not None else "n/a (no validation)"
        out.print(
            f"train: {result.epochs} epochs, {result.global_step} steps; best val top-1 {best}; "
            f"run folder {result.run_dir}"
        )


# Every train option that is part of the config, and the config.json keys it sets: with --config, the options
# given on the command line replace these keys of the file (--data also clears the file's index keys).
_OPTION_KEYS: dict[str, tuple[str, ...]] = {
    "data": ("train", "val", "train_index", "val_index"),
    "train_spec": ("train",),
    "val_spec": ("val",),
    "train_index": ("train_index",),
    "val_index": ("val_index",),
    "out": ("out",),
    "backbone": ("model.backbone",),
    "weights": ("model.weights",),
    "segments": ("model.num_segments", "data.num_segments"),
    "shift_div": ("model.shift_div",),
    "shift_mode": ("model.shift_mode",),
    "shift_place": ("model.shift_place",),
    "dropout": ("model.dropout",),
    "partial_bn": ("model.partial_bn",),
    "batch_size": ("data.batch_size",),
    "workers": ("data.num_workers",),
    "crop_size": ("data.crop_size",),
    "scale_size": ("data.scale_size",),
    "dense": ("data.dense",),
    "flip": ("data.flip",),
    "gpu_decode": ("data.gpu_decode",),
    "cache_dir": ("data.cache_dir",),
    "cache_size": ("data.cache_size_bytes",),
    "cache_verify": ("data.cache_verify",),
    "epochs": ("optim.epochs",),
    "lr": ("optim.lr",),
    "no_lr_scaling": ("optim.scale_lr",),
    "lr_schedule": ("optim.lr_schedule",),
    "lr_steps": ("optim.lr_steps",),
    "warmup_epochs": ("optim.warmup_epochs",),
    "wd": ("optim.weight_decay",),
    "momentum": ("optim.momentum",),
    "clip_grad": ("optim.clip_grad",),
    "label_smoothing": ("optim.label_smoothing",),
    "eval_every": ("runtime.eval_every",),
    "log_every": ("runtime.log_every",),
    "checkpoint_every": ("runtime.checkpoint_every",),
    "seed": ("runtime.seed",),
    "device": ("runtime.device",),
    "amp": ("runtime.amp",),
    "channels_last": ("runtime.channels_last",),
    "use_compile": ("runtime.compile",),
    "allow_changes": ("allow_changes",),
    "dist_timeout": ("runtime.dist_timeout_s",),
}
_NOT_CONFIG = frozenset({"config_file", "log_file"})  # train options that are not part of a run's config


def _train_config(opts: dict[str, Any], ctx: click.Context) -> Any:
    """The TrainConfig of the options; with --config, the file's with the options given on the command line."""
    from click.core import ParameterSource

    from ssv2prep.errors import ConfigError

    path = opts["config_file"]
    if path is None:
        if opts["out"] is None:
            raise click.UsageError("Missing option '--out' (or give --config with a run's config.json).")
        return _options_config(opts)
    from ssv2prep.train.config import load_train_config, train_config_from_dict

    saved = load_train_config(path)
    given = [
        name
        for name in _OPTION_KEYS
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    ]
    # --val alone (or nothing) with --config: keep the file's train shards instead of asking for --data/--train
    sources = None if opts["data"] is not None or opts["train_spec"] else ("", opts["val_spec"])
    flags = _options_config(opts, sources=sources, out=opts["out"] or Path()).to_dict()
    for name in given:
        for dotted in _OPTION_KEYS[name]:
            section, _, key = dotted.rpartition(".")
            (saved.setdefault(section, {}) if section else saved)[key] = (flags[section] if section else flags)[key]
    cfg = train_config_from_dict(saved)
    try:
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{exc} (options from {path} and the command line)") from None
    return cfg


def _options_config(
    opts: dict[str, Any], *, sources: tuple[str, str | None] | None = None, out: Path | None = None
) -> Any:
    from ssv2prep.data.loader import DataConfig
    from ssv2prep.models.tsm import ModelConfig
    from ssv2prep.train.config import OptimConfig, RuntimeConfig, TrainConfig, default_num_workers

    train_spec, val_spec = sources or _train_sources(opts["data"], opts["train_spec"], opts["val_spec"])
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
        **_cache_fields(opts["cache_dir"], opts["cache_size"], opts["cache_verify"]),
    )
    optim = OptimConfig(
        epochs=opts["epochs"],
        lr=opts["lr"],
        scale_lr=not opts["no_lr_scaling"],
        momentum=opts["momentum"],
        weight_decay=opts["wd"],
        lr_schedule=opts["lr_schedule"],
        lr_steps=float_list("--lr-steps", opts["lr_steps"]),
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
        checkpoint_every=opts["checkpoint_every"],
        seed=opts["seed"],
        dist_timeout_s=opts["dist_timeout"],
    )
    return TrainConfig(
        train=train_spec,
        val=val_spec,
        train_index=opts["train_index"],
        val_index=opts["val_index"],
        out=out if out is not None else opts["out"],
        model=model,
        data=data,
        optim=optim,
        runtime=runtime,
        allow_changes=opts["allow_changes"],
    )


class _JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's `fields` (progress data)."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import UTC, datetime

        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        return json.dumps(data | getattr(record, "fields", {}))


def _open_log_file(path: Path | None) -> logging.Handler | None:
    """A JSON-lines handler on the root logger for `--log-file` (rank 0 only: ranks may share the folder)."""
    if path is None or not _is_main_process():
        return None
    from ssv2prep.errors import ConfigError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--log-file {path}: cannot open it ({exc.strerror or exc})") from exc
    handler.setFormatter(_JsonLines())
    handler.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(handler)
    return handler


class _TrainProgress:
    """Progress for `fit` events. On a terminal: one rich bar per epoch. Off one (batch jobs): one plain log line
    every `every_steps` steps or `every_s` seconds (epoch, step/steps, loss, lr, clips/s, data wait, ETA).
    Step lines also go to the `--log-file` handler (`json`), also when the bar shows them. Every line with an lr
    says how it came from `--lr` (`lr`, per 64 clips when `scale_lr`) and the total batch.

    The quiet stretches between events (setting up the model and shards; loader workers starting and the shuffle
    buffer filling before the first step; validation and the next epoch's workers) show as a pulsing bar that
    says what is going on; off a terminal the set-up and the first batch get a log line each."""

    def __init__(
        self,
        *,
        enabled: bool,
        every_steps: int = 10,
        every_s: float = 60.0,
        json: logging.Handler | None = None,
        lr: float | None = None,
        scale_lr: bool = True,
        workers: int = 0,
        shuffle_buffer: int = 0,
    ) -> None:
        self.workers, self.shuffle_buffer = workers, shuffle_buffer
        self.waiting: Any = None  # the pulsing task of a quiet stretch (terminal only)
        self.started_at: float | None = None  # the start event's time, until the first step
        self.enabled = enabled
        self.given_lr, self.scale_lr, self.base_lr = lr, scale_lr, 0.0
        self.bar = enabled and console.is_terminal
        self.every_steps, self.every_s, self.json = every_steps, every_s, json
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=not self.bar,
        )
        self.task: Any = None
        self.steps = self.epochs = self.clips_per_step = 0
        self.window = _Window()
        self.log = logging.getLogger("ssv2prep.train")

    def __enter__(self) -> _TrainProgress:
        self.progress.__enter__()
        if self.enabled:
            self._wait("setting up: the shard index, the model, the run folder", log=True)
        return self

    def _wait(self, what: str, *, log: bool = False) -> None:
        """Show `what` as the current quiet stretch: a pulsing bar on a terminal, a log line off it (`log`)."""
        if self.bar:
            if self.waiting is not None:
                self.progress.remove_task(self.waiting)
            self.waiting = self.progress.add_task(what, total=None, info="")
        elif log:
            self.log.info("%s ...", what)

    def _done_waiting(self) -> None:
        if self.waiting is not None:
            self.progress.remove_task(self.waiting)
            self.waiting = None

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def event(self, kind: str, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        getattr(self, f"_on_{kind}")(data)

    def _on_start(self, d: dict[str, Any]) -> None:
        self.steps, self.epochs = d["steps_per_epoch"], d["epochs"]
        self.clips_per_step = d["batch_size"] * d["world_size"]
        self.base_lr = d["base_lr"]
        self.window.reset()
        self.log.info(
            "training on %s x %d (amp %s): %d clips per process, %d in total, base lr %.5g (%s), "
            "%d steps per epoch, epochs %d..%d",
            d["device"],
            d["world_size"],
            d["amp"],
            d["batch_size"],
            d["batch_size"] * d["world_size"],
            d["base_lr"],
            self.lr_origin(d["base_lr"]),
            self.steps,
            d["start_epoch"] + 1,
            d["epochs"],
            extra={"fields": {"event": "start", **d}},
        )
        self.started_at = time.monotonic()
        if self.workers:
            plural = "s" if self.workers > 1 else ""
            first = f"starting {self.workers} data worker{plural} per process"
        else:
            first = "decoding in this process (--workers 0)"
        self._wait(f"first batch: {first}, filling the shuffle buffer ({self.shuffle_buffer} clips)", log=True)

    def lr_origin(self, lr: float) -> str:
        """How `lr` came about, e.g. '0.01 per 64 clips x 16/64' or '--lr 0.01 as given x 0.1 schedule'."""
        if self.given_lr is None:
            return "--lr unknown"
        factor = lr / self.base_lr if self.base_lr else 1.0
        schedule = "" if abs(factor - 1) < 1e-6 else f" x {factor:.3g} schedule"
        if self.scale_lr:
            return f"{self.given_lr:g} per 64 clips x {self.clips_per_step}/64{schedule}"
        return f"--lr {self.given_lr:g} as given, --no-lr-scaling{schedule}"

    def _on_step(self, d: dict[str, Any]) -> None:
        self._done_waiting()
        if self.started_at is not None:
            self.log.info(
                "first step done %.1f s after the start (%.0f%% of that step waiting for data)",
                time.monotonic() - self.started_at,
                100 * d["data_wait"],
            )
            self.started_at = None
        if self.bar:
            if self.task is None:
                self.task = self.progress.add_task(f"epoch {d['epoch'] + 1}", total=self.steps, info="")
            info = (
                f"loss {d['loss']:.3f} top1 {d['top1']:.1f} lr {d['lr']:.2e} {d['clips_per_s']:.1f} clips/s "
                f"data {100 * d['data_wait']:.0f}%"
            )
            self.progress.update(self.task, advance=1, info=info)
        done = d["step"] - d["epoch"] * self.steps + 1  # steps of this epoch done (also when resumed mid-epoch)
        self.window.add(d)
        if done % self.every_steps and done != self.steps and self.window.seconds() < self.every_s:
            return
        fields = self.window.take(
            d, done=done, steps=self.steps, epochs=self.epochs, clips_per_step=self.clips_per_step
        )
        text = (
            f"epoch {fields['epoch']}/{self.epochs} step {done}/{self.steps} loss {fields['loss']:.4f} "
            f"lr {fields['lr']:.3e} ({self.lr_origin(fields['lr'])}) "
            f"{fields['clips_per_s']:.1f} clips/s data {fields['data_wait_pct']:.0f}% "
            f"eta {_hms(fields['eta_epoch_s'])} (run {_hms(fields['eta_run_s'])})"
        )
        if not self.bar:
            self.log.info(text, extra={"fields": fields})
        elif self.json is not None:  # the bar shows it on the terminal; machines still get the line
            record = self.log.makeRecord(self.log.name, logging.INFO, __file__, 0, text, (), None)
            record.fields = fields
            self.json.handle(record)

    def _on_epoch(self, d: dict[str, Any]) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if d["epoch"] < self.epochs:
            self._wait(f"epoch {d['epoch']} done: validation (when due), then the next epoch's data workers")
        skipped = f", {int(d['skipped'])} corrupt samples skipped" if d.get("skipped") else ""
        self.log.info(
            "epoch %d: loss %.4f, train top-1 %.2f%%, %.0f%% of step time waiting for data%s",
            d["epoch"],
            d["loss"],
            d["top1"],
            100 * d["data_wait"],
            skipped,
            extra={"fields": {"event": "epoch", **d}},
        )

    def _on_eval(self, d: dict[str, Any]) -> None:
        self.log.info(
            "epoch %d validation: top-1 %.2f%%, top-5 %.2f%%, mean class %.2f%% (%d videos)",
            d["epoch"],
            d["top1"],
            d["top5"],
            d["mean_class_accuracy"],
            d["videos"],
            extra={"fields": {"event": "eval", **d}},
        )


class _Window:
    """Steps since the last progress line: their clips, data wait and time, for rates that are not one step's."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.monotonic()
        self.wait = 0.0
        self.n = 0

    def add(self, d: dict[str, Any]) -> None:
        self.wait += d["data_wait"]
        self.n += 1

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def take(self, d: dict[str, Any], *, done: int, steps: int, epochs: int, clips_per_step: int) -> dict[str, Any]:
        """The line's fields (clips/s over all ranks); starts a new window."""
        per_step = self.seconds() / max(1, self.n)
        left_epoch = steps - done
        fields = {
            "event": "step",
            "epoch": d["epoch"] + 1,
            "epoch_step": done,
            "steps_per_epoch": steps,
            "step": d["step"],
            "loss": d["loss"],
            "top1": d["top1"],
            "lr": d["lr"],
            "clips_per_s": clips_per_step / per_step if per_step > 0 else 0.0,
            "data_wait_pct": 100 * self.wait / max(1, self.n),
            "eta_epoch_s": left_epoch * per_step,
            "eta_run_s": (left_epoch + (epochs - d["epoch"] - 1) * steps) * per_step,
        }
        self.reset()
        return fields


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------------------------------------- eval


_SPLIT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


_INDEX_SPLIT_RE = re.compile(r"ssv2-([A-Za-z0-9][A-Za-z0-9_-]*)\.json")


def _default_eval_out(checkpoint: Path, split: str, data: str) -> Path:
    """The default report folder: `eval-<split>` beside the checkpoint, unless it holds something else than an
    earlier eval of this checkpoint on this data; then the first `eval-<split>-N` (N = 2, 3, ...) that is free or
    holds exactly that. A folder without a readable report.json but with files in it is never reused."""
    import itertools
    import json

    base = checkpoint.parent / f"eval-{split}"
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
            break
        try:
            report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
            same = _same_place(report["checkpoint"], str(checkpoint)) and _same_place(report["data"], data)
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if same:
            break
    if n > 1:
        logging.getLogger("ssv2prep.eval").info(
            "%s holds the reports of another checkpoint or other data: this eval's go to %s (--out chooses)",
            base,
            folder,
        )
    return folder


def _same_place(recorded: str, given: str) -> bool:
    """Whether two data/checkpoint names mean the same thing: the same file for local paths, else equal text."""
    if "://" in recorded or "://" in given or recorded.startswith("pipe:") or given.startswith("pipe:"):
        return recorded == given
    return Path(recorded).resolve() == Path(given).resolve()


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
@click.option(
    "--workers", type=int, default=2, show_default=True, help="Loader processes per rank (0: decode in this process)."
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Report folder, written even when it holds reports already. Default: eval-<split> beside the "
    "checkpoint (<split> from --split, or from an ssv2-<split>.json given as --data); a re-run of the same "
    "checkpoint on the same data replaces its reports there, while another checkpoint or other data goes to "
    "the first free eval-<split>-2, -3, ... (said in a log line), so no earlier eval is lost.",
)
@click.option(
    "--predictions",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write per-video top-5 class indices (id;c1;c2;c3;c4;c5) for submission. With --grid: those of the "
    "first setting (the first crops= and clips= values), which the eval names when it writes them.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option(
    "--amp",
    is_flag=True,
    help="Autocast on CUDA (bf16 where supported, else fp16). Default: fp32, the official test's arithmetic.",
)
@click.option("--channels-last/--no-channels-last", default=None, help="Default: on for CUDA, as in train.")
@_cache_options
def eval_cmd(**opts: Any) -> None:
    """Evaluate a checkpoint on a held-out split: top-1/top-5, per-class, confusion, seconds per video.

    On a split without labels (the SSv2 test split) it writes the predictions only (to --predictions, else
    predictions.csv in --out). The precision (fp32 unless --amp) is printed and recorded in report.json.

    \b
    Examples:
      ssv2prep eval --checkpoint runs/r50/best.pt --data shards/ssv2-validation.json --crops 3 --clips 2
      ssv2prep eval --checkpoint TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth --data shards
      ssv2prep eval --checkpoint runs/r50/best.pt --data shards --grid 'crops=1,3,5,10;clips=1,2'
      torchrun --nproc-per-node 4 -m ssv2prep eval --checkpoint runs/r50/best.pt --data shards
    """
    from ssv2prep.train.evaluation import evaluate_checkpoint, predictions_file

    cfg = _eval_config(opts, click.get_current_context())
    with progress_bars() as progress:
        task = progress.add_task("evaluating", total=None, rate="")
        rows = evaluate_checkpoint(cfg, on_batch=lambda n: progress.advance(task, n))
    if not _is_main_process():
        return
    for r in rows:
        setting = f"eval: {r['crops']} crops x {r['clips']} clips, {r['segments']} frames, {r['precision']}"
        if r["labelled"] == 0:
            written = predictions_file(cfg, rows)
            out.print(f"{setting}: {r['videos']} videos, no labels: wrote predictions only ({written})", markup=False)
            continue
        unlabelled = f" ({r['videos'] - r['labelled']} more have no label)" if r["labelled"] < r["videos"] else ""
        out.print(
            f"{setting}: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, mean class {r['mean_class_accuracy']:.2f}% "
            f"on {r['labelled']} videos{unlabelled}, {r['seconds_per_video']:.3f} s/video",
            markup=False,
        )
    written = predictions_file(cfg, rows)
    if written is not None and any(r["labelled"] for r in rows):
        first = rows[0]
        which = f" of the first setting, {first['crops']} crops x {first['clips']} clips," if len(rows) > 1 else ""
        out.print(f"predictions{which} in {written}", markup=False)
    out.print(f"reports in {cfg.out}", markup=False)


def _eval_config(opts: dict[str, Any], ctx: click.Context) -> Any:
    """The EvalConfig of `eval`'s options: options named as its fields pass through; the rest are resolved here
    (the data folder's index, the default report folder, the grid, --amp, the cache)."""
    from click.core import ParameterSource

    from ssv2prep.errors import ConfigError
    from ssv2prep.train.evaluation import EvalConfig

    split, data_spec, checkpoint = opts["split"], opts["data_spec"], opts["checkpoint"]
    if not _SPLIT_RE.fullmatch(split):  # it names files and the default --out folder: keep it a plain name
        raise ConfigError(f"--split {split!r}: not a split name (letters, digits, '-' and '_' only)")
    spec = data_spec
    if Path(data_spec).is_dir():
        spec = str(Path(data_spec) / f"ssv2-{split}.json")
    elif ctx.get_parameter_source("split") is ParameterSource.DEFAULT:
        named = _INDEX_SPLIT_RE.fullmatch(data_spec.rstrip("/").rsplit("/", 1)[-1])
        split = named.group(1) if named else split  # an ssv2-test.json given as --data: its reports are test's
    same = ("checkpoint", "index", "segments", "dense", "full_res", "crop_size", "scale_size", "batch_size")
    same += ("workers", "predictions", "device", "channels_last")
    return EvalConfig(
        **{name: opts[name] for name in same},
        data=spec,
        settings=_parse_grid(opts["grid"], int(opts["crops"]), int(opts["clips"])),
        out=opts["out_dir"] if opts["out_dir"] is not None else _default_eval_out(checkpoint, split, spec),
        amp="auto" if opts["amp"] else "off",
        **_cache_fields(opts["cache_dir"], opts["cache_size"], opts["cache_verify"]),
    )


# --------------------------------------------------------------------------------------------------------- export


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the exported file (default: beside the checkpoint).",
)
@click.option(
    "--dataset",
    default="somethingv2",
    show_default=True,
    help="Dataset name in the official file name (letters, digits, '-'); the official test_models.py takes the "
    "class count from it.",
)
def export(checkpoint: Path, out_dir: Path | None, dataset: str) -> None:
    """Export one of our checkpoints in the official TSM layout and file name (module.base_model..., new_fc).

    Models the official code would run as another network are refused: unidirectional shifts, shift-div 1 (the
    official 'shift1' moves all channels from t+1) and block-placed MobileNetV2.

    \b
    Example:
      ssv2prep export runs/r50/best.pt --out exported/
    """
    from ssv2prep.models.official import export_official
    from ssv2prep.train.checkpoint import load_checkpoint
    from ssv2prep.train.evaluation import load_for_eval

    model, _, _ = load_for_eval(checkpoint, None)
    ckpt = load_checkpoint(checkpoint, mmap=True)  # only the epoch and best accuracy: the weights stay unread
    path = export_official(
        model,
        out_dir or checkpoint.parent,
        dataset=dataset,
        epochs=int(ckpt["epoch"]),
        best_prec1=max(0.0, float(ckpt["best_top1"])),
    )
    out.print(f"export: {path}", markup=False)


# -------------------------------------------------------------------------------------------------------- predict


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.argument("videos", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--classes",
    "classes_file",
    default=None,
    help="classes.json, labels.json or a shard index (ssv2-train.json), a path or s3:// URL (needed for official "
    "checkpoints).",
)
@click.option("--crops", type=click.Choice(["1", "3", "5", "10"]), default="1", show_default=True)
@click.option("--clips", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--scale-size", type=int, default=None, help="Resize short side (default: as trained).")
@click.option("--crop-size", type=int, default=None, help="Crop size (default: as trained).")
@click.option("--online", is_flag=True, help="Frame by frame with a unidirectional model; print as it evolves.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--amp", is_flag=True, help="Autocast on CUDA (not with --online). Default: fp32, as eval.")
def predict(
    checkpoint: Path,
    videos: tuple[Path, ...],
    classes_file: str | None,
    crops: str,
    clips: str,
    scale_size: int | None,
    crop_size: int | None,
    online: bool,
    device: str,
    amp: bool,
) -> None:
    """Classify webm/mp4 files directly and print the top-5 classes with probabilities.

    A file that cannot be decoded is reported (one 'error:' line naming it) and the others are still classified;
    the exit status is then non-zero.

    \b
    Examples:
      ssv2prep predict runs/r50/best.pt clip1.webm clip2.webm
      ssv2prep predict TSM_somethingv2_RGB_resnet50_shift8_blockres_avg_segment8_e45.pth a.webm --classes labels.json
      ssv2prep predict runs/online/best.pt a.webm --online
    """
    from ssv2prep.errors import ConfigError
    from ssv2prep.train.predict import Prediction, predict_online, predict_videos

    if online and amp:
        raise ConfigError("--amp does not apply to --online (the frame caches stay fp32)")
    failed = 0

    def show(p: Prediction) -> None:
        nonlocal failed
        if p.error is not None:
            failed += 1
            click.echo(f"error: {p.error}", err=True)
            return
        out.print(f"{p.video}:", markup=False)
        for rank, (name, prob) in enumerate(p.top5, 1):
            out.print(f"  {rank}. {name}  {100 * prob:.1f}%", markup=False)

    if online:
        failed = _predict_online(predict_online, checkpoint, videos, classes_file, scale_size, crop_size, device)
    else:
        predict_videos(
            checkpoint,
            list(videos),
            classes_file=classes_file,
            crops=int(crops),
            clips=int(clips),
            scale_size=scale_size,
            crop_size=crop_size,
            device=device,
            amp=amp,
            on_result=show,
        )
    if failed:
        raise click.exceptions.Exit(1)


def _predict_online(
    predict_online: Any,
    checkpoint: Path,
    videos: tuple[Path, ...],
    classes_file: str | None,
    scale_size: int | None,
    crop_size: int | None,
    device: str,
) -> int:
    """Stream every video through the online model, printing as it goes; returns how many could not be read."""
    from ssv2prep.errors import SampleError

    failed = 0
    for video in videos:
        out.print(f"{video} (online):", markup=False)

        def show(i: int, top: list[tuple[str, float]]) -> None:
            out.print(f"  frame {i + 1:4d}: {top[0][0]} ({100 * top[0][1]:.1f}%)", markup=False)

        try:
            predict_online(
                checkpoint,
                video,
                classes_file=classes_file,
                scale_size=scale_size,
                crop_size=crop_size,
                device=device,
                on_frame=show,
            )
        except SampleError as exc:
            failed += 1
            click.echo(f"error: {exc}", err=True)
    return failed
