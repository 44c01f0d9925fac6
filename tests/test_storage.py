"""The storage layer against a local folder and a real S3 API server (moto on 127.0.0.1)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ssv2prep import storage
from ssv2prep.errors import ConfigError
from ssv2prep.storage import StorageError


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty folder: a local path, or a prefix in a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    s3 = request.getfixturevalue("s3")
    return f"s3://{s3.new_bucket()}/some/prefix"


def test_write_read_list_remove_round_trip(root: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    a = storage.join(root, "a.bin")
    storage.write_bytes(a, data)
    src = tmp_path / "local.bin"
    src.write_bytes(b"uploaded bytes")
    storage.upload(src, storage.join(root, "b.bin"))

    assert storage.read_bytes(a) == data
    assert storage.size(a) == 256_000
    assert storage.exists(a) and not storage.exists(storage.join(root, "c.bin"))
    assert storage.list_names(root) == ["a.bin", "b.bin"]
    with storage.open_read(storage.join(root, "b.bin")) as fh:
        assert fh.read() == b"uploaded bytes"

    storage.write_bytes(a, b"replaced")  # overwrite is whole
    assert hashlib.md5(storage.read_bytes(a)).hexdigest() == hashlib.md5(b"replaced").hexdigest()
    storage.remove(a)
    storage.remove(a)  # a missing file is fine
    assert storage.list_names(root) == ["b.bin"]


def test_missing_file_is_one_line_error_naming_it(root: str) -> None:
    url = storage.join(root, "nope.json")
    with pytest.raises(StorageError, match=r"nope\.json: not found"):
        storage.read_bytes(url)
    assert storage.list_names(storage.join(root, "empty")) == []


def test_missing_bucket_names_the_url(s3) -> None:
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-xyz/k: not found"):
        storage.read_bytes("s3://no-such-bucket-xyz/k")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "s3://other/x", ""])
def test_join_refuses_names_that_leave_the_folder(name: str) -> None:
    with pytest.raises(ConfigError):
        storage.join("s3://bucket/prefix", name)
    with pytest.raises(ConfigError):
        storage.join("/data/shards", name)


def test_join_parent_basename() -> None:
    assert storage.join("s3://b/p/", "x/y.tar") == "s3://b/p/x/y.tar"
    assert storage.join("/data", "./y.tar") == "/data/y.tar"
    assert storage.parent("s3://b/p/ssv2-train.json") == "s3://b/p"
    assert storage.basename("https://h/x/ssv2-train.json?sig=1") == "ssv2-train.json"
    assert storage.local_path("file:///tmp/x") == Path("/tmp/x")
    assert not storage.is_remote("file:///tmp/x") and storage.is_remote("gs://b/x")


def test_unknown_scheme_and_read_only_http_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"ftp://h/x: unknown scheme ftp://"):
        storage.exists("ftp://h/x")
    with pytest.raises(ConfigError, match="read-only"):
        storage.write_bytes("https://example.invalid/x", b"")


def test_list_sizes_and_read_many_from_one_listing(root: str) -> None:
    blobs = {"a.json": b"{}", "b.tar": bytes(5000), "sub/c.bin": b"deeper"}
    for name, data in blobs.items():
        storage.write_bytes(storage.join(root, name), data)
    assert storage.list_sizes(root) == {"a.json": 2, "b.tar": 5000}  # files directly inside only
    assert storage.list_sizes(storage.join(root, "nothing-here")) == {}
    urls = [storage.join(root, n) for n in ("b.tar", "sub/c.bin", "a.json")]
    got = storage.read_many(urls)
    assert list(got) == urls and list(got.values()) == [bytes(5000), b"deeper", b"{}"]
    with pytest.raises(StorageError, match=r"missing\.json: not found"):
        storage.read_many([urls[0], storage.join(root, "missing.json")])


def test_abort_uploads_aborts_only_the_named_open_uploads(s3) -> None:
    bucket = s3.new_bucket()
    for key in ("p/ssv2-train-000000.tar", "p/ssv2-train-000001.tar", "other/ssv2-train-000000.tar"):
        s3.client.create_multipart_upload(Bucket=bucket, Key=key)
    aborted = storage.abort_uploads(f"s3://{bucket}/p", {"ssv2-train-000000.tar", "ssv2-train-000009.tar"})
    assert aborted == ["ssv2-train-000000.tar"]
    assert sorted(s3.multipart_uploads(bucket)) == ["other/ssv2-train-000000.tar", "p/ssv2-train-000001.tar"]
    assert storage.abort_uploads("/local/folder", {"x"}) == []
