"""Video file -> decoded frames -> JPEG bytes, with two decoders and two JPEG encoders behind one signature.

Decoders (who turns the VP9 stream into YUV frames):
- `pyav` (default): in-process with PyAV's bundled FFmpeg libraries, one codec thread. No process start per video.
- `ffmpeg`: an `ffmpeg` binary (PATH first, else the static one imageio-ffmpeg ships) run through ffmpeg-python,
  writing raw frames (the stream's pixel format) to a pipe. For users who need a given build.

Everything after decoding is the same code for both decoders (scaling, colour conversion, JPEG encoding all run in
this process), so the two give byte-identical frames, scaled or not. The ffmpeg binary hands over the stream's own
pixel format (4:2:0, 4:4:4, RGB `gbrp`, 10-bit ...), so nothing is converted before the shared code.

Scaling (`resize=` a `Resize`) is libswscale with the official recipe's interpolation by default: the official TSM
extraction runs `ffmpeg -vf scale=-1:256`, whose libswscale default is bicubic. `Resize(height=H)` is that rule (the
height fixed, width from the aspect ratio); `Resize(short_side=S)` fixes the shorter side (the two differ on portrait
videos). Sizes round as ffmpeg's scale filter does, so the frames equal the official recipe's.

Frame counts: a video that decodes to its end without an error is good, whatever its header's frame estimate says
(the estimate comes from a duration and a rate; encoders write start offsets and variable rates into both). The
estimate is kept (`header_frames`) and a disagreement flagged, not failed. A file whose bytes end before its
container says they do is `truncated`; that is read from the container structure (`container_truncation`).

JPEG encoders (`encoder=`):
- `ffmpeg` (default): FFmpeg's mjpeg encoder through PyAV, fed straight from the YUV planes (scaled and converted
  to full-range YUV in one libswscale pass; no RGB frame is ever made). `quality` maps to the FFmpeg quantizer scale
  whose tables are closest to libjpeg's at that quality (`ffmpeg_qscale`): 90 -> 2, which is also what the official
  TSM recipe's `-q:v 0` gives.
- `pillow`: libjpeg(-turbo) through Pillow at exactly `quality`, from RGB frames (the YUV planes are scaled first,
  then converted). Slower; for users who want libjpeg's quality scale exactly.
Both keep the source's chroma layout as the official recipe's ffmpeg does: 4:2:0 JPEGs from 4:2:0 video (SSv2),
4:4:4 from 4:4:4 and RGB video (RGB converted with BT.601, as JPEG readers assume).

Failures raise `DecodeError` / `TooFewFramesError` with a one-line reason.
"""

from __future__ import annotations

import io
import logging
import math
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

# Decoders and container durations disagree by a frame or two (rounding of durations), so a decoded count is flagged
# as disagreeing with the header only when it is off by more than max(2, 5% of the estimate) frames.
MISMATCH_SLACK_FRAMES = 2
MISMATCH_SLACK_FRACTION = 0.05

# `--interpolation` names -> libswscale methods (PyAV's Interpolation names). bicubic is the ffmpeg scale filter's
# default, so it is what the official recipe's frames were made with.
INTERPOLATIONS: dict[str, str] = {
    "bicubic": "BICUBIC",
    "bilinear": "BILINEAR",
    "area": "AREA",
    "lanczos": "LANCZOS",
    "point": "POINT",
}
DEFAULT_INTERPOLATION = "bicubic"


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    """Frames of one video: JPEG bytes in display order plus the metadata the shard JSON records."""

    jpegs: list[bytes]
    fps: float | None
    width: int
    height: int
    header_frames: int | None = None  # the container header's frame estimate (None: it gives none)

    @property
    def frame_count_mismatch(self) -> bool:
        """Whether the decoded count disagrees with the header estimate beyond rounding (see `counts_disagree`)."""
        return counts_disagree(self.num_frames, self.header_frames)

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
    pix_fmt: str = "yuv420p"  # the decoder's output format (what the ffmpeg binary is asked to write)


def counts_disagree(got: int, header_frames: int | None) -> bool:
    """True when `got` decoded frames differ from the header estimate by more than max(2, 5%) frames."""
    if not header_frames:
        return False
    slack = max(MISMATCH_SLACK_FRAMES, round(MISMATCH_SLACK_FRACTION * header_frames))
    return abs(got - header_frames) > slack


def _rescale(a: int, b: int, c: int) -> int:
    """a * b / c rounded to nearest, halves away from zero: ffmpeg's av_rescale, which its scale filter uses."""
    return max(1, (a * b + c // 2) // c)


@dataclass(frozen=True, slots=True)
class Resize:
    """How frames are scaled: at most one of `short_side` (the shorter side gets S pixels) and `height` (the
    official recipe's `scale=-1:H`); neither keeps the native size. `interpolation` is a key of INTERPOLATIONS."""

    short_side: int | None = None
    height: int | None = None
    interpolation: str = DEFAULT_INTERPOLATION

    def size(self, width: int, height: int) -> tuple[int, int]:
        """Output (width, height) for a `width` x `height` video; the free side keeps the aspect ratio, rounded as
        ffmpeg's `scale=-1:H` / `scale=S:-1` round it."""
        if self.short_side is not None and self.height is not None:
            raise ConfigError("--short-side and --height are exclusive: give one")
        if self.height is not None:
            return _rescale(self.height, width, height), self.height
        if self.short_side is None:
            return width, height
        if width <= height:
            return self.short_side, _rescale(self.short_side, height, width)
        return _rescale(self.short_side, width, height), self.short_side


def encode_jpeg(rgb_hwc: np.ndarray, quality: int, subsampling: int = 2) -> bytes:
    """RGB uint8 (H, W, 3) -> baseline JPEG bytes with Pillow (libjpeg); `subsampling` as Pillow's (2 = 4:2:0,
    1 = 4:2:2, 0 = 4:4:4)."""
    buf = io.BytesIO()
    Image.fromarray(rgb_hwc, "RGB").save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return buf.getvalue()


# JPEG chroma layout per source layout, as ffmpeg's format negotiation picks it for the mjpeg encoder (the official
# recipe): 4:2:0 stays 4:2:0 (SSv2), 4:2:2 stays 4:2:2, 4:4:4 and RGB sources give 4:4:4 JPEGs.
_JPEG_LAYOUTS = {(1, 1): ("yuvj420p", 2), (1, 0): ("yuvj422p", 1), (0, 0): ("yuvj444p", 0)}


def jpeg_layout(frame_format: Any) -> tuple[str, int]:
    """(full-range pixel format for FFmpeg's mjpeg, Pillow subsampling) for frames of `frame_format` (a PyAV
    VideoFormat)."""
    if frame_format.is_rgb:
        return _JPEG_LAYOUTS[(0, 0)]
    shifts = (int(frame_format.chroma_width(64) < 64), int(frame_format.chroma_height(64) < 64))
    return _JPEG_LAYOUTS.get(shifts, _JPEG_LAYOUTS[(1, 1)])


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

    def _context(self, width: int, height: int, pix_fmt: str) -> Any:
        av = self._av
        if self._ctx is None or (self._ctx.width, self._ctx.height, self._ctx.pix_fmt) != (width, height, pix_fmt):
            ctx = av.CodecContext.create("mjpeg", "w")
            ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
            ctx.time_base = Fraction(1, 25)
            ctx.qmin = ctx.qmax = self.qscale  # a constant quantizer: every frame at qscale
            ctx.thread_count = 1
            ctx.flags |= int(av.codec.context.Flags.bitexact)  # no encoder version string inside the JPEG
            ctx.open()
            self._ctx, self._next_pts = ctx, 0
        return self._ctx

    def __call__(self, frame: Any) -> bytes:
        ctx = self._context(frame.width, frame.height, frame.format.name)
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

    def __init__(self, encoder: str, quality: int, size: tuple[int, int] | None, interpolation: str) -> None:
        from av.video.reformatter import VideoReformatter

        self.encoder, self.quality, self.size = encoder, quality, size
        self.interpolation = INTERPOLATIONS[interpolation]
        self._scaler, self._convert = VideoReformatter(), VideoReformatter()
        self._mjpeg = _MjpegEncoder(quality) if encoder == "ffmpeg" else None

    def __call__(self, frame: Any) -> bytes:
        width, height = self.size or (frame.width, frame.height)
        interp = self.interpolation
        rgb_source = frame.format.is_rgb  # e.g. VP9 profile 1 `gbrp`
        jpeg_format, subsampling = jpeg_layout(frame.format)
        if self._mjpeg is not None:
            # One swscale pass: scale and expand to the full range JPEG expects (as the official recipe's graph,
            # where the scale filter also does the conversion the mjpeg encoder asks for). From RGB the matrix must
            # be BT.601, what JPEG decoders assume and ffmpeg uses; the frame's own tag (RGB) would give BT.709.
            return self._mjpeg(
                self._scaler.reformat(
                    frame,
                    width=width,
                    height=height,
                    format=jpeg_format,
                    interpolation=interp,
                    dst_colorspace="ITU601" if rgb_source else None,
                )
            )
        if rgb_source:  # already RGB: scale there, no round trip through 4:2:0
            return encode_jpeg(
                self._convert.reformat(
                    frame, width=width, height=height, format="rgb24", interpolation=interp
                ).to_ndarray(),
                self.quality,
                subsampling,
            )
        if (frame.width, frame.height) != (width, height):
            # Scaling the YUV planes first (chroma is a quarter of the pixels), then converting, is 1.3x faster
            # than scaling in RGB, measured here at 240 -> 256 px (630 vs 485 frames/s with Pillow, one core).
            frame = self._scaler.reformat(frame, width=width, height=height, interpolation=interp)
        return encode_jpeg(self._convert.reformat(frame, format="rgb24").to_ndarray(), self.quality, subsampling)


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
        if container.start_time and "matroska" in container.format.name:
            # A Matroska Duration is the end timestamp: a stream that starts at 0.3 s (ffmpeg's -output_ts_offset,
            # camera offsets) lasts 0.3 s less than it says.
            duration_s -= container.start_time / 1_000_000
    expected = stream.frames or (round(duration_s * fps) if duration_s and duration_s > 0 and fps else None)
    ctx = stream.codec_context
    pix_fmt = ctx.pix_fmt or "yuv420p"
    return ProbedVideo(fps, expected or None, ctx.width, ctx.height, int(ctx.colorspace), int(ctx.color_range), pix_fmt)


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


def _check_count(got: int) -> None:
    # Only an empty result fails here: a count that disagrees with the header estimate is recorded, not failed
    # (the file decoded to its end; truncation is judged from the container structure before decoding).
    if got == 0:
        raise TooFewFramesError("no frames decoded")


_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MATROSKA_SEGMENT = b"\x18\x53\x80\x67"


def _ebml_vint(data: bytes, pos: int) -> tuple[int, int, bool]:
    """An EBML variable-size integer at `pos`: (value, bytes used, all value bits set = 'unknown size')."""
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8 or pos + length > len(data):
        raise ValueError("bad EBML size")
    value = first & (0xFF >> length)
    for b in data[pos + 1 : pos + length]:
        value = (value << 8) | b
    return value, length, value == (1 << (7 * length)) - 1


def _matroska_end(head: bytes) -> int | None:
    """The byte offset where a Matroska/WebM file's Segment ends, from its first bytes; None when unknown."""
    size, n, _ = _ebml_vint(head, 4)
    pos = 4 + n + size  # past the EBML header
    if head[pos : pos + 4] != _MATROSKA_SEGMENT:
        return None
    size, n, unknown = _ebml_vint(head, pos + 4)
    return None if unknown else pos + 4 + n + size


def _isobmff_end(path: Path, file_size: int) -> int | None:
    """Where the last top-level box of an MP4/MOV file ends (walking box headers only); None when not ISO BMFF."""
    pos = 0
    with path.open("rb") as f:
        while pos < file_size:
            f.seek(pos)
            header = f.read(16)
            if len(header) < 8:
                return pos + 8
            size = int.from_bytes(header[:4], "big")
            if pos == 0 and header[4:8] != b"ftyp":
                return None
            if size == 1:
                if len(header) < 16:
                    return pos + 16
                size = int.from_bytes(header[8:16], "big")
            elif size == 0:  # the last box runs to the end of the file
                return file_size
            if size < 8:
                return None
            pos += size
    return pos


def container_truncation(path: str | Path) -> str | None:
    """Why `path` ends before its container says it does (a one-line reason), or None when it is whole or its
    container does not say (Matroska/WebM with an unknown Segment size, other formats).

    Reads the container's own sizes (Matroska Segment size, MP4 top-level boxes), not decoded frames, so it is
    the same for every decoder, and a file cut inside its last packet is caught although decoders drop that
    packet without an error.
    """
    p = Path(path)
    file_size = _check_file(p)
    with p.open("rb") as f:
        head = f.read(4096)
    try:
        end = _matroska_end(head) if head.startswith(_EBML_MAGIC) else _isobmff_end(p, file_size)
    except (ValueError, IndexError):
        return None  # not a structure we can read; the demuxer decides
    if end is not None and file_size < end:
        return f"truncated: the file has {file_size} bytes but its container declares {end}"
    return None


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


def _raw_layout(pix_fmt: str, width: int, height: int) -> tuple[str, list[tuple[int, int]]]:
    """The raw format to ask the ffmpeg binary for and its planes as (bytes per row, rows).

    The stream's own format when it is planar with one component per plane (every VP9 profile: yuv420p, yuv444p,
    gbrp, their 10/12-bit forms), so the frames reach the shared code as PyAV's decoder gives them; else 4:2:0.
    """
    import av

    fmt = av.VideoFormat(pix_fmt)
    planes = {c.plane for c in fmt.components}
    if not fmt.is_planar or len(planes) != len(fmt.components) or any(c.bits > 16 for c in fmt.components):
        return _raw_layout("yuv420p", width, height)  # packed or semi-planar: let the binary convert
    frame = av.VideoFrame(width, height, pix_fmt)
    depth = {c.plane: (c.bits + 7) // 8 for c in fmt.components}
    return pix_fmt, [(plane.width * depth[i], plane.height) for i, plane in enumerate(frame.planes)]


def _ffmpeg_frames(path: Path, probed: ProbedVideo) -> Iterator[Any]:
    """Raw frames from the ffmpeg binary in the stream's pixel format, wrapped as PyAV frames tagged with the
    stream's colour info."""
    import av
    import ffmpeg

    width, height = probed.width, probed.height
    pix_fmt, planes = _raw_layout(probed.pix_fmt, width, height)
    frame_bytes = sum(w * h for w, h in planes)
    args = (
        ffmpeg.input(str(path), threads=1)
        .output("pipe:", format="rawvideo", pix_fmt=pix_fmt, fps_mode="passthrough")
        .global_args("-nostdin", "-loglevel", "error", "-threads", "1")
        .compile(cmd=ffmpeg_binary())
    )
    # A process group of its own: a terminal's Ctrl-C goes to the whole foreground group, and an ffmpeg that got it
    # would stop mid-video, turning a good video into a decode error that a resumed run trusts. The stage stops it
    # by stopping this process: its pipe closes and it ends on the next write.
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, process_group=0) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while data := proc.stdout.read(frame_bytes):
                if len(data) != frame_bytes:
                    raise DecodeError("ffmpeg output ended inside a frame")
                frame = av.VideoFrame(width, height, pix_fmt)
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


def _check_whole(path: Path) -> None:
    reason = container_truncation(path)
    if reason:
        raise DecodeError(reason, reason="truncated")


def decode_video(
    path: str | Path,
    *,
    decoder: str = "pyav",
    quality: int = 90,
    short_side: int | None = None,
    encoder: str = "ffmpeg",
    resize: Resize | None = None,
) -> DecodedVideo:
    """Decode every frame of `path` in display order and JPEG-encode it.

    Args:
        path: a video file (SSv2: VP9 WebM).
        decoder: "pyav" or "ffmpeg" (who decodes; the frames are identical).
        quality: JPEG quality 1..95 on libjpeg's scale (mapped by `ffmpeg_qscale` for the ffmpeg encoder).
        short_side: shorthand for `resize=Resize(short_side=...)` (bicubic); ignored when `resize` is given.
        encoder: "ffmpeg" (FFmpeg's mjpeg from YUV) or "pillow" (libjpeg from RGB).
        resize: the output size rule and interpolation (None: `short_side`, else the native size).

    Returns:
        The JPEGs of every decoded frame; `header_frames` holds the header's estimate, which may disagree.

    Raises:
        DecodeError: empty, unreadable or undecodable file; reason `truncated` when the bytes end early.
        TooFewFramesError: the file decodes to no frames.
    """
    if decoder not in FRAME_READERS:
        raise ConfigError(f"unknown decoder {decoder!r}; expected one of {sorted(FRAME_READERS)}")
    if encoder not in JPEG_ENCODERS:
        raise ConfigError(f"unknown JPEG encoder {encoder!r}; expected one of {list(JPEG_ENCODERS)}")
    resize = resize or Resize(short_side=short_side)
    if resize.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {resize.interpolation!r}; expected one of {list(INTERPOLATIONS)}")
    _check_whole(Path(path))
    probed, frames = FRAME_READERS[decoder](Path(path))
    width, height = resize.size(probed.width, probed.height)
    size = None if (width, height) == (probed.width, probed.height) else (width, height)
    pipeline = _FramePipeline(encoder, quality, size, resize.interpolation)
    jpegs = [pipeline(frame) for frame in frames]
    _check_count(len(jpegs))
    return DecodedVideo(jpegs=jpegs, fps=probed.fps, width=width, height=height, header_frames=probed.expected_frames)


def count_video_frames(path: str | Path) -> tuple[ProbedVideo, int]:
    """Decode `path` fully (to validate it) without converting frames; return the probe and the frame count.

    The count is what decodes; `probe.expected_frames` is the header's estimate, which may disagree.
    """
    import av

    _check_whole(Path(path))
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
    _check_count(count)
    return probed, count


def decode_rgb(path: str | Path) -> np.ndarray:
    """Every frame of a video as RGB uint8 `(T, H, W, 3)`, in display order (PyAV)."""
    _, frames = _pyav_reader(Path(path))
    decoded = [frame.to_ndarray(format="rgb24") for frame in frames]
    if not decoded:
        raise TooFewFramesError("no frames decoded")
    return np.stack(decoded)
