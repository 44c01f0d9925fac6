"""Where files live: local paths and object-store URLs behind one small set of functions.

Every command that reads or writes shards, indexes, manifests or work records goes through here, so `s3://` works
wherever a local folder does. Local paths use the file system directly; URLs go through fsspec (s3fs for `s3://`,
gcsfs for `gs://` when installed, fsspec's own HTTP reader for `http(s)://`, which is read-only).

Credentials, endpoint and region come from the standard places of each store (for S3: the AWS environment
variables, `AWS_ENDPOINT_URL` included, `~/.aws/config`, instance roles); ssv2prep never takes them as flags, so
they never reach a log or an error message.

A write is atomic everywhere: locally a temp file beside the target and a rename; in an object store one PUT (or
one multipart upload), which makes the object visible only once it is complete. So a listed object is whole, and a
killed writer leaves nothing half-written under the name a reader looks for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from ssv2prep.errors import ConfigError, Ssv2PrepError
from ssv2prep.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

# scheme -> (fsspec protocol, writable, the package that provides it)
SCHEMES: dict[str, tuple[str, bool, str]] = {
    "s3": ("s3", True, "s3fs"),
    "gs": ("gs", True, "gcsfs"),
    "http": ("http", False, "aiohttp"),
    "https": ("https", False, "aiohttp"),
}


class StorageError(Ssv2PrepError):
    """A file or object that cannot be read or written (missing, no access, store unreachable)."""


def scheme_of(url: str | os.PathLike[str]) -> str | None:
    """The URL scheme of `url` (`s3`, `https`, ...), or None for a local path (including `file://`)."""
    text = os.fspath(url)
    if "://" not in text:
        return None
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return None
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"{text}: unknown scheme {scheme}:// (use a local path or one of {known})")
    return scheme


def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for an object-store or HTTP URL, False for a local path."""
    return scheme_of(url) is not None


def local_path(url: str | os.PathLike[str]) -> Path:
    """The local path of a local `url` (a plain path or `file://...`)."""
    text = os.fspath(url)
    return Path(text[len("file://") :] if text.startswith("file://") else text)


def _fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a remote URL."""
    scheme = scheme_of(url)
    assert scheme is not None
    protocol, _, package = SCHEMES[scheme]
    try:
        import fsspec

        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{url}: {scheme}:// needs the {package} package (pip install {package})") from exc
    return fs, url if scheme in ("http", "https") else url.split("://", 1)[1]


def _writable(url: str) -> tuple[Any, str]:
    scheme = scheme_of(url)
    assert scheme is not None
    if not SCHEMES[scheme][1]:
        raise ConfigError(f"{url}: {scheme}:// is read-only; write to a local folder or an object store")
    return _fs(url)


@contextlib.contextmanager
def _errors(url: str, doing: str) -> Iterator[None]:
    """Turn a store's exceptions into one-line `StorageError`s naming the URL (never credentials)."""
    try:
        yield
    except Ssv2PrepError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"{url}: not found") from exc
    except PermissionError as exc:
        raise StorageError(f"{url}: access denied while {doing} (check the credentials and the bucket policy)") from exc
    except Exception as exc:  # botocore/aiohttp errors have no common base worth importing here
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise StorageError(f"{url}: {doing} failed: {detail}") from exc


def join(base: str | os.PathLike[str], name: str) -> str:
    """`name` inside the folder or prefix `base`; refuses names that would leave it.

    Raises:
        ConfigError: `name` is absolute, has a scheme, or walks out with `..`.
    """
    if not name or "://" in name or name.startswith(("/", "\\")) or os.path.isabs(name):
        raise ConfigError(f"{name!r}: not a name inside {os.fspath(base)}")
    parts = name.replace("\\", "/").split("/")
    if any(p == ".." for p in parts):
        raise ConfigError(f"{name!r}: leaves {os.fspath(base)} (.. is not allowed)")
    clean = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")))
    text = os.fspath(base)
    if is_remote(text):
        return f"{text.rstrip('/')}/{clean}"
    return str(local_path(text) / clean)


def parent(url: str | os.PathLike[str]) -> str:
    """The folder or prefix that holds `url`."""
    text = os.fspath(url)
    if is_remote(text):
        head, _, _ = text.rstrip("/").rpartition("/")
        return head
    return str(local_path(text).parent)


def basename(url: str | os.PathLike[str]) -> str:
    """The last component of a path or URL (without query)."""
    text = os.fspath(url)
    if is_remote(text):
        return posixpath.basename(urlsplit(text).path.rstrip("/"))
    return local_path(text).name


def exists(url: str | os.PathLike[str]) -> bool:
    """Whether a file or object exists at `url`."""
    text = os.fspath(url)
    if not is_remote(text):
        return local_path(text).exists()
    fs, path = _fs(text)
    with _errors(text, "checking"):
        return bool(fs.exists(path))


def size(url: str | os.PathLike[str]) -> int:
    """Size in bytes of the file or object at `url`."""
    text = os.fspath(url)
    if not is_remote(text):
        try:
            return local_path(text).stat().st_size
        except FileNotFoundError as exc:
            raise StorageError(f"{text}: not found") from exc
    fs, path = _fs(text)
    with _errors(text, "reading the size"):
        return int(fs.size(path))


def read_bytes(url: str | os.PathLike[str]) -> bytes:
    """The whole content of the file or object at `url`."""
    text = os.fspath(url)
    if not is_remote(text):
        try:
            return local_path(text).read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"{text}: not found") from exc
        except OSError as exc:
            raise StorageError(f"{text}: cannot read: {exc.strerror or exc}") from exc
    fs, path = _fs(text)
    with _errors(text, "reading"):
        return bytes(fs.cat_file(path))


def open_read(url: str | os.PathLike[str]) -> IO[bytes]:
    """A binary stream over the file or object at `url` (the caller closes it)."""
    text = os.fspath(url)
    if not is_remote(text):
        try:
            return open(local_path(text), "rb")  # the caller owns and closes the stream
        except FileNotFoundError as exc:
            raise StorageError(f"{text}: not found") from exc
    fs, path = _fs(text)
    with _errors(text, "opening"):
        return fs.open(path, "rb")


def write_bytes(url: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `url` atomically (temp + rename locally; one PUT in an object store)."""
    text = os.fspath(url)
    if not is_remote(text):
        atomic_write_bytes(local_path(text), data)
        return
    fs, path = _writable(text)
    with _errors(text, "writing"):
        fs.pipe_file(path, data)


def upload(local: str | os.PathLike[str], url: str | os.PathLike[str]) -> None:
    """Copy the local file `local` to `url` atomically (one object, visible only when complete)."""
    text = os.fspath(url)
    if not is_remote(text):
        target = local_path(text)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.upload.tmp")
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)
        return
    fs, path = _writable(text)
    with _errors(text, "uploading"):
        fs.put_file(os.fspath(local), path)


def remove(url: str | os.PathLike[str]) -> None:
    """Delete the file or object at `url`; a missing one is fine."""
    text = os.fspath(url)
    if not is_remote(text):
        with contextlib.suppress(FileNotFoundError):
            local_path(text).unlink()
        return
    fs, path = _writable(text)
    with _errors(text, "deleting"):
        if fs.exists(path):
            fs.rm_file(path)


def list_names(folder: str | os.PathLike[str]) -> list[str]:
    """Names (not paths) of the files directly inside a folder or prefix, sorted; [] when there is none."""
    text = os.fspath(folder)
    if not is_remote(text):
        root = local_path(text)
        return sorted(p.name for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    fs, path = _fs(text)
    with _errors(text, "listing"):
        try:
            entries = fs.ls(path.rstrip("/"), detail=True, refresh=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")


def list_sizes(folder: str | os.PathLike[str]) -> dict[str, int]:
    """{name: size in bytes} of the files directly inside a folder or prefix, from one listing; {} when none."""
    text = os.fspath(folder)
    if not is_remote(text):
        root = local_path(text)
        if not root.is_dir():
            return {}
        out = {}
        for entry in os.scandir(root):
            with contextlib.suppress(FileNotFoundError):  # a temp file renamed away while listing
                if entry.is_file():
                    out[entry.name] = entry.stat().st_size
        return dict(sorted(out.items()))
    fs, path = _fs(text)
    with _errors(text, "listing"):
        try:
            entries = fs.ls(path.rstrip("/"), detail=True, refresh=True)
        except FileNotFoundError:
            return {}
    return dict(
        sorted(
            (posixpath.basename(e["name"].rstrip("/")), int(e.get("size") or 0))
            for e in entries
            if e.get("type") == "file"
        )
    )


def read_many(urls: list[str]) -> dict[str, bytes]:
    """{url: content} of several files or objects; remote ones of one store are fetched concurrently.

    Raises:
        StorageError: one of them is missing or unreadable (the message names the first such URL).
    """
    out: dict[str, bytes] = {}
    remote: dict[str, list[str]] = {}
    for url in urls:
        if is_remote(url):
            remote.setdefault(scheme_of(url) or "", []).append(url)
        else:
            out[url] = read_bytes(url)
    for group in remote.values():
        fs, _ = _fs(group[0])
        paths = {_fs_path(url): url for url in group}
        with _errors(group[0], "reading"):
            got = fs.cat(list(paths), on_error="return")
        for path, url in paths.items():
            data = got.get(path, FileNotFoundError(path))
            if isinstance(data, BaseException):
                with _errors(url, "reading"):
                    raise data
            out[url] = bytes(data)
    return {url: out[url] for url in urls}


def _fs_path(url: str) -> str:
    return _fs(url)[1]


def abort_uploads(folder: str | os.PathLike[str], names: list[str] | set[str]) -> list[str]:
    """Abort multipart uploads left open (by a killed writer) for objects `names` of an S3 prefix; their names.

    An open upload is invisible in listings but keeps its parts (and their cost) until aborted. Only the given
    names are touched, so a `--part` run never aborts another part's upload in progress. Local folders and other
    stores have no such thing: [].
    """
    text = os.fspath(folder)
    if scheme_of(text) != "s3":
        return []
    fs, path = _fs(text)
    bucket, _, prefix = path.rstrip("/").partition("/")
    wanted = {f"{prefix}/{n}" if prefix else n: n for n in names}
    aborted = []
    with _errors(text, "listing open uploads"):
        for upload in fs.list_multipart_uploads(bucket):
            name = wanted.get(upload.get("Key", ""))
            if name is not None:
                fs.abort_mpu(bucket, upload["Key"], upload["UploadId"])
                aborted.append(name)
    return sorted(aborted)
