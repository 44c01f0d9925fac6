"""The shard cache against a real S3 API server: hits, misses, corrupt entries, eviction, early stops."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from ssv2prep import storage
from ssv2prep.data.cache import CacheConfig, entry_path, open_cached, parse_size


def _shards(s3, count: int, size: int) -> list[tuple[str, bytes]]:
    bucket = s3.new_bucket("cache")
    out = []
    for k in range(count):
        data = os.urandom(size)
        url = f"s3://{bucket}/ssv2-train-{k:06d}.tar"
        storage.write_bytes(url, data)
        out.append((url, data))
    return out


def _read(url: str, data: bytes, cfg: CacheConfig, *, md5: str | None = None, stop_at: int | None = None) -> bytes:
    digest = md5 if md5 is not None else hashlib.md5(data).hexdigest()
    with open_cached(url, cfg, size=len(data), md5=digest, opener=lambda: storage.open_read(url)) as fh:
        return fh.read(stop_at) if stop_at is not None else fh.read()


def test_miss_keeps_a_copy_and_a_hit_reads_it_without_the_store(s3, tmp_path: Path) -> None:
    ((url, data),) = _shards(s3, 1, 300_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000)
    assert _read(url, data, cfg) == data
    assert entry_path(cfg.root, url).read_bytes() == data
    storage.remove(url)  # the store no longer has it: only the cache can answer
    assert _read(url, data, cfg) == data
    assert sorted(p.name for p in cfg.root.iterdir()) == [entry_path(cfg.root, url).name]  # no temp files


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_partial_entry_is_fetched_again(s3, tmp_path: Path, damage: str) -> None:
    ((url, data),) = _shards(s3, 1, 100_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000)
    _read(url, data, cfg)
    entry = entry_path(cfg.root, url)
    raw = bytearray(entry.read_bytes())
    if damage == "flip":
        raw[50_000] ^= 0xFF
    else:
        del raw[60_000:]
    entry.write_bytes(bytes(raw))
    assert _read(url, data, cfg) == data  # from the store again, not the damaged copy
    assert entry.read_bytes() == data


def test_size_only_verification_misses_a_flipped_byte_by_design(s3, tmp_path: Path) -> None:
    ((url, data),) = _shards(s3, 1, 10_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000, verify="size")
    _read(url, data, cfg)
    entry = entry_path(cfg.root, url)
    raw = bytearray(entry.read_bytes())
    raw[0] ^= 0xFF
    entry.write_bytes(bytes(raw))
    assert _read(url, data, cfg) == bytes(raw)


def test_a_shard_that_does_not_match_its_index_is_not_kept(s3, tmp_path: Path) -> None:
    ((url, data),) = _shards(s3, 1, 10_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000)
    assert _read(url, data, cfg, md5="0" * 32) == data  # the reader still gets the bytes
    assert list(cfg.root.iterdir()) == []


def test_a_reader_that_stops_early_still_leaves_a_whole_entry(s3, tmp_path: Path) -> None:
    ((url, data),) = _shards(s3, 1, 200_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000)
    assert _read(url, data, cfg, stop_at=1000) == data[:1000]
    assert entry_path(cfg.root, url).read_bytes() == data


def test_an_error_while_reading_leaves_nothing(s3, tmp_path: Path) -> None:
    ((url, data),) = _shards(s3, 1, 10_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000)
    digest = hashlib.md5(data).hexdigest()
    with (
        pytest.raises(RuntimeError),
        open_cached(url, cfg, size=len(data), md5=digest, opener=lambda: storage.open_read(url)) as fh,
    ):
        fh.read(10)
        raise RuntimeError("decoder gave up")
    assert list(cfg.root.iterdir()) == []


def test_least_recently_used_entries_go_first(s3, tmp_path: Path) -> None:
    shards = _shards(s3, 3, 100_000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=250_000)  # room for two
    (a, da), (b, db), (c, dc) = shards
    _read(a, da, cfg)
    _read(b, db, cfg)
    os.utime(entry_path(cfg.root, a), (1, 1))
    os.utime(entry_path(cfg.root, b), (2, 2))
    _read(a, da, cfg)  # a hit makes a the most recent
    _read(c, dc, cfg)  # b is now the least recent: evicted
    assert {p.name for p in cfg.root.iterdir()} == {entry_path(cfg.root, u).name for u in (a, c)}


def test_without_size_and_md5_nothing_is_cached(s3, tmp_path: Path) -> None:
    ((url, data),) = _shards(s3, 1, 1000)
    cfg = CacheConfig(tmp_path / "cache", max_bytes=10_000_000)
    with open_cached(url, cfg, size=None, md5=None, opener=lambda: storage.open_read(url)) as fh:
        assert fh.read() == data
    assert not cfg.root.exists() or list(cfg.root.iterdir()) == []


def test_parse_size() -> None:
    assert parse_size("200G") == 200 << 30
    assert parse_size("1.5t") == int(1.5 * (1 << 40))
    assert parse_size("512MB") == 512 << 20
    assert parse_size("1000") == 1000
