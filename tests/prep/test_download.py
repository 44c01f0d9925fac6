"""Tests of ssv2prep.prep.download against a real local HTTP server with injected faults."""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
from httpserver import FaultyServer

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
CHUNK = 64 * 1024


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def payload(tmp_path: Path) -> dict[str, bytes]:
    """Random files in tmp_path/www; returns name -> bytes."""
    rng = random.Random(1234)
    www = tmp_path / "www"
    www.mkdir()
    data = {name: rng.randbytes(size) for name, size in SIZES.items()}
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
    opts: dict[str, object] = {"retries": 3, "backoff_s": 0.001, "timeout_s": 10.0, "chunk_bytes": CHUNK}
    opts.update(kw)
    return DownloadConfig(dest=tmp_path / "dest", base_url=base_url, **opts)  # type: ignore[arg-type]


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
    assert "3 of 3 file(s) failed" in message and "HTTP 403" in message
    assert "licence" in message and "--cookies" in message and "--header" in message
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
    target.write_bytes(b"\0" * st.st_size)  # same size, same mtime below: the sidecar is trusted, no hashing
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    (result,) = download_manifest(one, _cfg(tmp_path, None))
    assert (result.status, result.sha256) == (FileStatus.ALREADY_COMPLETE, _sha(payload["part-00"]))

    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # now it is hashed and found wrong
    with pytest.raises(ChecksumError) as info:
        download_manifest(one, _cfg(tmp_path, None))
    zeros = b"\0" * st.st_size
    assert f"got {_sha(zeros)}" in str(info.value) and "left in place" in str(info.value)
    assert target.read_bytes() == b"\0" * st.st_size  # the file is not deleted


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
    (dest / "part-00").write_bytes(b"x" * SIZES["part-00"])  # right size, wrong bytes
    (dest / "part-01").write_bytes(payload["part-01"][:1000])  # truncated
    with pytest.raises(ChecksumError) as info:
        download_manifest(replace(manifest, files=manifest.files[:2]), _cfg(tmp_path, server.url))
    message = str(info.value)
    assert f"expected {_sha(payload['part-00'])}, got {_sha(b'x' * SIZES['part-00'])}" in message
    assert "part-01 is 1000 bytes but the manifest expects 1100000" in message and "part-01.part" in message
    assert (dest / "part-00").read_bytes() == b"x" * SIZES["part-00"]
    assert (dest / "part-01").read_bytes() == payload["part-01"][:1000]
    assert server.requests == []


def test_server_ignoring_range_restarts_cleanly(tmp_path, payload, manifest, server):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "part-01.part").write_bytes(b"garbage!" * 12_500)  # 100 kB that must not survive
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


def test_header_option_and_cookie_parsing_errors_do_not_echo_values(tmp_path):
    assert parse_header_option(" X-Key :  v a l ") == ("X-Key", "v a l")
    with pytest.raises(ConfigError) as info:
        parse_header_option("Authorization Bearer SECRET")
    assert "SECRET" not in str(info.value)
    bad = tmp_path / "cookies.txt"
    bad.write_text("127.0.0.1\tFALSE\t/\tFALSE\t0\tname\tvalue\nthis line SECRET is broken\n")
    with pytest.raises(ConfigError) as info:
        load_cookies(bad)
    assert "line 2" in str(info.value) and "SECRET" not in str(info.value)
    lines = [
        "\ufeff# Netscape HTTP Cookie File",
        "#HttpOnly_.h.org\tTRUE\t/p\tTRUE\t0\tn\tv 1",
        "h.org\tFALSE\t/\tFALSE\t5\tm",
    ]
    bad.write_text("\r\n".join(lines) + "\r\n")  # BOM, CRLF, HttpOnly prefix, a value-less line
    jar = load_cookies(bad)
    assert sorted((c.domain, c.path, c.secure, c.expires, c.name, c.value) for c in jar) == [
        (".h.org", "/p", True, None, "n", "v 1"),
        ("h.org", "/", False, 5, "m", ""),
    ]


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
