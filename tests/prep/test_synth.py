"""Tests for `ssv2prep.prep.synth`: real VP9 encoding and decoding with PyAV, tiny sizes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ssv2prep.annotations import load_annotations, template_to_class
from ssv2prep.errors import ConfigError
from ssv2prep.fsutil import file_digest
from ssv2prep.prep.manifest import load_manifest
from ssv2prep.prep.synth import (
    PAIRS,
    MirrorPair,
    SynthConfig,
    SynthResult,
    class_templates,
    part_names,
    plan_videos,
    render_frames,
    synthesize,
    write_package,
)

av = pytest.importorskip("av")

TINY = SynthConfig(
    num_pairs=3,
    train_per_class=2,
    validation_per_class=1,
    test_per_class=1,
    height=48,
    min_frames=12,
    max_frames=16,
    seed=7,
    package=True,
    num_parts=3,
)
N_TINY = 2 * 3 * (2 + 1 + 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SynthResult]:
    """The same tiny config twice (determinism), and once more with zip-wrapped parts."""
    base = tmp_path_factory.mktemp("synth")
    return {
        "a": synthesize(base / "a", TINY),
        "b": synthesize(base / "b", TINY),
        "zip": synthesize(base / "zip", replace(TINY, zip_parts=True)),
    }


def _decode(path: Path) -> tuple[list[np.ndarray], dict[str, object]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        info = {
            "codec": stream.codec_context.name,
            "rate": stream.average_rate,
            "format": container.format.name,
            "pix_fmt": frames[0].format.name,
        }
        return [f.to_ndarray(format="rgb24") for f in frames], info


def _centroids(frames: list[np.ndarray]) -> np.ndarray:
    """(T, 2) x, y centroid of the pixels that differ from the per-pixel temporal median (the moving object)."""
    clip = np.stack(frames).astype(np.float32)
    moving = np.abs(clip - np.median(clip, axis=0)).max(axis=-1) > 40
    ys, xs = np.mgrid[0 : clip.shape[1], 0 : clip.shape[2]]
    out = []
    for mask in moving:
        assert mask.sum() > 0
        out.append((xs[mask].mean(), ys[mask].mean()))
    return np.array(out)


def _slope(values: np.ndarray) -> float:
    return float(np.polyfit(np.arange(len(values)), values, 1)[0])


def test_every_video_decodes_as_vp9_webm(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    plan = {v.video_id: v for v in plan_videos(TINY)}
    files = sorted(result.videos_dir.iterdir())
    assert sorted(p.stem for p in files) == sorted(plan)
    assert all(p.suffix == ".webm" for p in files)
    for path in files:
        frames, info = _decode(path)
        video = plan[path.stem]
        assert info["codec"] == "vp9"
        assert info["rate"] == 12
        assert "webm" in str(info["format"])
        assert info["pix_fmt"] == "yuv420p"
        assert len(frames) == video.num_frames
        assert TINY.min_frames <= len(frames) <= TINY.max_frames
        assert frames[0].shape == (48, video.width_px, 3)
        assert 1.3 * 48 - 1 <= video.width_px <= 1.8 * 48 + 1


def test_annotation_schemas_and_counts(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    labels = result.labels_dir
    train = json.loads((labels / "train.json").read_text())
    validation = json.loads((labels / "validation.json").read_text())
    test = json.loads((labels / "test.json").read_text())
    assert len(train) == 6 * 2 and len(validation) == 6 and len(test) == 6
    assert result.counts == {"train": 12, "validation": 6, "test": 6}
    for entry in train + validation:
        assert set(entry) == {"id", "label", "template", "placeholders"}
        filled = entry["template"]
        for noun in entry["placeholders"]:
            filled = filled.replace("[something]", noun, 1)
        assert entry["label"] == filled[0].lower() + filled[1:]
        assert len(entry["placeholders"]) == entry["template"].count("[something]")
    assert all(set(e) == {"id"} for e in test)
    ids = [e["id"] for e in train + validation + test]
    assert all(isinstance(i, str) for i in ids)
    assert sorted(int(i) for i in ids) == list(range(1, N_TINY + 1))
    # Ids are shuffled across splits, not handed out split by split.
    assert sorted(int(e["id"]) for e in train) != list(range(1, len(train) + 1))
    # The shared annotation reader accepts the files as they are.
    ann = load_annotations(labels)
    assert ann.classes == result.classes
    assert {s: len(r) for s, r in ann.splits.items()} == result.counts


def test_labels_json_is_alphabetical_and_covers_every_template(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    text = (result.labels_dir / "labels.json").read_text()
    pairs = json.loads(text, object_pairs_hook=list)
    names = [k for k, _ in pairs]
    assert names == sorted(names)
    assert [v for _, v in pairs] == [str(i) for i in range(6)]
    assert tuple(names) == result.classes
    assert sorted(names) == sorted(template_to_class(t) for t in class_templates(3))
    for split in ("train", "validation"):
        for entry in json.loads((result.labels_dir / f"{split}.json").read_text()):
            assert template_to_class(entry["template"]) in names
    assert set(class_templates(3)) == {t for p in PAIRS[:3] for t in (p.forward, p.backward)}
    assert class_templates(3)[:2] == [
        "Pushing [something] from left to right",
        "Pushing [something] from right to left",
    ]


def test_test_answers_agree_with_the_plan(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    lines = (result.labels_dir / "test-answers.csv").read_text().splitlines()
    answers = dict(line.split(";") for line in lines)
    test_ids = [e["id"] for e in json.loads((result.labels_dir / "test.json").read_text())]
    assert list(answers) == test_ids
    planned = {v.video_id: v.class_name for v in plan_videos(TINY) if v.split == "test"}
    assert answers == planned
    assert sorted(answers.values()) == sorted(result.classes)  # one test video per class


def test_two_runs_are_byte_identical(runs: dict[str, SynthResult]) -> None:
    a, b = runs["a"].out_dir, runs["b"].out_dir
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) == N_TINY + 5 + 1 + 3 + 1 + 1  # videos, labels, config, parts, labels zip, manifest
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def _joined(package_dir: Path, names: list[str]) -> bytes:
    return b"".join((package_dir / n).read_bytes() for n in names)


def test_joined_parts_are_the_tar_gz_of_the_videos(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    assert result.package_dir is not None
    names = part_names(3, zip_parts=False)
    assert names == [f"20bn-something-something-v2-0{i}" for i in range(3)]
    parts = [(result.package_dir / n).read_bytes() for n in names]
    assert parts[0][:2] == b"\x1f\x8b"
    assert all(p[:2] != b"\x1f\x8b" for p in parts[1:])
    assert all(len(p) > 0 for p in parts)
    assert len(parts[0]) == len(parts[1]) >= len(parts[2])
    archive = b"".join(parts)
    assert gzip.decompress(archive)[:100].startswith(b"20bn-something-something-v2/")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = tar.getmembers()
        expected = sorted(result.videos_dir.iterdir(), key=lambda p: int(p.stem))
        assert [m.name for m in members] == [f"20bn-something-something-v2/{p.name}" for p in expected]
        for member, path in zip(members, expected, strict=True):
            assert member.isreg()
            assert (member.uid, member.gid, member.mode) == (0, 0, 0o644)
            extracted = tar.extractfile(member)
            assert extracted is not None
            assert extracted.read() == path.read_bytes()
        assert len({m.mtime for m in members}) == 1


def test_zip_wrapped_parts_hold_the_raw_parts(runs: dict[str, SynthResult]) -> None:
    raw_dir, zip_dir = runs["a"].package_dir, runs["zip"].package_dir
    assert raw_dir is not None and zip_dir is not None
    for raw_name, zip_name in zip(part_names(3, zip_parts=False), part_names(3, zip_parts=True), strict=True):
        assert zip_name == raw_name + ".zip"
        data = (zip_dir / zip_name).read_bytes()
        assert data[:4] == b"PK\x03\x04"
        with zipfile.ZipFile(zip_dir / zip_name) as zf:
            infos = zf.infolist()
            assert [i.filename for i in infos] == [raw_name]
            assert infos[0].compress_type == zipfile.ZIP_STORED
            assert zf.read(raw_name) == (raw_dir / raw_name).read_bytes()
    assert not (zip_dir / part_names(3, zip_parts=False)[0]).exists()


def test_labels_zip_holds_the_five_files(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    assert result.package_dir is not None
    with zipfile.ZipFile(result.package_dir / "20bn-something-something-download-package-labels.zip") as zf:
        names = ["labels.json", "train.json", "validation.json", "test.json", "test-answers.csv"]
        assert zf.namelist() == [f"labels/{n}" for n in names]
        for n in names:
            assert zf.read(f"labels/{n}") == (result.labels_dir / n).read_bytes()


def test_manifest_matches_the_package_files(runs: dict[str, SynthResult]) -> None:
    for key, zipped in (("a", False), ("zip", True)):
        result = runs[key]
        assert result.manifest_path is not None and result.package_dir is not None
        manifest = load_manifest(result.manifest_path)
        on_disk = sorted(p.name for p in result.package_dir.iterdir() if p.name != "manifest.json")
        assert sorted(f.name for f in manifest.files) == on_disk
        assert manifest.base_url is None
        for f in manifest.files:
            path = result.package_dir / f.name
            assert f.size_bytes == path.stat().st_size
            assert f.sha256 == file_digest(path)
            assert f.checksum_advisory is False
            expected_role = "labels" if f.name.endswith("labels.zip") else "video_part"
            assert f.role == expected_role
        assert [f.name for f in manifest.files if f.role == "video_part"] == part_names(3, zip_parts=zipped)


def test_left_right_and_up_down_videos_mirror_each_other(runs: dict[str, SynthResult]) -> None:
    result = runs["a"]
    slopes: dict[str, list[tuple[float, float]]] = {}
    for video in plan_videos(TINY):
        if video.class_name.startswith(("Pushing", "Moving something")):
            frames, _ = _decode(result.videos_dir / f"{video.video_id}.webm")
            forward = _centroids(frames)
            backward = _centroids(frames[::-1])
            slopes.setdefault(video.class_name, []).append((_slope(forward[:, 0]), _slope(forward[:, 1])))
            # The reversed video moves the other way, as a video of the twin class does.
            assert np.sign(_slope(backward[:, 0])) == -np.sign(_slope(forward[:, 0]))
    assert all(sx > 1.0 for sx, _ in slopes["Pushing something from left to right"])
    assert all(sx < -1.0 for sx, _ in slopes["Pushing something from right to left"])
    assert all(sy < -0.5 for _, sy in slopes["Moving something up"])
    assert all(sy > 0.5 for _, sy in slopes["Moving something down"])
    assert all(abs(sy) < 0.5 for name in slopes if name.startswith("Pushing") for _, sy in slopes[name])
    assert all(abs(sx) < 0.5 for name in slopes if name.startswith("Moving") for sx, _ in slopes[name])
    assert sum(len(v) for v in slopes.values()) == 4 * 4


@pytest.mark.parametrize("pair", PAIRS, ids=[p.forward for p in PAIRS])
def test_each_twin_is_the_exact_time_reversal(pair: MirrorPair) -> None:
    placeholders = ("red " + pair.nouns[0], "blue " + pair.nouns[-1])[: pair.num_objects]
    kwargs = {"height_px": 32, "width_px": 49, "num_frames": 10, "seed": (3, 11, 1)}
    forward = render_frames(pair.forward, placeholders, **kwargs)
    backward = render_frames(pair.backward, placeholders, **kwargs)
    assert forward.shape == (10, 32, 49, 3) and forward.dtype == np.uint8
    np.testing.assert_array_equal(backward, forward[::-1])
    # Something moves: the first and last frames differ by far more than the noise.
    assert np.abs(forward[0].astype(int) - forward[-1].astype(int)).max() > 60


def test_rerun_skips_existing_videos_and_package(tmp_path: Path) -> None:
    cfg = replace(TINY, num_pairs=1, train_per_class=1, validation_per_class=1, test_per_class=1, num_parts=2)
    progress: list[tuple[int, int]] = []
    first = synthesize(tmp_path, cfg, on_progress=lambda d, t: progress.append((d, t)))
    assert progress == [(i, 6) for i in range(1, 7)]
    assert first.package_dir is not None
    watched = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched}
    progress.clear()
    synthesize(tmp_path, cfg, on_progress=lambda d, t: progress.append((d, t)))
    assert progress == [(i, 6) for i in range(1, 7)]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in watched} == before
    # A deleted video is made again, with the same bytes; the others stay untouched.
    victim = sorted(first.videos_dir.iterdir())[0]
    victim.unlink()
    synthesize(tmp_path, replace(cfg, package=False))
    assert victim.read_bytes() == before[victim][1]
    others = [p for p in first.videos_dir.iterdir() if p != victim]
    assert all(p.stat().st_mtime_ns == before[p][0] for p in others)
    # Switching to zip-wrapped parts replaces the raw parts.
    manifest_path = write_package(tmp_path, num_parts=2, zip_parts=True)
    listed = sorted(p.name for p in manifest_path.parent.iterdir())
    assert listed == sorted(
        [*part_names(2, zip_parts=True), manifest_path.name, "20bn-something-something-download-package-labels.zip"]
    )


def test_rerun_with_other_settings_is_refused(tmp_path: Path) -> None:
    cfg = replace(TINY, num_pairs=1, train_per_class=1, validation_per_class=0, test_per_class=0, package=False)
    synthesize(tmp_path, cfg)
    with pytest.raises(ConfigError, match="seed"):
        synthesize(tmp_path, replace(cfg, seed=8))
    assert len(list((tmp_path / "20bn-something-something-v2").iterdir())) == 2


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_pairs": 0}, "--pairs"),
        ({"num_pairs": len(PAIRS) + 1}, "--pairs"),
        ({"train_per_class": 0}, "--train-per-class"),
        ({"height": 8}, "--height"),
        ({"min_frames": 20, "max_frames": 10}, "--max-frames"),
        ({"num_parts": 0}, "--parts"),
        ({"num_parts": 101}, "--parts"),
    ],
)
def test_invalid_config_raises_config_error(changes: dict[str, int], field: str, tmp_path: Path) -> None:
    cfg = replace(TINY, **changes)
    with pytest.raises(ConfigError, match=field):
        cfg.validate()
    with pytest.raises(ConfigError, match=field):
        synthesize(tmp_path / "out", cfg)
    assert not (tmp_path / "out").exists()


def test_plan_is_deterministic_and_balanced() -> None:
    plan = plan_videos(TINY)
    assert plan == plan_videos(TINY)
    assert plan != plan_videos(replace(TINY, seed=8))
    per_class = {}
    for v in plan:
        per_class.setdefault((v.split, v.class_name), 0)
        per_class[(v.split, v.class_name)] += 1
    expected = {"train": 2, "validation": 1, "test": 1}
    assert per_class == {(s, template_to_class(t)): n for s, n in expected.items() for t in class_templates(3)}


@pytest.mark.parametrize(("changes", "field"), [({"height": 48.0}, "--height"), ({"package": 1}, "--package")])
def test_wrong_types_raise_config_error(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field} .* must be"):
        replace(TINY, **changes).validate()


def test_too_many_parts_for_the_archive_is_refused(tmp_path: Path) -> None:
    (tmp_path / "20bn-something-something-v2").mkdir()
    with pytest.raises(ConfigError, match="non-empty parts"):
        write_package(tmp_path, num_parts=100)
    assert [p.name for p in (tmp_path / "package").iterdir()] == []


def test_a_folder_with_foreign_videos_is_refused(tmp_path: Path) -> None:
    videos = tmp_path / "20bn-something-something-v2"
    videos.mkdir()
    (videos / "1.webm").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="already holds videos"):
        synthesize(tmp_path, replace(TINY, package=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["20bn-something-something-v2"]
    assert (videos / "1.webm").read_bytes() == b"not ours"
