"""Where shards come from: resolve a user's shard spec to a `ShardSource`, open shard URLs, read samples from tars.

A spec is one of:

- a shard index (`.../ssv2-train.json`: a local path, an `http(s)://` URL, or an object in a store, `s3://` or
  `gs://`, read through `ssv2prep.storage`): the shard urls, their `nsamples`, sizes and MD5s, the classes and
  `flip_pairs` all come from it. Relative urls in the index are relative to the index's location (inside its
  folder or prefix for an index in a store).
- one shard or a brace pattern (`/data/ssv2-train-{000000..000337}.tar`, `https://host/ssv2-train-{...}.tar`,
  `s3://bucket/ssv2/ssv2-train-{...}.tar`, `pipe:aws s3 cp s3://bucket/ssv2-train-{000000..000337}.tar -`).
  Per-shard sample counts (needed for exact epochs) come from the `index=` argument when given; otherwise, for
  local, http and store patterns, from the index named like the shards (`ssv2-train.json` beside
  `ssv2-train-000000.tar`) when it exists. A `pipe:` pattern gets counts only from an explicit `index=`. Without
  counts `nsamples` is None, which evaluation accepts and training refuses (see `ssv2prep.data.loader`).

Classes: the index's own `class_names` list when it has one, else the class file it names (`classes.json`) beside
it. Names are never invented here: without either, `classes` is None (with a warning) and the consumers that need
names (`train`, `eval`) refuse with an error naming the index. A class list whose length differs from the index's
`num_classes` is a `ShardError`.

Shards in a store (or behind http / `pipe:`) can be read through a bounded local cache (`ssv2prep.data.cache`):
`iter_samples(..., cache=...)` keeps a verified copy of each shard read whole, and later reads use it.

`pipe:` runs a command and reads the shard from its stdout (split with `shlex`, never through a shell). It is
honoured only in specs the user typed: an index whose shardlist holds a `pipe:` url is refused with `ShardError`,
because an index is data that may come from anyone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import logging
import re
import shlex
import signal
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urljoin, urlsplit

import braceexpand

from ssv2prep import storage
from ssv2prep.data.cache import CacheConfig, open_cached
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.prep.index import check_index, read_classes, read_index

log = logging.getLogger(__name__)

PIPE_PREFIX = "pipe:"
HTTP_TIMEOUT_S = 60.0
PIPE_EXIT_TIMEOUT_S = 10.0
STDERR_TAIL_CHARS = 300
DRAIN_CHUNK_BYTES = 1 << 16
# `ssv2-train-000012.tar` -> index `ssv2-train.json` (shard-format.md naming).
SHARD_NAME_RE = re.compile(r"^(?P<stem>.+)-\d+\.tar$")
TAR_BLOCK = 512
ZERO_BLOCK = bytes(TAR_BLOCK)
LOCAL_BUFFER_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class ShardSource:
    """The shards of one split and what is known about them.

    Attributes:
        urls: shard URLs in index order: local paths, `file://`, `http(s)://`, `s3://`, `gs://` or (user-typed
            only) `pipe:` commands.
        nsamples: samples per shard, aligned with `urls`; None when no index gave counts.
        classes: class names in label order, or None when unknown.
        flip_pairs: class index pairs whose meaning swaps under a horizontal flip (from the index).
        split: the split name (`train`, `validation`, ...) when known.
        format: `frames` or `video` when an index says so (samples are recognised by their members anyway).
        index_url: where the index was read from, or None.
        classes_from: where `classes` were read from (the index's `class_names`, or the class file beside it).
        num_classes: the index's `num_classes` (else the length of `classes`), or None when unknown.
        filesizes, md5sums: per shard, what the index says its bytes are (None per entry or as a whole when it
            does not say); a shard cache keeps only copies that match both.
    """

    urls: tuple[str, ...]
    nsamples: tuple[int, ...] | None
    classes: tuple[str, ...] | None
    flip_pairs: tuple[tuple[int, int], ...]
    split: str | None
    format: str | None = None
    index_url: str | None = None
    classes_from: str | None = None
    num_classes: int | None = None
    filesizes: tuple[int | None, ...] | None = None
    md5sums: tuple[str | None, ...] | None = None

    @property
    def num_samples(self) -> int | None:
        """Total samples over all shards, or None without counts."""
        return None if self.nsamples is None else sum(self.nsamples)


@dataclass(frozen=True, slots=True)
class RawSample:
    """One sample as stored: the key and its members (`{"json": b"...", "000003.jpg": b"...", ...}`), undecoded."""

    key: str
    members: dict[str, bytes]
    url: str


# ------------------------------------------------------------------------------------------------- resolution
STORE_SCHEMES = ("s3", "gs")


def _is_pipe(url: str) -> bool:
    return url.startswith(PIPE_PREFIX)


def _is_http(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def _is_store(url: str) -> bool:
    """An object in a store (`s3://`, `gs://`), read through `ssv2prep.storage`."""
    return not _is_pipe(url) and urlsplit(url).scheme in STORE_SCHEMES


def _has_scheme(url: str) -> bool:
    return "://" in url or url.startswith("file:")


def _shard_name(url: str) -> str:
    """The file name of a shard URL (for `pipe:`, of the last `.tar` argument of the command)."""
    if _is_pipe(url):
        tars = [tok for tok in shlex.split(url[len(PIPE_PREFIX) :]) if tok.endswith(".tar")]
        return _shard_name(tars[-1]) if tars else ""
    if _is_http(url) or _is_store(url) or url.startswith("file:"):
        return unquote(urlsplit(url).path).rsplit("/", 1)[-1]
    return Path(url).name


def _check_scheme(url: str, index_url: str | None = None) -> None:
    """Refuse a URL scheme nothing here can read: `ConfigError` for a typed spec, `ShardError` for an index's url."""
    try:
        storage.scheme_of(url)
    except ConfigError as exc:
        if index_url is None:
            raise
        raise ShardError(f"{index_url}: the index lists {exc}") from None


def _join(base: str, rel: str) -> str:
    """An index url made absolute against the index's location (a local file, an http URL or a store object)."""
    if _is_pipe(rel):
        raise ShardError(f"{base}: the index lists a pipe: url ({rel[:60]}); pipe: is only accepted in a typed spec")
    remote = _is_http(base) or _is_store(base)
    if remote and rel.startswith("file:"):
        raise ShardError(f"{base}: an index in a store or served over http may not list local files ({rel[:60]})")
    if _has_scheme(rel):
        _check_scheme(rel, base)
        return rel
    if _is_http(base):
        return urljoin(base, rel)
    if _is_store(base):
        try:
            return storage.join(storage.parent(base), rel)
        except ConfigError as exc:
            raise ShardError(f"{base}: shard url {rel[:60]!r} is not a name inside the index's prefix") from exc
    return str(Path(base).parent / rel)


def _fetch_http(url: str, *, missing_ok: bool = False) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        if missing_ok and exc.code == 404:
            return None
        raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ShardError(f"{url}: cannot fetch ({exc})") from exc


def _fetch_store(url: str) -> bytes:
    try:
        return storage.read_bytes(url)
    except storage.StorageError as exc:
        raise ShardError(str(exc)) from exc


def _read_remote_index(url: str) -> dict[str, Any]:
    data = _fetch_http(url) if _is_http(url) else _fetch_store(url)
    try:
        obj = json.loads(data or b"")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{url}: not a readable shard index ({exc})") from exc
    return check_index(obj, url)


def _classes_beside(index_url: str, index: dict[str, Any]) -> tuple[tuple[str, ...] | None, str]:
    """(the class file an index names, read beside it, or None with a warning when absent/unreadable; its URL)."""
    name = str(index.get("classes", "classes.json"))
    if not _is_http(index_url):  # local or object store: the shard side's reader (storage, folder-bound)
        where = f"{name} beside {index_url}"
        try:
            return tuple(read_classes(index_url, index)), storage.join(storage.parent(index_url), name)
        except (ShardError, ConfigError) as exc:
            log.warning("%s: no class names (%s)", index_url, exc)
            return None, where
    url = urljoin(index_url, name)
    try:
        classes = json.loads(_fetch_http(url) or b"")
    except (ShardError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: the index carries no class_names and no class list is usable beside it (%s)", index_url, exc)
        return None, url
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        log.warning("%s: the class list beside the index is not a list of names; class names unknown", index_url)
        return None, url
    return tuple(classes), url


def _read_classes(index_url: str, index: dict[str, Any]) -> tuple[tuple[str, ...] | None, str]:
    """(the index's classes: its own `class_names`, else the class file beside it, None when neither exists;
    where they were read from, for messages).

    Raises:
        ShardError: `class_names` that is not a list of names, or a list whose length differs from `num_classes`.
    """
    names = index.get("class_names")
    if names is None:
        classes, where = _classes_beside(index_url, index)
    elif isinstance(names, list) and all(isinstance(c, str) for c in names):
        classes, where = tuple(names), f"{index_url} (its class_names)"
    else:
        raise ShardError(f"{index_url}: class_names must be a list of class names")
    declared = index.get("num_classes")
    if classes is not None and isinstance(declared, int) and declared != len(classes):
        raise ShardError(
            f"{index_url}: the index says num_classes {declared}, but its class list has {len(classes)} names"
        )
    return classes, where


def index_classes(index_url: str, index: dict[str, Any]) -> tuple[str, ...] | None:
    """The classes of a parsed index read from `index_url` (local path or URL), as `resolve_source` finds them."""
    return _read_classes(_local_path(index_url), index)[0]


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _load_index(index_url: str) -> dict[str, Any]:
    if _is_http(index_url) or _is_store(index_url):
        return _read_remote_index(index_url)
    return read_index(_local_path(index_url))


def _flip_pairs(index_url: str, index: dict[str, Any]) -> tuple[tuple[int, int], ...]:
    try:
        return tuple((int(a), int(b)) for a, b in index.get("flip_pairs") or [])
    except (TypeError, ValueError) as exc:
        raise ShardError(f"{index_url}: flip_pairs must be a list of [class, class] pairs ({exc})") from exc


def _from_index(index_url: str, index: dict[str, Any]) -> ShardSource:
    entries = index["shardlist"]
    base = index_url if _is_http(index_url) or _is_store(index_url) else _local_path(index_url)
    classes, classes_from = _read_classes(base, index)
    declared = index.get("num_classes")
    return ShardSource(
        urls=tuple(_join(base, e["url"]) for e in entries),
        nsamples=tuple(int(e["nsamples"]) for e in entries),
        classes=classes,
        flip_pairs=_flip_pairs(index_url, index),
        split=index.get("split"),
        format=index.get("format"),
        index_url=index_url,
        classes_from=classes_from,
        num_classes=declared if isinstance(declared, int) else (len(classes) if classes is not None else None),
        filesizes=tuple(e["filesize"] if isinstance(e.get("filesize"), int) else None for e in entries),
        md5sums=tuple(e["md5sum"] if isinstance(e.get("md5sum"), str) else None for e in entries),
    )


def _neighbour_index(first_url: str) -> str | None:
    """The index named like the shards, beside the first one, if it exists (local, http or store; never pipe:)."""
    match = SHARD_NAME_RE.match(_shard_name(first_url))
    if match is None or _is_pipe(first_url):
        return None
    name = f"{match.group('stem')}.json"
    if _is_http(first_url):
        url = urljoin(first_url, name)
        return url if _fetch_http(url, missing_ok=True) is not None else None
    if _is_store(first_url):
        url = storage.join(storage.parent(first_url), name)
        try:
            return url if storage.exists(url) else None
        except storage.StorageError as exc:
            raise ShardError(str(exc)) from exc
    path = Path(_local_path(first_url)).parent / name
    return str(path) if path.is_file() else None


def _with_counts(urls: list[str], index_url: str) -> ShardSource:
    """Typed shard urls, with counts, classes and flip pairs from the index they belong to (matched by file name)."""
    indexed = _from_index(index_url, _load_index(index_url))
    by_name = {_shard_name(u): i for i, u in enumerate(indexed.urls)}
    missing = [u for u in urls if _shard_name(u) not in by_name]
    if missing:
        raise ConfigError(
            f"index {index_url} does not list shard {_shard_name(missing[0]) or missing[0]!r} "
            f"({len(missing)} of {len(urls)} shards unmatched); pass the index of these shards"
        )
    rows = [by_name[_shard_name(u)] for u in urls]

    def pick(values: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        return None if values is None else tuple(values[i] for i in rows)

    return dataclasses.replace(
        indexed,
        urls=tuple(urls),
        nsamples=pick(indexed.nsamples),
        filesizes=pick(indexed.filesizes),
        md5sums=pick(indexed.md5sums),
    )


def resolve_source(spec: str, *, index: str | None = None) -> ShardSource:
    """Turn a user's shard spec into a `ShardSource` (see the module docstring for the rules).

    Args:
        spec: an index (`*.json`), one shard, or a brace pattern; local, `file://`, `http(s)://`, `s3://`, `gs://`
            or `pipe:`.
        index: an index (path or URL) giving per-shard counts for the shards of a pattern.

    Raises:
        ConfigError: an empty spec, an unknown URL scheme, an index given twice, or typed shards the index does not
            list.
        ShardError: an index that cannot be read, lists a `pipe:` url, or whose class list contradicts its
            `num_classes`.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("shard spec is empty: give an index (ssv2-train.json) or a shard pattern")
    if not _is_pipe(spec):
        _check_scheme(spec)
    if index is not None:
        _check_scheme(index)
    if not _is_pipe(spec) and _shard_name(spec).endswith(".json"):
        if index is not None:
            raise ConfigError(f"{spec} is already an index; do not also pass index={index}")
        return _from_index(spec, _load_index(spec))
    urls = list(braceexpand.braceexpand(spec))
    if index is None:
        index = _neighbour_index(urls[0])
    if index is None:
        log.info("%s: no shard index found, so per-shard sample counts are unknown", spec)
        return ShardSource(tuple(urls), None, None, (), None)
    return _with_counts(urls, index)


# ------------------------------------------------------------------------------------------------------ opening
@contextlib.contextmanager
def _open_local(url: str) -> Iterator[IO[bytes]]:
    path = _local_path(url)
    try:
        fh = open(path, "rb", buffering=LOCAL_BUFFER_BYTES)  # noqa: SIM115 - closed below, after the caller's block
    except FileNotFoundError as exc:
        raise ShardError(f"{path}: shard not found") from exc
    except OSError as exc:
        raise ShardError(f"{path}: cannot open shard ({exc.strerror or exc})") from exc
    with fh:
        yield fh


@contextlib.contextmanager
def _open_http(url: str) -> Iterator[IO[bytes]]:
    try:
        resp = urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise ShardError(f"{url}: cannot open shard ({exc})") from exc
    with resp:
        yield resp


def _stderr_tail(err: IO[bytes]) -> str:
    err.seek(0)
    text = err.read().decode("utf-8", "replace")
    return " ".join(text.split())[-STDERR_TAIL_CHARS:] or "no stderr"


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    """Close our end of the pipe and reap the command (killing it if it lingers); its exit status or None."""
    if proc.stdout is not None:
        proc.stdout.close()
    try:
        return proc.wait(timeout=PIPE_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


@contextlib.contextmanager
def _open_pipe(url: str) -> Iterator[IO[bytes]]:
    argv = shlex.split(url[len(PIPE_PREFIX) :])
    if not argv:
        raise ShardError(f"{url!r}: empty pipe: command")
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        except OSError as exc:
            raise ShardError(f"{url}: cannot run {argv[0]!r} ({exc.strerror or exc})") from exc
        assert proc.stdout is not None
        try:
            yield proc.stdout
        except ShardError:  # unreadable stream: a failing command explains it better than tarfile does
            status = _stop(proc)
            if status not in (0, None, -signal.SIGPIPE):
                raise ShardError(f"{url}: command exited with status {status}: {_stderr_tail(err)}") from None
            raise
        except BaseException:  # the reader stopped early (or was interrupted): the command's fate does not matter
            proc.kill()
            _stop(proc)
            raise
        while proc.stdout.read(DRAIN_CHUNK_BYTES):  # the zero padding after the tar end marker
            pass
        status = _stop(proc)
        if status != 0:
            raise ShardError(f"{url}: command exited with status {status}: {_stderr_tail(err)}")


@contextlib.contextmanager
def _open_store(url: str) -> Iterator[IO[bytes]]:
    try:
        fh = storage.open_read(url)  # seekable: a skipped member costs a ranged read, not its bytes
    except storage.StorageError as exc:
        raise ShardError(f"cannot open shard {exc}") from exc
    with fh:
        yield fh


OPENERS: dict[str, Callable[[str], contextlib.AbstractContextManager[IO[bytes]]]] = {
    "pipe": _open_pipe,
    "http": _open_http,
    "https": _open_http,
    "s3": _open_store,
    "gs": _open_store,
    "file": _open_local,
    "": _open_local,
}
LOCAL_KINDS = ("file", "")


def url_kind(url: str) -> str:
    """The opener key of a URL: `pipe`, `http`, `https`, `s3`, `gs`, `file`, or `` for a local path."""
    if _is_pipe(url):
        return "pipe"
    scheme = urlsplit(url).scheme
    return scheme if scheme in OPENERS else ""


def open_shard(url: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A context manager giving a readable binary stream of one shard; errors are `ShardError` naming the URL."""
    return OPENERS[url_kind(url)](url)


def is_cacheable(url: str) -> bool:
    """Whether a shard cache applies to `url`: streamed shards (store, http, `pipe:`), not local files."""
    return url_kind(url) not in LOCAL_KINDS


@dataclass(frozen=True, slots=True)
class ShardCheck:
    """What the index says one shard's bytes are (both needed for the cache to keep a copy)."""

    size: int | None = None
    md5: str | None = None


def _open_for_reading(
    url: str, cache: CacheConfig | None, check: ShardCheck
) -> tuple[contextlib.AbstractContextManager[IO[bytes]], bool]:
    """(the stream's context manager, whether it fills a cache entry and so must be read to its end)."""
    if cache is None or not is_cacheable(url) or check.size is None or check.md5 is None:
        return open_shard(url), False
    return open_cached(url, cache, size=check.size, md5=check.md5, opener=lambda: open_shard(url)), True


# ------------------------------------------------------------------------------------------------------ reading
def _split_name(name: str) -> tuple[str, str]:
    """`dir/78687.000003.jpg` -> (`dir/78687`, `000003.jpg`): the key ends at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{folder}/{key}" if folder else key), suffix


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    while len(data) < size:  # http and pipe streams may return short reads before the end
        more = stream.read(size - len(data))
        if not more:
            raise tarfile.ReadError(f"unexpected end of data ({size - len(data)} bytes missing)")
        data += more
    return data


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # base-256 (GNU) for values that do not fit the octal field
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """`"%d %s=%s\\n"` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        length_text, _, _ = data[pos : pos + 20].partition(b" ")
        if not length_text.isdigit():
            break
        length = int(length_text)
        key, _, value = data[pos + len(length_text) + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _header(block: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a 512-byte tar header, after checking its checksum."""
    expected = _octal(block[148:156])
    if sum(block[:148]) + 8 * 32 + sum(block[156:]) != expected:
        raise tarfile.ReadError(f"bad tar header checksum at byte {offset}")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:262] == b"ustar":
        prefix = block[345:500].split(b"\0", 1)[0]
        name = prefix + b"/" + name if prefix else name
    return name.decode("utf-8", "surrogateescape"), _octal(block[124:136]), block[156:157]


class _TarReader:
    """A forward-only reader of a tar stream: member headers, then each member's data read or skipped.

    A small reader of our own rather than `tarfile`'s stream mode, which costs several times more per member (a
    shard has ~50 small JPEG members per video), and which cannot skip a member without reading its bytes. Handles
    USTAR, GNU long names and pax paths/sizes. Errors are `tarfile.ReadError`.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        """Read from `stream`, positioned at a member header (the start of the tar)."""
        self.stream = stream
        self.offset = 0  # bytes of the tar consumed so far (for messages)
        self._pending = 0  # data + padding bytes of the current member not yet consumed
        self._size = 0  # data bytes of the current member
        try:
            self._seekable = stream.seekable()
        except (AttributeError, OSError, ValueError):
            self._seekable = False

    def next_member(self) -> tuple[str, int] | None:
        """(name, size) of the next regular file, positioned at its data; None at the end-of-archive marker."""
        self.skip_data()  # a member whose data the caller neither read nor skipped
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            block = self.stream.read(TAR_BLOCK)
            if len(block) < TAR_BLOCK and block:
                block += _read_exact(self.stream, TAR_BLOCK - len(block))
            if block == ZERO_BLOCK:
                return None
            if not block:
                raise tarfile.ReadError(
                    "empty file" if self.offset == 0 else f"no end-of-archive marker after byte {self.offset}"
                )
            name, size, kind = _header(block, self.offset)
            size = int(pax.get("size", size))
            self.offset += TAR_BLOCK
            self._pending = size + (-size % TAR_BLOCK)
            if kind in (b"0", b"\0", b"7"):
                self._size = size
                return long_name or pax.get("path") or name, size
            if kind == b"L":
                long_name = self._take(size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(self._take(size))
            else:  # directories, links, global pax headers: nothing a sample uses
                self.skip_data()
                if kind != b"g":
                    long_name, pax = None, {}

    def _take(self, size: int) -> bytes:
        data = _read_exact(self.stream, size)
        _read_exact(self.stream, self._pending - size)
        self.offset += self._pending
        self._pending = 0
        return data

    def read_data(self) -> bytes:
        """The current member's bytes (once)."""
        return self._take(self._size)

    def skip_data(self) -> None:
        """Pass over the current member's bytes without keeping them: a seek when the stream can, else a drain."""
        left, self._pending = self._pending, 0
        self.offset += left
        if not left:
            return
        if self._seekable:
            self.stream.seek(left, 1)  # past the end is found by the next header read
            return
        while left:
            chunk = self.stream.read(min(left, DRAIN_CHUNK_BYTES))
            if not chunk:
                raise tarfile.ReadError(f"unexpected end of data ({left} bytes missing)")
            left -= len(chunk)


def read_samples(
    stream: IO[bytes], url: str, *, start: int = 0, stop: int | None = None
) -> Generator[RawSample, None, int | None]:
    """Samples `start <= i < stop` (0-based, stored order) of a tar stream, members grouped by key.

    Members of samples before `start` are passed over by their headers alone (their bytes are seeked past, or
    drained for a stream that cannot seek, and never kept); reading ends at the first header of sample `stop`.
    The generator's return value is the number of samples the stream holds when it was read to its end, or None
    when reading stopped early at sample `stop`.

    Raises:
        tarfile.ReadError: the stream is not a readable tar.
    """
    reader = _TarReader(stream)
    key: str | None = None
    members: dict[str, bytes] | None = None
    ordinal = -1
    while (member := reader.next_member()) is not None:
        name_key, suffix = _split_name(member[0])
        if not suffix:
            continue
        if name_key != key:
            if members is not None and key is not None:
                yield RawSample(key, members, url)
            key, ordinal = name_key, ordinal + 1
            if stop is not None and ordinal >= stop:
                return None
            members = {} if ordinal >= start else None
        if members is None:
            reader.skip_data()
        else:
            members[suffix] = reader.read_data()
    if members is not None and key is not None:
        yield RawSample(key, members, url)
    return ordinal + 1


class _LeftEarly(Exception):
    """Raised inside an open shard to close it without reading the rest (a `pipe:` command is then stopped)."""


def iter_samples(
    url: str,
    *,
    start: int = 0,
    stop: int | None = None,
    cache: CacheConfig | None = None,
    check: ShardCheck = ShardCheck(),
) -> Iterator[RawSample]:
    """Stream the samples of one shard in stored order (members grouped by key; bytes are not decoded).

    `start`/`stop` select samples `start <= i < stop` (0-based): the ones before `start` are skipped by their tar
    headers alone, and the shard is closed after sample `stop - 1` (see `read_samples`).

    `cache`: read a streamed shard through this local cache when `check` gives its size and MD5 (see
    `ssv2prep.data.cache`). A cache miss reads the whole shard, also past `stop`, so that the copy can be kept: the
    samples yielded are the same, and the next read of the shard, of any range, is local.

    Raises:
        ShardError: the shard is missing, cannot be fetched, is not a readable tar (also mid-way), or holds fewer
            than `stop` samples (an index that does not match its shards).
    """
    count = 0
    opened, read_to_end = _open_for_reading(url, cache, check)
    with contextlib.suppress(_LeftEarly), opened as stream:
        samples = read_samples(stream, url, start=start, stop=stop)
        try:
            while True:
                try:
                    sample = next(samples)
                except StopIteration as end:
                    held = end.value
                    break
                count += 1
                yield sample
        except (tarfile.TarError, EOFError, OSError, ValueError, http.client.HTTPException) as exc:
            raise ShardError(f"{url}: unreadable shard after {start + count} samples ({exc})") from exc
        if held is None:
            if read_to_end:
                return  # leaving the block normally lets the cache read the rest and keep the copy
            raise _LeftEarly
        if stop is not None and held < stop:
            raise ShardError(
                f"{url}: holds {held} samples, fewer than the {stop} its index counts (index and shards do not match)"
            )
