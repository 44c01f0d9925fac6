"""Video file -> decoded frames -> JPEG bytes, with two decoders and two JPEG encoders behind one signature.

Decoders (who turns the VP9 stream into YUV frames):
- `pyav` (default): in-process with PyAV's bundled FFmpeg libraries, one codec thread. No process start per video.
- `ffmpeg`: an `ffmpeg` binary (PATH first, else the static one imageio-ffmpeg ships) run through ffmpeg-python,
  writing raw YUV 4:2:0 frames to a pipe. For users who need a given build.

Everything after decoding is the same code for both decoders (scaling, colour conversion, JPEG encoding all run in
this process), so the two give byte-identical frames, scaled or not.

JPEG encoders (`encoder=`):
- `ffmpeg` (default): FFmpeg's mjpeg encoder through PyAV, fed straight from the YUV planes (scaled and converted
  to full-range YUV in one libswscale pass; no RGB frame is ever made). `quality` maps to the FFmpeg quantizer scale
  whose tables are closest to libjpeg's at that quality (`ffmpeg_qscale`): 90 -> 2, which is also what the official
  TSM recipe's `-q:v 0` gives.
- `pillow`: libjpeg(-turbo) through Pillow at exactly `quality`, from RGB frames (the YUV planes are scaled first,
  then converted). Slower; for users who want libjpeg's quality scale exactly.

Failures raise `DecodeError` / `TooFewFramesError` with a one-line reason.
"""

from __future__ import annotations

import io
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
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
    colorspace: int = 2  # FFmpeg's AVColorSpace / AVColorRange codes, carried onto frames the ffmpeg binary decodes
    color_range: int = 0


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
    """RGB uint8 (H, W, 3) -> baseline JPEG bytes with Pillow (libjpeg), 4:2:0 chroma subsampling."""
    buf = io.BytesIO()
    Image.fromarray(rgb_hwc, "RGB").save(buf, format="JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


# The JPEG standard's example luminance table (ITU-T T.81 Annex K), which libjpeg scales by its quality setting,
# and the MPEG-1 default intra matrix, which FFmpeg's mjpeg encoder scales by qscale / 8 (both in natural order).
_JPEG_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)  # fmt: skip
_MPEG1_INTRA = (
    (8, 16, 19, 22, 26, 27, 29, 34), (16, 16, 22, 24, 27, 29, 34, 37), (19, 22, 26, 27, 29, 34, 34, 38),
    (22, 22, 26, 27, 29, 34, 37, 40), (22, 26, 27, 29, 32, 35, 40, 48), (26, 27, 29, 32, 35, 40, 48, 58),
    (26, 27, 29, 34, 38, 46, 56, 69), (27, 29, 35, 38, 46, 56, 69, 83),
)  # fmt: skip


def _log_mean_step(table: tuple[tuple[int, ...], ...], scale: float) -> float:
    steps = [min(255.0, max(1.0, v * scale)) for row in table for v in row]
    return sum(math.log(x) for x in steps) / len(steps)


def ffmpeg_qscale(quality: int) -> int:
    """The FFmpeg mjpeg quantizer scale (1..31) whose luma steps are closest (geometric mean) to libjpeg's at
    `quality`: 95 -> 1, 90 -> 2, 85 -> 4, 75 -> 6, 50 -> 12."""
    ijg_scale = (5000 / quality if quality < 50 else 200 - 2 * quality) / 100
    target = _log_mean_step(_JPEG_LUMA, ijg_scale)
    return min(range(1, 32), key=lambda q: abs(_log_mean_step(_MPEG1_INTRA, q / 8) - target))


class _MjpegEncoder:
    """FFmpeg's mjpeg encoder fed with full-range YUV 4:2:0 frames; one codec context per frame size."""

    def __init__(self, quality: int) -> None:
        import av

        self._av = av
        self.qscale = ffmpeg_qscale(quality)
        self._ctx: Any = None
        self._next_pts = 0

    def _context(self, width: int, height: int) -> Any:
        av = self._av
        if self._ctx is None or (self._ctx.width, self._ctx.height) != (width, height):
            ctx = av.CodecContext.create("mjpeg", "w")
            ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuvj420p"
            ctx.time_base = Fraction(1, 25)
            ctx.qmin = ctx.qmax = self.qscale  # a constant quantizer: every frame at qscale
            ctx.thread_count = 1
            ctx.flags |= int(av.codec.context.Flags.bitexact)  # no encoder version string inside the JPEG
            ctx.open()
            self._ctx, self._next_pts = ctx, 0
        return self._ctx

    def __call__(self, frame: Any) -> bytes:
        ctx = self._context(frame.width, frame.height)
        frame.pts, frame.time_base = self._next_pts, ctx.time_base  # the encoder wants increasing timestamps
        self._next_pts += 1
        try:
            packets = ctx.encode(frame)  # mjpeg is intra-only without delay: one packet per frame
        except self._av.FFmpegError as exc:
            raise DecodeError(f"JPEG encoding failed: {_one_line(exc)}", reason="encode_failed") from exc
        if len(packets) != 1:
            raise DecodeError(f"mjpeg encoder returned {len(packets)} packets for one frame", reason="encode_failed")
        return bytes(packets[0])


JPEG_ENCODERS = ("ffmpeg", "pillow")


class _FramePipeline:
    """Decoded frame (any YUV layout) -> scaled -> JPEG bytes, reusing swscale contexts across a video's frames."""

    def __init__(self, encoder: str, quality: int, size: tuple[int, int] | None) -> None:
        from av.video.reformatter import VideoReformatter

        self.encoder, self.quality, self.size = encoder, quality, size
        self._scaler, self._convert = VideoReformatter(), VideoReformatter()
        self._mjpeg = _MjpegEncoder(quality) if encoder == "ffmpeg" else None

    def __call__(self, frame: Any) -> bytes:
        width, height = self.size or (frame.width, frame.height)
        if self._mjpeg is not None:
            # One swscale pass: scale and expand to the full range JPEG expects.
            return self._mjpeg(self._scaler.reformat(frame, width=width, height=height, format="yuvj420p"))
        if (frame.width, frame.height) != (width, height):
            # Scaling the YUV planes first (chroma is a quarter of the pixels), then converting, is 1.3x faster
            # than scaling in RGB, measured here at 240 -> 256 px (630 vs 485 frames/s with Pillow, one core).
            frame = self._scaler.reformat(frame, width=width, height=height, format="yuv420p")
        return encode_jpeg(self._convert.reformat(frame, format="rgb24").to_ndarray(), self.quality)


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
    ctx = stream.codec_context
    return ProbedVideo(fps, expected or None, ctx.width, ctx.height, int(ctx.colorspace), int(ctx.color_range))


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


def _pyav_reader(path: Path) -> tuple[ProbedVideo, Iterator[Any]]:
    """Open once: the header gives the probe, then the decoded frames (YUV, as the stream stores them)."""
    import av

    container = _open(path)
    try:
        probed = _probe_container(container)
    except BaseException:
        container.close()
        raise

    def frames() -> Iterator[Any]:
        try:
            with container:
                stream = container.streams.video[0]
                stream.thread_count = 1
                yield from container.decode(stream)
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


def _ffmpeg_reader(path: Path) -> tuple[ProbedVideo, Iterator[Any]]:
    probed = probe_video(path)
    return probed, _ffmpeg_frames(path, probed)


def _ffmpeg_frames(path: Path, probed: ProbedVideo) -> Iterator[Any]:
    """Raw YUV 4:2:0 frames from the ffmpeg binary, wrapped as PyAV frames tagged with the stream's colour info."""
    import av
    import ffmpeg

    width, height = probed.width, probed.height
    planes = [(width, height), ((width + 1) // 2, (height + 1) // 2), ((width + 1) // 2, (height + 1) // 2)]
    frame_bytes = sum(w * h for w, h in planes)
    args = (
        ffmpeg.input(str(path), threads=1)
        .output("pipe:", format="rawvideo", pix_fmt="yuv420p", fps_mode="passthrough")
        .global_args("-nostdin", "-loglevel", "error", "-threads", "1")
        .compile(cmd=ffmpeg_binary())
    )
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while data := proc.stdout.read(frame_bytes):
                if len(data) != frame_bytes:
                    raise DecodeError("ffmpeg output ended inside a frame")
                frame = av.VideoFrame(width, height, "yuv420p")
                frame.colorspace, frame.color_range = probed.colorspace, probed.color_range
                offset = 0
                for plane, (w, h) in zip(frame.planes, planes, strict=True):
                    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(h, plane.line_size)
                    rows[:, :w] = np.frombuffer(data, np.uint8, w * h, offset).reshape(h, w)
                    offset += w * h
                yield frame
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode("utf-8", "replace")
            code = proc.wait()
        if code != 0:
            raise DecodeError(f"ffmpeg exited {code}: {' '.join(err.split())[:200]}")


FRAME_READERS: dict[str, Callable[[Path], tuple[ProbedVideo, Iterator[Any]]]] = {
    "pyav": _pyav_reader,
    "ffmpeg": _ffmpeg_reader,
}


def decode_video(
    path: str | Path,
    *,
    decoder: str = "pyav",
    quality: int = 90,
    short_side: int | None = None,
    encoder: str = "ffmpeg",
) -> DecodedVideo:
    """Decode every frame of `path` in display order and JPEG-encode it.

    Args:
        path: a video file (SSv2: VP9 WebM).
        decoder: "pyav" or "ffmpeg" (who decodes; the frames are identical).
        quality: JPEG quality 1..95 on libjpeg's scale (mapped by `ffmpeg_qscale` for the ffmpeg encoder).
        short_side: scale so the short side has this many pixels (None keeps the native size).
        encoder: "ffmpeg" (FFmpeg's mjpeg from YUV) or "pillow" (libjpeg from RGB).

    Raises:
        DecodeError: empty, unreadable, undecodable or truncated file.
        TooFewFramesError: the file decodes to no frames.
    """
    if decoder not in FRAME_READERS:
        raise ConfigError(f"unknown decoder {decoder!r}; expected one of {sorted(FRAME_READERS)}")
    if encoder not in JPEG_ENCODERS:
        raise ConfigError(f"unknown JPEG encoder {encoder!r}; expected one of {list(JPEG_ENCODERS)}")
    probed, frames = FRAME_READERS[decoder](Path(path))
    size = scaled_size(probed.width, probed.height, short_side) if short_side else None
    pipeline = _FramePipeline(encoder, quality, size)
    jpegs = [pipeline(frame) for frame in frames]
    _check_count(len(jpegs), probed)
    width, height = size or (probed.width, probed.height)
    return DecodedVideo(jpegs=jpegs, fps=probed.fps, width=width, height=height)


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
    _, frames = _pyav_reader(Path(path))
    decoded = [frame.to_ndarray(format="rgb24") for frame in frames]
    if not decoded:
        raise TooFewFramesError("no frames decoded")
    return np.stack(decoded)
