"""Shards in an object store: indexes, patterns and shard streams over a real S3 API (moto's server on 127.0.0.1),
and the local shard cache in front of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssv2prep import storage
from ssv2prep.data.cache import CacheConfig, entry_path
from ssv2prep.data.loader import DataConfig, build_eval_loader, build_train_loader
from ssv2prep.data.source import ShardCheck, iter_samples, resolve_source
from ssv2prep.errors import ConfigError, ShardError

SMALL = DataConfig(num_segments=2, crop_size=32, scale_size=40, batch_size=3, num_workers=0, shuffle_buffer=4)


def upload_folder(folder: Path, prefix: str, *, skip: tuple[str, ...] = ()) -> None:
    """Every file of a shard folder to `prefix` (one object per file, as `aws s3 sync` would)."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in skip:
            storage.upload(path, storage.join(prefix, path.name))


def put_json(url: str, obj: object) -> None:
    storage.write_bytes(url, json.dumps(obj).encode())


@pytest.fixture(scope="module")
def bucket(s3, tiny_shards: Path) -> str:
    """`s3://<bucket>/ssv2`: the tiny shard folder uploaded as is. Read-only."""
    prefix = f"s3://{s3.new_bucket()}/ssv2"
    upload_folder(tiny_shards, prefix)
    return prefix


def batches_of(loader) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return (
        [k for b in batches for k in b.keys],
        torch.cat([b.labels for b in batches]),
        torch.cat([b.clips for b in batches]),
    )


def same_batches(a, b) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


# ------------------------------------------------------------------------------------------------------ resolution
def test_an_s3_index_resolves_like_the_local_one(bucket: str, tiny_shards: Path) -> None:
    local = resolve_source(str(tiny_shards / "ssv2-train.json"))
    remote = resolve_source(f"{bucket}/ssv2-train.json")
    assert remote.urls == tuple(f"{bucket}/{Path(u).name}" for u in local.urls)
    assert len(remote.urls) == 4 and remote.nsamples == local.nsamples == (3, 3, 3, 3)
    assert remote.classes == local.classes and remote.classes is not None and len(remote.classes) == 4
    assert remote.num_classes == 4 and remote.flip_pairs == local.flip_pairs == ((2, 3),)
    index = json.loads((tiny_shards / "ssv2-train.json").read_text())
    assert remote.filesizes == tuple(e["filesize"] for e in index["shardlist"])
    assert remote.md5sums == tuple(e["md5sum"] for e in index["shardlist"])
    assert remote.index_url == f"{bucket}/ssv2-train.json"


def test_an_s3_pattern_finds_its_index_by_name(bucket: str) -> None:
    src = resolve_source(f"{bucket}/ssv2-train-{{000001..000002}}.tar")
    assert src.urls == (f"{bucket}/ssv2-train-000001.tar", f"{bucket}/ssv2-train-000002.tar")
    assert src.nsamples == (3, 3) and src.num_classes == 4 and src.md5sums is not None and None not in src.md5sums
    assert src.index_url == f"{bucket}/ssv2-train.json"


def test_s3_shards_give_the_same_batches_as_local_ones(bucket: str, tiny_shards: Path) -> None:
    for split, build in (("validation", build_eval_loader), ("train", build_train_loader)):
        local = batches_of(build(resolve_source(str(tiny_shards / f"ssv2-{split}.json")), SMALL))
        remote = batches_of(build(resolve_source(f"{bucket}/ssv2-{split}.json"), SMALL))
        assert len(local[0]) == (4 if split == "validation" else 12)
        assert same_batches(local, remote), split


def test_class_names_inside_the_index_need_no_class_file(s3, tiny_shards: Path) -> None:
    prefix = f"s3://{s3.new_bucket()}/x"
    upload_folder(tiny_shards, prefix, skip=("classes.json",))
    names = json.loads((tiny_shards / "classes.json").read_text())
    index = json.loads((tiny_shards / "ssv2-validation.json").read_text())
    put_json(f"{prefix}/ssv2-validation.json", {**index, "class_names": names})
    assert resolve_source(f"{prefix}/ssv2-validation.json").classes == tuple(names)
    put_json(f"{prefix}/ssv2-validation.json", {**index, "class_names": names[:3]})
    with pytest.raises(ShardError, match=r"validation\.json: the index says num_classes 4, but its class list has 3"):
        resolve_source(f"{prefix}/ssv2-validation.json")
    bare = {k: v for k, v in index.items() if k != "class_names"}
    put_json(f"{prefix}/ssv2-validation.json", bare)
    src = resolve_source(f"{prefix}/ssv2-validation.json")
    assert src.classes is None and src.num_classes == 4  # names are not invented; consumers that need them refuse


def test_unknown_schemes_and_escaping_urls_are_refused(s3, tiny_shards: Path) -> None:
    with pytest.raises(ConfigError, match=r"ftp://host/ssv2-train\.json: unknown scheme ftp://"):
        resolve_source("ftp://host/ssv2-train.json")
    with pytest.raises(ConfigError, match="unknown scheme ftp://"):
        resolve_source("ftp://host/ssv2-train-{000000..000001}.tar")
    prefix = f"s3://{s3.new_bucket()}/y"
    index = json.loads((tiny_shards / "ssv2-validation.json").read_text())
    for url, problem in (
        ("ftp://host/a.tar", "unknown scheme ftp://"),
        (f"file://{tiny_shards}/ssv2-validation-000000.tar", "may not list local files"),
        ("../other/ssv2-validation-000000.tar", "not a name inside the index's prefix"),
    ):
        put_json(f"{prefix}/ssv2-validation.json", {**index, "shardlist": [{"url": url, "nsamples": 3}]})
        with pytest.raises(ShardError, match=problem):
            resolve_source(f"{prefix}/ssv2-validation.json")


def test_a_missing_s3_index_or_shard_is_a_one_line_error_naming_it(s3, tiny_shards: Path) -> None:
    prefix = f"s3://{s3.new_bucket()}/z"
    with pytest.raises(ShardError, match=rf"{prefix}/ssv2-train\.json: not found"):
        resolve_source(f"{prefix}/ssv2-train.json")
    storage.upload(tiny_shards / "ssv2-validation.json", f"{prefix}/ssv2-validation.json")
    storage.upload(tiny_shards / "classes.json", f"{prefix}/classes.json")
    src = resolve_source(f"{prefix}/ssv2-validation.json")
    with pytest.raises(ShardError, match=rf"cannot open shard {prefix}/ssv2-validation-000000\.tar: not found") as err:
        list(build_eval_loader(src, SMALL))
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------------------------------------- cache
def test_cache_keeps_verified_copies_then_reads_only_them(s3, tiny_shards: Path, tmp_path: Path) -> None:
    prefix = f"s3://{s3.new_bucket()}/c"
    upload_folder(tiny_shards, prefix)
    cache_dir = tmp_path / "cache"
    cfg = DataConfig(**{**_fields(SMALL), "cache_dir": cache_dir, "cache_size_bytes": 1 << 30})
    src = resolve_source(f"{prefix}/ssv2-validation.json")
    reference = batches_of(build_eval_loader(resolve_source(str(tiny_shards / "ssv2-validation.json")), SMALL))

    first = batches_of(build_eval_loader(src, cfg))
    assert same_batches(first, reference)
    entries = {url: entry_path(cache_dir, url) for url in src.urls}
    for url, entry in entries.items():  # whole shards, byte for byte
        assert entry.read_bytes() == (tiny_shards / Path(url).name).read_bytes()

    # a corrupt entry (same size, one byte changed) and a partial one are found and fetched again
    shard0, shard1 = src.urls
    data = bytearray(entries[shard0].read_bytes())
    data[700] ^= 0xFF
    entries[shard0].write_bytes(bytes(data))
    entries[shard1].write_bytes(entries[shard1].read_bytes()[:1024])
    assert same_batches(batches_of(build_eval_loader(src, cfg)), reference)
    for url, entry in entries.items():
        assert entry.read_bytes() == (tiny_shards / Path(url).name).read_bytes()

    # with the objects gone from the store, the cached copies are all that is read
    for url in src.urls:
        storage.remove(url)
    assert same_batches(batches_of(build_eval_loader(src, cfg)), reference)
    entries[shard0].write_bytes(bytes(data))  # now a corrupt copy cannot be replaced: it must not be used
    with pytest.raises(ShardError, match=rf"{shard0}: not found"):
        list(build_eval_loader(src, cfg))


def test_a_range_read_through_the_cache_keeps_the_whole_shard(bucket: str, tiny_shards: Path, tmp_path: Path) -> None:
    src = resolve_source(f"{bucket}/ssv2-train.json")
    url = src.urls[2]
    check = ShardCheck(src.filesizes[2], src.md5sums[2])  # type: ignore[index]
    cache = CacheConfig(tmp_path / "cache", 1 << 30)
    full = list(iter_samples(url))
    local_samples = list(iter_samples(str(tiny_shards / Path(url).name)))
    assert len(full) == 3 and [(x.key, x.members) for x in full] == [(x.key, x.members) for x in local_samples]
    assert list(iter_samples(url, start=1, stop=3)) == full[1:3]  # skipping by seeking in the object
    assert not cache.root.exists()
    assert list(iter_samples(url, start=1, stop=2, cache=cache, check=check)) == full[1:2]
    assert entry_path(cache.root, url).read_bytes() == (tiny_shards / Path(url).name).read_bytes()
    assert list(iter_samples(url, start=0, stop=2, cache=cache, check=check)) == full[:2]  # a hit, sliced
    local = str(tiny_shards / Path(url).name)
    list(iter_samples(local, cache=cache, check=check))
    assert sorted(p.name for p in cache.root.iterdir()) == [entry_path(cache.root, url).name]  # local: not cached


def test_cache_options_are_validated_naming_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--cache-size must be > 0"):
        DataConfig(cache_dir=tmp_path, cache_size_bytes=0).validate()
    with pytest.raises(ConfigError, match="--cache-verify must be one of md5, size"):
        DataConfig(cache_dir=tmp_path, cache_verify="sha1").validate()
    DataConfig(cache_size_bytes=0).validate()  # without --cache-dir the size is unused


def _fields(cfg: DataConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}
