"""`ssv2prep predict`: classify video files directly (decode, sample, transform like eval) or online, frame by frame.

Offline: the test sampling (segment centres; `clips=2` adds segment starts) and eval crops, scores = mean of raw
logits over views, then softmax for the printed probabilities. Online (`--online`, unidirectional models only):
every frame goes through `OnlineTSM.step` with the shift cache of the previous frame; the running prediction is the
softmax of the mean logits of the last T frames.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ssv2prep.data.sampling import SamplingSpec, sample_clips
from ssv2prep.data.transforms import eval_views, normalize_clips
from ssv2prep.errors import ConfigError
from ssv2prep.prep.decode import decode_rgb
from ssv2prep.train.evaluation import load_for_eval, trained_sizes

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prediction:
    """Top-5 (class name, probability) of one video."""

    video: Path
    top5: list[tuple[str, float]]


def load_class_names(path: Path) -> list[str]:
    """Class names from `classes.json` (a list) or an SSv2 `labels.json` (name -> index)."""
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(obj, list):
        return [str(c) for c in obj]
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
    model: torch.nn.Module,
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
    with torch.inference_mode():
        return model(normalize_clips(clips_uint8, torch.device("cpu"))).mean(dim=0)


def predict_videos(
    checkpoint: Path,
    videos: list[Path],
    *,
    classes_file: Path | None = None,
    crops: int = 1,
    clips: int = 1,
    scale_size: int | None = None,
    crop_size: int | None = None,
) -> list[Prediction]:
    """Top-5 classes of each video under the eval protocol (on the CPU), at the sizes the checkpoint was trained
    with unless `scale_size` / `crop_size` are given (as `eval`)."""
    model, cfg, classes = load_for_eval(checkpoint, None)
    names = _class_names(classes, classes_file, cfg.num_classes)
    crop_size, scale_size = trained_sizes(checkpoint, crop_size, scale_size)
    results = []
    for video in videos:
        logits = _offline_logits(
            model,
            _frames_tensor(video),
            segments=cfg.num_segments,
            crops=crops,
            clips=clips,
            scale_size=scale_size,
            crop_size=crop_size,
        )
        results.append(Prediction(video, _top5(logits, names)))
    return results


def _class_names(from_ckpt: list[str] | None, classes_file: Path | None, num_classes: int) -> list[str]:
    names = load_class_names(classes_file) if classes_file else from_ckpt
    if names is None:
        raise ConfigError("this checkpoint has no class names: pass --classes classes.json (or labels.json)")
    if len(names) != num_classes:
        raise ConfigError(f"{len(names)} class names for a model with {num_classes} outputs")
    return names


def predict_online(
    checkpoint: Path,
    video: Path,
    *,
    classes_file: Path | None = None,
    scale_size: int | None = None,
    crop_size: int | None = None,
    on_frame: Callable[[int, list[tuple[str, float]]], None] | None = None,
) -> list[list[tuple[str, float]]]:
    """Run a unidirectional model frame by frame; return (and report) the running top-5 after every frame."""
    from ssv2prep.models.online import OnlineTSM

    model, cfg, classes = load_for_eval(checkpoint, None)
    names = _class_names(classes, classes_file, cfg.num_classes)
    crop_size, scale_size = trained_sizes(checkpoint, crop_size, scale_size)
    online = OnlineTSM(model)
    views = eval_views(_frames_tensor(video), crops=1, crop_size=crop_size, scale_size=scale_size)[0]
    frames = normalize_clips(views, torch.device("cpu"))  # (N, 3, S, S)
    cache = online.init_cache(1, "cpu", height=frames.shape[-2], width=frames.shape[-1])
    history: list[torch.Tensor] = []
    running = []
    with torch.inference_mode():
        for i in range(frames.shape[0]):
            logits, cache = online.step(frames[i : i + 1], cache)
            history = [*history[-(cfg.num_segments - 1) :], logits[0]] if cfg.num_segments > 1 else [logits[0]]
            top = _top5(torch.stack(history).mean(dim=0), names)
            running.append(top)
            if on_frame:
                on_frame(i, top)
    return running
