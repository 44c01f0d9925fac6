"""A synthetic dataset in the exact Something-Something-V2 form: VP9 WebM videos plus the annotation files.

Output layout under `OUT` (the layout of the real dataset once extracted)::

    OUT/20bn-something-something-v2/<id>.webm      VP9, yuv420p, `fps`, height `height`, landscape width
    OUT/labels/labels.json                         class name -> index as string, alphabetical
    OUT/labels/{train,validation}.json             [{"id", "label", "template", "placeholders"}]
    OUT/labels/test.json                           [{"id"}]
    OUT/labels/test-answers.csv                    id;Class name (no header)
    OUT/synth_config.json                          the fields that decide the videos and labels
    OUT/package/...                                (package=True) the distribution form, see `write_package`

Classes come in mirror pairs named like real SSv2 classes. The renderer draws the first class of a pair; a video
of the twin is the same kind of video with its frames in reverse order. Every frame of a pair is therefore drawn
from one distribution, so only the order of frames tells the two classes apart.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from fractions import Fraction
from pathlib import Path

import numpy as np

from ssv2prep.annotations import template_to_class
from ssv2prep.errors import ConfigError, Ssv2PrepError
from ssv2prep.fsutil import (
    CHUNK_BYTES,
    atomic_open,
    atomic_write_bytes,
    atomic_write_text,
    file_digest,
    output_write_error,
    write_problem,
)
from ssv2prep.prep.manifest import DownloadManifest, ManifestFile, load_manifest, write_manifest

log = logging.getLogger(__name__)

VIDEOS_DIRNAME = "20bn-something-something-v2"
LABELS_DIRNAME = "labels"
PACKAGE_DIRNAME = "package"
CONFIG_FILENAME = "synth_config.json"
LABELS_ZIP_NAME = "20bn-something-something-download-package-labels.zip"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "validation", "test")
LABEL_FILES = ("labels.json", "train.json", "validation.json", "test.json", "test-answers.csv")

# Fixed archive metadata so two runs give the same bytes (2018-01-01, the year SSv2 v2 came out).
ARCHIVE_MTIME = 1514764800
ZIP_DATE_TIME = (2018, 1, 1, 0, 0, 0)
MEMBER_MODE = 0o644
GZIP_LEVEL = 6
# Fast, single-threaded libvpx settings: realtime deadline and cpu-used 8 keep a small clip well under a second.
VP9_OPTIONS = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0", "row-mt": "0"}
WIDTH_RATIO_RANGE = (1.3, 1.8)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "orange": (240, 135, 30),
    "purple": (135, 55, 180),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
}
HAND_RGB = (225, 175, 140)
SHAPE_NOUNS = {"rectangle": "rectangle", "ellipse": "ellipse", "triangle": "triangle", "diamond": "diamond"}
BOX_NOUNS = {"box": "rectangle", "case": "rectangle"}
SHEET_NOUNS = {"paper": "rectangle", "towel": "rectangle", "cloth": "rectangle"}
NOUN_SHAPES = {**SHAPE_NOUNS, **BOX_NOUNS, **SHEET_NOUNS}
TEXTURES = ("solid", "stripes", "checker", "waves")


# SynthConfig fields whose `ssv2prep synth` flag is not the field name in dashes; fps has no flag (a pipeline's or a
# caller's value), so it is named as the field.
_SYNTH_FLAGS = {"num_pairs": "--pairs", "num_parts": "--parts", "fps": "fps"}


def synth_flag(field_name: str) -> str:
    """The command-line flag of a SynthConfig field (`num_pairs` -> `--pairs`)."""
    return _SYNTH_FLAGS.get(field_name, "--" + field_name.replace("_", "-"))


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """What to synthesize. The fields above `package` decide the videos and labels; the rest the package form."""

    num_pairs: int = 4
    train_per_class: int = 8
    validation_per_class: int = 2
    test_per_class: int = 2
    height: int = 240
    fps: int = 12
    min_frames: int = 24
    max_frames: int = 48
    seed: int = 0
    package: bool = False
    num_parts: int = 2
    zip_parts: bool = False

    def validate(self) -> None:
        """Raise `ConfigError` naming the flag (`--pairs`, not `num_pairs`) of the first bad value."""
        for f in fields(self):
            value, want = getattr(self, f.name), type(f.default)
            if not isinstance(value, int) or isinstance(value, bool) != (want is bool):
                raise ConfigError(f"synth: {synth_flag(f.name)} {value!r} must be {want.__name__}")
        checks = (
            ("num_pairs", 1 <= self.num_pairs <= len(PAIRS), f"1..{len(PAIRS)}"),
            ("train_per_class", self.train_per_class >= 1, ">= 1"),
            ("validation_per_class", self.validation_per_class >= 0, ">= 0"),
            ("test_per_class", self.test_per_class >= 0, ">= 0"),
            ("height", 16 <= self.height <= 2160, "16..2160"),
            ("fps", 1 <= self.fps <= 120, "1..120"),
            ("min_frames", 2 <= self.min_frames <= 1000, "2..1000"),
            ("max_frames", self.min_frames <= self.max_frames <= 1000, f"{self.min_frames}..1000"),
            ("seed", self.seed >= 0, ">= 0"),
            ("num_parts", 1 <= self.num_parts <= 100, "1..100 (two-digit part suffix)"),
        )
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(
                    f"synth: {synth_flag(name)} {getattr(self, name)!r} is out of range; allowed: {allowed}"
                )

    def content_key(self) -> dict[str, int]:
        """The fields that decide videos and labels (a re-run into the same folder must match them)."""
        skip = {"package", "num_parts", "zip_parts"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass(frozen=True, slots=True)
class SynthResult:
    """Where `synthesize` wrote things, the class names in index order and the number of videos per split."""

    out_dir: Path
    videos_dir: Path
    labels_dir: Path
    package_dir: Path | None
    manifest_path: Path | None
    classes: tuple[str, ...]
    counts: dict[str, int]


@dataclass(frozen=True, slots=True)
class SynthVideo:
    """One planned video: everything the annotations need, and what the renderer reads back."""

    video_id: str
    split: str
    template: str
    placeholders: tuple[str, ...]
    width_px: int
    num_frames: int

    @property
    def class_name(self) -> str:
        """The template with brackets removed, i.e. the labels.json key."""
        return template_to_class(self.template)

    @property
    def caption(self) -> str:
        """The free-text `label` of train/validation entries: the template filled in, lower-case start."""
        text = self.template
        for noun in self.placeholders:
            text = text.replace("[something]", noun, 1)
        return text[:1].lower() + text[1:]


# ---------------------------------------------------------------------------------------------------------------
# Drawing: a frame is a view (zoom + offset) onto a world of sprites over an analytic background texture.


@dataclass(frozen=True, slots=True)
class _Sprite:
    shape: str
    rgb: tuple[float, float, float]
    cx: float
    cy: float
    rx: float
    ry: float


@dataclass(frozen=True, slots=True)
class _Pose:
    """One frame's scene: world-to-screen zoom `scale` about the image centre, world offset, sprites in draw order."""

    sprites: tuple[_Sprite, ...]
    scale: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0


@dataclass(frozen=True, slots=True)
class _Backdrop:
    rgb: np.ndarray  # (3,) float32
    texture: str
    period_px: float
    angle_rad: float
    amplitude: float
    noise_sigma: float


@dataclass(frozen=True, slots=True)
class _SceneObject:
    """An object before it is placed: its shape, colour and half sizes in pixels."""

    shape: str
    rgb: tuple[float, float, float]
    rx: float
    ry: float

    def at(self, cx: float, cy: float, **changes: float) -> _Sprite:
        sizes = {"rx": self.rx, "ry": self.ry, **changes}
        return _Sprite(self.shape, self.rgb, cx, cy, sizes["rx"], sizes["ry"])


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, s: _Sprite) -> np.ndarray:
    dx = (u - s.cx) / s.rx
    dy = (v - s.cy) / s.ry
    if shape == "ellipse":
        return dx * dx + dy * dy <= 1.0
    if shape == "triangle":
        return (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) * 0.5)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)


def _texture(backdrop: _Backdrop, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Background pattern in [-1, 1] as a function of world coordinates, so pans and zooms move it."""
    k = 2.0 * math.pi / backdrop.period_px
    along = u * math.cos(backdrop.angle_rad) + v * math.sin(backdrop.angle_rad)
    if backdrop.texture == "stripes":
        return np.sign(np.sin(k * along))
    if backdrop.texture == "checker":
        return np.sign(np.sin(k * u) * np.sin(k * v))
    if backdrop.texture == "waves":
        return 0.5 * (np.sin(k * along) + np.sin(0.7 * k * (v - u)))
    return np.zeros_like(u)


def _screen_span(centre: float, radius: float, offset: float, scale: float, size: int) -> slice:
    """Pixel range (padded by one) that a world interval `centre +- radius` covers on a screen axis of `size`."""
    lo = math.floor((centre - radius - size / 2 - offset) * scale + size / 2) - 1
    hi = math.ceil((centre + radius - size / 2 - offset) * scale + size / 2) + 1
    return slice(min(max(lo, 0), size), min(max(hi, 0), size))


def _draw(pose: _Pose, backdrop: _Backdrop, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Render one pose at `size` = (H, W): (H, W, 3) uint8 RGB, background + sprites + per-pixel noise."""
    h, w = size
    # World coordinates of pixel centres; x and y are separable, so keep them as (1, W) and (H, 1).
    u = (np.arange(w, dtype=np.float32)[None, :] + 0.5 - w / 2) / pose.scale + w / 2 + pose.offset_x
    v = (np.arange(h, dtype=np.float32)[:, None] + 0.5 - h / 2) / pose.scale + h / 2 + pose.offset_y
    texture = _texture(backdrop, u, v)[:, :, None]
    img = np.multiply(np.broadcast_to(texture, (h, w, 1)), np.float32(backdrop.amplitude)) + backdrop.rgb
    for sprite in pose.sprites:
        rows = _screen_span(sprite.cy, sprite.ry, pose.offset_y, pose.scale, h)
        cols = _screen_span(sprite.cx, sprite.rx, pose.offset_x, pose.scale, w)
        if sprite.rx < 0.25 or sprite.ry < 0.25 or rows.start >= rows.stop or cols.start >= cols.stop:
            continue
        mask = _shape_mask(sprite.shape, u[:, cols], v[rows, :], sprite)
        img[rows, cols][mask] = np.asarray(sprite.rgb, dtype=np.float32)
    # Uniform noise from raw bytes (std `noise_sigma`): as good as Gaussian here and several times cheaper.
    step = np.float32(backdrop.noise_sigma / 73.9)
    img += np.float32(0.5) - 127.5 * step  # centre the noise; +0.5 rounds on the cast below
    img += np.frombuffer(rng.bytes(img.size), dtype=np.uint8).reshape(img.shape) * step
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _progress(rng: np.random.Generator, num_frames: int) -> np.ndarray:
    """Motion progress 0..1 per frame: still at the start, a linear move, still at the end (lengths random)."""
    t = np.linspace(0.0, 1.0, num_frames)
    start, end = rng.uniform(0.0, 0.15), rng.uniform(0.85, 1.0)
    return np.clip((t - start) / (end - start), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Motions. Each draws the FIRST class of its pair as a list of poses; the twin is the same list reversed.


def _push(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    item = items[0]
    travel = w * rng.uniform(0.35, 0.55)
    x0 = rng.uniform(item.rx + 1, max(item.rx + 1, w - travel - item.rx - 1))
    cy = rng.uniform(0.35 * h, 0.7 * h)
    return [_Pose((item.at(x0 + travel * p, cy),)) for p in _progress(rng, n)]


def _pull(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    # A hand grips the top of the object: symmetric left/right, so it does not reveal the direction in one frame.
    item = items[0]
    hand = _SceneObject("ellipse", _jitter(rng, HAND_RGB), item.rx * 0.7, max(item.ry * 0.45, 2.0))
    poses = _push(rng, h, w, items, n)
    out = []
    for pose in poses:
        body = pose.sprites[0]
        out.append(_Pose((body, hand.at(body.cx, body.cy - body.ry * 0.95))))
    return out


def _move_up(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    item = items[0]
    travel = h * rng.uniform(0.35, 0.5)
    y0 = rng.uniform(min(h - item.ry - 1, item.ry + travel + 1), h - item.ry - 1)
    cx = rng.uniform(0.25 * w, 0.75 * w)
    return [_Pose((item.at(cx, y0 - travel * p),)) for p in _progress(rng, n)]


def _approach_with_camera(
    rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int
) -> list[_Pose]:
    item = items[0]
    zoom = rng.uniform(1.6, 2.2)
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, h / 2 + rng.uniform(-0.08, 0.08) * h
    sprite = item.at(cx, cy)
    return [_Pose((sprite,), scale=1.0 + (zoom - 1.0) * p) for p in _progress(rng, n)]


def _turn_camera_left(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    # Turning the camera left moves the whole scene (object and background) to the right on screen.
    item = items[0]
    pan = w * rng.uniform(0.3, 0.45)
    cx = rng.uniform(item.rx + 1, max(item.rx + 1, w - pan - item.rx - 1))
    sprite = item.at(cx, rng.uniform(0.35 * h, 0.65 * h))
    return [_Pose((sprite,), offset_x=-pan * p) for p in _progress(rng, n)]


def _move_closer(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    a, b = items[0], items[1]
    centre = w / 2 + rng.uniform(-0.05, 0.05) * w
    far = min(w * rng.uniform(0.5, 0.65), 2 * (w / 2 - max(a.rx, b.rx) - 2))
    near = (a.rx + b.rx) * 1.1
    ya, yb = (h / 2 + rng.uniform(-0.1, 0.1) * h for _ in range(2))
    poses = []
    for p in _progress(rng, n):
        half = (far + (near - far) * p) / 2
        poses.append(_Pose((a.at(centre - half, ya), b.at(centre + half, yb))))
    return poses


def _open(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    box = items[0]
    cx, cy = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.55 * h, 0.7 * h)
    lid = _SceneObject("rectangle", tuple(c * 0.7 for c in box.rgb), box.rx * 1.08, max(box.ry * 0.2, 1.5))
    inside = _SceneObject("rectangle", (30.0, 25.0, 20.0), box.rx * 0.85, box.ry * 0.2)
    lift = min(box.ry * rng.uniform(1.0, 1.5), cy - box.ry - lid.ry - 1)
    top = cy - box.ry
    poses = []
    for p in _progress(rng, n):
        interior = inside.at(cx, top + inside.ry * p, ry=inside.ry * p)
        poses.append(_Pose((box.at(cx, cy), interior, lid.at(cx, top - lid.ry - lift * p))))
    return poses


def _unfold(rng: np.random.Generator, h: int, w: int, items: Sequence[_SceneObject], n: int) -> list[_Pose]:
    sheet = replace(items[0], rx=items[0].rx * 1.6)  # a sheet is wide: its width change must show at 64 px
    side = 1.0 if rng.random() < 0.5 else -1.0  # which edge stays put
    edge = w / 2 - side * sheet.rx
    cy = rng.uniform(0.4 * h, 0.6 * h)
    crease = _SceneObject("rectangle", tuple(c * 0.6 for c in sheet.rgb), max(w * 0.006, 0.6), sheet.ry)
    poses = []
    for p in _progress(rng, n):
        half = sheet.rx * (0.5 + 0.5 * p)
        poses.append(_Pose((sheet.at(edge + side * half, cy, rx=half), crease.at(edge + side * sheet.rx, cy))))
    return poses


Motion = Callable[[np.random.Generator, int, int, Sequence[_SceneObject], int], list[_Pose]]


@dataclass(frozen=True, slots=True)
class MirrorPair:
    """Two real SSv2 templates whose videos are each other's time reversal; `motion` draws `forward`."""

    forward: str
    backward: str
    motion: Motion = field(repr=False)
    nouns: tuple[str, ...] = tuple(SHAPE_NOUNS)
    textured: bool = False  # the background must carry a pattern for the motion to be visible

    @property
    def num_objects(self) -> int:
        """How many `[something]` the templates hold."""
        return self.forward.count("[something]")


PAIRS: tuple[MirrorPair, ...] = (
    MirrorPair("Pushing [something] from left to right", "Pushing [something] from right to left", _push),
    MirrorPair("Moving [something] up", "Moving [something] down", _move_up),
    MirrorPair(
        "Approaching [something] with your camera",
        "Moving away from [something] with your camera",
        _approach_with_camera,
        textured=True,
    ),
    MirrorPair(
        "Turning the camera left while filming [something]",
        "Turning the camera right while filming [something]",
        _turn_camera_left,
        textured=True,
    ),
    MirrorPair("Pulling [something] from left to right", "Pulling [something] from right to left", _pull),
    MirrorPair(
        "Moving [something] and [something] closer to each other",
        "Moving [something] and [something] away from each other",
        _move_closer,
    ),
    MirrorPair("Opening [something]", "Closing [something]", _open, nouns=tuple(BOX_NOUNS)),
    MirrorPair("Unfolding [something]", "Folding [something]", _unfold, nouns=tuple(SHEET_NOUNS)),
)
PAIR_OF_TEMPLATE: dict[str, tuple[MirrorPair, bool]] = {
    **{p.forward: (p, False) for p in PAIRS},
    **{p.backward: (p, True) for p in PAIRS},
}


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], spread: float = 15.0) -> tuple[float, float, float]:
    r, g, b = (float(np.clip(c + rng.uniform(-spread, spread), 0, 255)) for c in rgb)
    return (r, g, b)


def _backdrop(rng: np.random.Generator, h: int, avoid: Sequence[tuple[float, ...]], textured: bool) -> _Backdrop:
    """A background colour far from every object colour, plus a pattern and a noise level."""
    rgb = np.array([128.0, 128.0, 128.0], dtype=np.float32)
    for _ in range(100):
        candidate = rng.uniform(60.0, 200.0, size=3).astype(np.float32)
        if all(np.linalg.norm(candidate - np.asarray(c, dtype=np.float32)) >= 110.0 for c in avoid):
            rgb = candidate
            break
    kinds = TEXTURES[1:] if textured else TEXTURES
    return _Backdrop(
        rgb=rgb,
        texture=str(kinds[rng.integers(len(kinds))]),
        period_px=h * rng.uniform(0.12, 0.3),
        angle_rad=rng.uniform(0.0, math.pi),
        amplitude=rng.uniform(14.0, 30.0),
        noise_sigma=rng.uniform(1.5, 4.5),
    )


def _objects_from_placeholders(rng: np.random.Generator, h: int, placeholders: Sequence[str]) -> list[_SceneObject]:
    """Objects from placeholders like "red triangle": colour from the palette, shape from the noun, random size."""
    out = []
    for text in placeholders:
        colour, _, noun = text.partition(" ")
        if colour not in PALETTE or noun not in NOUN_SHAPES:
            raise ConfigError(f"synth: placeholder {text!r} is not '<colour> <noun>' from the synthetic vocabulary")
        radius = h * rng.uniform(0.11, 0.19)
        out.append(
            _SceneObject(NOUN_SHAPES[noun], _jitter(rng, PALETTE[colour]), radius, radius * rng.uniform(0.7, 1.3))
        )
    return out


def render_frames(
    template: str, placeholders: Sequence[str], *, height_px: int, width_px: int, num_frames: int, seed: Sequence[int]
) -> np.ndarray:
    """Draw one synthetic video of the class given by `template`.

    Args:
        template: a template of `PAIRS` (e.g. "Moving [something] up").
        placeholders: one "<colour> <noun>" per `[something]`, e.g. ("red triangle",).
        height_px: frame height.
        width_px: frame width.
        num_frames: number of frames T.
        seed: entropy for the random scene (positions, sizes, background, noise).

    Returns:
        (T, H, W, 3) uint8 RGB. For a pair's twin templates and the same other arguments, the two results are
        exact time reversals of each other.
    """
    if template not in PAIR_OF_TEMPLATE:
        raise ConfigError(f"synth: template {template!r} is not one of the synthetic classes")
    pair, backward = PAIR_OF_TEMPLATE[template]
    if len(placeholders) != pair.num_objects:
        raise ConfigError(f"synth: template {template!r} takes {pair.num_objects} placeholders, got {placeholders!r}")
    rng = np.random.default_rng(list(seed))
    items = _objects_from_placeholders(rng, height_px, placeholders)
    backdrop = _backdrop(rng, height_px, [i.rgb for i in items] + [HAND_RGB], pair.textured)
    poses = pair.motion(rng, height_px, width_px, items, num_frames)
    frames = np.stack([_draw(pose, backdrop, (height_px, width_px), rng) for pose in poses])
    return frames[::-1].copy() if backward else frames


# ---------------------------------------------------------------------------------------------------------------
# Plan: ids, splits, classes and per-video choices, without drawing anything.


def class_templates(num_pairs: int) -> list[str]:
    """The templates of the first `num_pairs` pairs, twin after twin."""
    return [t for pair in PAIRS[:num_pairs] for t in (pair.forward, pair.backward)]


def _choose_video(cfg: SynthConfig, video_id: int, split: str, template: str) -> SynthVideo:
    rng = np.random.default_rng([cfg.seed, video_id, 0])
    pair, _ = PAIR_OF_TEMPLATE[template]
    colours = rng.choice(list(PALETTE), size=pair.num_objects, replace=False)
    nouns = rng.choice(list(pair.nouns), size=pair.num_objects)
    ratio = rng.uniform(*WIDTH_RATIO_RANGE)
    return SynthVideo(
        video_id=str(video_id),
        split=split,
        template=template,
        placeholders=tuple(f"{c} {n}" for c, n in zip(colours, nouns, strict=True)),
        width_px=round(cfg.height * ratio),
        num_frames=int(rng.integers(cfg.min_frames, cfg.max_frames + 1)),
    )


def plan_videos(cfg: SynthConfig) -> list[SynthVideo]:
    """Every video of the dataset, sorted by id; ids 1..N are shuffled across splits and classes.

    The same config always gives the same plan; each video's choices depend only on `(seed, id)`.
    """
    per_split = {"train": cfg.train_per_class, "validation": cfg.validation_per_class, "test": cfg.test_per_class}
    slots = [(split, t) for split in SPLITS for t in class_templates(cfg.num_pairs) for _ in range(per_split[split])]
    ids = np.random.default_rng([cfg.seed]).permutation(len(slots)) + 1
    videos = [_choose_video(cfg, int(i), split, t) for i, (split, t) in zip(ids, slots, strict=True)]
    return sorted(videos, key=lambda v: int(v.video_id))


# ---------------------------------------------------------------------------------------------------------------
# Writing: videos, labels, the package.


def encode_webm(frames_thwc: np.ndarray, fps: int) -> bytes:
    """Encode (T, H, W, 3) uint8 RGB as VP9 WebM (yuv420p, `fps`), bit-exact for the same input and libvpx."""
    import av  # heavy; only needed when videos are written

    _, h, w, _ = frames_thwc.shape
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        stream.codec_context.thread_count = 1  # libvpx is only deterministic single-threaded
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.options = dict(VP9_OPTIONS)
        for i, rgb in enumerate(frames_thwc):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def _write_video(video: SynthVideo, cfg: SynthConfig, path: Path) -> None:
    import av

    frames = render_frames(
        video.template,
        video.placeholders,
        height_px=cfg.height,
        width_px=video.width_px,
        num_frames=video.num_frames,
        seed=(cfg.seed, int(video.video_id), 1),
    )
    try:
        data = encode_webm(frames, cfg.fps)
    except (av.FFmpegError, ValueError) as exc:
        raise Ssv2PrepError(f"{path}: VP9 encoding with PyAV/libvpx failed ({exc}); check that av has libvpx") from exc
    atomic_write_bytes(path, data)


def _json_text(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def label_files(videos: Sequence[SynthVideo], classes: Sequence[str]) -> dict[str, str]:
    """File name -> text of the five SSv2 label files for `videos` (see the module docstring for schemas)."""
    by_split = {s: [v for v in videos if v.split == s] for s in SPLITS}

    def labelled(split: str) -> list[dict[str, object]]:
        return [
            {"id": v.video_id, "label": v.caption, "template": v.template, "placeholders": list(v.placeholders)}
            for v in by_split[split]
        ]

    return {
        "labels.json": _json_text({name: str(i) for i, name in enumerate(classes)}),
        "train.json": _json_text(labelled("train")),
        "validation.json": _json_text(labelled("validation")),
        "test.json": _json_text([{"id": v.video_id} for v in by_split["test"]]),
        "test-answers.csv": "".join(f"{v.video_id};{v.class_name}\n" for v in by_split["test"]),
    }


def _write_if_changed(path: Path, text: str) -> None:
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def _check_or_save_config(out: Path, cfg: SynthConfig) -> None:
    """Refuse to mix videos of two configs in one folder; save the config the first time."""
    path = out / CONFIG_FILENAME
    key = cfg.content_key()
    if path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: unreadable ({exc}); delete {out} or choose another output folder") from exc
        if saved != key:
            changed = sorted(k for k in key if saved.get(k) != key[k])
            raise ConfigError(
                f"{out} holds a synthetic dataset made with other settings ({', '.join(changed)}); "
                "use a new output folder or delete the old one"
            )
        return
    videos_dir = out / VIDEOS_DIRNAME
    if videos_dir.is_dir() and any(videos_dir.iterdir()):
        raise ConfigError(f"{out} already holds videos but no {CONFIG_FILENAME}; synthesize into an empty folder")
    atomic_write_text(path, _json_text(key))


def synthesize(
    out_dir: str | Path, cfg: SynthConfig, *, on_progress: Callable[[int, int], None] | None = None
) -> SynthResult:
    """Write a synthetic SSv2-form dataset under `out_dir` (layout in the module docstring).

    Videos that already exist are kept (writes are atomic, so an existing file is complete); a folder made
    with different video/label settings raises `ConfigError`. The same config gives byte-identical files.

    Args:
        out_dir: destination folder; nothing is written outside it.
        cfg: what to make; validated first.
        on_progress: called as `on_progress(done, total)` after each video, written or skipped.

    Returns:
        The paths written, the classes in index order and the number of videos per split.

    Raises:
        ConfigError: a bad setting (naming its flag), or `out_dir` holds another synthetic dataset.
        OutputWriteError: `out_dir` cannot be written (full, read-only, denied); the videos already written stay.
    """
    cfg.validate()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synth: output {out} exists and is not a folder")
    try:
        return _synthesize(out, cfg, on_progress)
    except OSError as exc:
        if write_problem(exc) is None:
            raise
        raise output_write_error(out, exc, "cannot write the synthetic dataset") from exc


def _synthesize(out: Path, cfg: SynthConfig, on_progress: Callable[[int, int], None] | None) -> SynthResult:
    out.mkdir(parents=True, exist_ok=True)
    _check_or_save_config(out, cfg)
    videos_dir, labels_dir = out / VIDEOS_DIRNAME, out / LABELS_DIRNAME
    videos_dir.mkdir(exist_ok=True)
    labels_dir.mkdir(exist_ok=True)
    videos = plan_videos(cfg)
    classes = tuple(sorted(template_to_class(t) for t in class_templates(cfg.num_pairs)))
    for name, text in label_files(videos, classes).items():
        _write_if_changed(labels_dir / name, text)
    written = 0
    for done, video in enumerate(videos, start=1):
        path = videos_dir / f"{video.video_id}.webm"
        if not path.is_file():
            _write_video(video, cfg, path)
            written += 1
        if on_progress is not None:
            on_progress(done, len(videos))
    log.info("synth: %d videos written, %d already present, in %s", written, len(videos) - written, videos_dir)
    package_dir = manifest_path = None
    if cfg.package:
        manifest_path = write_package(out, num_parts=cfg.num_parts, zip_parts=cfg.zip_parts)
        package_dir = manifest_path.parent
    counts = {s: sum(v.split == s for v in videos) for s in SPLITS}
    return SynthResult(out, videos_dir, labels_dir, package_dir, manifest_path, classes, counts)


# ---------------------------------------------------------------------------------------------------------------
# The distribution form.

PART_RE = re.compile(rf"^{re.escape(VIDEOS_DIRNAME)}-\d\d(\.zip)?$")


def part_names(num_parts: int, *, zip_parts: bool) -> list[str]:
    """`20bn-something-something-v2-00`, `-01`, ... (with `.zip` when each part is zip-wrapped)."""
    suffix = ".zip" if zip_parts else ""
    return [f"{VIDEOS_DIRNAME}-{i:02d}{suffix}" for i in range(num_parts)]


def _video_paths(videos_dir: Path) -> list[Path]:
    return sorted(videos_dir.glob("*.webm"), key=lambda p: (len(p.stem), p.stem))


def _write_targz(videos_dir: Path, fh: io.BufferedIOBase) -> None:
    """A reproducible gzip tar of every `<id>.webm` as `20bn-something-something-v2/<id>.webm`, ids ascending."""
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=GZIP_LEVEL) as gz,
        tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar,
    ):
        for path in _video_paths(videos_dir):
            info = tarfile.TarInfo(f"{VIDEOS_DIRNAME}/{path.name}")
            info.size = path.stat().st_size
            info.mtime, info.mode, info.type = ARCHIVE_MTIME, MEMBER_MODE, tarfile.REGTYPE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as src:
                tar.addfile(info, src)


def _zip_info(name: str, compress_type: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
    info.compress_type = compress_type
    info.create_system = 3  # unix, on every platform, for identical bytes
    info.external_attr = (0o100000 | MEMBER_MODE) << 16
    return info


def _copy_range(src: io.BufferedIOBase, dst: io.BufferedIOBase, size_bytes: int) -> None:
    left = size_bytes
    while left > 0:
        chunk = src.read(min(CHUNK_BYTES, left))
        if not chunk:
            raise Ssv2PrepError(f"synth: archive ended {left} bytes early while splitting it into parts")
        dst.write(chunk)
        left -= len(chunk)


def _split_archive(archive: Path, package_dir: Path, names: list[str], *, zip_parts: bool) -> None:
    """Cut `archive` into len(names) contiguous byte ranges (all but the last of equal size), one file each."""
    total = archive.stat().st_size
    part_bytes = -(-total // len(names))  # like `split -b`: equal parts, a shorter last one
    if part_bytes * (len(names) - 1) >= total:
        raise ConfigError(f"synth: cannot split a {total}-byte archive into {len(names)} non-empty parts; use fewer")
    with open(archive, "rb") as src:
        for i, name in enumerate(names):
            size = min(part_bytes, total - i * part_bytes)
            with atomic_open(package_dir / name, "wb") as dst:
                if not zip_parts:
                    _copy_range(src, dst, size)
                    continue
                raw_name = name.removesuffix(".zip")
                with zipfile.ZipFile(dst, "w") as zf, zf.open(_zip_info(raw_name, zipfile.ZIP_STORED), "w") as m:
                    _copy_range(src, m, size)


def _write_labels_zip(labels_dir: Path, path: Path) -> None:
    with atomic_open(path, "wb") as fh, zipfile.ZipFile(fh, "w") as zf:
        for name in LABEL_FILES:
            zf.writestr(_zip_info(f"{LABELS_DIRNAME}/{name}", zipfile.ZIP_DEFLATED), (labels_dir / name).read_bytes())


def _package_is_current(package_dir: Path, names: list[str]) -> bool:
    """True when a previous run left a manifest listing exactly `names`, each present at its recorded size."""
    path = package_dir / MANIFEST_NAME
    if not path.is_file():
        return False
    try:
        manifest = load_manifest(path)
    except Ssv2PrepError:
        return False
    listed = {f.name: f.size_bytes for f in manifest.files}
    if set(listed) != set(names):
        return False
    return all((package_dir / n).is_file() and (package_dir / n).stat().st_size == listed[n] for n in names)


def _remove_stale_parts(package_dir: Path, keep: list[str]) -> None:
    for path in package_dir.iterdir():
        if PART_RE.match(path.name) and path.name not in keep:
            log.info("synth: removing part %s left by an earlier run with other part settings", path)
            path.unlink()


def write_package(out_dir: str | Path, *, num_parts: int = 2, zip_parts: bool = False) -> Path:
    """Write the distribution form of `OUT` (videos + labels already there) to `OUT/package`; return the manifest.

    Files: `20bn-something-something-v2-NN` (the byte-split gzip tar; `.zip`-wrapped, stored, when `zip_parts`),
    `20bn-something-something-download-package-labels.zip` (`labels/<five files>`) and `manifest.json`
    (binding sha256 and exact sizes). A package whose manifest already lists the same files at their sizes is
    kept as is. The bytes depend only on the videos and labels.
    """
    out = Path(out_dir)
    package_dir = out / PACKAGE_DIRNAME
    names = [*part_names(num_parts, zip_parts=zip_parts), LABELS_ZIP_NAME]
    manifest_path = package_dir / MANIFEST_NAME
    if _package_is_current(package_dir, names):
        log.info("synth: package in %s is complete; keeping it", package_dir)
        return manifest_path
    package_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(package_dir, names)
    fd, tmp = tempfile.mkstemp(prefix=".archive.", suffix=".tar.gz.tmp", dir=package_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write_targz(out / VIDEOS_DIRNAME, fh)
        _split_archive(Path(tmp), package_dir, names[:-1], zip_parts=zip_parts)
    finally:
        Path(tmp).unlink(missing_ok=True)
    _write_labels_zip(out / LABELS_DIRNAME, package_dir / LABELS_ZIP_NAME)
    files = tuple(_manifest_entry(package_dir / n) for n in names)
    manifest = DownloadManifest(name="something-something-v2-synthetic", files=files, notes=[_PACKAGE_NOTE])
    write_manifest(manifest, manifest_path)
    log.info("synth: wrote %d package files to %s", len(names), package_dir)
    return manifest_path


_PACKAGE_NOTE = "synthetic SSv2-form distribution written by `ssv2prep synth --package`; checksums are binding"


def _manifest_entry(path: Path) -> ManifestFile:
    role = "labels" if path.name == LABELS_ZIP_NAME else "video_part"
    return ManifestFile(
        name=path.name, role=role, size_bytes=path.stat().st_size, sha256=file_digest(path), checksum_advisory=False
    )


__all__ = [
    "PAIRS",
    "MirrorPair",
    "SynthConfig",
    "SynthResult",
    "SynthVideo",
    "class_templates",
    "encode_webm",
    "label_files",
    "part_names",
    "plan_videos",
    "render_frames",
    "synthesize",
    "write_package",
]
