"""The shard stage against the contract (shard-format.md), with real VP9 videos, tar and webdataset readers."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from fixtures import copy_dataset, folder_bytes, make_shards, read_json, shard_config
from PIL import Image

from ssv2prep.annotations import load_annotations
from ssv2prep.errors import AnnotationError, ConfigError, ShardError
from ssv2prep.prep.decode import Resize, decode_video, ffmpeg_binary, ffmpeg_qscale
from ssv2prep.prep.prepare import WORK_DIR, TooManyFailuresError, shard_dataset
from ssv2prep.prep.shard import WriterSettings


def test_writes_exactly_the_contract_files(tiny_shards: Path, synth_tiny) -> None:
    names = {p.name for p in tiny_shards.iterdir() if not p.name.startswith(".")}
    ann = load_annotations(synth_tiny.labels_dir)
    expected = {"classes.json"}
    for split, records in ann.splits.items():
        n_shards = -(-len(records) // 3)
        expected |= {f"ssv2-{split}-{i:06d}.tar" for i in range(n_shards)}
        expected |= {f"ssv2-{split}.json", f"ssv2-{split}.manifest.jsonl", f"ssv2-{split}.stats.json"}
    assert names == expected
    assert read_json(tiny_shards / "classes.json") == list(ann.classes)


def test_tarfile_reads_samples_as_the_contract_says(tiny_shards: Path, synth_tiny) -> None:
    ann = load_annotations(synth_tiny.labels_dir)
    by_id = {r.video_id: r for recs in ann.splits.values() for r in recs}
    seen = {}
    for shard in sorted(tiny_shards.glob("ssv2-*.tar")):
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
            for m in members:
                key = m.name.split(".")[0]
                seen.setdefault(key, []).append(m.name)
            metas = [json.loads(tar.extractfile(m).read()) for m in members if m.name.endswith(".json")]
        for meta in metas:
            rec = by_id[meta["id"]]
            assert meta["label"] == rec.label and meta["class"] == rec.class_name
            assert meta["template"] == rec.template and meta["caption"] == rec.caption
            assert meta["source"] == f"{rec.video_id}.webm" and meta["fps"] == 12.0 and meta["height"] == 48
            names = seen[meta["id"]]
            assert sorted(n for n in names if n.endswith(".jpg")) == [
                f"{meta['id']}.{i:06d}.jpg" for i in range(meta["num_frames"])
            ]
            assert (f"{meta['id']}.cls" in names) == (rec.label is not None)
    assert set(seen) == set(by_id)


def test_frames_equal_a_direct_decode(tiny_shards: Path, synth_tiny) -> None:
    shard = tiny_shards / "ssv2-validation-000000.tar"
    with tarfile.open(shard) as tar:
        meta = json.loads(next(tar.extractfile(m).read() for m in tar if m.name.endswith(".json")))
        jpgs = [
            tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.name.startswith(f"{meta['id']}.") and m.name.endswith(".jpg")
        ]
    direct = decode_video(synth_tiny.videos_dir / f"{meta['id']}.webm", quality=90)
    assert jpgs == direct.jpegs
    with av.open(str(synth_tiny.videos_dir / f"{meta['id']}.webm")) as c:
        ref = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    first = np.asarray(Image.open(io.BytesIO(jpgs[0])).convert("RGB")).astype(int)
    assert len(ref) == len(jpgs) and first.shape == ref[0].shape
    assert np.abs(first - ref[0]).mean() < 4.0  # JPEG q90 of the same pixels


def test_webdataset_reads_every_sample(tiny_shards: Path) -> None:
    index = read_json(tiny_shards / "ssv2-train.json")
    urls = [str(tiny_shards / e["url"]) for e in index["shardlist"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == index["num_samples"] == sum(e["nsamples"] for e in index["shardlist"])
    for s in samples:
        meta = json.loads(s["json"])
        assert int(s["cls"]) == meta["label"]
        frames = sorted(k for k in s if k.endswith(".jpg"))
        assert len(frames) == meta["num_frames"]
        assert Image.open(io.BytesIO(s[frames[-1]])).size == (meta["width"], meta["height"])


def test_index_manifest_and_stats_reconcile(tiny_shards: Path, synth_tiny) -> None:
    ann = load_annotations(synth_tiny.labels_dir)
    for split, records in ann.splits.items():
        index = read_json(tiny_shards / f"ssv2-{split}.json")
        assert index["__kind__"] == "wids-shard-index-v1" and index["split"] == split
        assert index["num_classes"] == len(ann.classes) and index["classes"] == "classes.json"
        for entry in index["shardlist"]:
            data = (tiny_shards / entry["url"]).read_bytes()
            assert entry["filesize"] == len(data)
            assert entry["md5sum"] == __import__("hashlib").md5(data).hexdigest()
        lines = [json.loads(x) for x in (tiny_shards / f"ssv2-{split}.manifest.jsonl").read_text().splitlines()]
        assert sorted(x["id"] for x in lines) == sorted(r.video_id for r in records)
        assert sum(x["status"] == "ok" for x in lines) == index["num_samples"]
        assert sum(x["num_frames"] for x in lines) == index["num_frames"]
        stats = read_json(tiny_shards / f"ssv2-{split}.stats.json")
        assert (stats["ok"], stats["failed"], stats["missing"]) == (len(records), 0, 0)


def test_test_split_labels_come_from_answers(tiny_shards: Path, synth_tiny) -> None:
    answers = dict(line.split(";") for line in (synth_tiny.labels_dir / "test-answers.csv").read_text().splitlines())
    classes = read_json(tiny_shards / "classes.json")
    lines = [json.loads(x) for x in (tiny_shards / "ssv2-test.manifest.jsonl").read_text().splitlines()]
    assert lines and all(classes[x["label"]] == answers[x["id"]] for x in lines)


def test_flip_pairs_in_the_index(tiny_shards: Path) -> None:
    classes = read_json(tiny_shards / "classes.json")
    pairs = read_json(tiny_shards / "ssv2-train.json")["flip_pairs"]
    named = [(classes[a], classes[b]) for a, b in pairs]
    assert ("Pushing something from left to right", "Pushing something from right to left") in named
    assert all(a.replace("left", "X").replace("right", "left").replace("X", "right") == b for a, b in named)


def test_same_inputs_give_identical_bytes(synth_tiny, tmp_path: Path) -> None:
    a = make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, tmp_path / "a", splits=("validation", "test"))
    b = make_shards(
        synth_tiny.videos_dir, synth_tiny.labels_dir, tmp_path / "b", splits=("validation", "test"), workers=2
    )
    assert folder_bytes(a, "ssv2-*.tar") == folder_bytes(b, "ssv2-*.tar")
    assert folder_bytes(a, "ssv2-*.manifest.jsonl") == folder_bytes(b, "ssv2-*.manifest.jsonl")


def test_parts_union_equals_a_whole_run(synth_tiny, tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    r1 = shard_dataset(shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, part=(1, 2)))
    assert r1.incomplete_splits and not (out / "ssv2-train.json").exists()
    written_1 = {s.name for s in r1.written}
    r2 = shard_dataset(shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, part=(2, 2)))
    assert not r2.incomplete_splits and not written_1 & {s.name for s in r2.written}
    assert folder_bytes(out) == folder_bytes(tiny_shards)


def test_resume_after_kill_is_byte_identical(synth_tiny, tiny_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "ssv2prep",
        "-q",
        "shard",
        "--videos",
        str(synth_tiny.videos_dir),
        "--labels",
        str(synth_tiny.labels_dir),
        "--out",
        str(out),
        "--videos-per-shard",
        "3",
        "--workers",
        "1",
        "--decoder",
        "pyav",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((out / WORK_DIR).glob("ssv2-*.json")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((out / WORK_DIR).glob("ssv2-*.json")))
    total = len(list(tiny_shards.glob("ssv2-*.tar")))
    assert 1 <= done_before < total, "the run should have been killed part-way"
    (out / ".ssv2-train-000001.tar.abc123.tmp").write_bytes(b"half a shard")  # as a kill mid-write leaves
    result = shard_dataset(shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, max_failed_fraction=0.01))
    assert result.skipped_shards == done_before and len(result.written) == total - done_before
    assert folder_bytes(out) == folder_bytes(tiny_shards)
    assert not list(out.glob(".*.tmp"))


def test_rerun_skips_everything(tiny_shards: Path, synth_tiny, tmp_path: Path) -> None:
    out = tmp_path / "rerun"
    make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, out, splits=("validation",))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    result = shard_dataset(shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, splits=("validation",)))
    assert result.written == [] and result.skipped_shards == len(mtimes)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == mtimes


def test_other_settings_in_the_same_out_are_refused(synth_tiny, tmp_path: Path) -> None:
    out = make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, tmp_path / "o", splits=("validation",))
    with pytest.raises(ConfigError, match="quality"):
        shard_dataset(
            shard_config(
                synth_tiny.videos_dir,
                synth_tiny.labels_dir,
                out,
                splits=("validation",),
                writer=WriterSettings(quality=50),
            )
        )


def test_bad_videos_are_recorded_with_reasons(synth_tiny, tmp_path: Path) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "data")
    train = read_json(labels / "train.json")
    ids = [e["id"] for e in train]
    (videos / f"{ids[0]}.webm").write_bytes(b"")
    whole = (videos / f"{ids[1]}.webm").read_bytes()
    (videos / f"{ids[1]}.webm").write_bytes(whole[: len(whole) * 6 // 10])
    (videos / f"{ids[2]}.webm").write_bytes(os.urandom(3000))
    (videos / f"{ids[3]}.webm").unlink()
    (videos / f"{ids[4]}.webm").unlink()
    with av.open(str(videos / f"{ids[4]}.webm"), "w") as c:  # a WebM header and no frames at all
        s = c.add_stream("libvpx-vp9", rate=12)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    result = shard_dataset(shard_config(videos, labels, tmp_path / "out", splits=("train",)))
    manifest = (tmp_path / "out/ssv2-train.manifest.jsonl").read_text().splitlines()
    lines = {x["id"]: x for x in map(json.loads, manifest)}
    assert lines[ids[0]]["status"] == "failed" and lines[ids[0]]["reason"] == "empty_file"
    assert lines[ids[1]]["status"] == "failed" and lines[ids[1]]["reason"] == "truncated"
    assert lines[ids[2]]["status"] == "failed" and lines[ids[2]]["error"]
    assert lines[ids[3]]["status"] == "missing"
    assert lines[ids[4]]["status"] == "failed" and lines[ids[4]]["reason"] == "decode_error"
    summary = result.summaries["train"]
    assert (summary.ok, summary.failed, summary.missing) == (len(ids) - 5, 4, 1)
    assert summary.ok == read_json(tmp_path / "out/ssv2-train.json")["num_samples"]
    with pytest.raises(TooManyFailuresError, match="4 of 11 videos failed"):
        shard_dataset(shard_config(videos, labels, tmp_path / "out", splits=("train",), max_failed_fraction=0.1))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda e: e[0].update(template="Juggling [something]"), "is not in labels.json"),
        (lambda e: e[1].update(id=e[0]["id"]), "more than once"),
        (lambda e: e[0].update(id="12.5"), "contain '.' or '/'"),
    ],
)
def test_bad_annotations_stop_before_any_work(synth_tiny, tmp_path: Path, mutate, message: str) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "data")
    train = read_json(labels / "train.json")
    mutate(train)
    (labels / "train.json").write_text(json.dumps(train))
    with pytest.raises(AnnotationError, match=message):
        shard_dataset(shard_config(videos, labels, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.tar"))


def test_holdout_is_stratified_and_disjoint(synth_tiny, tmp_path: Path) -> None:
    out = make_shards(synth_tiny.videos_dir, synth_tiny.labels_dir, tmp_path / "h", splits=("train",), holdout=0.34)
    train = [json.loads(x) for x in (out / "ssv2-train.manifest.jsonl").read_text().splitlines()]
    hold = [json.loads(x) for x in (out / "ssv2-holdout.manifest.jsonl").read_text().splitlines()]
    assert not {x["id"] for x in train} & {x["id"] for x in hold}
    assert len(train) + len(hold) == len(read_json(synth_tiny.labels_dir / "train.json"))
    per_class = {}
    for x in hold:
        per_class[x["label"]] = per_class.get(x["label"], 0) + 1
    assert per_class == {c: 1 for c in range(4)}  # round(0.34 * 3) = 1 of each class's 3 videos


def test_video_format_keeps_the_original_bytes(synth_tiny, tiny_video_shards: Path) -> None:
    out = tiny_video_shards
    index = read_json(out / "ssv2-validation.json")
    assert index["format"] == "video" and index["jpeg_quality"] is None
    for s in wds.WebDataset([str(out / e["url"]) for e in index["shardlist"]], shardshuffle=False):
        meta = json.loads(s["json"])
        assert s["webm"] == (synth_tiny.videos_dir / f"{meta['id']}.webm").read_bytes()
        assert meta["num_frames"] == decode_video(synth_tiny.videos_dir / f"{meta['id']}.webm").num_frames


def test_ffmpeg_decoder_gives_identical_shards(synth_tiny, tiny_shards: Path, tmp_path: Path) -> None:
    out = make_shards(
        synth_tiny.videos_dir,
        synth_tiny.labels_dir,
        tmp_path / "ff",
        splits=("validation",),
        writer=WriterSettings(decoder="ffmpeg"),
    )
    assert folder_bytes(out, "ssv2-validation-*.tar") == folder_bytes(tiny_shards, "ssv2-validation-*.tar")


def test_short_side_scales_frames(synth_tiny, tmp_path: Path) -> None:
    out = make_shards(
        synth_tiny.videos_dir,
        synth_tiny.labels_dir,
        tmp_path / "s",
        splits=("validation",),
        writer=WriterSettings(short_side=32),
    )
    index = read_json(out / "ssv2-validation.json")
    assert index["short_side"] == 32 and index["settings"]["encoder"] == "ffmpeg"
    # The size rule and the interpolation are part of the settings (they change every frame's bytes).
    assert (index["settings"]["height"], index["settings"]["interpolation"]) == (None, "bicubic")
    for s in wds.WebDataset([str(p) for p in sorted(out.glob("*.tar"))], shardshuffle=False):
        meta = json.loads(s["json"])
        assert meta["height"] == 32 and Image.open(io.BytesIO(s["000000.jpg"])).size == (meta["width"], 32)


@pytest.mark.parametrize("encoder", ["ffmpeg", "pillow"])
def test_scaled_frames_match_a_one_pass_rgb_scale(synth_tiny, encoder: str) -> None:
    """Both encoders scale the YUV planes: the frames must equal a one-pass RGB scale up to resampling and JPEG
    noise, and the ffmpeg binary decoder must give the very same bytes (everything after decoding is shared)."""
    video = sorted(synth_tiny.videos_dir.glob("*.webm"))[0]
    ours = decode_video(video, short_side=56, quality=95, encoder=encoder)
    binary = decode_video(video, short_side=56, quality=95, encoder=encoder, decoder="ffmpeg")
    assert ours.jpegs == binary.jpegs
    with av.open(str(video)) as container:
        reference = []
        for frame in container.decode(video=0):
            width = round(frame.width * 56 / frame.height)
            reference.append(frame.reformat(width=width, height=56, format="rgb24").to_ndarray().astype(np.int16))
    assert ours.num_frames == len(reference)
    assert (ours.height, ours.width) == reference[0].shape[:2]
    for jpg, ref in zip(ours.jpegs, reference, strict=True):
        got = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), np.int16)
        assert got.shape == ref.shape and np.abs(got - ref).mean() < 3.0


def test_sizes_round_as_ffmpeg_scale(tmp_path: Path) -> None:
    """90x60 at 51 px: 76.5 rounds half away from zero in ffmpeg (77), not to even as Python's round does (76)."""
    src = tmp_path / "one.jpg"
    cmd = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc2=size=90x60:rate=1"]
    subprocess.run([*cmd, "-frames:v", "1", "-vf", "scale=-1:51", str(src)], check=True)
    assert Resize(height=51).size(90, 60) == Image.open(src).size == (77, 51)
    assert Resize(short_side=51).size(60, 90) == (51, 77) and Resize(height=51).size(60, 90) == (34, 51)
    assert Resize().size(60, 90) == (60, 90)


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (WriterSettings(short_side=64, height=64), "--short-side and --height are exclusive"),
        (WriterSettings(height=4), "--height must be >= 8"),
        (WriterSettings(interpolation="cubic"), "--interpolation must be one of"),
    ],
)
def test_bad_scaling_settings_are_refused(synth_tiny, tmp_path: Path, writer: WriterSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        shard_dataset(shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, tmp_path / "o", writer=writer))
    assert not list(tmp_path.glob("o/*.tar"))


def test_quality_maps_to_the_ffmpeg_quantizer() -> None:
    assert [ffmpeg_qscale(q) for q in (95, 90, 85, 75, 50)] == [1, 2, 4, 6, 12]
    scales = [ffmpeg_qscale(q) for q in range(1, 96)]
    assert scales == sorted(scales, reverse=True) and min(scales) >= 1 and max(scales) <= 31


def test_ffmpeg_encoder_quantizes_as_the_official_recipe(synth_tiny, tmp_path: Path) -> None:
    """--quality 90 with the ffmpeg encoder writes the quantization tables of `ffmpeg -q:v 0` (the official
    extraction); the pillow encoder writes libjpeg's tables at exactly --quality."""
    video = sorted(synth_tiny.videos_dir.glob("*.webm"))[0]
    cmd = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-i", str(video), "-q:v", "0"]
    subprocess.run([*cmd, "-frames:v", "1", str(tmp_path / "official.jpg")], check=True)
    official = Image.open(tmp_path / "official.jpg")
    ours = Image.open(io.BytesIO(decode_video(video, quality=90).jpegs[0]))
    assert ours.quantization == official.quantization and ours.size == official.size
    pillow = Image.open(io.BytesIO(decode_video(video, quality=80, encoder="pillow").jpegs[0]))
    buf = io.BytesIO()
    ours.convert("RGB").save(buf, format="JPEG", quality=80, subsampling=2)
    assert pillow.quantization == Image.open(buf).quantization != ours.quantization


def test_wrong_videos_folder_is_an_error_before_any_work(synth_tiny, tmp_path: Path) -> None:
    parent = synth_tiny.videos_dir.parent  # the folder above the videos: no <id>.webm in it
    with pytest.raises(ShardError, match=rf"--videos {re.escape(str(parent))}: none of the 12 train videos are there"):
        shard_dataset(shard_config(parent, synth_tiny.labels_dir, tmp_path / "out"))
    assert not list((tmp_path / "out").glob("ssv2-*"))


def test_missing_videos_count_against_the_limit(synth_tiny, tmp_path: Path) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "data")
    ids = [e["id"] for e in read_json(labels / "train.json")]
    for video_id in ids[:3]:
        (videos / f"{video_id}.webm").unlink()
    with pytest.raises(TooManyFailuresError, match=r"split train: 3 of 12 videos are not in --videos .* --max-missing"):
        shard_dataset(shard_config(videos, labels, tmp_path / "a", splits=("train",), max_failed_fraction=0.1))
    with pytest.raises(TooManyFailuresError, match=r"3 of 12 videos are not in --videos"):
        shard_dataset(shard_config(videos, labels, tmp_path / "b", splits=("train",), max_missing_fraction=0.2))
    result = shard_dataset(
        shard_config(
            videos, labels, tmp_path / "c", splits=("train",), max_failed_fraction=0.0, max_missing_fraction=0.25
        )
    )
    assert (result.summaries["train"].ok, result.summaries["train"].missing) == (9, 3)


def test_a_split_with_no_usable_video_is_an_error(synth_tiny, tmp_path: Path) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "data")
    for entry in read_json(labels / "validation.json"):
        (videos / f"{entry['id']}.webm").write_bytes(b"")  # present, but not one decodes
    with pytest.raises(TooManyFailuresError, match=r"split validation: none of its 4 videos could be used"):
        shard_dataset(shard_config(videos, labels, tmp_path / "out", splits=("validation",)))
