"""Video file -> frames (RGB uint8) -> JPEG bytes, behind one signature for two backends.

- `pyav` (default): decodes in-process with PyAV's bundled FFmpeg libraries, one codec thread, scaling in
  libswscale while converting to RGB. No process start-up per video.
- `ffmpeg`: runs an `ffmpeg` binary (PATH first, else the static one imageio-ffmpeg ships) through
  ffmpeg-python, reading frames back as a stream of PPM images on a pipe. For users who need a given build.

Both return `DecodedVideo` with JPEG frames encoded by the same Pillow encoder, so the only difference between
them is who decodes. Failures raise `DecodeError` / `TooFewFramesError` with a one-line reason.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ssv2prep.errors import ConfigError, DecodeError, TooFewFramesError

log = logging.getLogger(__name__)

# Decoders and container durations can disagree by a frame or two, so a video counts as truncated only when it
# decodes to fewer than (declared - max(2, 5% of declared)) frames.
TRUNCATION_SLACK_FRAMES = 2
TRUNCATION_SLACK_FRACTION = 0.05


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    """Frames of one video: JPEG bytes in display order plus the metadata the shard JSON records."""

    jpegs: list[bytes]
    fps: float | None
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        """How many frames were decoded."""
        return len(self.jpegs)


@dataclass(frozen=True, slots=True)
class ProbedVideo:
    """What the container header says, without decoding: fps and the expected frame count (or None)."""

    fps: float | None
    expected_frames: int | None
    width: int
    height: int


def scaled_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Output (width, height) when the short side is scaled to `short_side` (None keeps the size).

    The long side is rounded to the nearest integer, keeping the aspect ratio as ffmpeg's `scale=-1:S` would up to
    rounding; sizes are never below 1.
    """
    if short_side is None or min(width, height) == short_side:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def encode_jpeg(rgb_hwc: np.ndarray, quality: int) -> bytes:
    """RGB uint8 (H, W, 3) -> baseline JPEG bytes, 4:2:0 chroma subsampling."""
    buf = io.BytesIO()
    Image.fromarray(rgb_hwc, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def _check_file(path: Path) -> int:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DecodeError(f"cannot read {path.name}: {exc.strerror or exc}", reason="unreadable") from exc
    if size == 0:
        raise DecodeError("zero-byte file", reason="empty_file")
    return size


def _probe_container(container: Any) -> ProbedVideo:
    import av

    if not container.streams.video:
        raise DecodeError("no video stream", reason="no_video_stream")
    stream = container.streams.video[0]
    try:
        rate = stream.average_rate or stream.guessed_rate
    except av.FFmpegError:  # pragma: no cover - defensive: some builds raise on odd headers
        rate = None
    fps = float(rate) if rate else None
    duration_s = None
    if stream.duration is not None and stream.time_base is not None:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / 1_000_000
    expected = stream.frames or (round(duration_s * fps) if duration_s and fps else None)
    return ProbedVideo(fps, expected or None, stream.codec_context.width, stream.codec_context.height)


def _open(path: Path) -> Any:
    import av

    _check_file(path)
    try:
        return av.open(str(path))
    except av.FFmpegError as exc:
        raise DecodeError(f"unreadable container: {_one_line(exc)}") from exc


def probe_video(path: str | Path) -> ProbedVideo:
    """Read the container header of `path` with PyAV (no decoding)."""
    with _open(Path(path)) as container:
        return _probe_container(container)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _check_count(got: int, probed: ProbedVideo) -> None:
    if got == 0:
        raise TooFewFramesError("no frames decoded")
    exp = probed.expected_frames
    if exp and got < exp - max(TRUNCATION_SLACK_FRAMES, round(TRUNCATION_SLACK_FRACTION * exp)):
        raise DecodeError(f"truncated: decoded {got} of about {exp} frames the header declares", reason="truncated")


def _pyav_reader(path: Path, short_side: int | None) -> tuple[ProbedVideo, Iterator[np.ndarray]]:
    """Open once: the header gives the probe, then frames are decoded and converted (scaled) to RGB."""
    import av
    from av.video.reformatter import VideoReformatter

    container = _open(path)
    try:
        probed = _probe_container(container)
    except BaseException:
        container.close()
        raise
    width, height = scaled_size(probed.width, probed.height, short_side) if short_side else (None, None)

    def frames() -> Iterator[np.ndarray]:
        # One reformatter for the whole video: its swscale context is reused from frame to frame.
        reformatter = VideoReformatter()
        try:
            with container:
                stream = container.streams.video[0]
                stream.thread_count = 1
                for frame in container.decode(stream):
                    rgb = reformatter.reformat(frame, width=width, height=height, format="rgb24")
                    yield rgb.to_ndarray()
        except av.FFmpegError as exc:
            raise DecodeError(f"decode failed: {_one_line(exc)}") from exc

    return probed, frames()


def ffmpeg_binary() -> str:
    """The ffmpeg used by `--decoder ffmpeg` and the official-recipe benchmark: PATH first, else imageio-ffmpeg's."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("no ffmpeg on PATH and imageio-ffmpeg is not installed") from exc
    return imageio_ffmpeg.get_ffmpeg_exe()


def _read_ppm(stream: io.BufferedReader) -> np.ndarray | None:
    """One binary PPM (P6, maxval 255) from a pipe, or None at a clean end of stream."""
    tokens: list[bytes] = []
    while len(tokens) < 4:
        line = stream.readline()
        if not line:
            if tokens:
                raise DecodeError("ffmpeg output ended inside a frame header")
            return None
        tokens.extend(line.split(b"#")[0].split())
    magic, w, h, maxval = tokens[:4]
    if magic != b"P6" or maxval != b"255":
        raise DecodeError(f"unexpected frame format from ffmpeg ({magic!r}, maxval {maxval!r})")
    width, height = int(w), int(h)
    data = stream.read(width * height * 3)
    if len(data) != width * height * 3:
        raise DecodeError("ffmpeg output ended inside a frame")
    return np.frombuffer(data, np.uint8).reshape(height, width, 3)


def _ffmpeg_reader(path: Path, short_side: int | None) -> tuple[ProbedVideo, Iterator[np.ndarray]]:
    probed = probe_video(path)
    size = scaled_size(probed.width, probed.height, short_side) if short_side else None
    return probed, _ffmpeg_frames(path, size)


def _ffmpeg_frames(path: Path, size: tuple[int, int] | None) -> Iterator[np.ndarray]:
    import ffmpeg

    out_args: dict[str, object] = {"format": "image2pipe", "vcodec": "ppm", "fps_mode": "passthrough"}
    node = ffmpeg.input(str(path), threads=1)
    if size is not None:
        # The exact size PyAV would produce, so both decoders give identical frame sizes.
        node = node.filter("scale", size[0], size[1], flags="bicubic")
    args = (
        node.output("pipe:", **out_args)
        .global_args("-nostdin", "-loglevel", "error", "-threads", "1")
        .compile(cmd=ffmpeg_binary())
    )
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while (frame := _read_ppm(proc.stdout)) is not None:  # type: ignore[arg-type]
                yield frame
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace")
            code = proc.wait()
        if code != 0:
            raise DecodeError(f"ffmpeg exited {code}: {' '.join(err.split())[:200]}")


FRAME_READERS: dict[str, Callable[[Path, int | None], tuple[ProbedVideo, Iterator[np.ndarray]]]] = {
    "pyav": _pyav_reader,
    "ffmpeg": _ffmpeg_reader,
}


def decode_video(
    path: str | Path, *, decoder: str = "pyav", quality: int = 90, short_side: int | None = None
) -> DecodedVideo:
    """Decode every frame of `path` in display order and JPEG-encode it.

    Args:
        path: a video file (SSv2: VP9 WebM).
        decoder: "pyav" or "ffmpeg".
        quality: JPEG quality 1..95 for Pillow.
        short_side: scale so the short side has this many pixels (None keeps the native size).

    Raises:
        DecodeError: empty, unreadable, undecodable or truncated file.
        TooFewFramesError: the file decodes to no frames.
    """
    if decoder not in FRAME_READERS:
        raise ConfigError(f"unknown decoder {decoder!r}; expected one of {sorted(FRAME_READERS)}")
    probed, frames = FRAME_READERS[decoder](Path(path), short_side)
    jpegs: list[bytes] = []
    shape = (0, 0)
    for rgb in frames:
        shape = rgb.shape[:2]
        jpegs.append(encode_jpeg(rgb, quality))
    _check_count(len(jpegs), probed)
    return DecodedVideo(jpegs=jpegs, fps=probed.fps, width=int(shape[1]), height=int(shape[0]))


def count_video_frames(path: str | Path) -> tuple[ProbedVideo, int]:
    """Decode `path` fully (to validate it) without converting frames; return the probe and the frame count."""
    import av

    with _open(Path(path)) as container:
        probed = _probe_container(container)
        count = 0
        try:
            stream = container.streams.video[0]
            stream.thread_count = 1
            for _ in container.decode(stream):
                count += 1
        except av.FFmpegError as exc:
            raise DecodeError(f"decode failed: {_one_line(exc)}") from exc
    _check_count(count, probed)
    return probed, count


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def decode_rgb(path: str | Path) -> np.ndarray:
    """Every frame of a video as RGB uint8 `(T, H, W, 3)`, in display order (PyAV)."""
    _, frames = _pyav_reader(Path(path), None)
    decoded = list(frames)
    if not decoded:
        raise TooFewFramesError("no frames decoded")
    return np.stack(decoded)
