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
