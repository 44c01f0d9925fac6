"""The shard loaders end to end on tiny synthetic shards: sources, exact epochs, coverage, flips, skips, errors."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch
from fixtures import make_shards
from httpserver import FaultyServer

from ssv2prep.data import decode as decode_mod
from ssv2prep.data.loader import (
    Batch,
    ClipFinisher,
    ClipPlanner,
    DataConfig,
    build_eval_loader,
    build_train_loader,
)
from ssv2prep.data.sampling import SamplingSpec, segment_centre_indices
from ssv2prep.data.source import _TarReader, iter_samples, resolve_source
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.prep.shard import WriterSettings

T = 4
SMALL = DataConfig(num_segments=T, crop_size=32, scale_size=40, batch_size=2, num_workers=0, shuffle_buffer=4)


@pytest.fixture(scope="module")
def shards(synth_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Frames-format shards of 2 videos each: train 6 shards (12 videos), validation 2, test 2. Read-only."""
    out = tmp_path_factory.mktemp("loader-shards")
    return make_shards(
        synth_tiny.videos_dir, synth_tiny.labels_dir, out, videos_per_shard=2, splits=("train", "validation")
    )


@pytest.fixture(scope="module")
def video_shards(synth_tiny, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same plan in video format (the .webm bytes per sample). Read-only."""
    out = tmp_path_factory.mktemp("loader-video-shards")
    writer = WriterSettings(format="video")
    return make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, out, videos_per_shard=2, writer=writer)


RAGGED = (5, 4, 3)


@pytest.fixture(scope="module")
def ragged(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 12 train samples re-packed into shards of 5, 4 and 3 (fewer shards than the slots of 2 ranks x 2
    workers), with their index (`ssv2-train.json`). Read-only."""
    out = tmp_path_factory.mktemp("ragged-shards")
    samples = [s for url in resolve_source(str(shards / "ssv2-train.json")).urls for s in iter_samples(url)]
    shardlist, pos = [], 0
    for i, n in enumerate(RAGGED):
        name = f"ssv2-train-{i:06d}.tar"
        members = [(f"{s.key}.{suffix}", data) for s in samples[pos : pos + n] for suffix, data in s.members.items()]
        _write_tar(out / name, members)
        shardlist.append({"url": name, "nsamples": n})
        pos += n
    index = json.loads((shards / "ssv2-train.json").read_text())
    (out / "ssv2-train.json").write_text(json.dumps({**index, "shardlist": shardlist, "num_samples": pos}))
    shutil.copy(shards / "classes.json", out / "classes.json")
    return out


def stored(folder: Path, split: str) -> dict[str, dict]:
    """{key: sample json} of a split, read with tarfile (independently of the loader)."""
    out = {}
    for tar_path in sorted(folder.glob(f"ssv2-{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    out[meta["id"]] = meta
    return out


def collect(batches) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    batches = list(batches)
    keys = [k for b in batches for k in b.keys]
    return keys, torch.cat([b.labels for b in batches]), torch.cat([b.clips for b in batches])


# ------------------------------------------------------------------------------------------------------ sources
def test_index_source_resolves_relative_urls_counts_classes_and_flip_pairs(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    assert src.urls == tuple(str(shards / f"ssv2-train-{i:06d}.tar") for i in range(6))
    assert src.nsamples == (2,) * 6 and src.num_samples == 12
    assert src.classes == tuple(json.loads((shards / "classes.json").read_text()))
    assert src.flip_pairs == ((2, 3),) and src.split == "train" and src.format == "frames"


def test_brace_pattern_with_and_without_index(shards: Path) -> None:
    pattern = str(shards / "ssv2-train-{000001..000003}.tar")
    explicit = resolve_source(pattern, index=str(shards / "ssv2-train.json"))
    assert explicit.urls == tuple(str(shards / f"ssv2-train-{i:06d}.tar") for i in (1, 2, 3))
    assert explicit.nsamples == (2, 2, 2) and explicit.flip_pairs == ((2, 3),)
    beside = resolve_source(pattern)  # ssv2-train.json beside the shards is found by name
    assert beside == explicit
    as_url = resolve_source(f"file://{shards}/ssv2-train.json")
    assert as_url.urls == resolve_source(str(shards / "ssv2-train.json")).urls
    loader = build_eval_loader(beside, SMALL)
    keys, _, _ = collect(loader)
    assert len(keys) == 6 == loader.num_samples_this_rank


def test_pattern_without_any_index_has_no_counts_and_train_refuses(shards: Path, tmp_path: Path) -> None:
    for name in ("ssv2-validation-000000.tar", "ssv2-validation-000001.tar"):
        shutil.copy(shards / name, tmp_path / name)
    src = resolve_source(str(tmp_path / "ssv2-validation-{000000..000001}.tar"))
    assert src.nsamples is None and src.classes is None
    with pytest.raises(ConfigError, match="per-shard sample counts"):
        build_train_loader(src, SMALL)
    loader = build_eval_loader(src, SMALL)
    assert loader.num_samples_this_rank is None
    assert sorted(collect(loader)[0]) == sorted(stored(shards, "validation"))


def test_pipe_pattern_needs_the_index_explicitly(shards: Path) -> None:
    pattern = f"pipe:cat {shards}/ssv2-train-{{000000..000005}}.tar"
    assert resolve_source(pattern).nsamples is None  # no neighbour lookup for pipe:
    src = resolve_source(pattern, index=str(shards / "ssv2-train.json"))
    assert src.urls[0] == f"pipe:cat {shards}/ssv2-train-000000.tar" and src.nsamples == (2,) * 6
    local = build_eval_loader(resolve_source(str(shards / "ssv2-train.json")), SMALL)
    piped = build_eval_loader(src, SMALL)
    lk, ll, lc = collect(local)
    pk, pl, pc = collect(piped)
    assert pk == lk and torch.equal(pl, ll) and torch.equal(pc, lc)
    train = build_train_loader(src, SMALL)
    assert len(train) == 6 and len(list(train)) == 6


def test_index_with_a_pipe_url_is_refused(shards: Path, tmp_path: Path) -> None:
    index = json.loads((shards / "ssv2-validation.json").read_text())
    index["shardlist"][1]["url"] = "pipe:curl -s http://example.invalid/x.tar"
    (tmp_path / "evil.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="pipe:"):
        resolve_source(str(tmp_path / "evil.json"))


def test_failing_pipe_command_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="exited with status"):
        list(iter_samples(f"pipe:cat {tmp_path}/absent.tar"))


def test_http_source_from_the_faulty_server(shards: Path) -> None:
    local_keys, local_labels, local_clips = collect(
        build_eval_loader(resolve_source(str(shards / "ssv2-train.json")), SMALL)
    )
    with FaultyServer(shards) as srv:
        src = resolve_source(srv.url_for("ssv2-train.json"))
        assert src.urls[0] == srv.url_for("ssv2-train-000000.tar") and src.nsamples == (2,) * 6
        assert src.classes is not None and len(src.classes) == 4
        keys, labels, clips = collect(build_eval_loader(src, SMALL))
        assert keys == local_keys and torch.equal(labels, local_labels) and torch.equal(clips, local_clips)
        # a brace pattern over http finds the index beside the shards
        pattern = resolve_source(srv.url + "/ssv2-train-{000000..000001}.tar")
        assert pattern.nsamples == (2, 2)
        srv.status("/ssv2-train-000001.tar", 404, times=None)
        with pytest.raises(ShardError, match=r"ssv2-train-000001\.tar: HTTP 404"):
            list(build_eval_loader(src, SMALL))


# ------------------------------------------------------------------------------------------ decode only sampled
def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every JPEG the loader decodes from now on, appended to the returned list (the real decoder still runs)."""
    decoded: list[bytes] = []
    real = decode_mod.decode_one_jpeg

    def counting(data: bytes) -> torch.Tensor:
        decoded.append(data)
        return real(data)

    monkeypatch.setattr(decode_mod, "decode_one_jpeg", counting)
    return decoded


def test_only_the_sampled_frames_are_decoded(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded = _count_decodes(monkeypatch)
    src = resolve_source(str(shards / "ssv2-train.json"))
    keys, _, clips = collect(build_eval_loader(src, SMALL))
    expected: list[bytes] = []
    for url in src.urls:
        for sample in iter_samples(url):
            n = sum(1 for name in sample.members if name.endswith(".jpg"))
            expected += [sample.members[f"{i:06d}.jpg"] for i in sorted(set(segment_centre_indices(n, T)))]
    assert len(keys) == 12 and clips.shape == (12, 1, T, 3, 32, 32)
    assert decoded == expected  # exactly the sampled frames, each once, nothing else
    assert len(decoded) < sum(m["num_frames"] for m in stored(shards, "train").values())


def test_planner_keeps_only_the_sampled_frames_bytes(shards: Path) -> None:
    sample = next(iter_samples(str(shards / "ssv2-train-000000.tar")))
    request = ClipPlanner(SamplingSpec("test", T, clips=2))(sample, np.random.default_rng(0))
    n = sum(1 for name in sample.members if name.endswith(".jpg"))
    tick = n / T
    flat = [int(tick / 2 + tick * t) for t in range(T)] + [int(tick * t) for t in range(T)]
    assert request.frames == tuple(sorted(set(flat)))
    assert [request.frames[k] for k in request.order] == flat
    assert request.jpegs == tuple(sample.members[f"{i:06d}.jpg"] for i in request.frames)


# ----------------------------------------------------------------------------------------- exact epochs, ranks
def test_train_epochs_are_exact_on_every_rank_with_workers(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    cfg = DataConfig(num_segments=T, crop_size=32, scale_size=40, batch_size=2, num_workers=2, shuffle_buffer=4)
    by_epoch: dict[int, list[list[str]]] = {0: [], 1: []}
    for rank in (0, 1):
        loader = build_train_loader(src, cfg, rank=rank, world_size=2, seed=3)
        assert len(loader) == 12 // (2 * 2)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 3
            for b in batches:
                assert isinstance(b, Batch) and b.clips.shape == (2, T, 3, 32, 32) and b.clips.dtype == torch.uint8
                assert b.labels.dtype == torch.int64 and b.skipped == 0
            by_epoch[epoch].append([k for b in batches for k in b.keys])
    meta = stored(shards, "train")
    for epoch, (r0, r1) in by_epoch.items():
        assert not set(r0) & set(r1), f"epoch {epoch}: ranks share samples"
        assert len(r0 + r1) == len(set(r0) | set(r1)) == 12 and set(r0) | set(r1) == set(meta)
    assert by_epoch[0] != by_epoch[1]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more workers than cores
@pytest.mark.parametrize(
    ("world", "workers", "batch", "unseen"), [(2, 2, 2, 0), (1, 3, 2, 0), (1, 2, 5, 2), (2, 0, 3, 0)]
)
def test_an_epoch_reads_every_clip_once_from_ragged_shards(
    ragged: Path, world: int, workers: int, batch: int, unseen: int
) -> None:
    # 12 samples in shards of 5, 4, 3: dealing whole shards to 4 slots repeated some and left others out
    src = resolve_source(str(ragged / "ssv2-train.json"))
    assert src.nsamples == RAGGED
    cfg = DataConfig(**{**_fields(SMALL), "num_workers": workers, "batch_size": batch})
    loaders = [build_train_loader(src, cfg, rank=r, world_size=world, seed=3) for r in range(world)]
    epochs = []
    for epoch in (0, 1):
        keys: list[str] = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 12 // (world * batch)
            assert all(len(b.keys) == batch and b.skipped == 0 for b in batches)
            keys += [k for b in batches for k in b.keys]
        assert len(keys) == len(set(keys)) == 12 - unseen  # no clip twice, none left out but the remainder
        assert set(keys) <= set(stored(ragged, "train"))
        epochs.append(keys)
    assert epochs[0] != epochs[1]


def test_a_rank_decodes_only_its_own_samples(ragged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # rank 0 of 2 shares shards with rank 1; the other rank's samples are passed over by tar header, undecoded
    decoded = _count_decodes(monkeypatch)
    src = resolve_source(str(ragged / "ssv2-train.json"))
    cfg = DataConfig(**{**_fields(SMALL), "batch_size": 3})
    loader = build_train_loader(src, cfg, rank=0, world_size=2, seed=5)
    keys = [k for b in loader for k in b.keys]
    assert len(keys) == 6
    frames = {k: set() for k in stored(ragged, "train")}
    for url in src.urls:
        for sample in iter_samples(url):
            frames[sample.key] |= {data for name, data in sample.members.items() if name.endswith(".jpg")}
    mine = set().union(*(frames[k] for k in keys))
    assert decoded and set(decoded) <= mine
    assert len(decoded) <= T * len(keys)  # at most T distinct frames per clip of this rank


def test_an_index_promising_more_samples_than_a_shard_holds_is_a_shard_error(ragged: Path, tmp_path: Path) -> None:
    for p in ragged.iterdir():
        shutil.copy(p, tmp_path / p.name)
    index = json.loads((ragged / "ssv2-train.json").read_text())
    index["shardlist"][2]["nsamples"] = 9  # the shard holds 3
    (tmp_path / "ssv2-train.json").write_text(json.dumps(index))
    loader = build_train_loader(resolve_source(str(tmp_path / "ssv2-train.json")), SMALL, seed=0)
    with pytest.raises(ShardError, match=r"ssv2-train-000002\.tar: holds 3 samples, fewer than the \d+ its index"):
        for epoch in range(4):  # in some epoch the plan reads past the shard's third sample
            loader.set_epoch(epoch)
            list(loader)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more workers than cores
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resuming_mid_epoch_from_ragged_shards_yields_exactly_the_remaining_batches(ragged: Path, workers: int) -> None:
    # slots now start and end inside shards: a resumed worker re-plans the same ranges and replays its part
    src = resolve_source(str(ragged / "ssv2-train.json"))
    loader = build_train_loader(src, DataConfig(**{**_fields(SMALL), "num_workers": workers}), seed=2)
    for epoch in (0, 3):
        loader.set_epoch(epoch)
        full = list(loader)
        assert len(full) == 6 and len({k for b in full for k in b.keys}) == 12
        for skip in (1, 3, 5):
            loader.set_epoch(epoch, skip=skip)
            rest = list(loader)
            assert [b.keys for b in rest] == [b.keys for b in full[skip:]]
            assert all(torch.equal(a.clips, b.clips) for a, b in zip(rest, full[skip:], strict=True))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more workers than cores
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resuming_mid_epoch_yields_exactly_the_remaining_batches(shards: Path, workers: int) -> None:
    # 12 videos, batch 2: 6 batches per epoch; with 2 or 3 workers the remaining batches come from rotated workers.
    src = resolve_source(str(shards / "ssv2-train.json"))
    cfg = DataConfig(**{**_fields(SMALL), "num_workers": workers})
    loader = build_train_loader(src, cfg, seed=7)
    loader.set_epoch(1)
    full = list(loader)
    assert len(full) == 6
    for skip in (1, 4, 5):
        loader.set_epoch(1, skip=skip)
        rest = list(loader)
        assert len(rest) == 6 - skip, skip
        for got, want in zip(rest, full[skip:], strict=True):  # same videos, same frames, same crops
            assert got.keys == want.keys and torch.equal(got.clips, want.clips) and torch.equal(got.labels, want.labels)
    with pytest.raises(ValueError, match="cannot skip 6 of 6"):
        loader.set_epoch(1, skip=6)


def test_train_labels_match_the_samples_and_batches_are_reproducible(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    meta = stored(shards, "train")
    first = list(build_train_loader(src, SMALL, seed=5))
    again = list(build_train_loader(src, SMALL, seed=5))
    for a, b in zip(first, again, strict=True):
        assert a.keys == b.keys and torch.equal(a.clips, b.clips)
        assert a.labels.tolist() == [meta[k]["label"] for k in a.keys]
    assert len(first) == 6


def test_flip_mirrors_pixels_and_swaps_pair_labels(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    meta = stored(shards, "train")
    plain = list(build_train_loader(src, SMALL, seed=1))
    flipped = list(build_train_loader(src, DataConfig(**{**_fields(SMALL), "flip": True, "flip_prob": 1.0}), seed=1))
    swap = {0: 0, 1: 1, 2: 3, 3: 2}
    seen_pairs = 0
    for a, b in zip(plain, flipped, strict=True):
        assert a.keys == b.keys
        assert torch.equal(b.clips, a.clips.flip(-1))
        assert a.labels.tolist() == [meta[k]["label"] for k in a.keys]
        assert b.labels.tolist() == [swap[meta[k]["label"]] for k in b.keys]
        seen_pairs += sum(meta[k]["label"] in (2, 3) for k in b.keys)
    assert seen_pairs > 0
    # flip=False never flips, whatever flip_prob says
    never = build_train_loader(src, DataConfig(**{**_fields(SMALL), "flip_prob": 1.0}), seed=1)
    for a, b in zip(plain, never, strict=True):
        assert torch.equal(a.clips, b.clips) and torch.equal(a.labels, b.labels)


def _fields(cfg: DataConfig) -> dict:
    return {name: getattr(cfg, name) for name in cfg.__slots__}


def test_eval_sees_every_sample_once_across_ranks_and_workers(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    cfg = DataConfig(num_segments=T, crop_size=32, scale_size=40, batch_size=2, num_workers=2)
    all_keys: list[str] = []
    for rank in (0, 1):
        loader = build_eval_loader(src, cfg, crops=3, clips=2, mode="test", rank=rank, world_size=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        keys = [k for b in batches for k in b.keys]
        assert len(keys) == loader.num_samples_this_rank == loader.seen == 6
        assert all(b.clips.shape[1:] == (6, T, 3, 32, 32) for b in batches)
        all_keys += keys
    assert sorted(all_keys) == sorted(stored(shards, "train"))


def test_eval_views_are_crop_major_then_clip(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-validation.json"))
    single = collect(build_eval_loader(src, SMALL, crops=3, mode="test"))[2]
    twice = collect(build_eval_loader(src, SMALL, crops=3, clips=2, mode="test"))[2]
    assert single.shape[1] == 3 and twice.shape[1] == 6
    # view = crop * clips + clip; clip 0 of the twice sampler is the 1-clip test sampler (segment centres)
    for crop in range(3):
        assert torch.equal(twice[:, 2 * crop], single[:, crop])
    assert not torch.equal(twice[:, 1], twice[:, 0])


# ------------------------------------------------------------------------------------------ video, gpu, pickle
def test_video_shards_give_the_frames_shards_clip(shards: Path, video_shards: Path) -> None:
    cfg = DataConfig(num_segments=T, crop_size=40, scale_size=48, batch_size=2, num_workers=0)
    fk, fl, fc = collect(build_eval_loader(resolve_source(str(shards / "ssv2-validation.json")), cfg))
    vk, vl, vc = collect(build_eval_loader(resolve_source(str(video_shards / "ssv2-validation.json")), cfg))
    assert vk == fk and torch.equal(vl, fl) and vc.shape == fc.shape == (4, 1, T, 3, 40, 40)
    for i in range(len(fk)):
        diff = (vc[i].float() - fc[i].float()).abs().mean().item()
        assert diff < 5.0  # the JPEG (q90, 4:2:0) error of these small sharp-edged frames is 2-4 per pixel
        other = fc[(i + 1) % len(fk)]  # another video's clip is far away
        assert (vc[i].float() - other.float()).abs().mean().item() > 2 * diff
    train = build_train_loader(resolve_source(str(video_shards / "ssv2-train.json")), SMALL)
    assert [tuple(b.clips.shape) for b in train] == [(2, T, 3, 32, 32)] * 6


def test_main_process_decode_is_the_cpu_twin_of_worker_decode(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    workers = list(build_train_loader(src, SMALL, seed=2))
    main = list(build_train_loader(src, SMALL, seed=2, decode_device="cpu"))
    for a, b in zip(workers, main, strict=True):
        assert a.keys == b.keys and torch.equal(a.clips, b.clips) and torch.equal(a.labels, b.labels)
    ev_a = collect(build_eval_loader(src, SMALL, crops=10))
    ev_b = collect(build_eval_loader(src, SMALL, crops=10, decode_device="cpu"))
    assert ev_a[0] == ev_b[0] and torch.equal(ev_a[2], ev_b[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_matches_cpu(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-validation.json"))
    cpu = collect(build_eval_loader(src, SMALL))
    gpu = collect(build_eval_loader(src, DataConfig(**{**_fields(SMALL), "gpu_decode": True})))
    assert cpu[0] == gpu[0] and gpu[2].is_cuda
    assert (gpu[2].cpu().float() - cpu[2].float()).abs().mean() < 2.0


def test_gpu_decode_without_cuda_is_a_config_error(shards: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="CUDA"):
        build_eval_loader(resolve_source(str(shards / "ssv2-validation.json")), DataConfig(gpu_decode=True))


def test_stream_pickles_for_spawned_workers(shards: Path) -> None:
    loader = build_train_loader(resolve_source(str(shards / "ssv2-train.json")), SMALL, seed=4)
    loader.set_epoch(2)
    loader.stream.epoch = 2
    clone = pickle.loads(pickle.dumps(loader.stream))
    mine = [b.keys for b in loader]
    theirs = [b.keys for b in clone]
    assert theirs == mine


# ------------------------------------------------------------------------------------------------ failure paths
def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_corrupt_jpeg_sample_is_skipped_and_counted(shards: Path, tmp_path: Path) -> None:
    samples = [s for i in range(2) for s in iter_samples(str(shards / f"ssv2-train-{i:06d}.tar"))]
    bad = samples[1].key
    members: list[tuple[str, bytes]] = []
    for s in samples:
        for suffix, data in s.members.items():
            if s.key == bad and suffix.endswith(".jpg"):
                data = b"\xff\xd8 definitely not a jpeg"
            if s.key == samples[2].key and suffix == "cls":
                continue  # an unlabelled sample (no .cls, label null): label -1
            if s.key == samples[2].key and suffix == "json":
                data = json.dumps({**json.loads(data), "label": None}).encode()
            members.append((f"{s.key}.{suffix}", data))
    _write_tar(tmp_path / "ssv2-x-000000.tar", members)
    index = {
        "__kind__": "wids-shard-index-v1",
        "shardlist": [{"url": "ssv2-x-000000.tar", "nsamples": 4}],
        "split": "x",
        "flip_pairs": [],
    }
    (tmp_path / "ssv2-x.json").write_text(json.dumps(index))
    src = resolve_source(str(tmp_path / "ssv2-x.json"))
    assert src.classes is None  # no classes.json beside it: a warning, not an error
    loader = build_eval_loader(src, SMALL)
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert keys == [s.key for s in samples if s.key != bad]
    assert sum(b.skipped for b in batches) == 1 == loader.skipped and loader.seen == 3
    labels = dict(zip(keys, torch.cat([b.labels for b in batches]).tolist(), strict=True))
    assert labels[samples[2].key] == -1
    train = build_train_loader(src, DataConfig(**{**_fields(SMALL), "batch_size": 3, "shuffle_buffer": 1}))
    assert len(train) == 1
    batches = list(train)
    assert len(batches) == 1 and batches[0].skipped == 1 == train.skipped and bad not in batches[0].keys


def test_missing_shard_is_a_clear_error_naming_it(shards: Path, tmp_path: Path) -> None:
    for p in shards.glob("ssv2-train*"):
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "ssv2-train-000004.tar").unlink()
    src = resolve_source(str(tmp_path / "ssv2-train.json"))
    cfg = DataConfig(**{**_fields(SMALL), "num_workers": 2})
    with pytest.raises(ShardError) as info:
        list(build_eval_loader(src, cfg))
    assert str(info.value) == f"{tmp_path / 'ssv2-train-000004.tar'}: shard not found"
    with pytest.raises(ShardError, match=r"ssv2-train-000004\.tar: shard not found"):
        list(build_train_loader(src, SMALL))


def test_truncated_shard_is_an_error_not_a_skip(shards: Path, tmp_path: Path) -> None:
    data = (shards / "ssv2-validation-000000.tar").read_bytes()
    (tmp_path / "ssv2-validation-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="unreadable shard"):
        list(iter_samples(str(tmp_path / "ssv2-validation-000000.tar")))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"scale_size": 16}, "scale_size"),
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"num_segments": 80, "dense": True}, "dense"),
    ],
)
def test_bad_config_is_a_config_error(shards: Path, change: dict, message: str) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    with pytest.raises(ConfigError, match=message):
        build_train_loader(src, DataConfig(**{**_fields(SMALL), **change}))


def test_bad_eval_options_and_ranks(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    with pytest.raises(ConfigError, match="crops"):
        build_eval_loader(src, SMALL, crops=4)
    with pytest.raises(ConfigError, match="one clip"):
        build_eval_loader(src, SMALL, clips=2)  # twice sample is a test-mode protocol
    with pytest.raises(ConfigError, match="rank"):
        build_train_loader(src, SMALL, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        build_train_loader(src, DataConfig(**{**_fields(SMALL), "batch_size": 7}), world_size=2)


def test_finisher_shapes(shards: Path) -> None:
    sample = next(iter_samples(str(shards / "ssv2-validation-000000.tar")))
    rng = np.random.default_rng(0)
    train_req = ClipPlanner(SamplingSpec("train", T))(sample, rng)
    assert ClipFinisher(True, T, 32, 40)(train_req).shape == (T, 3, 32, 32)
    test_req = ClipPlanner(SamplingSpec("test", T, clips=2))(sample, rng)
    assert ClipFinisher(False, T, 32, 40, crops=5, full_res=True)(test_req).shape == (10, T, 3, 40, 40)


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every regular file of a tar stream, read by the loader's tar reader."""
    reader = _TarReader(stream)
    while (member := reader.next_member()) is not None:
        yield member[0], reader.read_data()


def test_tar_reader_matches_tarfile_for_long_and_pax_names(tmp_path: Path) -> None:
    long_dir = "d" * 120
    names = ["a.json", f"{long_dir}/b.000000.jpg", "ümlaut.cls", "c." + "x" * 150 + ".txt"]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        path = tmp_path / f"t{fmt}.tar"
        usable = [n for n in names if fmt != tarfile.USTAR_FORMAT or len(n.encode()) <= 100]
        with tarfile.open(path, "w", format=fmt) as tar:
            for i, name in enumerate(usable):
                data = bytes([i]) * (700 * i + 3)
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tar:
            expected = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        with open(path, "rb") as fh:
            assert list(tar_members(fh)) == expected


def test_shuffle_buffer_reorders_within_a_pass(shards: Path) -> None:
    src = resolve_source(str(shards / "ssv2-train.json"))
    in_order = [
        k for b in build_train_loader(src, DataConfig(**{**_fields(SMALL), "shuffle_buffer": 1})) for k in b.keys
    ]
    mixed = [k for b in build_train_loader(src, DataConfig(**{**_fields(SMALL), "shuffle_buffer": 8})) for k in b.keys]
    assert len(in_order) == len(mixed) == 12  # one epoch = exactly one pass over the 12 samples
    assert sorted(mixed) == sorted(in_order) == sorted(stored(shards, "train")) and mixed != in_order
