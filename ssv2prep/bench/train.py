"""`bench train`: the GPU check. Short real training runs on generated shards, one per variant, through the public
`ssv2prep.train.run.fit` API, with pass/fail per row.

Variants: precision (fp32, fp16 with a GradScaler, bf16) x `torch.compile` (off, on), with channels_last (the CUDA
default), plus bf16 without channels_last and bf16 with GPU JPEG decode (`DataConfig.gpu_decode`). A variant the
device cannot run is a SKIP row that says why (on CPU only fp32 eager runs: the trainer autocasts on CUDA only).

Per row: steps run, first / last loss (the first and last train records: the runs log every `LOG_EVERY` steps,
so each is a mean over up to that many steps), all losses finite, the loss falling (last < first), clips/s and the
share of step time spent waiting for data (from the run's `metrics.jsonl`, over the log windows after `WARMUP_STEPS`
warm-up steps), and the host syncs per step (eager rows).

Host syncs: the training loop reads its device-side loss and accuracy on the host only at sync points (every
`log_every` steps, an epoch's first step, mid-epoch checkpoints, the epoch's end; `fit`'s step events say which
steps synced). The check runs eager rows under `torch.cuda.set_sync_debug_mode("warn")` and records each warning with
the Python line that caused it. Expected: syncs from `ssv2prep/train/` in a step that synced (those reads, and the
epoch's end, which falls into the next epoch's first step), from `torch/amp/` in any step (the fp16 GradScaler's inf
check), and in the GPU-decode row those of the loader's decode and torchvision (nvjpeg runs in the training process
there). Any other sync, including one from `ssv2prep/train/` between sync points, is unexpected and fails the row.

Eval parity: the fp32 eager run's checkpoint, loaded for evaluation, scores the same validation clips on CPU in fp32
and on the device in fp32 (PyTorch's default TF32 setting for convolutions); it passes when
`max |logit diff| <= PARITY_RTOL * max(1, max |CPU logit|)`.

With two or more GPUs, also a 2-process DDP run (`torchrun`, NCCL) whose validation set is a single shard, so one
rank has no validation data: it checks that the ranks agree on steps and that evaluation sees every video once.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ssv2prep.errors import ConfigError
from ssv2prep.train.runtime import cuda_has_native_bf16

log = logging.getLogger(__name__)

LOG_EVERY = 5  # the runs' log_every (see `log_every_for`): most steps do not sync, so a sync between them shows
WARMUP_STEPS = 5
PARITY_RTOL = 1e-2
PARITY_VIDEOS = 8
SYNC_MESSAGE = "synchronizing CUDA operation"
EXPECTED_SYNC_PLACES = ("torch/amp/",)  # in any step
SYNC_POINT_PLACES = ("ssv2prep/train/",)  # in steps that synced
GPU_DECODE_SYNC_PLACES = ("ssv2prep/data/loader.py", "torchvision/")
DDP_TIMEOUT_S = 180
NUM_PAIRS = 2  # 4 classes


@dataclass(frozen=True, slots=True)
class Variant:
    """One training configuration of the check."""

    name: str
    amp: str  # RuntimeConfig.amp
    compile: bool = False
    channels_last: bool = True
    gpu_decode: bool = False


VARIANTS = (
    Variant("fp32", "off"),
    Variant("fp16+scaler", "fp16"),
    Variant("bf16", "bf16"),
    Variant("fp32 compile", "off", compile=True),
    Variant("fp16+scaler compile", "fp16", compile=True),
    Variant("bf16 compile", "bf16", compile=True),
    Variant("bf16 no channels_last", "bf16", channels_last=False),
    Variant("bf16 gpu decode", "bf16", gpu_decode=True),
)


@dataclass(frozen=True, slots=True)
class Sizes:
    """Model and data sizes of the check on one kind of device."""

    backbone: str
    segments: int
    crop: int
    scale: int
    batch_size: int
    height: int  # of the synthesized videos
    steps_per_epoch: int  # at most: fewer videos to synthesize, more (short) epochs
    lr: float  # not scaled by batch; high enough that the loss falls within 20 steps from random init


SIZES = {
    # TSM-R50 8 frames at 224 px: the official recipe's model, so clips/s is the number a user cares about
    "cuda": Sizes("resnet50", 8, 224, 256, 16, 256, 5, 0.01),
    # tiny: what CI can afford on two shared cores
    "cpu": Sizes("resnet18", 2, 32, 40, 4, 48, 1000, 0.003),
}


@dataclass(frozen=True, slots=True)
class TrainBenchConfig:
    """Options of `bench train` (None: the device's default from `SIZES`)."""

    device: str = "cuda"
    steps: int = 20
    backbone: str | None = None
    segments: int | None = None
    crop: int | None = None
    batch_size: int | None = None
    workers: int | None = None
    lr: float | None = None
    compile: bool = True  # include the torch.compile rows
    ddp: bool | None = None  # None: when 2+ GPUs are present
    work_dir: Path | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError naming the bad flag."""
        if self.device not in SIZES:
            raise ConfigError(f"--device must be one of {sorted(SIZES)} (got {self.device!r})")
        if self.steps < 2:
            raise ConfigError(f"--steps must be >= 2 (got {self.steps})")
        for flag, value in (("--segments", self.segments), ("--crop", self.crop), ("--batch-size", self.batch_size)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} must be >= 1 (got {value})")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (got {self.workers})")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"--lr must be > 0 (got {self.lr})")

    def sizes(self) -> Sizes:
        """The device's sizes with the given overrides."""
        base = SIZES[self.device]
        crop = self.crop or base.crop
        return replace(
            base,
            backbone=self.backbone or base.backbone,
            segments=self.segments or base.segments,
            crop=crop,
            scale=max(crop, round(crop * base.scale / base.crop)),
            batch_size=self.batch_size or base.batch_size,
            lr=self.lr or base.lr,
        )


def cuda_skip_reason(device: str) -> str | None:
    """Why `--device cuda` cannot run here (None when it can, or for CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA"
    return None


# ------------------------------------------------------------------------------------------------------ data
def _epoch_plan(steps: int, cap: int) -> tuple[int, int]:
    """(steps per epoch, epochs) with steps per epoch <= cap dividing `steps`, so the runs do exactly `steps`."""
    per_epoch = next(n for n in range(min(cap, steps), 0, -1) if steps % n == 0)
    return per_epoch, steps // per_epoch


def log_every_for(steps: int) -> int:
    """The runs' `log_every`: `LOG_EVERY`, or fewer for a short run, so that it has two log windows at least (the
    first and last loss must come from different steps)."""
    return max(1, min(LOG_EVERY, steps // 2))


def make_data(work: Path, sizes: Sizes, *, steps_per_epoch: int, seed: int, workers: int = 1) -> dict[str, Any]:
    """Synthesize and shard a dataset: a train split of at least `steps_per_epoch * batch` videos (up to 16
    shards) and a 4-video validation split in one shard. Returns the index paths and video counts."""
    from ssv2prep.bench.data import synth_shards
    from ssv2prep.prep.synth import SynthConfig

    classes = 2 * NUM_PAIRS
    train_videos = steps_per_epoch * sizes.batch_size
    per_class = -(-train_videos // classes)
    frames = max(sizes.segments, 8)
    # one validation shard (so a second rank gets none), and train shards enough for the loader's worker slots
    per_shard = max(classes, -(-per_class * classes // 16))
    out = synth_shards(
        work,
        SynthConfig(
            num_pairs=NUM_PAIRS,
            train_per_class=per_class,
            validation_per_class=1,
            test_per_class=0,
            height=sizes.height,
            min_frames=2 * frames,
            max_frames=3 * frames,
            seed=seed,
        ),
        splits=("train", "validation"),
        videos_per_shard=per_shard,
        workers=workers,
        max_failed_fraction=0.0,
    )
    return {
        "train": str(out / "ssv2-train.json"),
        "val": str(out / "ssv2-validation.json"),
        "train_videos": per_class * classes,
        "val_videos": classes,
    }


# ------------------------------------------------------------------------------------------------------ runs
def _train_config(
    cfg: TrainBenchConfig, sizes: Sizes, data: dict[str, Any], v: Variant, out: Path, epochs: int, steps: int
):
    from ssv2prep.data.loader import DataConfig
    from ssv2prep.models.tsm import ModelConfig
    from ssv2prep.train.config import OptimConfig, RuntimeConfig, TrainConfig, default_num_workers

    workers = cfg.workers if cfg.workers is not None else (default_num_workers() if cfg.device == "cuda" else 1)
    return TrainConfig(
        train=data["train"],
        val=data["val"],
        out=out,
        model=ModelConfig(backbone=sizes.backbone, num_segments=sizes.segments, dropout=0.0),
        data=DataConfig(
            num_segments=sizes.segments,
            crop_size=sizes.crop,
            scale_size=sizes.scale,
            batch_size=sizes.batch_size,
            num_workers=workers,
            gpu_decode=v.gpu_decode,
        ),
        optim=OptimConfig(epochs=epochs, lr=sizes.lr, scale_lr=False, lr_steps=(), weight_decay=1e-4),
        runtime=RuntimeConfig(
            device=cfg.device,
            amp=v.amp,
            channels_last=v.channels_last if cfg.device == "cuda" else False,
            compile=v.compile,
            log_every=log_every_for(steps),
            eval_every=epochs,
            seed=cfg.seed,
        ),
    )


def variant_skip_reason(v: Variant, device: str, *, compile_rows: bool) -> str | None:
    """Why this device cannot run `v` (None when it can)."""
    if device == "cpu":
        if v.amp != "off":
            return "mixed precision: the trainer autocasts on CUDA only"
        if v.gpu_decode:
            return "GPU decode needs CUDA"
        if v.compile:
            return "compile rows run on CUDA only (a CPU compile needs a C++ toolchain and minutes)"
        return None
    if v.compile and not compile_rows:
        return "--no-compile"
    if v.compile and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton, which is not installed"
    if v.amp == "bf16" and not cuda_has_native_bf16():
        return "this GPU has no native bf16 (it would only emulate it)"
    return None


class SyncRecorder:
    """Host syncs per training step under `torch.cuda.set_sync_debug_mode("warn")`, by the Python line that caused
    them. `on_event` is `fit`'s event callback: each "step" event closes one step's count and says whether that step
    was a sync point of the loop."""

    def __init__(self, expected: tuple[str, ...] = EXPECTED_SYNC_PLACES) -> None:
        self.expected = expected
        self.caught: list[warnings.WarningMessage] = []
        self.per_step: list[tuple[bool, list[str]]] = []  # (synced, places)
        self._mark = 0

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "start":
            self._mark = len(self.caught)
        elif kind == "step":
            step = self.caught[self._mark :]
            self._mark = len(self.caught)
            places = [_place(w) for w in step if SYNC_MESSAGE in str(w.message)]
            self.per_step.append((bool(data["synced"]), places))

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.caught = caught
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)

    def _is_expected(self, place: str, synced: bool) -> bool:
        return any(e in place for e in self.expected) or (synced and any(e in place for e in SYNC_POINT_PLACES))

    def summary(self, warmup: int) -> dict[str, Any]:
        """Counts over the steps after `warmup`: syncs and unexpected syncs per step, by place, and how many of the
        counted steps were not sync points (the steps where the loop itself must not sync)."""
        steady = self.per_step[warmup:] or self.per_step
        places: dict[str, int] = {}
        unexpected: dict[str, int] = {}
        for synced, step in steady:
            for place in step:
                places[place] = places.get(place, 0) + 1
                if not self._is_expected(place, synced):
                    unexpected[place] = unexpected.get(place, 0) + 1
        n = max(1, len(steady))
        return {
            "steps_counted": len(steady),
            "steps_between_syncs": sum(not synced for synced, _ in steady),
            "syncs_per_step": sum(places.values()) / n,
            "unexpected_per_step": sum(unexpected.values()) / n,
            "places": places,
            "unexpected": unexpected,
        }


def _place(w: warnings.WarningMessage) -> str:
    path = str(w.filename).replace(os.sep, "/")
    for anchor in ("ssv2prep/", "torch/"):
        if anchor in path:
            path = path[path.rindex(anchor) :]
            break
    return f"{path}:{w.lineno}"


def log_windows(records: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int, int]]:
    """Each train record of a run's `metrics.jsonl` with the first step and the number of steps its log window
    covers: the steps since the previous train record of its epoch, or since the epoch's first step."""
    epoch_steps = {r["epoch"]: r["steps"] for r in records if r["kind"] == "epoch"}
    train = sorted((r for r in records if r["kind"] == "train"), key=lambda r: r["step"])
    windows, last_step = [], {}
    for r in train:
        epoch = r["epoch"]
        first = last_step[epoch] + 1 if epoch in last_step else sum(n for e, n in epoch_steps.items() if e < epoch)
        windows.append((r, first, r["step"] - first + 1))
        last_step[epoch] = r["step"]
    return windows


def summarize_metrics(records: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """The row's numbers from a run's `metrics.jsonl` records (train records: one per log window, epoch records)."""
    windows = log_windows(records)
    losses = [float(r["loss"]) for r, _, _ in windows]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    first = losses[0] if losses else math.nan
    last = losses[-1] if losses else math.nan
    timed = [(r, n) for r, first_step, n in windows if first_step >= WARMUP_STEPS and r["clips_per_s"] > 0]
    timed = timed or [(r, n) for r, _, n in windows if r["clips_per_s"] > 0]
    clips = [n * batch_size for _, n in timed]
    seconds = [c / r["clips_per_s"] for (r, _), c in zip(timed, clips, strict=True)]
    total = sum(seconds)
    wait = sum(r["data_wait"] * t for (r, _), t in zip(timed, seconds, strict=True))
    evals = [r for r in records if r["kind"] == "eval"]
    return {
        "steps": int(sum(r["steps"] for r in records if r["kind"] == "epoch")),
        "first_loss": first,
        "last_loss": last,
        "finite": finite,
        "decreasing": finite and last < first,
        "clips_per_s": sum(clips) / total if total > 0 else math.nan,
        "data_wait": wait / total if total > 0 else math.nan,
        "eval_videos": evals[-1]["videos"] if evals else None,
    }


def _verdict(row: dict[str, Any], steps: int) -> tuple[str, str]:
    problems = []
    if row["steps"] != steps:
        problems.append(f"ran {row['steps']} of {steps} steps")
    if not row["finite"]:
        problems.append("a loss is not finite")
    elif not row["decreasing"]:
        problems.append(f"loss did not fall ({row['first_loss']:.3f} -> {row['last_loss']:.3f})")
    syncs = row.get("syncs")
    if syncs and syncs["unexpected"]:
        problems.append("unexpected host syncs at " + ", ".join(sorted(syncs["unexpected"])))
    return ("FAIL", "; ".join(problems)) if problems else ("PASS", "")


def run_variant(
    cfg: TrainBenchConfig, sizes: Sizes, data: dict[str, Any], v: Variant, out: Path, epochs: int, *, steps: int
) -> dict[str, Any]:
    """Train one variant for `epochs` (`steps` steps in all); its row (see the module docstring)."""
    from ssv2prep.train.report import read_metrics
    from ssv2prep.train.run import fit

    tcfg = _train_config(cfg, sizes, data, v, out, epochs, steps)
    # GPU decode runs nvjpeg in the training process: its syncs are part of that design, not a leak
    expected = EXPECTED_SYNC_PLACES + (GPU_DECODE_SYNC_PLACES if v.gpu_decode else ())
    recorder = SyncRecorder(expected) if cfg.device == "cuda" and not v.compile else None
    start = time.perf_counter()
    error = None
    try:
        if recorder is not None:
            with recorder.recording():
                fit(tcfg, on_event=recorder.on_event)
        else:
            fit(tcfg)
    except Exception as exc:  # a failing variant is a FAIL row, and the other variants still run
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        log.warning("bench train: variant %s failed: %s", v.name, error)
    row = {"variant": v.name, **asdict(v), **summarize_metrics(read_metrics(out / "metrics.jsonl"), sizes.batch_size)}
    row["seconds"] = time.perf_counter() - start
    row["syncs"] = recorder.summary(WARMUP_STEPS) if recorder is not None else None
    row["status"], row["reason"] = _verdict(row, steps)
    if error:
        row["status"], row["reason"] = "FAIL", error
    if v.compile:
        torch._dynamo.reset()  # drop the compiled graphs (and the model they hold) before the next variant
    if cfg.device == "cuda":
        torch.cuda.empty_cache()
    return row


def eval_parity(checkpoint: Path, val: str, sizes: Sizes, device: str) -> dict[str, Any]:
    """Max |logit diff| of one checkpoint on the same validation clips, CPU fp32 against `device` fp32."""
    from ssv2prep.data.loader import DataConfig, build_eval_loader, normalize_clips
    from ssv2prep.data.source import resolve_source
    from ssv2prep.train.evaluation import load_for_eval

    model, _, _ = load_for_eval(checkpoint, None)
    dcfg = DataConfig(
        num_segments=sizes.segments,
        crop_size=sizes.crop,
        scale_size=sizes.scale,
        batch_size=PARITY_VIDEOS,
        num_workers=0,
        pin_memory=False,
    )
    batch = next(iter(build_eval_loader(resolve_source(val), dcfg)))
    clips = batch.clips.reshape(-1, *batch.clips.shape[2:])  # (B * V, T, 3, H, W)
    with torch.inference_mode():
        reference = model(normalize_clips(clips, torch.device("cpu"))).float()
        dev = torch.device(device)
        other = copy.deepcopy(model).to(dev)(normalize_clips(clips, dev)).float().cpu()
    diff = float((reference - other).abs().max())
    scale = max(1.0, float(reference.abs().max()))
    tolerance = PARITY_RTOL * scale
    return {
        "device": device,
        "videos": len(batch.keys),
        "max_abs_logit": float(reference.abs().max()),
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "tf32_convolutions": bool(torch.backends.cudnn.allow_tf32) if device == "cuda" else False,
        "status": "PASS" if diff <= tolerance else "FAIL",
    }


def run_ddp(cfg: TrainBenchConfig, sizes: Sizes, data: dict[str, Any], out: Path, epochs: int) -> dict[str, Any]:
    """A 2-process `torchrun` training run (NCCL on CUDA, gloo on CPU) with the 1-shard validation set."""
    from ssv2prep.train.report import read_metrics

    # Each rank runs steps_per_epoch / 2 steps per epoch (the total batch doubles).
    expected_steps = (data["train_videos"] // (2 * sizes.batch_size)) * epochs
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ssv2prep",
        "-q",
        "train",
        "--train",
        data["train"],
        "--val",
        data["val"],
        "--out",
        str(out),
        "--backbone",
        sizes.backbone,
        "--segments",
        str(sizes.segments),
        "--crop-size",
        str(sizes.crop),
        "--scale-size",
        str(sizes.scale),
        "--batch-size",
        str(sizes.batch_size),
        "--epochs",
        str(epochs),
        "--lr",
        str(sizes.lr),
        "--no-lr-scaling",
        "--lr-steps",
        "",
        "--dropout",
        "0.0",
        "--log-every",
        str(log_every_for(expected_steps)),
        "--eval-every",
        str(epochs),
        "--device",
        cfg.device,
        "--seed",
        str(cfg.seed),
    ]
    if cfg.workers is not None:
        cmd += ["--workers", str(cfg.workers)]
    if cfg.device == "cuda":
        cmd += ["--amp", "auto"]  # bf16 where the GPU has it natively, else fp16 with a loss scaler
    start = time.perf_counter()
    rc, tail = _run_group(cmd, timeout=DDP_TIMEOUT_S)
    records = read_metrics(out / "metrics.jsonl")
    row = {
        "variant": f"DDP 2 ranks ({'nccl' if cfg.device == 'cuda' else 'gloo'}), 1-shard val",
        **summarize_metrics(records, sizes.batch_size),
        "seconds": time.perf_counter() - start,
        "syncs": None,
        "returncode": rc,
    }
    problems = []
    if rc != 0:
        problems.append(f"torchrun exited {rc}: {' '.join(tail.split())[-300:]}")
    if row["steps"] != expected_steps:
        problems.append(f"ran {row['steps']} of {expected_steps} steps")
    if not row["finite"]:
        problems.append("a loss is not finite")
    if row["eval_videos"] != data["val_videos"]:
        problems.append(f"evaluation saw {row['eval_videos']} of {data['val_videos']} validation videos")
    row["status"], row["reason"] = ("FAIL", "; ".join(problems)) if problems else ("PASS", "")
    # Two ranks: clips/s in metrics.jsonl is rank 0's; the per-GPU number is that.
    return row


def _run_group(cmd: list[str], *, timeout: float) -> tuple[int, str]:
    """Run `cmd` (torchrun) in its own process group; (exit code, the end of its output). On timeout torchrun is
    asked to stop its ranks (SIGTERM), then its group is killed, so no rank is left waiting on a collective."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output[-2000:]
    except subprocess.TimeoutExpired:
        # torchrun starts each rank in a session of its own: SIGTERM lets it stop them (and their workers) itself
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return -1, f"timed out after {timeout:g} s (a rank waiting on the other in a collective?)"


def _environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0], "device": device}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
    return env


def run_train_bench(cfg: TrainBenchConfig, *, on_progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the check; returns {"skipped": reason} without CUDA, else the rows, parity, DDP row and a verdict.

    Raises:
        ConfigError: bad options.
    """
    cfg.validate()
    say = on_progress or (lambda _msg: None)
    reason = cuda_skip_reason(cfg.device)
    if reason:
        return {"skipped": reason, "device": cfg.device}
    sizes = cfg.sizes()
    cap = SIZES[cfg.device].steps_per_epoch
    steps_per_epoch, epochs = _epoch_plan(cfg.steps, cap)
    work = Path(tempfile.mkdtemp(prefix="bench-train-", dir=cfg.work_dir))
    start = time.perf_counter()
    try:
        say(f"generating data ({steps_per_epoch * sizes.batch_size} train videos at {sizes.height} px)")
        data = make_data(
            work, sizes, steps_per_epoch=steps_per_epoch, seed=cfg.seed, workers=0 if cfg.device == "cuda" else 1
        )
        # the train split is rounded up to whole classes: with batch < 4 an epoch can take a step more
        steps = data["train_videos"] // sizes.batch_size * epochs
        rows, parity = [], None
        for i, v in enumerate(VARIANTS):
            skip = variant_skip_reason(v, cfg.device, compile_rows=cfg.compile)
            if skip:
                rows.append({"variant": v.name, **asdict(v), "status": "SKIP", "reason": skip})
                continue
            say(f"training {v.name} ({steps} steps)")
            out = work / f"run-{i}"
            rows.append(run_variant(cfg, sizes, data, v, out, epochs, steps=steps))
            if parity is None and v.amp == "off" and not v.compile and (out / "last.pt").is_file():
                say("eval parity: CPU fp32 against the device")
                parity = eval_parity(out / "last.pt", data["val"], sizes, cfg.device)
        gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
        want_ddp = cfg.ddp if cfg.ddp is not None else gpus >= 2
        ddp = None
        if want_ddp and cfg.device == "cuda" and gpus < 2:
            ddp = {"variant": "DDP 2 ranks (nccl)", "status": "SKIP", "reason": f"needs 2 GPUs ({gpus} here)"}
        elif want_ddp:
            say("DDP: 2 processes with torchrun")
            ddp = run_ddp(cfg, sizes, data, work / "run-ddp", epochs)
        ran = [r for r in [*rows, ddp] if r is not None and r["status"] != "SKIP"]
        ok = bool(ran) and all(r["status"] == "PASS" for r in ran) and (parity is None or parity["status"] == "PASS")
        return {
            "device": cfg.device,
            "environment": _environment(cfg.device),
            "sizes": asdict(sizes),
            "steps": steps,
            "epochs": epochs,
            "data": {k: data[k] for k in ("train_videos", "val_videos")},
            "rows": rows,
            "parity": parity,
            "ddp": ddp,
            "seconds": time.perf_counter() - start,
            "status": "PASS" if ok else "FAIL",
        }
    finally:
        if cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ table
def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def format_train_bench(result: dict[str, Any]) -> str:
    """The result as a markdown table (paste into the README) plus the parity and verdict lines."""
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    env, s = result["environment"], result["sizes"]
    where = f"{env.get('gpu', 'CPU')}" + (f" x{env['gpus']}" if env.get("gpus", 1) > 1 else "")
    lines = [
        f"bench train on {where}, torch {env['torch']}: TSM-{s['backbone']} {s['segments']} frames at {s['crop']} px, "
        f"batch {s['batch_size']}, {result['steps']} steps per variant on generated shards",
        "",
        "| variant | steps | first loss | last loss | finite | falling | clips/s | data wait | syncs/step | result |",
        "|---|---:|---:|---:|:-:|:-:|---:|---:|---:|---|",
    ]
    rows = [*result["rows"], *([result["ddp"]] if result.get("ddp") else [])]
    for r in rows:
        if r["status"] == "SKIP":
            lines.append(f"| {r['variant']} | - | - | - | - | - | - | - | - | SKIP: {r['reason']} |")
            continue
        syncs = r.get("syncs")
        sync_text = "-" if not syncs else f"{syncs['syncs_per_step']:.1f} ({syncs['unexpected_per_step']:.1f} unexp.)"
        verdict = r["status"] + (f": {r['reason']}" if r["reason"] else "")
        lines.append(
            f"| {r['variant']} | {r['steps']} | {_fmt(r['first_loss'], '.3f')} | {_fmt(r['last_loss'], '.3f')} | "
            f"{'yes' if r['finite'] else 'no'} | {'yes' if r['decreasing'] else 'no'} | "
            f"{_fmt(r['clips_per_s'], '.1f')} | {_fmt(100 * r['data_wait'], '.0f')}% | {sync_text} | {verdict} |"
        )
    p = result.get("parity")
    lines.append("")
    if p:
        lines.append(
            f"eval parity (CPU fp32 vs {p['device']} fp32, {p['videos']} videos): max |logit diff| "
            f"{p['max_abs_diff']:.2e}, tolerance {p['tolerance']:.2e} "
            f"({PARITY_RTOL:g} x max(1, max |logit|)): {p['status']}"
        )
    else:
        lines.append("eval parity: not run (no fp32 eager checkpoint)")
    lines.append(
        f"clips/s and data wait: after {WARMUP_STEPS} warm-up steps, per GPU; syncs: eager rows under "
        f"set_sync_debug_mode('warn'); {result['status']} in {result['seconds']:.0f} s"
    )
    return "\n".join(lines)
