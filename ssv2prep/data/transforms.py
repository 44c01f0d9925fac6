"""Clip transforms on uint8 frames, compatible with the official TSM augmentation and test crops (tsm.md section 4).

Frames are uint8 tensors `(N, 3, H, W)` (RGB, N frames of one video); crops and resizes stay in uint8 (bilinear
with antialiasing, which matches PIL's BILINEAR resize that the official code uses), and the float conversion with
ImageNet mean/std happens on the training device in `normalize_clips`.

- Train (`GroupMultiScaleCrop(224, [1, .875, .75, .66])`, `max_distort=1`, 13 fixed offsets): crop sizes are
  `int(short_side * scale)`, snapped to the crop size when within 3 px; one (width, height) pair is drawn from the
  pairs with |i - j| <= 1, one of the 13 fixed offsets is drawn, and the crop is resized to `crop_size` squared; one
  crop for the whole clip. The official frames have a short side of 256 (their extraction); here the crop is
  computed on the frame as if its short side were `scale_size` (256) and mapped back onto the stored frame, so crop
  and resize are one step and the result does not depend on the size the shards were written at. Horizontal flip
  only when asked (SSv2 is not flipped), and then the label is swapped with the index's `flip_pairs`.
- Eval: resize the short side to `scale_size` (torchvision `Resize(256)` sizes), then 1 crop (centre), 3 (left,
  right, centre at the vertical middle), 5 (4 corners + centre) or 10 (those 5, each followed by its mirror), of
  `crop_size`, or of `scale_size` with `full_res`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
MAX_DISTORT = 1
SNAP_PX = 3  # crop sizes within 3 px of the output size snap to it (the official `abs(x - size) < 3`)
NUM_FIXED_OFFSETS = 13

Box = tuple[int, int, int, int]  # (x, y, width, height) in pixels


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after scaling the short side to `short_side` (long side truncated, as torchvision Resize)."""
    if min(width, height) == short_side:
        return width, height
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


def multiscale_crop_sizes(base_px: int, crop_size: int, scales: Sequence[float] = MULTISCALE_SCALES) -> list[int]:
    """Candidate crop sides `int(base_px * s)`, each snapped to `crop_size` when within 3 px of it."""
    sizes = [int(base_px * s) for s in scales]
    return [crop_size if abs(s - crop_size) < SNAP_PX else s for s in sizes]


def multiscale_pairs(
    width: int,
    height: int,
    crop_size: int,
    *,
    scales: Sequence[float] = MULTISCALE_SCALES,
    max_distort: int = MAX_DISTORT,
) -> list[tuple[int, int]]:
    """Candidate (crop width, crop height) pairs `(sizes[j], sizes[i])` with |i - j| <= max_distort, i-major."""
    sizes = multiscale_crop_sizes(min(width, height), crop_size, scales)
    return [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]


def fixed_offsets(width: int, height: int, crop_w: int, crop_h: int, *, more: bool = True) -> list[tuple[int, int]]:
    """The official fixed (x, y) crop offsets: 5 (corners, centre), or 13 with `more` (plus 4 edge centres, 4 quarters).

    Order: upper-left, upper-right, lower-left, lower-right, centre; then centre-left, centre-right, lower-centre,
    upper-centre, and the upper-left, upper-right, lower-left, lower-right quarter points.
    """
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)]
    if more:
        offsets += [(0, 2 * hs), (4 * ws, 2 * hs), (2 * ws, 4 * hs), (2 * ws, 0)]
        offsets += [(ws, hs), (3 * ws, hs), (ws, 3 * hs), (3 * ws, 3 * hs)]
    return offsets


@dataclass(frozen=True, slots=True)
class TrainCrop:
    """The random choices of one train clip, independent of the frame size: pair index, offset index, flip."""

    pair: int
    offset: int
    flip: bool


def draw_train_crop(rng: np.random.Generator, *, num_pairs: int, flip_prob: float) -> TrainCrop:
    """Draw a size pair and one of the 13 offsets uniformly, and a flip with probability `flip_prob`.

    The flip draw happens whatever `flip_prob` is, so the same generator state gives the same crop with and
    without flipping.
    """
    pair = int(rng.integers(num_pairs))
    offset = int(rng.integers(NUM_FIXED_OFFSETS))
    flip = bool(rng.random() < flip_prob)
    return TrainCrop(pair, offset, flip)


def train_crop_box(width: int, height: int, crop: TrainCrop, *, crop_size: int, scale_size: int) -> Box:
    """The crop of `crop` on a `width` x `height` frame, computed as if its short side were `scale_size`.

    Exactly the official box when the frame's short side already is `scale_size`; otherwise that box scaled back to
    the frame (rounded to whole pixels).
    """
    vw, vh = resized_size(width, height, scale_size)
    cw, ch = multiscale_pairs(vw, vh, crop_size)[crop.pair]
    x, y = fixed_offsets(vw, vh, cw, ch)[crop.offset]
    if (vw, vh) == (width, height):
        return x, y, cw, ch
    sx, sy = width / vw, height / vh
    x0, y0 = min(width - 1, round(x * sx)), min(height - 1, round(y * sy))
    x1 = min(width, max(x0 + 1, round((x + cw) * sx)))
    y1 = min(height, max(y0 + 1, round((y + ch) * sy)))
    return x0, y0, x1 - x0, y1 - y0


def stack_channels_last(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack same-shape `(..., 3, H, W)` tensors into `(N, ..., 3, H, W)` whose memory is laid out `(N, ..., H, W, 3)`.

    Decoded JPEGs and PyTorch's fast uint8 resize are channels-last; stacking into that layout is a plain copy, where
    `torch.stack` would transpose every pixel. Raises RuntimeError when the shapes differ.
    """
    first = tensors[0]
    shape = (len(tensors), *first.shape[:-3], *first.shape[-2:], first.shape[-3])
    out = torch.empty(shape, dtype=first.dtype, device=first.device).movedim(-1, -3)
    for i, tensor in enumerate(tensors):
        if tensor.shape != first.shape:
            raise RuntimeError(f"cannot stack shapes {tuple(first.shape)} and {tuple(tensor.shape)}")
        out[i].copy_(tensor)
    return out


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 `(N, 3, h, w)` -> uint8 `(N, 3, height, width)`, bilinear with antialiasing (PIL BILINEAR's output).

    On CPU the resize runs in uint8 (channels-last is PyTorch's fast path); elsewhere in float, rounded back.
    """
    if frames.shape[-2:] == (height, width):
        return frames.contiguous()
    if frames.device.type == "cpu":
        x = frames.contiguous(memory_format=torch.channels_last)
        return F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    y = F.interpolate(frames.float(), size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def apply_train_crop(frames: torch.Tensor, crop: TrainCrop, *, crop_size: int, scale_size: int) -> torch.Tensor:
    """uint8 `(T, 3, H, W)` -> uint8 `(T, 3, crop_size, crop_size)`: the multi-scale crop, resized, maybe mirrored."""
    x, y, w, h = train_crop_box(frames.shape[-1], frames.shape[-2], crop, crop_size=crop_size, scale_size=scale_size)
    out = resize_frames(frames[..., y : y + h, x : x + w], crop_size, crop_size)
    return out.flip(-1) if crop.flip else out


def flip_label(label: int, flip_pairs: Sequence[tuple[int, int]]) -> int:
    """The label of the mirrored clip: the twin class for a class in `flip_pairs`, else unchanged."""
    for a, b in flip_pairs:
        if label == a:
            return b
        if label == b:
            return a
    return label


def resize_short_side(frames: torch.Tensor, short_side: int) -> torch.Tensor:
    """uint8 `(N, 3, H, W)` with the short side scaled to `short_side` (no-op when it already is)."""
    width, height = resized_size(frames.shape[-1], frames.shape[-2], short_side)
    return resize_frames(frames, height, width)


CropPosition = tuple[int, int, bool]  # (x, y, mirrored)


def _centre(width: int, height: int, size: int) -> list[CropPosition]:
    # torchvision CenterCrop: the half margins rounded (half to even, as Python round)
    return [(round((width - size) / 2.0), round((height - size) / 2.0), False)]


def _three(width: int, height: int, size: int) -> list[CropPosition]:
    ws, hs = (width - size) // 4, (height - size) // 4
    return [(0, 2 * hs, False), (4 * ws, 2 * hs, False), (2 * ws, 2 * hs, False)]


def _five(width: int, height: int, size: int) -> list[CropPosition]:
    return [(x, y, False) for x, y in fixed_offsets(width, height, size, size, more=False)]


def _ten(width: int, height: int, size: int) -> list[CropPosition]:
    return [(x, y, mirrored) for x, y, _ in _five(width, height, size) for mirrored in (False, True)]


EVAL_CROPS: dict[int, Callable[[int, int, int], list[CropPosition]]] = {1: _centre, 3: _three, 5: _five, 10: _ten}


def eval_crop_positions(width: int, height: int, size: int, crops: int) -> list[CropPosition]:
    """(x, y, mirrored) of each test crop of side `size` on a `width` x `height` frame, in the official order."""
    return EVAL_CROPS[crops](width, height, size)


def eval_views(
    frames: torch.Tensor, *, crops: int, crop_size: int, scale_size: int, full_res: bool = False
) -> torch.Tensor:
    """uint8 `(N, 3, H, W)` -> uint8 `(crops, N, 3, S, S)`: short side to `scale_size`, then the test crops.

    `S` is `crop_size`, or `scale_size` with `full_res` (the official `--full_res`).
    """
    frames = resize_short_side(frames, scale_size)
    size = scale_size if full_res else crop_size
    height, width = frames.shape[-2:]
    views = []
    for x, y, mirrored in eval_crop_positions(width, height, size, crops):
        view = frames[..., y : y + size, x : x + size]
        views.append(view.flip(-1) if mirrored else view)
    return stack_channels_last(views)


@functools.lru_cache(maxsize=8)
def _normalize_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), mean / std) as (3, 1, 1) float32 tensors on `device`, made once per device: building them
    from Python numbers every step is a blocking host-to-device copy."""
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
    return (1.0 / (255.0 * std)).to(device), (mean / std).to(device)


def normalize_clips(clips: torch.Tensor, device: torch.device, *, channels_last: bool = False) -> torch.Tensor:
    """uint8 RGB clips `(..., 3, H, W)` -> float32 on `device`: `(x / 255 - mean) / std` with ImageNet mean/std.

    The shape is unchanged (train `(B, T, 3, H, W)`, eval `(B, V, T, 3, H, W)`); the input may have any memory layout
    (the loaders' batches are channels-last in memory). The result is contiguous, or with `channels_last` laid out
    so that `out.view(-1, 3, H, W)` is a channels-last 4-D tensor (the model's `(N*T, 3, H, W)` view).
    """
    if clips.dtype != torch.uint8:
        raise TypeError(f"normalize_clips expects uint8 clips (got {clips.dtype})")
    x = clips.to(device, non_blocking=True)
    scale, shift = _normalize_constants(device)
    if channels_last:
        height, width = x.shape[-2:]
        out = torch.empty((*x.shape[:-3], height, width, 3), dtype=torch.float32, device=device).movedim(-1, -3)
    else:
        out = torch.empty(x.shape, dtype=torch.float32, device=device)
    out.copy_(x)  # one kernel converts dtype and layout, whatever layout the uint8 clips have
    return out.mul_(scale).sub_(shift)
