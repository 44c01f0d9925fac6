"""Small file-system helpers shared by every stage: atomic writes, digests, the output-folder lock and write errors."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ssv2prep.errors import Ssv2PrepError

CHUNK_BYTES = 1 << 20


def _file_mode() -> int:
    # mkstemp creates 0600 files; finished outputs get the usual 0666 & ~umask, like open() would give.
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def make_temp(target: Path) -> tuple[int, str]:
    """A temp file beside `target` (same folder, so the final rename is atomic) with normal permissions."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file beside `path`; rename it onto `path` only if the block succeeds.

    A reader therefore sees either the old file or the whole new one, never a partial write, even if the process is
    killed. There is no fsync: a killed process loses nothing the OS has accepted, and `verify` checks shard MD5s
    after a machine crash; an fsync per file costs more than writing a small shard.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = make_temp(target)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh  # type: ignore[misc]
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Write `obj` as UTF-8 JSON (keys in insertion order) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


LOCK_NAME = ".ssv2prep.lock"


class OutputLockedError(Ssv2PrepError):
    """Another ssv2prep process holds the lock on an output folder. `pid` is the holder's (None if unknown)."""

    def __init__(self, message: str, *, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class OutputWriteError(Ssv2PrepError):
    """An output that cannot be written (disk full, read-only file system, permission), naming the path."""


_WRITE_PROBLEMS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def write_problem(exc: OSError) -> str | None:
    """A short phrase for an OSError that means 'this output cannot be written', else None."""
    return _WRITE_PROBLEMS.get(exc.errno) if exc.errno is not None else None


def output_write_error(path: str | os.PathLike[str], exc: OSError, what: str = "cannot write") -> Ssv2PrepError:
    """The typed one-line error for a failed write under `path` (OutputWriteError for disk-full/read-only/denied)."""
    problem = write_problem(exc) or exc.strerror or str(exc)
    return OutputWriteError(f"{path}: {what}: {problem}")


def _lock_file(root: Path, path: Path, option: str, shared: bool) -> int:
    """An fd of `path` holding its flock (exclusive, or shared), with our pid written in it."""
    for _ in range(10):
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        except OSError as exc:
            raise output_write_error(root, exc, f"cannot create the {option} lock") from exc
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            pid = int(holder) if holder.isdigit() else None
            who = f"process {pid}" if pid is not None else "another process"
            raise OutputLockedError(
                f"{root}: {option} is in use by {who} (lock {path}); wait for it to finish or use another folder",
                pid=pid,
            ) from None
        # The holder before us removes the file as it lets go: a lock on that removed file locks nothing.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            if not shared:
                os.ftruncate(fd, 0)
            # Shared holders each write their pid: the file names one of them (the latest), which is enough to
            # tell a user which run to wait for.
            os.pwrite(fd, f"{os.getpid()}\n".ljust(12).encode("ascii"), 0)
            return fd
        os.close(fd)
    raise OutputLockedError(f"{root}: {option} lock {path} keeps changing hands; try again", pid=None)


@contextlib.contextmanager
def output_lock(
    folder: str | os.PathLike[str],
    *,
    option: str = "the output folder",
    name: str = LOCK_NAME,
    shared: bool = False,
) -> Iterator[Path]:
    """Hold a lock on `folder` (created if missing) for the block; fail at once if another process holds it.

    The lock is `fcntl.flock` on `folder/name` (default `.ssv2prep.lock`), which holds the holder's pid while it
    runs and is removed when the last holder lets go. The kernel drops a flock when its holder exits, however it
    exits, so a lock file left by a killed run never blocks a later one. Two runs writing the same folder would
    delete each other's temp files; this makes the second one stop before touching anything. `shared` locks (the
    `--part` runs of one shard plan, which write disjoint shards) coexist with each other, not with an exclusive one.

    Raises:
        OutputLockedError: another process holds the lock (the message names its pid and `option`).
        OutputWriteError: the folder or its lock file cannot be created (read-only, full, denied).
    """
    root = Path(folder)
    path = root / name
    fd = _lock_file(root, path, option, shared)
    try:
        yield path
    finally:
        # Removed while still locked, and only by its last holder (the one that can make its lock exclusive), so
        # that nobody can lock a removed file while others still hold the old one (see _lock_file).
        with contextlib.suppress(OSError):
            if shared:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(path)
        os.close(fd)
