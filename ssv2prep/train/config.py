"""Options of `train` and `eval` as frozen dataclasses (defaults live here and nowhere else)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.errors import ConfigError
from ssv2prep.train.schedule import SCHEDULES

AMP_MODES = ("auto", "off", "bf16", "fp16")  # auto: bf16 where the GPU has it natively, else fp16; off: fp32
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


# Keys `fit` writes into config.json beside the options (`run_record`): read back, they are not options.
RECORD_KEYS = frozenset({"classes", "base_lr", "history"})


def run_record(cfg: TrainConfig, *, classes: list[str], base_lr: float, history: list[Any]) -> dict[str, Any]:
    """A run's config.json: the options, then the `RECORD_KEYS` (the class names, the lr after scaling, and the
    option changes of earlier resumes, when there were any)."""
    return cfg.to_dict() | {"classes": classes, "base_lr": base_lr} | ({"history": history} if history else {})


def load_train_config(path: Path) -> dict[str, Any]:
    """The options of a run's `config.json` as a nested dict checked against the config dataclasses: every key
    known, every value of its field's type (lists where tuples are kept as lists, paths as text). `classes`,
    `base_lr` and `history`, which `fit` records beside the options, are dropped.

    Raises:
        ConfigError: an unreadable or non-JSON file, an unknown key or a value of the wrong type, naming the file
            and the dotted key (`optim.lr`).
    """
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a run's config.json (a JSON object)")
    data = {k: v for k, v in data.items() if k not in RECORD_KEYS}
    return _checked(data, TrainConfig, path, "")


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    """A `TrainConfig` from a dict in the form of `TrainConfig.to_dict()` (checked first with `_checked`);
    missing keys take the dataclass defaults."""
    sections = _sections()
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name in sections:
            kwargs[name] = sections[name](**{k: _typed(sections[name], k, v) for k, v in value.items()})
        else:
            kwargs[name] = _typed(TrainConfig, name, value)
    for name in ("model", "data"):
        kwargs.setdefault(name, sections[name]())
    return TrainConfig(**kwargs)


def _sections() -> dict[str, type]:
    from ssv2prep.data.loader import DataConfig  # torch: imported only when a config file is read
    from ssv2prep.models.tsm import ModelConfig

    return {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "runtime": RuntimeConfig}


class _WrongType(Exception):
    pass


def _checked(data: dict[str, Any], cls: type, path: Path, prefix: str) -> dict[str, Any]:
    import typing

    sections = _sections() if cls is TrainConfig else {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    if cls is TrainConfig:
        missing = [name for name in ("train", "out") if name not in data]
        if missing:
            raise ConfigError(f"{path}: no {missing[0]!r} key (not a run's config.json?)")
    checked: dict[str, Any] = {}
    for key, value in data.items():
        dotted = prefix + key
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {dotted!r}")
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {dotted} must be an object of {sections[key].__name__} keys")
            checked[key] = _checked(value, sections[key], path, dotted + ".")
            continue
        try:
            _coerce(value, hints[key])
        except _WrongType:
            raise ConfigError(f"{path}: {dotted} = {value!r} is not of type {_type_name(hints[key])}") from None
        checked[key] = value
    return checked


def _typed(cls: type, name: str, value: Any) -> Any:
    import typing

    return _coerce(value, typing.get_type_hints(cls)[name])


def _coerce(value: Any, hint: Any) -> Any:
    """`value` (as JSON has it) as the field type `hint`; raises _WrongType when it is not one."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except _WrongType:
                    pass
        raise _WrongType
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(_coerce(v, args[0]) for v in value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, str):
        return value
    if hint is Path and isinstance(value, str):
        return Path(value)
    raise _WrongType


def _type_name(hint: Any) -> str:
    return str(hint).replace("pathlib.", "").replace("typing.", "").replace("<class '", "").replace("'>", "")
