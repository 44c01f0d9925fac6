"""Options of `train` and `eval` as frozen dataclasses (defaults live here and nowhere else)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.errors import ConfigError
from ssv2prep.train.schedule import SCHEDULES

AMP_MODES = ("auto", "off", "bf16", "fp16")
STANDARD_INDEX = "ssv2-{split}.json"


@dataclass(frozen=True, slots=True)
class OptimConfig:
    """The optimizer and lr schedule (official SSv2 recipe: lr 0.01 per 64 clips, steps at 20 and 40, clip 20)."""

    epochs: int = 50
    lr: float = 0.01  # per 64 clips of total batch unless scale_lr is False
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4  # the paper's value (the official README command leaves the 5e-4 default)
    lr_schedule: str = "step"
    lr_steps: tuple[float, ...] = (20.0, 40.0)
    warmup_epochs: float = 0.0
    clip_grad: float | None = 20.0
    label_smoothing: float = 0.0
    fc_lr5: bool | None = None  # None: True when starting from ImageNet weights, as the official code

    def validate(self) -> None:
        """Raise ConfigError on a bad value."""
        if self.epochs < 1 or self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ConfigError("need --epochs >= 1, --lr > 0, 0 <= --momentum < 1 and --wd >= 0")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(f"--lr-schedule must be one of {list(SCHEDULES)} (got {self.lr_schedule!r})")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError("--clip-grad must be > 0 (or omitted)")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("--label-smoothing must be in [0, 1)")


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """Where and how fast: device, mixed precision, channels_last, torch.compile, logging cadence."""

    device: str = "auto"
    amp: str = "auto"  # auto: bf16 on CUDA when supported, else fp16 with a scaler; off on CPU
    channels_last: bool | None = None  # None: on for CUDA
    compile: bool = False
    log_every: int = 10
    eval_every: int = 1
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: only at the end of each epoch)
    seed: int = 0  # model init; each rank's dropout draws from a seed derived from it and the rank
    dist_timeout_s: float = 900.0  # a collective that waits longer fails (a rank died or hangs) instead of hanging

    def validate(self) -> None:
        """Raise ConfigError on a bad value."""
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"--dist-timeout must be > 0 seconds (got {self.dist_timeout_s})")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"--amp must be one of {list(AMP_MODES)} (got {self.amp!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if self.log_every < 1 or self.eval_every < 1:
            raise ConfigError("--log-every and --eval-every must be >= 1")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (got {self.checkpoint_every})")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Everything `ssv2prep train` needs. `model` and `data` are the model's and loader's own configs."""

    train: str
    out: Path
    model: Any  # ssv2prep.models.tsm.ModelConfig (kept loose here so this module imports without torch)
    data: Any  # ssv2prep.data.loader.DataConfig
    val: str | None = None
    train_index: str | None = None
    val_index: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    allow_changes: bool = False  # resuming with other options (lr, dropout, ...) than the run was started with

    def validate(self) -> None:
        """Validate every section."""
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.runtime.validate()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the whole config (`config.json`, and embedded in checkpoints)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def sources_from_data_dir(data_dir: Path) -> tuple[str, str | None]:
    """(train index, validation index or None) under a shard folder with the standard file names."""
    train = data_dir / STANDARD_INDEX.format(split="train")
    if not train.is_file():
        raise ConfigError(f"--data {data_dir}: no {train.name} there (run `ssv2prep shard --out {data_dir}` first)")
    val = data_dir / STANDARD_INDEX.format(split="validation")
    return str(train), str(val) if val.is_file() else None


def default_num_workers() -> int:
    """Loader workers per process when not given: the cores this process may use, shared by the local ranks
    (torchrun's LOCAL_WORLD_SIZE), at most 8 and at least 1 (0 would decode in the training process itself)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // local))
