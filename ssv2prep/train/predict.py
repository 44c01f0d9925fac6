"""`ssv2prep predict`: classify video files directly (decode, sample, transform like eval) or online, frame by frame.

Offline: the test sampling (segment centres; `clips=2` adds segment starts) and eval crops, scores = mean of raw
logits over views, then softmax for the printed probabilities. Online (`--online`, unidirectional models only):
every frame goes through `OnlineTSM.step` with the shift cache of the previous frame; the running prediction is the
softmax of the mean logits of the last T frames.

The model runs in fp32 (the official test's arithmetic) on the chosen device unless `amp` asks for autocast. A file
that cannot be decoded becomes a `Prediction` with an `error` and the other files are still classified.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssv2prep.data.sampling import SamplingSpec, sample_clips
from ssv2prep.data.transforms import eval_views, normalize_clips
from ssv2prep.errors import ConfigError, SampleError
from ssv2prep.prep.decode import decode_rgb
from ssv2prep.train.dist import pick_device
from ssv2prep.train.evaluation import load_for_eval, trained_sizes
from ssv2prep.train.runtime import amp_dtype, check_device, exact_fp32, precision_name

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prediction:
    """Top-5 (class name, probability) of one video, or (empty top5) the one-line reason it could not be read."""

    video: Path
    top5: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Runner:
    """A model ready to score clips: its device and autocast dtype (None: fp32)."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype | None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def _runner(model: torch.nn.Module, device: str, amp: bool) -> _Runner:
    check_device(device)
    dev = pick_device(device)
    dtype = amp_dtype("auto" if amp else "off", dev)
    if amp and dtype is None:
        log.info("--amp has no effect on %s: predicting in fp32", dev)
    log.info("predicting on %s in %s", dev, precision_name(dtype))
    return _Runner(model.to(dev), dev, dtype)


def load_class_names(path: str | Path) -> list[str]:
    """Class names from `classes.json` (a list), an SSv2 `labels.json` (name -> index) or a shard index
    (`ssv2-train.json`: its `class_names`, else the class file beside it); a local path or a store URL (`s3://`)."""
    from ssv2prep import storage
    from ssv2prep.data.source import index_classes
    from ssv2prep.prep.index import INDEX_KIND

    try:
        obj = json.loads(storage.read_bytes(path))
    except (storage.StorageError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--classes {path}: not a readable JSON file ({' '.join(str(exc).split())[:120]})") from exc
    if isinstance(obj, list):
        return [str(c) for c in obj]
    if isinstance(obj, dict) and obj.get("__kind__") == INDEX_KIND:
        names = index_classes(str(path), obj)
        if names is None:
            raise ConfigError(f"--classes {path}: the index does not carry its classes (no class_names, no class list)")
        return list(names)
    if isinstance(obj, dict):
        return [name for name, _ in sorted(obj.items(), key=lambda kv: int(kv[1]))]
    raise ConfigError(f"{path}: expected a JSON list of class names or a labels.json object")


def _top5(logits: torch.Tensor, classes: list[str]) -> list[tuple[str, float]]:
    probs = torch.softmax(logits.float(), dim=-1)
    values, indices = probs.topk(min(5, probs.shape[-1]))
    return [(classes[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]


def _frames_tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(decode_rgb(path)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W) uint8


def _offline_logits(
    runner: _Runner,
    frames: torch.Tensor,
    *,
    segments: int,
    crops: int,
    clips: int,
    scale_size: int,
    crop_size: int,
) -> torch.Tensor:
    spec = SamplingSpec(mode="test", num_segments=segments, clips=clips)
    views = []
    for indices in sample_clips(frames.shape[0], spec):
        views.append(eval_views(frames[indices], crops=crops, crop_size=crop_size, scale_size=scale_size))
    clips_uint8 = torch.cat(views)  # (clips * crops, T, 3, S, S)
    with torch.inference_mode(), exact_fp32(runner.dtype is None), runner.autocast():
        return runner.model(normalize_clips(clips_uint8, runner.device)).float().mean(dim=0).cpu()


def predict_videos(
    checkpoint: Path,
    videos: list[Path],
    *,
    classes_file: str | Path | None = None,
    crops: int = 1,
    clips: int = 1,
    scale_size: int | None = None,
    crop_size: int | None = None,
    device: str = "cpu",
    amp: bool = False,
    on_result: Callable[[Prediction], None] | None = None,
) -> list[Prediction]:
    """Top-5 classes of each video under the eval protocol, at the sizes the checkpoint was trained with unless
    `scale_size` / `crop_size` are given (as `eval`).

    A video that cannot be decoded (no video stream, not a video, truncated) gets a `Prediction` whose `error`
    names the file; the others are classified all the same. `on_result` sees each one as it is done.
    """
    model, cfg, classes = load_for_eval(checkpoint, None)
    names = _class_names(classes, classes_file, cfg.num_classes, checkpoint)
    crop_size, scale_size = trained_sizes(checkpoint, crop_size, scale_size)
    runner = _runner(model, device, amp)
    results = []
    for video in videos:
        try:
            frames = _frames_tensor(video)
        except SampleError as exc:
            result = Prediction(video, error=f"{video}: {exc}")
        else:
            logits = _offline_logits(
                runner,
                frames,
                segments=cfg.num_segments,
                crops=crops,
                clips=clips,
                scale_size=scale_size,
                crop_size=crop_size,
            )
            result = Prediction(video, _top5(logits, names))
        results.append(result)
        if on_result:
            on_result(result)
    return results


def _class_names(
    from_ckpt: list[str] | None, classes_file: str | Path | None, num_classes: int, checkpoint: Path
) -> list[str]:
    names = load_class_names(classes_file) if classes_file else from_ckpt
    if names is None:
        raise ConfigError("this checkpoint has no class names: pass --classes classes.json (or labels.json)")
    if len(names) != num_classes:
        raise ConfigError(
            f"{classes_file or checkpoint}: {len(names)} class names for a model with {num_classes} outputs"
        )
    if from_ckpt is not None and names != from_ckpt:
        # Output i of the model means the checkpoint's class i: another list would print wrong names.
        first = next(i for i, (a, b) in enumerate(zip(names, from_ckpt, strict=True)) if a != b)
        raise ConfigError(
            f"--classes {classes_file}: its class list differs from the checkpoint's ({checkpoint}) at index {first} "
            f"({names[first]!r} vs {from_ckpt[first]!r}); leave --classes out to use the checkpoint's names"
        )
    return names


def predict_online(
    checkpoint: Path,
    video: Path,
    *,
    classes_file: str | Path | None = None,
    scale_size: int | None = None,
    crop_size: int | None = None,
    device: str = "cpu",
    on_frame: Callable[[int, list[tuple[str, float]]], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Run a unidirectional model frame by frame, in fp32; return (and report) the running top-5 after every frame.

    Raises:
        SampleError: when `video` cannot be decoded (the message names the file).
    """
    from ssv2prep.models.online import OnlineTSM

    model, cfg, classes = load_for_eval(checkpoint, None)
    names = _class_names(classes, classes_file, cfg.num_classes, checkpoint)
    crop_size, scale_size = trained_sizes(checkpoint, crop_size, scale_size)
    runner = _runner(model, device, amp=False)  # the shift caches stay in the model's dtype
    online = OnlineTSM(runner.model)
    try:
        decoded = _frames_tensor(video)
    except SampleError as exc:
        raise type(exc)(f"{video}: {exc}", reason=exc.reason) from exc
    views = eval_views(decoded, crops=1, crop_size=crop_size, scale_size=scale_size)[0]
    frames = normalize_clips(views, runner.device)  # (N, 3, S, S)
    cache = online.init_cache(1, runner.device, height=frames.shape[-2], width=frames.shape[-1])
    history: list[torch.Tensor] = []
    running = []
    with torch.inference_mode(), exact_fp32():
        for i in range(frames.shape[0]):
            logits, cache = online.step(frames[i : i + 1], cache)
            history = [*history[-(cfg.num_segments - 1) :], logits[0]] if cfg.num_segments > 1 else [logits[0]]
            top = _top5(torch.stack(history).mean(dim=0).cpu(), names)
            running.append(top)
            if on_frame:
                on_frame(i, top)
    return running
