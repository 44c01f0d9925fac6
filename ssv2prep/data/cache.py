"""A bounded local cache for streamed shards: epoch 1 reads from the store and keeps a copy, later epochs read disk.

A full SSv2 train split is 100-200 GB of frame shards; streaming it from S3 every epoch at several GPUs' appetite
is doubtful, and a local NVMe disk is not. The cache is a folder of whole shards named by a digest of their URL:

- A miss streams the shard from its store through to the reader and, byte for byte, into a temp file beside the
  entry. When the reader reaches the end and the bytes have the size and MD5 the index promised, the temp file is
  renamed into place; otherwise it is dropped. A reader that stops early leaves no entry. So an entry is always a
  whole, verified shard, and several processes filling the same entry at once only race to rename equal files.
- A hit checks the entry's size, and its MD5 unless `verify="size"`, before use; a corrupt or partial entry is
  deleted and the shard streamed again.
- After each new entry, the least recently used entries are deleted until the folder fits `max_bytes`.

Without an expected size and MD5 (an index that lacks them), shards are streamed and not cached: nothing could
prove a cached copy whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ssv2prep.errors import ConfigError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
ENTRY_SUFFIX = ".tar"
VERIFY_MODES = ("md5", "size")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Where the cache lives and how large it may grow (bytes); `verify` is how hits are checked."""

    root: Path
    max_bytes: int
    verify: str = "md5"

    def validate(self) -> None:
        """Raise ConfigError naming the flag that is out of range."""
        if self.max_bytes <= 0:
            raise ConfigError(f"--cache-size must be > 0 (got {self.max_bytes} bytes)")
        if self.verify not in VERIFY_MODES:
            raise ConfigError(f"--cache-verify must be one of {', '.join(VERIFY_MODES)} (got {self.verify!r})")


def parse_size(text: str) -> int:
    """`"200G"`, `"512M"`, `"1.5T"`, `"1000000"` -> bytes (powers of 1024 for the suffixes)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    value = text.strip().upper().removesuffix("B")
    try:
        if value and value[-1] in units:
            return int(float(value[:-1]) * units[value[-1]])
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"--cache-size must look like 200G, 512M or a byte count (got {text!r})") from exc


def entry_path(root: Path, url: str) -> Path:
    """The cache file of `url`: a digest of the URL (any URL maps to a safe, flat file name)."""
    return root / (hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + ENTRY_SUFFIX)


def _md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _valid(path: Path, size: int, md5: str, verify: str) -> bool:
    try:
        if path.stat().st_size != size:
            return False
    except FileNotFoundError:
        return False
    return verify == "size" or _md5_of(path) == md5


def _evict(root: Path, max_bytes: int, keep: Path) -> None:
    """Delete least recently used entries (by mtime, which a hit refreshes) until the folder fits `max_bytes`."""
    entries = []
    for p in root.glob(f"*{ENTRY_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            st = p.stat()
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        if path == keep:
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a process reading it keeps its open file; the name is free at once
            total -= size
            log.debug("cache: evicted %s (%d bytes)", path.name, size)


class _Tee:
    """A read-only stream that copies what it reads into a temp file and hashes it on the way."""

    def __init__(self, src: IO[bytes], tmp: Path, size: int, md5: str) -> None:
        self._src = src
        self._size, self._md5 = size, md5
        self._out = open(tmp, "wb")  # noqa: SIM115 (closed in close())
        self._hash = hashlib.md5()
        self._count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._src.read(n)
        if data:
            self._out.write(data)
            self._hash.update(data)
            self._count += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def finish(self) -> bool:
        """Read what the reader left (a tar reader stops at the end-of-archive blocks, before the padding) and
        say whether the whole copy matches the index."""
        while self._count <= self._size and self.read(CHUNK):
            pass
        self._out.close()
        return self._count == self._size and self._hash.hexdigest() == self._md5

    def close(self) -> None:
        self._out.close()

    def __enter__(self) -> _Tee:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_cached(
    url: str,
    cfg: CacheConfig,
    *,
    size: int | None,
    md5: str | None,
    opener: Callable[[], contextlib.AbstractContextManager[IO[bytes]]],
) -> Iterator[IO[bytes]]:
    """A stream of shard `url`: the cached copy when it is valid, else `opener`'s stream, kept when read whole.

    Args:
        url: the shard's URL (the cache key).
        cfg: the cache.
        size, md5: what the index says the shard holds; without both the shard is streamed and not cached.
        opener: opens the shard at its source (called only on a miss); returns a context manager of a stream.
    """
    if size is None or md5 is None:
        with opener() as stream:
            yield stream
        return
    cfg.root.mkdir(parents=True, exist_ok=True)
    target = entry_path(cfg.root, url)
    if _valid(target, size, md5, cfg.verify):
        os.utime(target)  # most recently used
        with open(target, "rb") as fh:
            yield fh
        return
    if target.exists():
        log.warning("cache: %s holds a corrupt or partial copy of %s; fetching it again", target, url)
        with contextlib.suppress(FileNotFoundError):
            target.unlink()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    try:
        with opener() as stream:
            tee = _Tee(stream, tmp, size, md5)
            try:
                yield tee  # type: ignore[misc]
                kept = tee.finish()
            finally:
                tee.close()
        if kept:
            os.replace(tmp, target)
            _evict(cfg.root, cfg.max_bytes, keep=target)
        else:
            log.warning("cache: %s does not match its index (size/MD5); not kept", url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
