"""Frame bytes -> uint8 RGB frames: JPEG frames (libjpeg-turbo on the CPU, nvjpeg on CUDA) and video files (PyAV).

The decoding step of the loader flow (`source` -> `assign` -> `clip` -> `decode` -> `stream` -> `loader`): a
`ClipFinisher` calls these for the frames a `ClipPlanner` kept, in a worker or, with GPU decoding, in the main
process.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence

import av
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from ssv2prep.data.transforms import stack_channels_last
from ssv2prep.errors import DecodeError

log = logging.getLogger(__name__)

CPU = torch.device("cpu")


@contextlib.contextmanager
def _torchvision_io() -> Iterator[None]:
    # torchvision 0.29 marks its image codecs deprecated in favour of torchcodec (not a dependency here); they are
    # still the fastest libjpeg-turbo/nvjpeg binding we have, so keep the per-call warning out of users' logs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        yield


def decode_one_jpeg(data: bytes) -> torch.Tensor:
    """JPEG bytes -> uint8 RGB `(3, H, W)` on the CPU (libjpeg-turbo through torchvision)."""
    with _torchvision_io():
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def decode_jpegs(jpegs: Sequence[bytes], device: torch.device = CPU) -> torch.Tensor:
    """JPEG frames of one video -> uint8 `(N, 3, H, W)`, channels-last in memory, on `device` (nvjpeg on CUDA).

    Raises:
        DecodeError: a frame that is not a decodable JPEG, or frames of different sizes.
    """
    try:
        if device.type == "cpu":
            frames = [decode_one_jpeg(b) for b in jpegs]
        else:
            frames = decode_jpeg_list([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs], device)
        return stack_channels_last(frames)
    except (RuntimeError, ValueError) as exc:
        raise DecodeError(f"JPEG frame does not decode ({' '.join(str(exc).split())[:200]})") from exc


def decode_jpeg_list(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """One `torchvision.io.decode_jpeg` call over encoded frames (uint8 1-D tensors): uint8 RGB `(3, H, W)` each on
    `device`. The single place a list of JPEGs reaches torchvision (one nvjpeg batch on CUDA).

    On CUDA it runs on a side stream of this module's, so decoding overlaps the training step queued on the current
    (compute) stream, and the current stream then waits for it. The side stream needs not wait for the compute
    stream: the decode reads host bytes only and writes tensors allocated from the side stream's own pool, never a
    block the compute stream freed while its queued kernels still read it (torchvision's decoder allocates its outputs
    on the caller's stream but writes them from a stream of its own without waiting for the caller's). The outputs
    are marked used by the compute stream (`record_stream`), so their blocks return to the side pool only after the
    compute stream is done with them.
    """
    if device.type != "cuda":
        with _torchvision_io():
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    compute = torch.cuda.current_stream(device)
    side = _side_stream(device)
    with torch.cuda.stream(side), _torchvision_io():
        frames = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    compute.wait_stream(side)
    for frame in frames:
        frame.record_stream(compute)
    return frames


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def decode_jpeg_batch(videos: Sequence[Sequence[bytes]], device: torch.device) -> list[torch.Tensor | DecodeError]:
    """The JPEG frames of a batch's videos, decoded in one `decode_jpeg_list` call: per video uint8 `(N, 3, H, W)`
    channels-last on `device`, or the DecodeError of that video (a frame that does not decode, frames of different
    sizes). When the batch call fails, each video is decoded on its own to find the ones at fault.
    """
    flat = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for frames in videos for b in frames]
    try:
        decoded = decode_jpeg_list(flat, device) if flat else []
    except (RuntimeError, ValueError):
        return [_decode_or_error(frames, device) for frames in videos]
    out: list[torch.Tensor | DecodeError] = []
    start = 0
    for frames in videos:
        part, start = decoded[start : start + len(frames)], start + len(frames)
        try:
            out.append(stack_channels_last(part))
        except (RuntimeError, ValueError) as exc:
            out.append(DecodeError(f"JPEG frames do not stack ({' '.join(str(exc).split())[:200]})"))
    return out


def _decode_or_error(jpegs: Sequence[bytes], device: torch.device) -> torch.Tensor | DecodeError:
    try:
        return decode_jpegs(jpegs, device)
    except DecodeError as exc:
        return exc


def decode_video_frames(data: bytes, frames: Sequence[int]) -> torch.Tensor:
    """Video bytes -> uint8 `(len(frames), 3, H, W)` of the frames numbered `frames` (sorted, 0-based).

    Decodes up to the last wanted frame and converts only the wanted ones. Containers can count a frame or two more
    than decode; wanted frames past the decodable end repeat the last decoded frame.

    Raises:
        DecodeError: the bytes are not a decodable video, or it has no frames.
    """
    wanted, last = set(frames), max(frames)
    got: dict[int, np.ndarray] = {}
    prev, count = None, 0
    try:
        with av.open(io.BytesIO(data)) as container:
            for count, frame in enumerate(container.decode(video=0), start=1):
                if count - 1 in wanted:
                    got[count - 1] = frame.to_ndarray(format="rgb24")
                prev = frame
                if count - 1 >= last:
                    break
            if prev is None:
                raise DecodeError("video has no decodable frames", reason="no_frames")
            tail = prev.to_ndarray(format="rgb24") if len(got) < len(wanted) else None
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise DecodeError(f"video does not decode ({' '.join(str(exc).split())[:200]})") from exc
    if tail is not None:
        log.debug("video decodes to %d frames; frames %s repeat the last one", count, sorted(wanted - set(got)))
    rgb = np.stack([got.get(i, tail) for i in frames])
    return torch.from_numpy(rgb).permute(0, 3, 1, 2)
