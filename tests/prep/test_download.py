"""Tests of ssv2prep.prep.download against a real local HTTP server with injected faults."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from httpserver import LOGIN_PAGE, FaultyServer

from ssv2prep.cli import main
from ssv2prep.errors import ChecksumError, ConfigError, DownloadError
from ssv2prep.prep.download import (
    DownloadConfig,
    FileStatus,
    download_manifest,
    load_cookies,
    parse_header_option,
)
from ssv2prep.prep.manifest import DownloadManifest, ManifestFile, load_manifest, write_manifest

SIZES = {"part-00": 300_000, "part-01": 1_100_000, "labels.zip": 2_900_000}
# what each file must start with: the first part is the gzip stream's start, a later part has no header, a zip is PK
MAGIC = {"part-00": b"\x1f\x8b", "part-01": b"", "labels.zip": b"PK\x03\x04"}
CHUNK = 64 * 1024
SHIPPED = Path(__file__).resolve().parents[2] / "manifests"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def payload(tmp_path: Path) -> dict[str, bytes]:
    """Random files in tmp_path/www, each starting with the magic bytes of its kind; returns name -> bytes."""
    rng = random.Random(1234)
    www = tmp_path / "www"
    www.mkdir()
    data = {name: MAGIC[name] + rng.randbytes(size - len(MAGIC[name])) for name, size in SIZES.items()}
    for name, blob in data.items():
        (www / name).write_bytes(blob)
    return data


@pytest.fixture()
def manifest(tmp_path: Path, payload: dict[str, bytes]) -> DownloadManifest:
    """A manifest with binding sizes and sha256, written with write_manifest and read back."""
    files = tuple(
        ManifestFile(name, "labels" if name.endswith(".zip") else "video_part", len(blob), sha256=_sha(blob))
        for name, blob in payload.items()
    )
    path = tmp_path / "manifest.json"
    write_manifest(DownloadManifest(name="synthetic", files=files), path)
    return load_manifest(path)


@pytest.fixture()
def server(tmp_path: Path, payload: dict[str, bytes]):
    with FaultyServer(tmp_path / "www") as srv:
        yield srv


def _cfg(tmp_path: Path, base_url: str | None, **kw: object) -> DownloadConfig:
    opts: dict[str, object] = {"dest": tmp_path / "dest", "retries": 3, "backoff_s": 0.001, "timeout_s": 10.0}
    opts.update({"chunk_bytes": CHUNK, **kw})
    return DownloadConfig(base_url=base_url, **opts)  # type: ignore[arg-type]


def _only(manifest: DownloadManifest, name: str, **changes: object) -> DownloadManifest:
    entry = next(f for f in manifest.files if f.name == name)
    return replace(manifest, files=(replace(entry, **changes),))


def _by_name(results):
    return {r.name: r for r in results}


def test_clean_download_in_parallel(tmp_path, payload, manifest, server):
    calls: list[tuple[str, int, int | None]] = []
    results = download_manifest(manifest, _cfg(tmp_path, server.url, jobs=2), on_progress=lambda *a: calls.append(a))

    dest = tmp_path / "dest"
    assert [r.name for r in results] == list(payload)
    for r in results:
        assert r.status is FileStatus.DOWNLOADED
        assert (dest / r.name).read_bytes() == payload[r.name]
        assert (r.size_bytes, r.sha256, r.attempts) == (len(payload[r.name]), _sha(payload[r.name]), 1)
        assert r.url == f"{server.url}/{r.name}"
        assert (r.error, r.advisory_mismatch) == (None, False)
        assert not (dest / f"{r.name}.part").exists()
        sidecar = (dest / f".{r.name}.verified.json").read_text()
        assert _sha(payload[r.name]) in sidecar
        last = [c for c in calls if c[0] == r.name][-1]
        assert last == (r.name, len(payload[r.name]), len(payload[r.name]))
    assert sorted(req.path for req in server.requests) == sorted(f"/{n}" for n in payload)
    assert all(req.range is None for req in server.requests)
    assert sorted(p.name for p in dest.iterdir() if not p.name.startswith(".")) == sorted(payload)


def test_drop_mid_file_resumes_with_range(tmp_path, payload, manifest, server):
    server.drop_after("/part-01", 200_000)
    results = _by_name(download_manifest(manifest, _cfg(tmp_path, server.url)))

    reqs = server.requests_for("/part-01")
    assert [r.range for r in reqs] == [None, "bytes=200000-"]
    assert (tmp_path / "dest" / "part-01").read_bytes() == payload["part-01"]
    assert results["part-01"].status is FileStatus.RESUMED
    assert results["part-01"].attempts == 2
    assert results["part-00"].status is FileStatus.DOWNLOADED


def test_part_left_by_failed_run_is_resumed_next_run(tmp_path, payload, manifest, server):
    server.drop_after("/labels.zip", 1_000_000)
    with pytest.raises(DownloadError) as info:
        download_manifest(manifest, _cfg(tmp_path, server.url, retries=0))
    assert "labels.zip" in str(info.value) and "giving up after 1 attempt" in str(info.value)
    part = tmp_path / "dest" / "labels.zip.part"
    assert part.read_bytes() == payload["labels.zip"][:1_000_000]
    statuses = {r.name: r.status for r in info.value.results}
    assert statuses == {
        "part-00": FileStatus.DOWNLOADED,
        "part-01": FileStatus.DOWNLOADED,
        "labels.zip": FileStatus.FAILED,
    }

    results = _by_name(download_manifest(manifest, _cfg(tmp_path, server.url, retries=0)))
    assert results["labels.zip"].status is FileStatus.RESUMED
    assert results["part-00"].status is FileStatus.ALREADY_COMPLETE
    assert [r.range for r in server.requests_for("/labels.zip")] == [None, "bytes=1000000-"]
    assert (tmp_path / "dest" / "labels.zip").read_bytes() == payload["labels.zip"]
    assert not part.exists()


def test_503_then_success(tmp_path, payload, manifest, server):
    server.status("/part-00", 503, times=2)
    results = _by_name(download_manifest(manifest, _cfg(tmp_path, server.url)))
    assert results["part-00"].attempts == 3
    assert results["part-00"].status is FileStatus.DOWNLOADED
    assert (tmp_path / "dest" / "part-00").read_bytes() == payload["part-00"]


def test_retries_run_out(tmp_path, manifest, server):
    server.status("/part-00", 500, times=None)
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(manifest, "part-00"), _cfg(tmp_path, server.url, retries=2))
    assert "part-00: giving up after 3 attempt(s)" in str(info.value) and "HTTP 500" in str(info.value)
    assert len(server.requests_for("/part-00")) == 3
    assert info.value.results[0].attempts == 3


def test_connection_refused_is_retried_then_fails(tmp_path, manifest):
    with socket.socket() as sock:  # a port that nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(manifest, "part-00"), _cfg(tmp_path, f"http://127.0.0.1:{port}", retries=1))
    assert "giving up after 2 attempt(s)" in str(info.value)
    assert f"http://127.0.0.1:{port}/part-00" in str(info.value)


def test_403_explains_licence_and_hides_secrets(tmp_path, manifest, server, caplog):
    secrets = ("HEADER-SECRET-1", "COOKIE-SECRET-2", "QUERY-SECRET-3")
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(f"# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsessionid\t{secrets[1]}\n")
    server.require_header("Authorization", "Bearer the-right-token")
    signed = tuple(replace(f, url=f"{server.url_for(f.name)}?sig={secrets[2]}") for f in manifest.files)
    cfg = _cfg(tmp_path, None, headers=(("Authorization", f"Bearer {secrets[0]}"),), cookies_file=cookies)

    with caplog.at_level(logging.DEBUG, logger="ssv2prep"), pytest.raises(DownloadError) as info:
        download_manifest(replace(manifest, files=signed), cfg)

    message = str(info.value)
    assert not isinstance(info.value, ChecksumError)
    assert "3 of 3 file(s) failed" in message and message.count("HTTP 403") == 3
    assert "licence" in message and "--cookies" in message and "--header" in message
    assert message.count("research licence") == 1 and message.count("--cookies") == 1  # the hint once, not per file
    assert len(message) < 600
    assert f"{server.url}/part-00" in message
    everything = message + caplog.text + repr(info.value.results)
    assert not any(secret in everything for secret in secrets)
    assert len(server.requests) == 3  # refused at once, no retry
    assert server.requests[0].headers["cookie"] == f"sessionid={secrets[1]}"  # the secrets were really sent
    assert server.requests[0].query == f"sig={secrets[2]}"


def test_404_names_file_and_url(tmp_path, manifest, server):
    missing = ManifestFile("part-02", "video_part", 10)
    with pytest.raises(DownloadError) as info:
        download_manifest(replace(manifest, files=(*manifest.files, missing)), _cfg(tmp_path, server.url + "/"))
    message = str(info.value)
    assert message.startswith("1 of 4 file(s) failed: part-02: not found (HTTP 404)")
    assert f"{server.url}/part-02" in message
    assert (tmp_path / "dest" / "part-00").exists()  # the other files were not wasted


def test_wrong_bytes_fail_with_both_digests_and_leave_nothing(tmp_path, payload, manifest, server):
    server.corrupt("/part-01")
    with pytest.raises(ChecksumError) as info:
        download_manifest(manifest, _cfg(tmp_path, server.url))
    served = bytes(b ^ 0xFF for b in payload["part-01"])
    message = str(info.value)
    assert f"expected {_sha(payload['part-01'])}, got {_sha(served)}" in message
    dest = tmp_path / "dest"
    assert not (dest / "part-01").exists() and not (dest / "part-01.part").exists()
    assert not (dest / ".part-01.verified.json").exists()
    assert (dest / "part-00").read_bytes() == payload["part-00"]
    assert [r.status for r in info.value.results] == [FileStatus.DOWNLOADED, FileStatus.FAILED, FileStatus.DOWNLOADED]


def test_advisory_mismatch_keeps_file(tmp_path, payload, manifest, server, caplog):
    one = _only(manifest, "part-00", sha256="ab" * 32, checksum_advisory=True)
    with caplog.at_level(logging.WARNING, logger="ssv2prep"):
        (result,) = download_manifest(one, _cfg(tmp_path, server.url))
    assert result.advisory_mismatch is True
    assert result.status is FileStatus.DOWNLOADED
    assert result.sha256 == _sha(payload["part-00"])
    assert (tmp_path / "dest" / "part-00").read_bytes() == payload["part-00"]
    assert "advisory" in caplog.text and "ab" * 32 in caplog.text


def test_rerun_downloads_nothing_and_needs_no_url(tmp_path, payload, manifest, server):
    download_manifest(manifest, _cfg(tmp_path, server.url))
    count = len(server.requests)
    again = download_manifest(manifest, _cfg(tmp_path, None))
    assert len(server.requests) == count
    assert [r.status for r in again] == [FileStatus.ALREADY_COMPLETE] * 3
    assert [r.sha256 for r in again] == [_sha(b) for b in payload.values()]
    assert all(r.attempts == 0 and r.url is None for r in again)


def test_rerun_trusts_sidecar_until_size_or_mtime_change(tmp_path, payload, manifest, server):
    one = _only(manifest, "part-00")
    download_manifest(one, _cfg(tmp_path, server.url))
    target = tmp_path / "dest" / "part-00"
    st = target.stat()
    zeros = MAGIC["part-00"] + b"\0" * (st.st_size - 2)
    target.write_bytes(zeros)  # same size, same mtime below: the sidecar is trusted, no hashing
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    (result,) = download_manifest(one, _cfg(tmp_path, None))
    assert (result.status, result.sha256) == (FileStatus.ALREADY_COMPLETE, _sha(payload["part-00"]))

    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # now it is hashed and found wrong
    with pytest.raises(ChecksumError) as info:
        download_manifest(one, _cfg(tmp_path, None))
    assert f"got {_sha(zeros)}" in str(info.value) and "left in place" in str(info.value)
    assert target.read_bytes() == zeros  # the file is not deleted


def test_hand_placed_files_are_accepted_without_requests(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    for name in payload:
        shutil.copyfile(tmp_path / "www" / name, dest / name)
    results = download_manifest(manifest, _cfg(tmp_path, server.url))
    assert server.requests == []
    assert [r.status for r in results] == [FileStatus.PROVIDED_BY_USER] * 3
    assert [r.sha256 for r in results] == [_sha(b) for b in payload.values()]
    assert all((dest / f".{name}.verified.json").is_file() for name in payload)


def test_hand_placed_wrong_files_are_kept_and_reported(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    wrong = MAGIC["part-00"] + b"x" * (SIZES["part-00"] - 2)
    (dest / "part-00").write_bytes(wrong)  # right size and magic, wrong bytes
    (dest / "part-01").write_bytes(payload["part-01"][:1000])  # truncated
    with pytest.raises(ChecksumError) as info:
        download_manifest(replace(manifest, files=manifest.files[:2]), _cfg(tmp_path, server.url))
    message = str(info.value)
    assert f"expected {_sha(payload['part-00'])}, got {_sha(wrong)}" in message
    assert "part-01 is 1000 bytes but the manifest expects 1100000" in message and "part-01.part" in message
    assert (dest / "part-00").read_bytes() == wrong
    assert (dest / "part-01").read_bytes() == payload["part-01"][:1000]
    assert server.requests == []


def test_server_ignoring_range_restarts_cleanly(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-01.part").write_bytes(random.Random(7).randbytes(100_000))  # 100 kB that must not survive
    server.ignore_range("/part-01")
    (result,) = download_manifest(_only(manifest, "part-01"), _cfg(tmp_path, server.url))
    assert [r.range for r in server.requests_for("/part-01")] == ["bytes=100000-"]
    assert result.status is FileStatus.DOWNLOADED
    assert (dest / "part-01").read_bytes() == payload["part-01"]


def test_complete_part_of_unknown_size_is_finished_on_416(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-00.part").write_bytes(payload["part-00"])
    (result,) = download_manifest(_only(manifest, "part-00", size_bytes=None), _cfg(tmp_path, server.url))
    assert [r.range for r in server.requests_for("/part-00")] == [f"bytes={SIZES['part-00']}-"]
    assert (result.status, result.sha256) == (FileStatus.RESUMED, _sha(payload["part-00"]))
    assert (dest / "part-00").read_bytes() == payload["part-00"]


def test_cookies_file_reaches_server(tmp_path, payload, manifest, server):
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(
        "# Netscape HTTP Cookie File\n\n"
        "#HttpOnly_127.0.0.1\tFALSE\t/\tFALSE\t0\tsessionid\tabc123\n"
        "127.0.0.1\tFALSE\t/\tFALSE\t4102444800\tconsent\tyes\n"
        ".example.com\tTRUE\t/\tFALSE\t0\tother\tnope\n"
    )
    server.require_header("Cookie", "sessionid=abc123; consent=yes")
    (result,) = download_manifest(_only(manifest, "part-00"), _cfg(tmp_path, server.url, cookies_file=cookies))
    assert result.status is FileStatus.DOWNLOADED
    assert server.requests[0].headers["cookie"] == "sessionid=abc123; consent=yes"


def test_headers_reach_server(tmp_path, payload, manifest, server):
    headers = (parse_header_option("Authorization: Bearer t0k:en"), ("X-Trace", "42"))
    server.require_header("Authorization", "Bearer t0k:en")
    results = download_manifest(manifest, _cfg(tmp_path, server.url, headers=headers))
    assert [r.status for r in results] == [FileStatus.DOWNLOADED] * 3
    assert {r.headers["x-trace"] for r in server.requests} == {"42"}
    assert {r.headers["accept-encoding"] for r in server.requests} == {"identity"}


def test_missing_url_is_a_config_error(tmp_path, manifest):
    with pytest.raises(ConfigError) as info:
        download_manifest(manifest, _cfg(tmp_path, None))
    assert "--base-url" in str(info.value) and "3 file(s) (part-00, part-01, labels.zip)" in str(info.value)


def test_base_url_option_overrides_manifest_urls(tmp_path, payload, manifest, server):
    elsewhere = replace(manifest, base_url="http://127.0.0.1:9/nothing-here")
    results = download_manifest(elsewhere, _cfg(tmp_path, server.url))
    assert [r.url for r in results] == [f"{server.url}/{n}" for n in payload]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"jobs": 0}, "jobs must be >= 1"),
        ({"retries": -1}, "retries must be >= 0"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"chunk_bytes": 0}, "chunk_bytes must be >= 1"),
        ({"base_url": "ftp://host/x"}, "is not an http(s) URL"),
        ({"headers": (("Bad Name", "v"),)}, "not a valid HTTP header name"),
        ({"headers": (("Range", "bytes=0-"),)}, "managed by the downloader"),
        ({"cookies_file": Path("/nonexistent/cookies.txt")}, "cookies file /nonexistent/cookies.txt not found"),
    ],
)
def test_config_validation(tmp_path, changes, fragment):
    with pytest.raises(ConfigError) as info:
        replace(DownloadConfig(dest=tmp_path), **changes).validate()
    assert fragment in str(info.value)


def test_header_option_and_cookie_parsing_errors_do_not_echo_values(tmp_path, caplog):
    assert parse_header_option(" X-Key :  v a l ") == ("X-Key", "v a l")
    with pytest.raises(ConfigError) as info:
        parse_header_option("Authorization Bearer SECRET")
    assert "SECRET" not in str(info.value)
    bad = tmp_path / "cookies.txt"
    header = "# Netscape HTTP Cookie File\n"
    cases = [
        (header + "127.0.0.1\tFALSE\t/\tFALSE\t0\tname\tvalue\nthis line SECRET is broken\n", "line 3"),
        (header + "h.org\tFALSE\t/\tFALSE\t5\tm\n", "line 2"),  # the value column is missing
        (header + "h.org\tFALSE\t/\tFALSE\tsoon\tm\tSECRET\n", "line 2"),  # the expiry is not a number
        (header + "h.org\tTRUE\t/\tFALSE\t0\tm\tSECRET\n", "line 2"),  # TRUE needs a leading dot on the domain
        ("h.org\tFALSE\t/\tFALSE\t0\tm\tSECRET\n", "# Netscape HTTP Cookie File"),  # no header line
    ]
    for text, fragment in cases:
        bad.write_text(text)
        with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError) as info:
            load_cookies(bad)
        assert fragment in str(info.value) and str(bad) in str(info.value)
        assert "SECRET" not in str(info.value) and "SECRET" not in caplog.text
        exc = info.value  # no chained exception (so no --debug traceback) carries the line
        assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_cookies_load_as_the_stdlib_reads_them(tmp_path):
    lines = [
        "# Netscape HTTP Cookie File",
        "#HttpOnly_.h.org\tTRUE\t/p\tTRUE\t0\tn\tv 1",
        "h.org\tFALSE\t/\tFALSE\t4102444800\tm\t",
        "",
        "# a comment",
    ]
    path = tmp_path / "cookies.txt"
    path.write_text("\r\n".join(lines) + "\r\n")  # CRLF, HttpOnly prefix, an empty value, a session cookie (0)
    jar = load_cookies(path)
    assert sorted((c.domain, c.path, c.secure, c.expires, c.name, c.value) for c in jar) == [
        (".h.org", "/p", True, None, "n", "v 1"),
        ("h.org", "/", False, 4102444800, "m", ""),
    ]
    assert next(c for c in jar if c.name == "n").has_nonstandard_attr("HTTPOnly")


def test_error_in_one_thread_stops_the_others(tmp_path, payload, manifest, server):
    seen: list[str] = []

    def on_progress(name: str, done: int, total: int | None) -> None:
        seen.append(name)
        if name == "part-00":
            raise RuntimeError("caller gave up")

    with pytest.raises(RuntimeError, match="caller gave up"):
        download_manifest(manifest, _cfg(tmp_path, server.url, jobs=1), on_progress=on_progress)
    dest = tmp_path / "dest"
    assert not (dest / "labels.zip").exists()  # queued behind the failure, cancelled
    assert "labels.zip" not in seen
    assert (dest / "part-00.part").stat().st_size == CHUNK  # one chunk written, kept for a later resume


# ---------------------------------------------------------------------------------------------------------------
# never accept a wrong file (issue 11)


def _advisory(manifest: DownloadManifest, **changes: object) -> DownloadManifest:
    """The shipped manifests' form: no exact size, a third-party (advisory) checksum."""
    files = tuple(replace(f, size_bytes=None, checksum_advisory=True, **changes) for f in manifest.files)
    return replace(manifest, files=files)


def _cli(tmp_path: Path, manifest_path: Path, *args: str):
    """`ssv2prep download --dest tmp_path/dest --manifest manifest_path ARGS` in-process."""
    argv = ["download", "--dest", str(tmp_path / "dest"), "--manifest", str(manifest_path), *args]
    return CliRunner().invoke(main, argv)


def _nothing_kept(dest: Path, name: str) -> bool:
    return not (dest / name).exists() and not (dest / f".{name}.verified.json").exists()


def test_login_page_is_refused_with_the_shipped_manifest(tmp_path, server):
    shipped = load_manifest(SHIPPED / "ssv2.json")
    for entry in shipped.files:
        server.html_page(entry.name)
    with pytest.raises(DownloadError) as info:
        download_manifest(shipped, _cfg(tmp_path, server.url))
    message = str(info.value)
    assert f"{len(shipped.files)} of {len(shipped.files)} file(s) failed" in message
    assert message.count("HTML page") == len(shipped.files) and message.count("research licence") == 1
    assert "--cookies" in message
    dest = tmp_path / "dest"
    assert all(_nothing_kept(dest, f.name) and not (dest / f"{f.name}.part").exists() for f in shipped.files)
    assert len(server.requests) == len(shipped.files)  # a refusal, not retried


@pytest.mark.parametrize("name", ["part-00", "part-01", "labels.zip"])
def test_html_labelled_as_binary_is_refused_by_its_bytes(tmp_path, manifest, server, name):
    server.html_page(name, content_type="application/octet-stream")
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(_advisory(manifest), name), _cfg(tmp_path, server.url))
    assert "HTML page" in str(info.value) and "licence" in str(info.value)
    assert _nothing_kept(tmp_path / "dest", name) and not (tmp_path / "dest" / f"{name}.part").exists()


def test_short_body_is_a_failed_attempt_then_an_error(tmp_path, manifest, server):
    server.short_body("part-01", 1000)
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(_advisory(manifest), "part-01"), _cfg(tmp_path, server.url, retries=2))
    assert "giving up after 3 attempt(s)" in str(info.value)
    assert _nothing_kept(tmp_path / "dest", "part-01")
    assert len(server.requests_for("part-01")) == 3


def test_short_body_then_a_good_answer_completes(tmp_path, payload, manifest, server):
    server.short_body("part-01", 1000, times=1)
    (result,) = download_manifest(_only(_advisory(manifest), "part-01"), _cfg(tmp_path, server.url))
    assert (tmp_path / "dest" / "part-01").read_bytes() == payload["part-01"]
    assert (result.status, result.advisory_mismatch) == (FileStatus.RESUMED, False)


@pytest.mark.parametrize(("name", "served_as"), [("part-00", "part-01"), ("labels.zip", "part-01")])
def test_wrong_magic_is_refused(tmp_path, payload, manifest, server, name, served_as):
    shutil.copyfile(tmp_path / "www" / served_as, tmp_path / "www" / name)  # right URL, wrong kind of file
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(_advisory(manifest), name), _cfg(tmp_path, server.url))
    expected = MAGIC[name].hex(" ")
    assert f"{name}: " in str(info.value) and expected in str(info.value)
    assert _nothing_kept(tmp_path / "dest", name) and not (tmp_path / "dest" / f"{name}.part").exists()


@pytest.mark.parametrize("wrapped", [False, True])
def test_first_part_may_be_gzip_or_a_zip_wrapper(tmp_path, payload, server, wrapped):
    name = "20bn-something-something-v2-00" + (".zip" if wrapped else "")
    blob = (b"PK\x03\x04" if wrapped else b"\x1f\x8b") + random.Random(5).randbytes(5000)
    (tmp_path / "www" / name).write_bytes(blob)
    man = DownloadManifest("m", (ManifestFile(name, "video_part", len(blob), sha256=_sha(blob)),))
    (result,) = download_manifest(man, _cfg(tmp_path, server.url))
    assert result.status is FileStatus.DOWNLOADED and (tmp_path / "dest" / name).read_bytes() == blob


@pytest.mark.parametrize(("factor", "ok"), [(1.15, True), (0.85, True), (1.3, False), (0.7, False)])
def test_size_outside_the_approximate_size_is_an_error(tmp_path, payload, manifest, server, factor, ok):
    approx = int(SIZES["part-01"] * factor)
    one = _only(_advisory(manifest, approx_size_bytes=approx), "part-01")
    if ok:
        (result,) = download_manifest(one, _cfg(tmp_path, server.url))
        assert result.size_bytes == SIZES["part-01"]
        return
    with pytest.raises(DownloadError) as info:
        download_manifest(one, _cfg(tmp_path, server.url))
    assert f"{SIZES['part-01']} bytes" in str(info.value) and f"about {approx} bytes (± 20%)" in str(info.value)
    assert _nothing_kept(tmp_path / "dest", "part-01") and not (tmp_path / "dest" / "part-01.part").exists()


def test_stale_part_with_wrong_magic_is_restarted(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-00.part").write_bytes(b"garbage!" * 5000)
    (result,) = download_manifest(_only(_advisory(manifest), "part-00"), _cfg(tmp_path, server.url))
    assert [r.range for r in server.requests_for("part-00")] == [None]
    assert (result.status, result.advisory_mismatch) == (FileStatus.DOWNLOADED, False)
    assert (dest / "part-00").read_bytes() == payload["part-00"]


def test_stale_part_longer_than_the_file_can_be_is_restarted(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-01.part").write_bytes(b"\0" * int(SIZES["part-01"] * 1.5))
    one = _only(_advisory(manifest, approx_size_bytes=SIZES["part-01"]), "part-01")
    (result,) = download_manifest(one, _cfg(tmp_path, server.url))
    assert [r.range for r in server.requests_for("part-01")] == [None]
    assert (dest / "part-01").read_bytes() == payload["part-01"] and result.status is FileStatus.DOWNLOADED


@pytest.mark.parametrize("advisory", [True, False])
def test_resumed_file_that_fails_its_checksum_is_fetched_again_from_zero(tmp_path, payload, manifest, server, advisory):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-01.part").write_bytes(random.Random(9).randbytes(27000))  # binary, no magic: looks plausible
    one = _only(manifest, "part-01", checksum_advisory=advisory)
    (result,) = download_manifest(one, _cfg(tmp_path, server.url))
    assert [r.range for r in server.requests_for("part-01")] == ["bytes=27000-", None]
    assert (dest / "part-01").read_bytes() == payload["part-01"]
    assert (result.status, result.sha256, result.advisory_mismatch) == (
        FileStatus.DOWNLOADED,
        _sha(payload["part-01"]),
        False,
    )


@pytest.mark.parametrize("sidecar", [True, False])
def test_present_login_page_is_not_accepted(tmp_path, manifest, server, sidecar):
    """A page saved as the file (by hand, or by an older version that then marked it verified) is reported."""
    dest = tmp_path / "dest"
    dest.mkdir()
    target = dest / "part-00"
    target.write_bytes(LOGIN_PAGE)
    if sidecar:
        st = target.stat()
        record = f'{{"size": {st.st_size}, "mtime_ns": {st.st_mtime_ns}, "sha256": "{_sha(LOGIN_PAGE)}"}}'
        (dest / ".part-00.verified.json").write_text(record)
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(_advisory(manifest), "part-00"), _cfg(tmp_path, server.url))
    message = str(info.value)
    assert "HTML page" in message and "left in place" in message and str(target) in message
    assert target.read_bytes() == LOGIN_PAGE and server.requests == []


def test_present_file_outside_the_approximate_size_is_reported(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-01").write_bytes(payload["part-01"][:500_000])  # a truncated copy, plausible bytes
    one = _only(_advisory(manifest, approx_size_bytes=SIZES["part-01"]), "part-01")
    with pytest.raises(DownloadError) as info:
        download_manifest(one, _cfg(tmp_path, server.url))
    message = str(info.value)
    assert "is 500000 bytes" in message and f"about {SIZES['part-01']} bytes (± 20%)" in message
    assert "left in place" in message and (dest / "part-01").stat().st_size == 500_000
    assert server.requests == [] and not (dest / ".part-01.verified.json").exists()


def test_hung_server_is_cut_by_the_timeout_option(tmp_path, payload, manifest, server):
    write_manifest(_only(manifest, "part-01"), tmp_path / "one.json")
    server.hang("part-01", after_bytes=100_000)
    started = time.monotonic()
    result = _cli(tmp_path, tmp_path / "one.json", "--base-url", server.url, "--timeout", "1")
    elapsed_s = time.monotonic() - started
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dest" / "part-01").read_bytes() == payload["part-01"]
    ranges = [r.range for r in server.requests_for("part-01")]
    assert len(ranges) == 2 and ranges[0] is None  # the second attempt resumes from what had arrived
    assert elapsed_s < 8  # 1 s of silence, 1 s of backoff, the rest; the old fixed 60 s would not fit
    assert "timed out" in " ".join(result.stderr.split())  # the retry warning (rich may wrap it)


def test_timeout_option_is_validated():
    result = CliRunner().invoke(main, ["download", "--dest", "d", "--timeout", "0"])
    assert result.exit_code == 2 and "--timeout" in result.stderr and "Traceback" not in result.stderr


def test_each_result_is_printed_once(tmp_path, payload, manifest, server):
    write_manifest(manifest, tmp_path / "m.json")
    result = _cli(tmp_path, tmp_path / "m.json", "--base-url", server.url)
    assert result.exit_code == 0, result.output
    both = result.stdout + result.stderr
    for name in payload:
        assert len([line for line in both.splitlines() if name in line]) == 1, both


def test_synth_package_downloads_over_loopback(tmp_path, synth_tiny):
    from ssv2prep.prep.synth import write_package

    root = tmp_path / "synth"
    shutil.copytree(synth_tiny.videos_dir, root / synth_tiny.videos_dir.name)
    shutil.copytree(synth_tiny.labels_dir, root / synth_tiny.labels_dir.name)
    for zip_parts in (False, True):
        man_path = write_package(root, num_parts=3, zip_parts=zip_parts)
        package = man_path.parent
        man = load_manifest(man_path)
        with FaultyServer(package) as srv:
            results = download_manifest(man, _cfg(tmp_path, srv.url, dest=tmp_path / f"dl-{zip_parts}"))
        assert [r.status for r in results] == [FileStatus.DOWNLOADED] * len(man.files)
        for f in man.files:
            assert (tmp_path / f"dl-{zip_parts}" / f.name).read_bytes() == (package / f.name).read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# credentials stay with the host the user named


@pytest.mark.parametrize("other_host", ["localhost", "127.0.0.1"])
def test_redirect_to_another_host_carries_no_credentials(tmp_path, payload, manifest, server, other_host):
    cookies = tmp_path / "cookies.txt"
    cookies.write_text(
        "# Netscape HTTP Cookie File\n"
        "127.0.0.1\tFALSE\t/\tFALSE\t0\tsessionid\tCOOKIE-SECRET\n"
        "localhost\tFALSE\t/\tFALSE\t0\tlocalid\tCOOKIE-SECRET-2\n"
    )
    headers = (("X-Auth-Token", "HEADER-SECRET"), ("Authorization", "Bearer AUTH-SECRET"))
    server.require_header("X-Auth-Token", "HEADER-SECRET")
    with FaultyServer(tmp_path / "www") as other:
        for name in payload:
            server.redirect(name, f"{other.url_on(other_host)}/{name}")
        results = download_manifest(manifest, _cfg(tmp_path, server.url, headers=headers, cookies_file=cookies))
        got = other.requests
    assert [r.status for r in results] == [FileStatus.DOWNLOADED] * 3
    assert len(got) == 3 and len(server.requests) == 3
    for req in got:  # the second host got the file requests, without any of the user's credentials
        assert not {"x-auth-token", "authorization", "cookie"} & set(req.headers), req.headers
    first = server.requests[0].headers
    assert first["x-auth-token"] == "HEADER-SECRET" and first["authorization"] == "Bearer AUTH-SECRET"
    assert first["cookie"] == "sessionid=COOKIE-SECRET"


def test_redirect_on_the_same_host_keeps_credentials(tmp_path, payload, manifest, server):
    (tmp_path / "www" / "files").mkdir()
    for name in payload:
        shutil.copyfile(tmp_path / "www" / name, tmp_path / "www" / "files" / name)
        server.redirect(name, f"/files/{name}", code=301)
    server.require_header("X-Auth-Token", "HEADER-SECRET")
    results = download_manifest(manifest, _cfg(tmp_path, server.url, headers=(("X-Auth-Token", "HEADER-SECRET"),)))
    assert [r.status for r in results] == [FileStatus.DOWNLOADED] * 3
    assert sorted(r.path for r in server.requests) == sorted(
        [f"/{n}" for n in payload] + [f"/files/{n}" for n in payload]
    )


def test_redirect_loop_is_refused(tmp_path, manifest, server):
    server.redirect("part-00", "/part-00")
    with pytest.raises(DownloadError) as info:
        download_manifest(_only(manifest, "part-00"), _cfg(tmp_path, server.url))
    assert "redirect" in str(info.value)
    assert len(server.requests) == 11  # the first request and 10 redirects, not retried


def test_client_hang_ups_print_no_server_traceback(tmp_path, payload, manifest, server, capfd):
    server.hang("part-01", after_bytes=100_000)
    with pytest.raises(DownloadError):
        download_manifest(_only(manifest, "part-01"), _cfg(tmp_path, server.url, retries=0, timeout_s=0.5))
    server.stop()  # the hung handler wakes up and writes into the closed connection
    deadline = time.monotonic() + 5
    while server.disconnects == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.disconnects >= 1
    assert "Traceback" not in capfd.readouterr().err
