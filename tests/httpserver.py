"""A small HTTP file server for tests, with faults that can be programmed per path.

`FaultyServer(root_dir)` serves the files below `root_dir` on 127.0.0.1 (a free port) from a daemon thread,
with `Range: bytes=N-` / `bytes=N-M` support (206 + Content-Range, 416 past the end). Faults are keyed by URL
path (``"/name"`` or ``"name"``) and counted down per request; ``times=None`` means "for every request"::

    with FaultyServer(tmp_path / "www") as srv:
        srv.drop_after("/a.bin", 100_000)      # first GET: full Content-Length, then close after 100 kB
        srv.status("/b.bin", 503)              # first GET: 503, later ones are served
        srv.status("/c.bin", 403, times=None)  # always 403
        srv.corrupt("/d.bin")                  # same length, wrong bytes
        srv.ignore_range("/e.bin")             # answer 200 (whole file) even to Range requests
        srv.require_header("Authorization", "Bearer t0ken")  # 403 for every request without it
        srv.html_page("/f.bin")                # 200 text/html login page instead of the file
        srv.short_body("/g.bin", 1000)         # Content-Length says the full size, the body is 1000 bytes short
        srv.hang("/h.bin")                     # headers, then nothing until the server stops
        srv.redirect("/i.bin", other.url_for("/i.bin"))  # 302 to another server (or path)
        ...
        assert srv.requests_for("/a.bin")[1].range == "bytes=100000-"

Order of checks for one request: `status` faults, then `require_header`, then `redirect`, then `html_page`, then
the file (404 when missing), then the body faults (`short_body`, `ignore_range`, `hang`, `corrupt`, `drop_after`).
Every request is recorded in `requests`, faulty or not. A client that hangs up early (a reset or broken pipe in a
handler) is expected here: it is counted in `disconnects` instead of printing a traceback; other handler errors
still print one. `url_on("localhost")` names the same server by another host name (a different host for clients).
Run ``python tests/httpserver.py DIR [PORT]`` to serve a folder by hand (no faults).
"""

from __future__ import annotations

import re
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

_CHUNK_BYTES = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")
_INVERT = bytes(255 - i for i in range(256))
_HANG_MAX_S = 30.0  # a hung response never outlives a forgotten stop() by much
_DISCONNECTS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
LOGIN_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>\n"
    b"<form method='post' action='/login'><input name='user'><input name='password' type='password'>"
    b"<button>Sign in</button></form>\n<p>Please accept the research licence to download this file.</p>\n"
    b"</body></html>\n"
)


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the server saw it. `headers` has lower-case names; `range` is the raw Range header."""

    method: str
    path: str
    query: str
    range: str | None
    headers: dict[str, str]


@dataclass(slots=True)
class _Fault:
    kind: str  # "status", "drop", "corrupt", "ignore_range", "html", "short", "hang", "redirect"
    times: int | None  # None = forever
    value: int = 0  # status code, bytes before the drop or the hang, or bytes missing from a short body
    text: str = ""  # Content-Type of an HTML page, or Location of a redirect


def _key(path: str) -> str:
    return "/" + path.lstrip("/")


class FaultyServer:
    """Serve `root_dir` over HTTP on 127.0.0.1 with programmable faults; a context manager.

    Args:
        root_dir: folder whose files are served; URL path ``/a/b`` maps to ``root_dir/a/b``.
    """

    def __init__(self, root_dir: str | Path) -> None:
        self.root = Path(root_dir).resolve()
        self.requests: list[RecordedRequest] = []
        self._faults: dict[str, list[_Fault]] = {}
        self._required: dict[str, str] = {}
        self._lock = threading.Lock()
        self.disconnects = 0  # handlers that ended because the client hung up (expected, silenced)
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------------------------
    def start(self) -> FaultyServer:
        """Bind a free port and serve from a daemon thread."""
        handler = type("_BoundHandler", (_Handler,), {"server_state": self})
        self._stopping.clear()
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.server_state = self
        self._httpd.daemon_threads = True
        # a short poll interval keeps stop() (hence every test's teardown) fast
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="FaultyServer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (hung responses end now)."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FaultyServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the server must be started)."""
        if self._httpd is None:
            raise RuntimeError("FaultyServer is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL without a trailing slash, e.g. ``http://127.0.0.1:40123``."""
        return f"http://127.0.0.1:{self.port}"

    def url_for(self, path: str) -> str:
        """Full URL of a served path."""
        return self.url + _key(path)

    def url_on(self, host: str) -> str:
        """Base URL naming this server by `host` (e.g. ``localhost``): the same socket, another host for a client."""
        return f"http://{host}:{self.port}"

    # -- faults -----------------------------------------------------------------------------------------------
    def _add(self, path: str, fault: _Fault) -> None:
        with self._lock:
            self._faults.setdefault(_key(path), []).append(fault)

    def drop_after(self, path: str, nbytes: int, times: int | None = 1) -> None:
        """Send the headers with the full Content-Length, then only `nbytes` of the body, then close."""
        self._add(path, _Fault("drop", times, nbytes))

    def status(self, path: str, code: int, times: int | None = 1) -> None:
        """Answer `code` (with a short text body) instead of serving the file."""
        self._add(path, _Fault("status", times, code))

    def corrupt(self, path: str, times: int | None = None) -> None:
        """Serve bytes of the right length but the wrong content (every byte inverted)."""
        self._add(path, _Fault("corrupt", times))

    def ignore_range(self, path: str, times: int | None = None) -> None:
        """Answer Range requests with 200 and the whole file, like servers without range support."""
        self._add(path, _Fault("ignore_range", times))

    def html_page(self, path: str, content_type: str = "text/html; charset=utf-8", times: int | None = None) -> None:
        """Answer 200 with a login page (`LOGIN_PAGE`) labelled `content_type`, as sites do for a missing session."""
        self._add(path, _Fault("html", times, text=content_type))

    def short_body(self, path: str, missing_bytes: int, times: int | None = None) -> None:
        """Serve the file as if its last `missing_bytes` were gone while Content-Length still counts them.

        A 200 (or 206) announces the full size but the body stops short and the connection closes; a Range
        request at or past the shortened end gets 416 with the shortened size (a truncating proxy or cache).
        """
        self._add(path, _Fault("short", times, missing_bytes))

    def hang(self, path: str, after_bytes: int = 0, times: int | None = 1) -> None:
        """Send the headers and `after_bytes` of the body, stall until the server stops (at most 30 s), then the rest.

        The client has usually given up by then, so the rest goes into a closed connection (a counted disconnect).
        """
        self._add(path, _Fault("hang", times, after_bytes))

    def redirect(self, path: str, location: str, code: int = 302, times: int | None = None) -> None:
        """Answer `code` with ``Location: location`` (absolute, or a path on this server)."""
        self._add(path, _Fault("redirect", times, code, location))

    def require_header(self, name: str, value: str) -> None:
        """Refuse (403) every request that lacks header `name` with exactly `value`."""
        with self._lock:
            self._required[name.lower()] = value

    def clear_faults(self) -> None:
        """Forget every fault and header requirement (recorded requests are kept)."""
        with self._lock:
            self._faults.clear()
            self._required.clear()

    def _take(self, path: str, kind: str) -> _Fault | None:
        """Consume one use of the first live fault of `kind` on `path`."""
        with self._lock:
            for fault in self._faults.get(path, []):
                if fault.kind == kind and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    # -- inspection -------------------------------------------------------------------------------------------
    def requests_for(self, path: str) -> list[RecordedRequest]:
        """Recorded requests for one path, oldest first."""
        key = _key(path)
        with self._lock:
            return [r for r in self.requests if r.path == key]

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(req)

    def _missing_header(self, headers: dict[str, str]) -> bool:
        with self._lock:
            return any(headers.get(name) != value for name, value in self._required.items())

    def _count_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1


class _QuietServer(ThreadingHTTPServer):
    """A threading server that counts client hang-ups instead of printing their tracebacks."""

    daemon_threads = True
    server_state: FaultyServer

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], _DISCONNECTS):
            self.server_state._count_disconnect()
            return
        super().handle_error(request, client_address)  # a real bug in the server: show it


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a dropped connection is a real mid-stream failure
    server_state: FaultyServer

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def _serve(self, *, send_body: bool) -> None:
        state = self.server_state
        split = urlsplit(self.path)
        path = _key(unquote(split.path))
        headers = {k.lower(): v for k, v in self.headers.items()}
        state._record(RecordedRequest(self.command, path, split.query, headers.get("range"), headers))
        fault = state._take(path, "status")
        if fault is not None:
            return self._send_text(fault.value, f"injected status {fault.value}\n")
        if state._missing_header(headers):
            return self._send_text(403, "forbidden: missing or wrong credentials\n")
        fault = state._take(path, "redirect")
        if fault is not None:
            return self._send_text(fault.value, f"moved to {fault.text}\n", location=fault.text)
        fault = state._take(path, "html")
        if fault is not None:
            return self._send_text(200, LOGIN_PAGE.decode(), content_type=fault.text)
        file = (state.root / path.lstrip("/")).resolve()
        if not file.is_relative_to(state.root) or not file.is_file():
            return self._send_text(404, f"not found: {path}\n")
        self._send_file(path, file, headers.get("range"), send_body=send_body)

    def _send_text(
        self, code: int, text: str, *, content_type: str = "text/plain", location: str | None = None
    ) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if location is not None:
            self.send_header("Location", location)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_file(self, path: str, file: Path, range_header: str | None, *, send_body: bool) -> None:
        state = self.server_state
        size = file.stat().st_size
        short = state._take(path, "short")
        # with a short body the file "really" ends `missing` bytes early; the headers still count them
        real_size = size if short is None else max(0, size - short.value)
        start, end = 0, size - 1
        match = _RANGE_RE.match(range_header or "")
        partial = match is not None and state._take(path, "ignore_range") is None
        if partial:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= real_size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{real_size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        length = end - start + 1 if size else 0
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if send_body:
            available = max(0, min(length, real_size - start))
            self._send_body(path, file, start, length, available)

    def _send_body(self, path: str, file: Path, start: int, length: int, available: int) -> None:
        state = self.server_state
        drop = state._take(path, "drop")
        hang = state._take(path, "hang")
        corrupt = state._take(path, "corrupt") is not None
        budget = min(available, drop.value) if drop is not None else available
        stall_after = hang.value if hang is not None else None  # bytes sent before the stall
        sent = 0
        with open(file, "rb") as fh:
            fh.seek(start)
            while sent < budget:
                if stall_after is not None and sent >= stall_after:
                    self.wfile.flush()
                    state._stopping.wait(_HANG_MAX_S)
                    stall_after = None
                end = budget if stall_after is None else min(budget, stall_after)
                chunk = fh.read(min(_CHUNK_BYTES, end - sent))
                if not chunk:
                    break
                if corrupt:
                    chunk = chunk.translate(_INVERT)
                self.wfile.write(chunk)
                sent += len(chunk)
        if drop is not None or available < length:
            self.wfile.flush()
            self.close_connection = True  # the client sees EOF short of Content-Length


def main(argv: list[str]) -> None:
    """Serve a folder until interrupted: ``python tests/httpserver.py DIR [PORT]``."""
    root = Path(argv[0]) if argv else Path.cwd()
    port = int(argv[1]) if len(argv) > 1 else 8000
    state = FaultyServer(root)
    handler = type("_BoundHandler", (_Handler,), {"server_state": state})
    with _QuietServer(("127.0.0.1", port), handler) as httpd:
        httpd.server_state = state
        print(f"serving {root} at http://127.0.0.1:{port}/ (Ctrl-C to stop)")
        httpd.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
