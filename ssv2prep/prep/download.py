"""Fetch the files of a download manifest into a folder: resumable, verified, retried, in parallel.

Layout of the destination folder for a manifest file ``NAME``::

    DEST/NAME                     the verified file (renamed into place only once it is complete and checked)
    DEST/NAME.part                bytes received so far; a later run resumes it with ``Range: bytes=N-``
    DEST/.NAME.verified.json      {"size": ..., "mtime_ns": ..., "sha256": ...} written after verification

Policy, per file:

- ``NAME`` present with a sidecar whose size and mtime still match: done (`ALREADY_COMPLETE`), nothing is hashed.
- ``NAME`` present without a (matching) sidecar, e.g. downloaded by hand: its size and sha256 are checked against
  the manifest. A match is accepted (`PROVIDED_BY_USER`, or `ALREADY_COMPLETE` if a stale sidecar existed) and a
  sidecar is written. A mismatch against a *binding* size or checksum fails the file but never deletes it: it is
  the user's file, so the message says what differs and to delete, replace or rename it to ``NAME.part``.
- Otherwise it is downloaded to ``NAME.part``. A binding checksum mismatch deletes the ``.part`` and fails the
  file with both digests; an advisory mismatch keeps the file, logs a warning and sets `advisory_mismatch`.

No file is ever accepted as complete without passing the checks that need no checksum (the shipped SSv2
manifests only have advisory ones), on every path above, a trusted sidecar included:

- its size fits `ManifestFile.size_bounds` (exact, or the approximate size ± 20 %); a server that announces a
  size outside them is refused before the body;
- its first bytes fit `ManifestFile.magics` (gzip or zip where the format fixes them), and it is neither an HTML
  page nor text: a ``200 text/html`` login page, or a page sent as ``application/octet-stream``, is refused
  before any byte is kept, with the licence hint (given once per run, in the final error);
- a body that ends short of its Content-Length is a failed attempt (retried, then an error), also when the
  server later claims (416) that the short size is the whole file;
- a stale ``.part`` that cannot be the start of the file (longer than the file can be, wrong first bytes, a
  page) is restarted; a resumed ``.part`` is hashed whole from disk, and if it then differs from the
  manifest's checksum (binding or advisory) the file is fetched once more from byte 0 before it is judged.

URL of a file: `DownloadConfig.base_url` + ``/NAME`` when given (the user's explicit choice wins), else the
manifest entry's `url`, else the manifest's `base_url` + ``/NAME``. Files that are already present need no URL.

Secrets: header values, cookie values and URL query strings (signed URLs) never appear in log lines, messages or
`FileResult.url`. Keep the ``urllib3`` logger at WARNING or above: at DEBUG it logs request URLs with their query.
User headers and cookies are sent only to the origin (scheme, host, port) of the file's URL and to redirects that
stay on it; redirects are followed here (at most 10), not by requests, so that a custom header such as
``X-Auth-Token`` never reaches another host.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import http.cookiejar
import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urljoin, urlsplit, urlunsplit

import requests
import urllib3

from ssv2prep.errors import ChecksumError, ConfigError, DownloadError
from ssv2prep.fsutil import atomic_write_json, file_digest
from ssv2prep.prep.manifest import APPROX_SIZE_TOLERANCE, GZIP_MAGIC, ZIP_MAGIC, DownloadManifest, ManifestFile

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int | None], None]

_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE_RE = re.compile(r"^bytes \*/(\d+)$")
_COOKIE_MAGIC_RE = re.compile(r"^\s*#( Netscape)? HTTP Cookie File")
_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 10
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<!--", b"<meta", b"<title", b"<script")
_SNIFF_BYTES = 512  # first bytes judged before a body from byte 0 is kept
_MIN_TEXT_BYTES = 8
_MAGIC_NAMES = {GZIP_MAGIC: "gzip", ZIP_MAGIC: "zip"}
_MANAGED_HEADERS = frozenset({"range", "accept-encoding", "host", "content-length"})
_MAX_BACKOFF_S = 120.0
_PROGRESS_EVERY_S = 0.2
_LICENCE_HINT = (
    "the SSv2 files need an accepted research licence and a login on the publisher's site; pass "
    "--cookies cookies.txt (exported from a logged-in browser) or --header 'Authorization: Bearer ...', "
    "or download the file by hand into {dest}"
)


@dataclass(frozen=True, slots=True)
class DownloadConfig:
    """Options of `download_manifest`.

    Attributes:
        dest: folder that receives the files (created if missing).
        base_url: folder URL holding the files; overrides every URL of the manifest.
        headers: extra request headers as (name, value) pairs, e.g. from ``--header "Authorization: Bearer ..."``.
        cookies_file: Netscape ``cookies.txt`` (as browser export extensions write it) sent with every request.
        jobs: files downloaded in parallel (threads).
        retries: extra attempts per file after transient failures (connection errors, timeouts, dropped
            streams, 5xx, 429); each attempt resumes from the bytes already received.
        backoff_s: base of the exponential backoff: attempt k waits ``backoff_s * 2**(k-1)`` s (capped at 120 s).
        timeout_s: connect and per-read timeout in seconds (``download --timeout``): a server silent this long
            fails the attempt.
        chunk_bytes: read size of the stream (also the granularity of progress reports).
    """

    dest: Path
    base_url: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    cookies_file: Path | None = None
    jobs: int = 2
    retries: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 60.0
    chunk_bytes: int = 1 << 20

    def validate(self) -> None:
        """Raise `ConfigError` on an out-of-range value, a malformed header or URL, or a missing cookies file."""
        checks = [
            (self.jobs >= 1, f"jobs must be >= 1, got {self.jobs}"),
            (self.retries >= 0, f"retries must be >= 0, got {self.retries}"),
            (self.backoff_s >= 0, f"backoff_s must be >= 0, got {self.backoff_s}"),
            (self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}"),
            (self.chunk_bytes >= 1, f"chunk_bytes must be >= 1, got {self.chunk_bytes}"),
            (not Path(self.dest).is_file(), f"dest {self.dest} is a file; it must be a folder"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"download: {message}")
        for name, value in self.headers:
            _check_header(name, value)
        if self.base_url is not None:
            _check_url(self.base_url, "--base-url")
        if self.cookies_file is not None and not Path(self.cookies_file).is_file():
            raise ConfigError(f"download: cookies file {self.cookies_file} not found")


class FileStatus(enum.Enum):
    """Outcome of one manifest file."""

    DOWNLOADED = "downloaded"  # fetched in one response from byte 0
    RESUMED = "resumed"  # some bytes came from a Range request continuing a .part
    ALREADY_COMPLETE = "already_complete"  # verified earlier (sidecar), nothing fetched
    PROVIDED_BY_USER = "provided_by_user"  # present without a sidecar, verified now, nothing fetched
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class FileResult:
    """What happened to one manifest file.

    Attributes:
        name: manifest file name.
        status: the outcome.
        size_bytes: size of the verified file (None when it failed).
        sha256: hex digest of the verified file (None when it failed).
        url: the URL used or that would be used, without query string or credentials (None if there is none).
        error: one-line reason when `status` is FAILED.
        attempts: HTTP requests made for this file in this run.
        seconds: wall time spent on this file.
        advisory_mismatch: the file differs from an advisory (third-party) checksum but was kept.
    """

    name: str
    status: FileStatus
    size_bytes: int | None = None
    sha256: str | None = None
    url: str | None = None
    error: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    advisory_mismatch: bool = False


def parse_header_option(text: str) -> tuple[str, str]:
    """Split a ``--header "Name: value"`` option into (name, value); `ConfigError` (without the value) if malformed."""
    name, sep, value = text.partition(":")
    if not sep:
        raise ConfigError("--header expects 'Name: value' (a colon between the header name and its value)")
    name, value = name.strip(), value.strip()
    _check_header(name, value)
    return name, value


def load_cookies(path: str | Path) -> requests.cookies.RequestsCookieJar:
    """Read a Netscape ``cookies.txt`` with `http.cookiejar.MozillaCookieJar` (as browser exports write it).

    Format: a first line ``# Netscape HTTP Cookie File`` (or ``# HTTP Cookie File``), then one cookie per line with
    7 tab-separated fields: domain, subdomains flag (TRUE exactly when the domain has a leading dot), path, secure,
    expiry (seconds since the epoch; 0 = a session cookie), name, value. ``#HttpOnly_`` prefixes are understood;
    other ``#`` lines and blank lines are skipped. A malformed file raises `ConfigError` naming the file and the
    line, never a value: the stdlib's own message quotes the line, so it is not chained.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cookies file {p}: cannot read it ({exc.strerror or type(exc).__name__})") from None
    _check_cookie_lines(p, data)
    mozilla = http.cookiejar.MozillaCookieJar()
    try:
        with warnings.catch_warnings():  # the stdlib warns with a traceback on lines it cannot parse
            warnings.simplefilter("ignore")
            # ignore_expires: an expiry of 0 means "session" in browser exports but "expired" to Python 3.11
            mozilla.load(str(p), ignore_discard=True, ignore_expires=True)
    except (http.cookiejar.LoadError, OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cookies file {p}: not a Netscape cookies.txt ({type(exc).__name__})") from None
    jar = requests.cookies.RequestsCookieJar()
    now = time.time()
    for cookie in mozilla:
        if cookie.expires == 0:
            cookie.expires, cookie.discard = None, True
        if not cookie.is_expired(now):
            jar.set_cookie(cookie)
    log.debug("loaded %d cookies from %s", len(jar), p)
    return jar


def _check_cookie_lines(path: Path, data: bytes) -> None:
    """Find what `MozillaCookieJar` would reject, to say which line is wrong without showing it."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"cookies file {path}: not UTF-8 text") from None
    if not lines or not _COOKIE_MAGIC_RE.match(lines[0]):
        raise ConfigError(
            f"cookies file {path}: the first line must be '# Netscape HTTP Cookie File' (as browser exports write "
            f"it); add it if your exporter left it out"
        )
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.removeprefix("#HttpOnly_")
        if not line.strip() or line.lstrip().startswith(("#", "$")):
            continue
        fields = line.split("\t")
        problem = None
        if len(fields) != 7:
            problem = f"{len(fields)} tab-separated field(s), expected 7"
        elif fields[4] and not fields[4].isdigit():
            problem = "the expiry (field 5) is not a number of seconds"
        elif (fields[1] == "TRUE") != fields[0].startswith("."):
            problem = "the subdomains flag (field 2) must be TRUE exactly when the domain starts with a dot"
        if problem:
            raise ConfigError(f"cookies file {path}, line {lineno}: {problem}")


def download_manifest(
    manifest: DownloadManifest, cfg: DownloadConfig, *, on_progress: ProgressFn | None = None
) -> list[FileResult]:
    """Download every file of `manifest` into `cfg.dest`, resuming and skipping completed work.

    Args:
        manifest: the files, their sizes and checksums (binding or advisory).
        cfg: destination, URLs, credentials, parallelism and retry policy.
        on_progress: called as ``on_progress(name, bytes_done, bytes_total_or_None)`` while bytes arrive
            (throttled; the last call for a completed download has ``bytes_done == bytes_total``). It is called
            from worker threads, so it must be thread-safe.

    Returns:
        One `FileResult` per manifest file, in manifest order (when nothing failed).

    Raises:
        ConfigError: invalid `cfg`, or a file to download has no URL (no ``--base-url``, no manifest URL).
        ChecksumError: after all files were processed, if every failure was a size/checksum mismatch.
        DownloadError: after all files were processed, if any file failed; the message lists each failed file
            with its reason and the exception's ``results`` attribute holds all `FileResult`s.
    """
    cfg.validate()
    dest = Path(cfg.dest)
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [_make_job(entry, manifest, cfg) for entry in manifest.files]
    _require_urls(jobs, dest)
    ctx = _Context.build(cfg, jobs, on_progress)
    pool = ThreadPoolExecutor(max_workers=max(1, min(cfg.jobs, len(jobs))), thread_name_prefix="download")
    try:
        outcomes = list(pool.map(lambda job: _run_job(job, ctx), jobs))
    except BaseException:
        # Ctrl-C or a bug: stop the other threads at their next chunk (their .part files stay for a resume)
        ctx.cancelled.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    results = [result for result, _ in outcomes]
    failures = [(result, error) for result, error in outcomes if error is not None]
    if failures:
        _raise_failures(results, failures, dest)
    return results


# ---------------------------------------------------------------------------------------------------------------
# validation and set-up


def _check_header(name: str, value: str) -> None:
    if not _HEADER_NAME_RE.match(name):
        raise ConfigError(f"header name {name!r} is not a valid HTTP header name")
    if "\r" in value or "\n" in value:
        raise ConfigError(f"header {name!r}: the value must not contain line breaks")
    if name.lower() in _MANAGED_HEADERS:
        raise ConfigError(f"header {name!r} is managed by the downloader and cannot be set")


def _check_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: {_display_url(url)!r} is not an http(s) URL")


def _display_url(url: str) -> str:
    """`url` without user info, query string or fragment, so signed URLs and passwords stay out of messages."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


@dataclass(frozen=True, slots=True)
class _Job:
    entry: ManifestFile
    url: str | None
    final: Path
    part: Path
    sidecar: Path

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def shown_url(self) -> str | None:
        return None if self.url is None else _display_url(self.url)


def _make_job(entry: ManifestFile, manifest: DownloadManifest, cfg: DownloadConfig) -> _Job:
    dest = Path(cfg.dest)
    final = dest / entry.name
    # manifest.py rejects '/', '.' and '..'; this also catches other separators. No resolve(): a file the user
    # symlinked into dest is legitimate. A leading dot is refused so no name can collide with a sidecar.
    if Path(os.path.normpath(final)).parent != Path(os.path.normpath(dest)) or entry.name.startswith("."):
        raise ConfigError(f"manifest file name {entry.name!r} is not a plain file name inside {dest}")
    base = cfg.base_url or (None if entry.url else manifest.base_url)
    url = f"{base.rstrip('/')}/{quote(entry.name)}" if base else entry.url
    if url is not None:
        _check_url(url, f"URL of {entry.name}")
    return _Job(entry, url, final, dest / f"{entry.name}.part", dest / f".{entry.name}.verified.json")


def _require_urls(jobs: list[_Job], dest: Path) -> None:
    missing = [job.name for job in jobs if job.url is None and not job.final.exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(
            f"no download URL for {len(missing)} file(s) ({shown}): the manifest has no base_url; pass "
            f"--base-url URL (the folder that holds the files), or download them by hand into {dest}"
        )


@dataclass(frozen=True, slots=True)
class _Context:
    """Shared state of one `download_manifest` call (the cookie jar is copied per session; `cancelled` is set once)."""

    cfg: DownloadConfig
    cookies: requests.cookies.RequestsCookieJar | None
    secrets: tuple[str, ...]
    on_progress: ProgressFn | None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def build(cls, cfg: DownloadConfig, jobs: list[_Job], on_progress: ProgressFn | None) -> _Context:
        cookies = load_cookies(cfg.cookies_file) if cfg.cookies_file is not None else None
        secrets = [value for _, value in cfg.headers]
        secrets += [c.value for c in cookies or [] if c.value]
        secrets += [urlsplit(job.url).query for job in jobs if job.url]
        secrets += [urlsplit(job.url).password or "" for job in jobs if job.url]
        # longest first, so a secret that contains another is replaced whole; 1-3 characters are no secret
        shown = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))
        return cls(cfg, cookies, shown, on_progress)

    def redact(self, text: str) -> str:
        """`text` with every secret replaced by ``***``."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def client(self) -> _Client:
        """An HTTP client for one file (its own session and copy of the cookie jar: sessions are not thread-safe)."""
        cookies = self.cookies.copy() if self.cookies is not None else None
        return _Client(requests.Session(), dict(self.cfg.headers), cookies, self.cfg.timeout_s)


@dataclass(slots=True)
class _Client:
    """One file's HTTP session, following redirects itself so that credentials stay with the host they are for.

    The user's headers and cookies go to the origin (scheme, host, port) of the URL asked for and to redirects
    that stay on it (or only upgrade it from http to https); once a redirect leaves it they are not sent again,
    for the rest of that chain. This is requests' rule for ``Authorization``, applied to every user header and
    cookie (requests would send a custom header such as ``X-Auth-Token`` to any host a redirect names).
    """

    session: requests.Session
    headers: dict[str, str]
    cookies: requests.cookies.RequestsCookieJar | None
    timeout_s: float

    def get(self, url: str, headers: dict[str, str], name: str) -> requests.Response:
        """GET `url` with `headers` (plus the user's where allowed), streaming; the first non-redirect answer."""
        trusted = True
        for _ in range(_MAX_REDIRECTS + 1):
            sent = {**self.headers, **headers} if trusted else dict(headers)
            try:
                resp = self.session.get(
                    url,
                    headers=sent,
                    cookies=self.cookies if trusted else None,
                    stream=True,
                    timeout=self.timeout_s,
                    allow_redirects=False,
                )
            except requests.Timeout as exc:
                raise _TransientError(f"no answer within {self.timeout_s:g} s (timed out; see --timeout)") from exc
            except requests.RequestException as exc:
                raise _TransientError(f"request failed ({_describe(exc)})") from exc
            location = resp.headers.get("Location", "").strip()
            if resp.status_code not in _REDIRECT_CODES or not location:
                return resp
            resp.close()
            target = urljoin(url, location)
            if urlsplit(target).scheme not in ("http", "https"):
                raise DownloadError(f"{name}: a redirect leads to {_display_url(target)!r}, which is not http(s)")
            trusted = trusted and _same_origin(url, target)
            url = target
        raise DownloadError(f"{name}: more than {_MAX_REDIRECTS} redirects from the download URL; check the URL")


def _same_origin(url: str, target: str) -> bool:
    """Whether credentials for `url` may follow a redirect to `target`: same host and port, or http->https."""
    a, b = urlsplit(url), urlsplit(target)
    try:
        port_a, port_b = a.port or _DEFAULT_PORTS[a.scheme], b.port or _DEFAULT_PORTS[b.scheme]
    except (ValueError, KeyError):  # a malformed port: the request itself will fail; send nothing
        return False
    if (a.hostname or "").lower() != (b.hostname or "").lower():
        return False
    if a.scheme == b.scheme:
        return port_a == port_b
    return (a.scheme, port_a, b.scheme, port_b) == ("http", 80, "https", 443)


# ---------------------------------------------------------------------------------------------------------------
# one file


class _CancelledError(Exception):
    """Another file's thread failed or the user interrupted: stop without recording a result."""


class _TransientError(Exception):
    """A failure worth retrying (the next attempt resumes from the bytes in the .part)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class _RefusedError(DownloadError):
    """Access refused, or a page where the file should be: the licence hint applies (given once per run)."""


@dataclass(slots=True)
class _Attempts:
    """Mutable counters of one file's download."""

    count: int = 0
    resumed: bool = False
    total: int | None = None  # the full size a response announced; a later different one means trouble
    started: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _run_job(job: _Job, ctx: _Context) -> tuple[FileResult, DownloadError | None]:
    """Process one file; expected failures become a FAILED result plus the error, bugs propagate.

    Outcomes are logged at debug level only: the CLI prints each result (or the failure) once.
    """
    state = _Attempts()
    if ctx.cancelled.is_set():
        raise _CancelledError(job.name)
    try:
        result = _check_existing(job, state) or _download(job, ctx, state)
    except DownloadError as exc:
        message = ctx.redact(str(exc))
        log.debug("%s", message)
        failed = FileResult(job.name, FileStatus.FAILED, None, None, job.shown_url, message, state.count)
        return _with_time(failed, state), exc
    except OSError as exc:  # disk full, permissions: not retried, reported per file
        message = ctx.redact(f"{job.name}: file system error in {job.final.parent} ({exc.strerror or exc})")
        log.debug("%s", message)
        failed = FileResult(job.name, FileStatus.FAILED, None, None, job.shown_url, message, state.count)
        return _with_time(failed, state), DownloadError(message)
    log.debug("%s: %s (%d bytes)", job.name, result.status.value, result.size_bytes or 0)
    return _with_time(result, state), None


def _with_time(result: FileResult, state: _Attempts) -> FileResult:
    return dataclasses.replace(result, attempts=state.count, seconds=state.elapsed())


def _raise_failures(results: list[FileResult], failures: list[tuple[FileResult, DownloadError]], dest: Path) -> None:
    reasons = "; ".join(result.error or result.name for result, _ in failures)
    if any(isinstance(error, _RefusedError) for _, error in failures):
        reasons += "; " + _LICENCE_HINT.format(dest=dest)  # once per run, not once per file
    all_checksum = all(isinstance(error, ChecksumError) for _, error in failures)
    cls = ChecksumError if all_checksum else DownloadError
    exc = cls(f"{len(failures)} of {len(results)} file(s) failed: {reasons}")
    exc.results = results  # type: ignore[attr-defined]
    raise exc


def _read_sidecar(path: Path) -> dict[str, object] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        log.warning("%s is unreadable; the file will be verified again", path)
        return None
    return obj if isinstance(obj, dict) else None


def _write_sidecar(job: _Job, sha256: str) -> None:
    st = job.final.stat()
    atomic_write_json(job.sidecar, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256})


def _check_existing(job: _Job, state: _Attempts) -> FileResult | None:
    """Result for a file already in dest (trusted sidecar or verified now); None when it must be downloaded.

    Even a trusted file must fit the manifest's size bounds and first bytes (a stat and a 512-byte read), so a
    page that an older version saved and marked verified is reported now.
    """
    if not job.final.exists():
        return None
    if not job.final.is_file():
        raise DownloadError(f"{job.final} exists but is not a regular file; move it away and rerun download")
    entry, st = job.entry, job.final.stat()
    sidecar = _read_sidecar(job.sidecar)
    trusted = (
        sidecar is not None
        and sidecar.get("size") == st.st_size
        and sidecar.get("mtime_ns") == st.st_mtime_ns
        and isinstance(sidecar.get("sha256"), str)
        and (entry.sha256 is None or entry.checksum_advisory or sidecar["sha256"] == entry.sha256.lower())
    )
    _check_present_content(job, st.st_size)
    if trusted:
        assert sidecar is not None  # narrowed by `trusted`
        sha256 = str(sidecar["sha256"])
        status = FileStatus.ALREADY_COMPLETE
    else:
        log.info("%s: present without a matching verification record; hashing it", job.name)
        sha256 = file_digest(job.final)
        _check_present_digest(job, sha256)
        _write_sidecar(job, sha256)
        status = FileStatus.ALREADY_COMPLETE if sidecar is not None else FileStatus.PROVIDED_BY_USER
    if job.part.exists():
        log.info("%s: removing the stale %s (the complete file is present)", job.name, job.part.name)
        job.part.unlink()
    advisory = _advisory_mismatch(job, sha256)
    return FileResult(job.name, status, st.st_size, sha256, job.shown_url, advisory_mismatch=advisory)


def _check_present_content(job: _Job, size: int) -> None:
    """Size (exact or approximate) and first bytes of a file found in dest; a mismatch is reported, the file kept."""
    expected = job.entry.size_bytes
    if expected is not None and size != expected:
        hint = f"rename it to {job.part.name} to resume it, or delete it" if size < expected else "delete or replace it"
        raise ChecksumError(
            f"{job.final} is {size} bytes but the manifest expects {expected}; it was left in place: {hint} "
            f"and rerun download"
        )
    bounds = job.entry.size_bounds()
    if bounds is not None and not bounds[0] <= size <= bounds[1]:
        raise DownloadError(
            f"{job.final} is {size} bytes but the manifest expects {_about(job.entry)}; it was left in place: "
            f"delete or replace it and rerun download"
        )
    problem = _head_problem(job.entry, _read_head(job.final))
    if problem is not None:
        text, is_page = problem
        cls = _RefusedError if is_page else DownloadError
        raise cls(f"{job.final} {text}; it was left in place: delete or replace it and rerun download")


def _check_present_digest(job: _Job, sha256: str) -> None:
    expected = job.entry.sha256
    if expected is None or job.entry.checksum_advisory or sha256 == expected.lower():
        return
    raise ChecksumError(
        f"{job.final}: sha256 mismatch (expected {expected.lower()}, got {sha256}); it was left in place: "
        f"delete or replace it and rerun download"
    )


def _advisory_mismatch(job: _Job, sha256: str) -> bool:
    entry = job.entry
    mismatch = bool(entry.sha256 and entry.checksum_advisory and sha256 != entry.sha256.lower())
    if mismatch:
        log.warning(
            "%s: sha256 %s differs from the advisory (third-party) checksum %s; keeping the file",
            job.name,
            sha256,
            entry.sha256,
        )
    return mismatch


def _download(job: _Job, ctx: _Context, state: _Attempts) -> FileResult:
    """Fetch `job` into its .part (resuming), verify it, rename it into place and write the sidecar.

    A resumed file is hashed whole from disk. If its checksum (binding or advisory) then differs from the
    manifest's, the bytes kept from an earlier run may be stale, so the file is fetched once more from byte 0
    and only that result is judged.
    """
    assert job.url is not None  # _require_urls guarantees a URL for every file that is not present
    size, sha256, inherited = _fetch_part(job, ctx, state)
    expected = (job.entry.sha256 or "").lower()
    if inherited and expected and sha256 != expected:
        log.warning(
            "%s: sha256 %s differs from the manifest's after resuming %s from an earlier run; the kept bytes may "
            "be stale: downloading it again from byte 0",
            job.name,
            sha256,
            job.part.name,
        )
        job.part.unlink()
        state.resumed, state.total = False, None
        size, sha256, _ = _fetch_part(job, ctx, state)
    _verify_download(job, size, sha256)
    os.replace(job.part, job.final)
    _write_sidecar(job, sha256)
    status = FileStatus.RESUMED if state.resumed else FileStatus.DOWNLOADED
    advisory = _advisory_mismatch(job, sha256)
    return FileResult(job.name, status, size, sha256, job.shown_url, advisory_mismatch=advisory)


def _fetch_part(job: _Job, ctx: _Context, state: _Attempts) -> tuple[int, str, bool]:
    """Fill the .part; return its size, sha256 and whether bytes from an earlier run are in it.

    A failure leaves a non-empty .part for a later resume and removes an empty one.
    """
    try:
        with _PartFile(job.part) as part:
            _drop_impossible_part(job, part)
            state.resumed = part.size > 0
            _fetch_with_retries(job, part, ctx, state)
    except DownloadError:
        if job.part.exists() and job.part.stat().st_size == 0:
            job.part.unlink()
        raise
    return part.size, part.sha256(), part.inherited


def _drop_impossible_part(job: _Job, part: _PartFile) -> None:
    """Restart a .part that cannot be the start of the file: longer than the file can be, or wrong first bytes."""
    if not part.size:
        return
    bounds = job.entry.size_bounds()
    if bounds is not None and part.size > bounds[1]:
        reason = f"is {part.size} bytes, more than the file can have ({_about(job.entry)})"
    else:
        problem = _head_problem(job.entry, _read_head(job.part), partial=True)
        if problem is None:
            return
        reason = problem[0]
    log.warning("%s: the stale %s %s; restarting from byte 0", job.name, job.part.name, reason)
    part.restart()


def _verify_download(job: _Job, size: int, sha256: str) -> None:
    """Judge a complete .part: exact or approximate size, first bytes, binding checksum; delete it if wrong."""
    entry = job.entry
    if entry.size_bytes is not None and size != entry.size_bytes:
        job.part.unlink()
        raise ChecksumError(
            f"{job.name}: received {size} bytes from {job.shown_url} but the manifest expects {entry.size_bytes}; "
            f"the partial file was deleted"
        )
    bounds = entry.size_bounds()
    if bounds is not None and not bounds[0] <= size <= bounds[1]:
        job.part.unlink()
        raise DownloadError(
            f"{job.name}: received {size} bytes from {job.shown_url} but the manifest expects {_about(entry)}; "
            f"the file was deleted: wrong URL or wrong manifest"
        )
    problem = _head_problem(entry, _read_head(job.part))
    if problem is not None:
        job.part.unlink()
        cls = _RefusedError if problem[1] else DownloadError
        raise cls(f"{job.name}: what {job.shown_url} sent {problem[0]}; it was deleted")
    if entry.sha256 and not entry.checksum_advisory and sha256 != entry.sha256.lower():
        job.part.unlink()
        raise ChecksumError(
            f"{job.name}: sha256 mismatch after download from {job.shown_url} (expected {entry.sha256.lower()}, "
            f"got {sha256}); the file was deleted: check the URL or the manifest and rerun download"
        )


def _about(entry: ManifestFile) -> str:
    return f"about {entry.approx_size_bytes} bytes (± {APPROX_SIZE_TOLERANCE:.0%})"


# ---------------------------------------------------------------------------------------------------------------
# what a file's first bytes say


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_SNIFF_BYTES)


def _head_problem(entry: ManifestFile, head: bytes, *, partial: bool = False) -> tuple[str, bool] | None:
    """Why a file starting with `head` cannot be `entry`: (the reason, whether it is a page or text), or None.

    Every manifest file is binary, so HTML or plain text is always wrong. With `partial`, `head` may be a
    prefix shorter than the magic (a .part that has only begun).
    """
    if _looks_like_html(head):
        return "is an HTML page (a login or licence page?), not the file", True
    if _looks_like_text(head):
        return "is text (an error or login message?), not the file", True
    magics = entry.magics()
    if not magics or any(head[: len(m)] == (m[: len(head)] if partial else m) for m in magics):
        return None
    wanted = " or ".join(f"{_MAGIC_NAMES[m]} ({m.hex(' ')})" for m in magics)
    shown = head[:4].hex(" ") or "nothing"
    return f"starts with {shown}, not {wanted}: it is not this file", False


def _looks_like_html(head: bytes) -> bool:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").lower().startswith(_HTML_STARTS)


def _looks_like_text(head: bytes) -> bool:
    """Whether `head` reads as text: UTF-8 (a character cut at the end is fine) without control characters."""
    if len(head) < _MIN_TEXT_BYTES:
        return False  # too little to tell text from binary
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:
            return False
        text = head[: exc.start].decode("utf-8")
    return all(ch.isprintable() or ch in "\t\n\r\f" for ch in text)


class _PartFile:
    """An append-only .part file.

    Bytes written through it are hashed as they arrive. Bytes found in it when opened (`inherited`, from an
    earlier run) are not taken on trust: `sha256` then hashes the whole file as it is on disk.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh = open(path, "ab")  # noqa: SIM115 - closed in __exit__
        self.size = self._fh.tell()
        self.inherited = self.size > 0
        self._hash = None if self.inherited else hashlib.sha256()

    def __enter__(self) -> _PartFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        if self._hash is not None:
            self._hash.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        """Drop every byte received so far."""
        self._fh.truncate(0)
        self._fh.seek(0)
        self._hash = hashlib.sha256()
        self.size = 0
        self.inherited = False

    def sha256(self) -> str:
        """Digest of the whole file; call it once the file is closed."""
        return self._hash.hexdigest() if self._hash is not None else file_digest(self.path)


# ---------------------------------------------------------------------------------------------------------------
# HTTP


def _fetch_with_retries(job: _Job, part: _PartFile, ctx: _Context, state: _Attempts) -> None:
    """Make requests until the .part holds the whole file; `DownloadError` on a refusal or when retries run out."""
    cfg = ctx.cfg
    client = ctx.client()
    with client.session:
        for attempt in range(cfg.retries + 1):
            if job.entry.size_bytes is not None and part.size == job.entry.size_bytes:
                return  # a complete .part from an earlier run: only verification is left
            state.count += 1
            try:
                _fetch_once(client, job, part, ctx, state)
                return
            except _TransientError as exc:
                reason = ctx.redact(str(exc))
                if attempt == cfg.retries:
                    raise DownloadError(
                        f"{job.name}: giving up after {state.count} attempt(s) on {job.shown_url}: {reason}; "
                        f"rerun download to resume from byte {part.size}"
                    ) from exc
                delay_s = min(cfg.backoff_s * 2**attempt, _MAX_BACKOFF_S)
                if exc.retry_after_s is not None:
                    delay_s = max(delay_s, min(exc.retry_after_s, _MAX_BACKOFF_S))
                log.warning("%s: %s; retry %d of %d in %.1f s", job.name, reason, attempt + 1, cfg.retries, delay_s)
                if ctx.cancelled.wait(delay_s):
                    raise _CancelledError(job.name) from None


def _fetch_once(client: _Client, job: _Job, part: _PartFile, ctx: _Context, state: _Attempts) -> None:
    """One GET from the current .part size to the end; returns once the body ended with every expected byte."""
    # identity: a server that labels a .tar.gz 'Content-Encoding: gzip' must not get it decompressed on the way
    headers = {"Accept-Encoding": "identity"}
    if part.size:
        headers["Range"] = f"bytes={part.size}-"
    with client.get(job.url or "", headers, job.name) as resp:
        if resp.status_code == 416:
            _accept_unsatisfiable(resp, job, part, state)
            return
        total, from_zero = _accept_response(resp, job, part, state)
        head = _judge_head(resp, job, part, ctx, state) if from_zero else b""
        _stream_body(resp, job, part, ctx, total, head=head)


def _accept_response(resp: requests.Response, job: _Job, part: _PartFile, state: _Attempts) -> tuple[int | None, bool]:
    """Check status, type and size of `resp`: (the full file size if known, whether the body starts at byte 0)."""
    code = resp.status_code
    if code in (401, 403):
        raise _RefusedError(f"{job.name}: HTTP {code} (access refused) from {job.shown_url}")
    if code == 404:
        raise DownloadError(f"{job.name}: not found (HTTP 404) at {job.shown_url}; check --base-url or the manifest")
    if code == 429 or code >= 500:
        raise _TransientError(f"HTTP {code} from {job.shown_url}", _retry_after_s(resp))
    if code not in (200, 206):
        raise DownloadError(f"{job.name}: unexpected HTTP {code} from {job.shown_url}")
    content_type = resp.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type in _PAGE_TYPES:
        raise _RefusedError(
            f"{job.name}: {job.shown_url} sent an HTML page (Content-Type {content_type}), not the file: "
            f"a login or licence page?"
        )
    if code == 200:
        total = _int_header(resp, "Content-Length")
    else:
        total = _accept_partial(resp, job, part)
        state.resumed = state.resumed or part.size > 0
    _check_total(job, total, part, state)
    return (total if total is not None else job.entry.size_bytes), code == 200


def _check_total(job: _Job, total: int | None, part: _PartFile, state: _Attempts) -> None:
    """The size a response announces must fit the manifest and agree with what earlier responses announced."""
    if total is None:
        return
    entry = job.entry
    if entry.size_bytes is not None and total != entry.size_bytes:
        raise DownloadError(
            f"{job.name}: the server has {total} bytes at {job.shown_url} but the manifest expects "
            f"{entry.size_bytes}; wrong URL or wrong manifest"
        )
    bounds = entry.size_bounds()
    if bounds is not None and not bounds[0] <= total <= bounds[1]:
        raise DownloadError(
            f"{job.name}: the server has {total} bytes at {job.shown_url} but the manifest expects {_about(entry)}; "
            f"wrong URL or wrong manifest"
        )
    before, state.total = state.total, total
    if before is not None and before != total:
        part.restart()
        state.resumed = False
        raise _TransientError(f"the size changed from {before} to {total} bytes between requests; restarting")


def _judge_head(resp: requests.Response, job: _Job, part: _PartFile, ctx: _Context, state: _Attempts) -> bytes:
    """Read the first bytes of a body from byte 0 and judge them before anything is kept; return them.

    A page or a wrong kind of file raises here, so it never becomes the file. Only then is a .part that the server
    did not continue (it ignored the Range request) dropped.
    """
    head = b""
    while len(head) < _SNIFF_BYTES:
        chunk = _read_chunk(resp, part, ctx, max(ctx.cfg.chunk_bytes, _SNIFF_BYTES) - len(head))
        if not chunk:
            break
        head += chunk
    problem = _head_problem(job.entry, head, partial=len(head) < _SNIFF_BYTES)
    if problem is not None:
        cls = _RefusedError if problem[1] else DownloadError
        raise cls(f"{job.name}: what {job.shown_url} sent {problem[0]}; nothing was kept")
    if part.size:
        log.info("%s: the server ignored the Range request; restarting from byte 0", job.name)
        part.restart()
        state.resumed = False
    return head


def _accept_partial(resp: requests.Response, job: _Job, part: _PartFile) -> int | None:
    """Validate a 206: it must continue exactly at the .part size. Return the total size it announces."""
    match = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
    if match is None or int(match.group(1)) != part.size or int(match.group(2)) < int(match.group(1)):
        shown = resp.headers.get("Content-Range", "missing")
        part.restart()
        raise _TransientError(f"206 with Content-Range {shown!r} does not continue at the requested byte")
    # a range that stops short of the end (some servers cap it) is kept: the next attempt continues after it
    return None if match.group(3) == "*" else int(match.group(3))


def _accept_unsatisfiable(resp: requests.Response, job: _Job, part: _PartFile, state: _Attempts) -> None:
    """A 416 to ``Range: bytes=N-`` means complete when the server's size is N (and no response said otherwise).

    A server that announced more bytes before (a body that ended short) is not believed: the attempt failed.
    """
    match = _UNSATISFIED_RANGE_RE.match(resp.headers.get("Content-Range", "").strip())
    total = int(match.group(1)) if match else None
    if part.size and total == part.size and state.total in (None, total):
        log.info("%s: the .part already holds all %d bytes", job.name, total)
        return
    asked, announced = part.size, state.total
    part.restart()
    state.resumed, state.total = False, None
    if total is not None and announced is not None and total != announced:
        raise _TransientError(
            f"the server announced {announced} bytes but now says the file has {total}; restarting from byte 0"
        )
    raise _TransientError(f"HTTP 416 for a range starting at byte {asked}; restarting from byte 0")


def _read_chunk(resp: requests.Response, part: _PartFile, ctx: _Context, nbytes: int) -> bytes:
    """Up to `nbytes` raw (undecoded: the checksum is over the file as served) bytes; a drop is transient."""
    try:
        return resp.raw.read(nbytes, decode_content=False)
    except urllib3.exceptions.TimeoutError as exc:
        raise _TransientError(
            f"no data for {ctx.cfg.timeout_s:g} s after {part.size} bytes (timed out; see --timeout)"
        ) from exc
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
        raise _TransientError(f"connection lost after {part.size} bytes ({_describe(exc)})") from exc


def _stream_body(
    resp: requests.Response, job: _Job, part: _PartFile, ctx: _Context, total: int | None, *, head: bytes = b""
) -> None:
    """Append `head` (bytes already read) and the rest of the body to the .part.

    A drop or a short body is transient (the next attempt resumes); more bytes than the manifest allows is not.
    """
    last_report = 0.0
    ctx_report = ctx.on_progress
    bounds = job.entry.size_bounds()
    while True:
        chunk, head = head or _read_chunk(resp, part, ctx, ctx.cfg.chunk_bytes), b""
        if not chunk:
            break
        if ctx.cancelled.is_set():
            raise _CancelledError(job.name)
        part.write(chunk)
        if total is None and bounds is not None and part.size > bounds[1]:
            part.restart()
            raise DownloadError(
                f"{job.name}: {job.shown_url} sent more than {bounds[1]} bytes but the manifest expects "
                f"{_about(job.entry)}; wrong URL or wrong manifest"
            )
        now = time.monotonic()
        if ctx_report is not None and now - last_report >= _PROGRESS_EVERY_S:
            last_report = now
            ctx_report(job.name, part.size, total)
    if ctx_report is not None:
        ctx_report(job.name, part.size, total)
    if total is not None and part.size < total:
        raise _TransientError(f"the body ended after {part.size} of {total} bytes")
    if total is not None and part.size > total:
        part.restart()
        raise _TransientError(f"received more than the {total} bytes announced; restarting from byte 0")


def _int_header(resp: requests.Response, name: str) -> int | None:
    value = resp.headers.get(name, "").strip()
    return int(value) if value.isdigit() else None


def _retry_after_s(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _describe(exc: BaseException) -> str:
    """Short text of an exception; the caller redacts it. Queries are cut because urllib3 quotes request paths."""
    text = re.sub(r"\?[^\s'\")]*", "?…", str(exc)) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"
