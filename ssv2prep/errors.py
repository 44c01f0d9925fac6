"""The exception hierarchy.

Library code raises these; `ssv2prep.cli` turns them into a one-line message and the exit code
below. A message says what went wrong, where (file, part, URL) and what to do about it.
"""

from __future__ import annotations


class Ssv2PrepError(Exception):
    """Base of every error a user can cause or fix. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(Ssv2PrepError):
    """A bad option, recipe key or value."""

    exit_code = 2


class ManifestError(Ssv2PrepError):
    """A download manifest or annotation file that cannot be used as it is."""


class AnnotationError(ManifestError):
    """SSv2 annotation files (labels/train/validation/test) that are missing or inconsistent."""


class DownloadError(Ssv2PrepError):
    """An HTTP download that failed for good (after retries) or was refused."""


class ChecksumError(DownloadError):
    """A downloaded file whose digest differs from the manifest."""


class ExtractError(Ssv2PrepError):
    """An archive part that is missing, out of order, truncated or unsafe."""


class ShardError(Ssv2PrepError):
    """A shard that could not be written or read back, or an index that breaks its invariants."""


class CheckpointError(Ssv2PrepError):
    """A checkpoint that cannot be loaded into the model asked for."""


class SampleError(Ssv2PrepError):
    """One sample (one video) that cannot be used; recorded and counted, not fatal by default.

    `reason` is a short stable code (`decode_error`, `truncated`, `empty_file`, `no_frames`, ...) that stats count
    by; the message is the one-line detail recorded next to it.
    """

    default_reason = "sample_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason


class DecodeError(SampleError):
    """A video (or JPEG) that the decoder could not read."""

    default_reason = "decode_error"


class TooFewFramesError(SampleError):
    """A video that decoded to no frames (or fewer than needed)."""

    default_reason = "no_frames"
