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
            data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
            with _torchvision_io():
                frames = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        return stack_channels_last(frames)
    except (RuntimeError, ValueError) as exc:
        raise DecodeError(f"JPEG frame does not decode ({' '.join(str(exc).split())[:200]})") from exc


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
