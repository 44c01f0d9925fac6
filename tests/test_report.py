"""`ssv2prep.report`: the page, its plots and contact sheets, checked against the folder's own files."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import copy_dataset, make_shards, read_json
from PIL import Image

from ssv2prep.data.loader import DataConfig, build_eval_loader, decode_jpegs, num_multiscale_pairs
from ssv2prep.data.sampling import segment_centre_indices
from ssv2prep.data.source import iter_samples, resolve_source
from ssv2prep.data.transforms import NUM_FIXED_OFFSETS, TrainCrop, apply_train_crop
from ssv2prep.errors import ConfigError, ShardError
from ssv2prep.prep.index import read_index, read_manifest
from ssv2prep.report import (
    CAPTION_PAD_PX,
    COUNT_KEYS,
    GAP_PX,
    LINE_PX,
    ROW_LABEL_PX,
    ReportConfig,
    ReportResult,
    contact_sheet_size,
    sheet_clips,
    sheet_tile_px,
    wrap_caption,
    write_report,
)

T = 8
STAMP_PX = 12  # the frame-number stamp in a tile's top-left corner
IMAGE_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")


@pytest.fixture(scope="module")
def tiny_report(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> ReportResult:
    """The report of the read-only `tiny_shards` folder, written to a private folder."""
    out = tmp_path_factory.mktemp("report-tiny")
    return write_report(ReportConfig(tiny_shards, out_dir=out, videos_per_class=2, num_segments=T))


def _table_rows(page: str) -> dict[str, list[str]]:
    """Rows of the counts table by split: the cells after the split name."""
    section = page.split("## Counts", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0]]
    assert header[:8] == ["split", "entries", "ok", "failed", "missing", "shards", "frames", "bytes"]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def _sheet_rows(page: str, name: str) -> list[str]:
    """Video ids of a contact sheet, top to bottom, as the page lists them."""
    section = page.split(f": {name}\n", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith("Rows, top to bottom:"))
    return re.findall(r"`([^`]+)`", line)


def _caption_lines(folder: Path, split: str, ids: list[str], width: int) -> list[int]:
    """Lines of each row's caption ("<class> | id <id> | <n> frames", wrapped to the sheet), top to bottom."""
    classes = read_json(folder / "classes.json")
    lines = {line["id"]: line for line in read_manifest(folder / f"ssv2-{split}.manifest.jsonl")}
    captions = [f"{classes[lines[i]['label']]} | id {i} | {lines[i]['num_frames']} frames" for i in ids]
    return [len(wrap_caption(c, width - 4)) for c in captions]


def _expected_counts(folder: Path, split: str) -> dict[str, int]:
    index = read_index(folder / f"ssv2-{split}.json")
    manifest = read_manifest(folder / f"ssv2-{split}.manifest.jsonl")
    status = Counter(line["status"] for line in manifest)
    files = [folder / e["url"] for e in index["shardlist"]]
    assert sum(e["nsamples"] for e in index["shardlist"]) == status["ok"]
    return {
        "entries": len(manifest),
        "ok": status["ok"],
        "failed": status["failed"],
        "missing": status["missing"],
        "shards": len(files),
        "frames": index["num_frames"],
        "bytes": sum(p.stat().st_size for p in files),
    }


def test_page_links_every_png_and_each_opens(tiny_report: ReportResult) -> None:
    page = tiny_report.page.read_text(encoding="utf-8")
    linked = IMAGE_LINK.findall(page)
    assert sorted(linked) == sorted(p.name for p in tiny_report.images)
    assert {p.parent for p in tiny_report.images} == {tiny_report.page.parent}
    assert {"videos_per_class.png", "frames_per_video.png", "frame_sizes.png", "bytes.png"} <= set(linked)
    assert {"contact-train-00.png", "contact-validation-00.png"} <= set(linked)
    for name in linked:
        with Image.open(tiny_report.page.parent / name) as image:
            assert image.format == "PNG"
            assert 200 <= image.width <= 4000 and 150 <= image.height <= 10000, (name, image.size)
    assert "failures.png" not in linked
    assert "No failures" in page
    assert not (tiny_report.page.parent / "failures.png").exists()


def test_counts_equal_index_and_manifest(tiny_report: ReportResult, tiny_shards: Path) -> None:
    page = tiny_report.page.read_text(encoding="utf-8")
    table = _table_rows(page)
    assert set(tiny_report.counts) == set(table) == {"train", "validation", "test"}
    for split, stated in tiny_report.counts.items():
        expected = _expected_counts(tiny_shards, split)
        assert stated == expected
        cells = table[split]
        assert [int(c) for c in cells[:7]] == [expected[k] for k in stated]
        assert cells[7] == f"{expected['bytes'] / 1e6:.2f}"
    assert tiny_report.counts["train"]["ok"] == 12 and tiny_report.counts["validation"]["ok"] == 4
    classes = read_json(tiny_shards / "classes.json")
    assert f"classes: {len(classes)}" in page
    a, b = read_index(tiny_shards / "ssv2-train.json")["flip_pairs"][0]
    assert f"{classes[a]} <-> {classes[b]}" in page


def test_frame_sizes_come_from_sample_jsons(tiny_report: ReportResult, tiny_shards: Path) -> None:
    page = tiny_report.page.read_text(encoding="utf-8")
    index = read_index(tiny_shards / "ssv2-validation.json")
    sizes = Counter()
    for entry in index["shardlist"]:
        for sample in iter_samples(str(tiny_shards / entry["url"])):
            meta = json.loads(sample.members["json"])
            sizes[(meta["width"], meta["height"])] += 1
    line = next(x for x in page.splitlines() if x.startswith("- validation ("))
    assert f"2 of 2 shards scanned, {len(sizes)} distinct sizes" in line
    listed = {(int(w), int(h)): int(n) for w, h, n in re.findall(r"(\d+)x(\d+): (\d+)", line)}
    assert listed == dict(sizes)


def test_contact_sheet_geometry(tiny_report: ReportResult, tiny_shards: Path) -> None:
    page = tiny_report.page.read_text(encoding="utf-8")
    classes = read_json(tiny_shards / "classes.json")
    tile = sheet_tile_px(224)
    assert tile == 96
    for split, per_class in (("train", 2), ("validation", 1)):  # validation has one video per class
        name = f"contact-{split}-00.png"
        ids = _sheet_rows(page, name)
        assert len(ids) == per_class * len(classes)
        labels = {line["id"]: line["label"] for line in read_manifest(tiny_shards / f"ssv2-{split}.manifest.jsonl")}
        assert Counter(labels[i] for i in ids) == dict.fromkeys(range(len(classes)), per_class)
        width = ROW_LABEL_PX + T * tile
        lines = _caption_lines(tiny_shards, split, ids, width)
        height = sum(n * LINE_PX + CAPTION_PAD_PX + 2 * tile + GAP_PX for n in lines)
        assert contact_sheet_size(lines, T, tile) == (width, height)
        with Image.open(tiny_report.page.parent / name) as image:
            assert image.size == (width, height)


def _loader_clips(tiny_shards: Path) -> dict[str, torch.Tensor]:
    source = resolve_source(str(tiny_shards / "ssv2-validation.json"))
    cfg = DataConfig(num_segments=T, batch_size=4, num_workers=0, pin_memory=False)
    return {key: batch.clips[i, 0] for batch in build_eval_loader(source, cfg) for i, key in enumerate(batch.keys)}


def test_val_rows_show_what_the_eval_loader_yields(tiny_report: ReportResult, tiny_shards: Path) -> None:
    page = tiny_report.page.read_text(encoding="utf-8")
    ids = _sheet_rows(page, "contact-validation-00.png")
    clips = _loader_clips(tiny_shards)
    tile = sheet_tile_px(224)
    with Image.open(tiny_report.page.parent / "contact-validation-00.png") as image:
        sheet = np.asarray(image.convert("RGB"))
    lines = _caption_lines(tiny_shards, "validation", ids, ROW_LABEL_PX + T * tile)
    block_top = 0
    for key, n in zip(ids, lines, strict=True):
        top = block_top + n * LINE_PX + CAPTION_PAD_PX
        block_top = top + 2 * tile + GAP_PX
        for k, frame in enumerate(clips[key].permute(0, 2, 3, 1).numpy()):
            expected = np.asarray(Image.fromarray(frame).resize((tile, tile), Image.Resampling.BILINEAR))
            x = ROW_LABEL_PX + k * tile
            shown = sheet[top : top + tile, x : x + tile]
            np.testing.assert_array_equal(shown[STAMP_PX:], expected[STAMP_PX:], err_msg=f"video {key} frame {k}")


def test_sheet_clips_use_loader_sampling_and_a_multiscale_crop(tiny_shards: Path) -> None:
    index = read_index(tiny_shards / "ssv2-train.json")
    sample = next(iter_samples(str(tiny_shards / index["shardlist"][0]["url"])))
    num_frames = sum(1 for name in sample.members if name.endswith(".jpg"))
    cfg = ReportConfig(tiny_shards, num_segments=T, crop_size=32, scale_size=40, seed=3)
    val, val_frames, train, train_frames = sheet_clips(sample, cfg)
    assert val.shape == train.shape == (T, 3, 32, 32) and val.dtype == train.dtype == torch.uint8
    assert val_frames == segment_centre_indices(num_frames, T)
    # 11..14 frames in 8 segments: every train segment is one frame wide, so the draw is frames 0..7
    assert train_frames == list(range(T))
    frames = decode_jpegs([sample.members[f"{i:06d}.jpg"] for i in train_frames])
    matches = [
        (pair, offset)
        for pair in range(num_multiscale_pairs())
        for offset in range(NUM_FIXED_OFFSETS)
        if torch.equal(apply_train_crop(frames, TrainCrop(pair, offset, False), crop_size=32, scale_size=40), train)
    ]
    assert matches, "the train row is not a multi-scale crop of the sampled frames"
    again = sheet_clips(sample, cfg)
    assert torch.equal(again[2], train) and again[3] == train_frames


def test_failures_are_shown_with_reason_and_count(synth_tiny, tmp_path: Path) -> None:
    videos, labels = copy_dataset(synth_tiny, tmp_path / "src")
    broken = read_json(labels / "train.json")[0]["id"]
    (videos / f"{broken}.webm").write_bytes(b"")
    shards = make_shards(videos, labels, tmp_path / "shards")
    messages: list[str] = []
    cfg = ReportConfig(shards, videos_per_class=1, num_segments=4, max_shards_scanned=1)
    result = write_report(cfg, on_progress=messages.append)
    assert sorted(m.split(":")[0] for m in messages if "scanned shard" in m) == ["test", "train", "validation"]
    assert result.page == (tmp_path / "shards-report" / "report.md").resolve()  # beside the shards, not inside
    assert not (shards / "report").exists()
    page = result.page.read_text(encoding="utf-8")
    manifest = read_manifest(shards / "ssv2-train.manifest.jsonl")
    failed = [line for line in manifest if line["status"] == "failed"]
    assert [line["id"] for line in failed] == [broken]
    reason = failed[0]["reason"]
    assert reason == "empty_file"
    assert f"| train | failed | {reason} | 1 |" in page
    assert f"train `{broken}` (failed, {reason})" in page
    assert result.counts["train"]["failed"] == 1 and result.counts["train"]["ok"] == 11
    assert _table_rows(page)["train"][:4] == ["12", "11", "1", "0"]
    assert "No failures" not in page
    assert (result.page.parent / "failures.png").is_file()
    assert "train (1 of 4 shards scanned" in page
    assert broken not in _sheet_rows(page, "contact-train-00.png")

    # a re-run without contact sheets drops the old sheets and their section
    again = write_report(ReportConfig(shards, videos_per_class=0))
    assert not list(again.page.parent.glob("contact-*.png"))
    assert "## Contact sheets" not in again.page.read_text(encoding="utf-8")
    assert again.counts == result.counts
    assert not list(again.page.parent.glob("*.tmp"))


def test_folder_without_index_is_a_shard_error(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=re.escape(str(tmp_path))):
        write_report(ReportConfig(tmp_path))
    with pytest.raises(ShardError, match="no shard index"):
        write_report(ReportConfig(tmp_path / "absent"))
    assert not (tmp_path / "report").exists()


def test_index_listing_a_shard_outside_the_folder_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    index = read_index(tiny_shards / "ssv2-train.json")
    index["shardlist"] = [{**index["shardlist"][0], "url": "../elsewhere/ssv2-train-000000.tar"}]
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "ssv2-train.json").write_text(json.dumps(index))
    (folder / "classes.json").write_bytes((tiny_shards / "classes.json").read_bytes())
    with pytest.raises(ShardError, match="not a file in"):
        write_report(ReportConfig(folder, out_dir=tmp_path / "out"))


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--scale-size"):
        write_report(ReportConfig(tmp_path, crop_size=224, scale_size=200))
    with pytest.raises(ConfigError, match="--videos-per-class"):
        write_report(ReportConfig(tmp_path, videos_per_class=-1))


# Long real SSv2 class names: the last words are what tells the twins apart.
_LONG_TWINS = (
    "Putting something that can't roll onto a slanted surface, so it slides down",
    "Putting something that can't roll onto a slanted surface, so it stays where it is",
)


def test_videos_per_class_plot_is_readable_at_174_classes(tmp_path: Path) -> None:
    from ssv2prep.report import CLASS_LABEL_PT, _Entry, _plot_videos_per_class, _Split, videos_per_class_figure

    classes = [*_LONG_TWINS, *(f"Class number {k} doing something to something" for k in range(172))]
    rng = np.random.default_rng(0)
    entries = [
        _Entry(id=str(i), label=int(c), status="ok", shard="s.tar", num_frames=40)
        for i, c in enumerate(rng.integers(0, 174, size=3000))
    ]
    split = _Split("train", tmp_path / "x.json", {}, classes, entries, True, None)
    fig = videos_per_class_figure([split], classes)
    labels = [t for ax in fig.axes for t in ax.get_yticklabels()]
    assert [t.get_text() for t in labels] == classes  # every name, whole, in order
    assert min(t.get_fontsize() for t in labels) >= CLASS_LABEL_PT >= 7
    path = _plot_videos_per_class([split], classes, tmp_path / "v.png")
    with Image.open(path) as image:
        width, height = image.size
    assert len(fig.axes) == 3 and height <= 1400 and width <= 2800 and width >= height  # 3 panels of 58 rows
    bars = Counter()
    for ax in fig.axes:
        for patch, label in zip(ax.patches, ax.get_yticklabels(), strict=True):
            bars[label.get_text()] += round(patch.get_width())
    assert bars == Counter({classes[c]: n for c, n in Counter(e.label for e in entries).items()})


def test_contact_sheet_captions_wrap_instead_of_cutting() -> None:
    narrow = ROW_LABEL_PX + 4 * 32 - 4  # a 4-frame sheet of 32 px tiles
    for name in _LONG_TWINS:
        lines = wrap_caption(f"{name} | id 12345 | 40 frames", narrow)
        assert " ".join(lines) == f"{name} | id 12345 | 40 frames"
        assert len(lines) > 1


# ------------------------------------------------------------------------------------------- remote shard folders
# The same report read through ssv2prep.storage from a real S3 API (moto's server on 127.0.0.1) and a real HTTP
# server: nothing mocks the clients. Small contact sheets keep these quick.
SMALL_SHEETS = ("--videos-per-class", "1", "--segments", "4", "--crop-size", "32", "--scale-size", "40")


def _cli(*args: object) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from ssv2prep.cli import main

    result = CliRunner().invoke(main, ["report", *map(str, args)], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _upload(folder: Path, prefix: str, names: set[str] | None = None) -> None:
    """Files of a shard folder to `prefix`, one object each (as `aws s3 sync` would); all, or only `names`."""
    from ssv2prep import storage

    for path in sorted(folder.iterdir()):
        if path.is_file() and (names is None or path.name in names):
            storage.upload(path, storage.join(prefix, path.name))


def _outputs(out: Path) -> tuple[str, dict[str, tuple[tuple[int, int], bytes]]]:
    """(report.md without its `Folder:` line, {PNG name: (pixel size, RGB pixels)}) of a report folder."""
    page = (out / "report.md").read_text(encoding="utf-8")
    page = "\n".join(line for line in page.splitlines() if not line.startswith("Folder: "))
    images = {}
    for path in sorted(out.glob("*.png")):
        with Image.open(path) as image:
            images[path.name] = (image.size, image.convert("RGB").tobytes())
    return page, images


def _count_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if not line.startswith("report: ")]


@pytest.fixture(scope="module")
def local_small_report(tiny_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`report` of the local `tiny_shards` with small sheets and one scanned shard per split: (out folder, stdout)."""
    out = tmp_path_factory.mktemp("report-local-small")
    code, stdout, stderr = _cli(tiny_shards, "--out", out, "--max-shards-scanned", "1", *SMALL_SHEETS)
    assert code == 0, stderr
    return out, stdout


def test_an_s3_shard_folder_gives_the_same_report_as_its_local_copy(
    s3, tiny_shards: Path, local_small_report: tuple[Path, str], tmp_path: Path
) -> None:
    prefix = f"s3://{s3.new_bucket()}/{tiny_shards.name}"  # same last name: same page title
    _upload(tiny_shards, prefix)
    code, stdout, stderr = _cli(prefix, "--out", tmp_path / "out", "--max-shards-scanned", "1", *SMALL_SHEETS)
    assert code == 0, stderr
    local_out, local_stdout = local_small_report
    page, images = _outputs(tmp_path / "out")
    assert (page, images) == _outputs(local_out)
    assert _count_lines(stdout) == _count_lines(local_stdout)
    assert sorted(images) == [
        "bytes.png",
        "contact-train-00.png",
        "contact-validation-00.png",
        "frame_sizes.png",
        "frames_per_video.png",
        "videos_per_class.png",
    ]
    table = _table_rows(page)
    for split in ("train", "validation", "test"):
        expected = _expected_counts(tiny_shards, split)
        assert [int(c) for c in table[split][:7]] == [expected[k] for k in COUNT_KEYS]
        assert f"{split}: {expected['ok']} ok, 0 failed, 0 missing in {expected['shards']} shards" in stdout
    assert "train (1 of 4 shards scanned" in page
    assert f"Folder: `{prefix}`" in (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    classes = read_json(tiny_shards / "classes.json")
    for split in ("train", "validation"):  # one video of every class, from the s3 shards
        ids = _sheet_rows(page, f"contact-{split}-00.png")
        labels = {line["id"]: line["label"] for line in read_manifest(tiny_shards / f"ssv2-{split}.manifest.jsonl")}
        assert sorted(labels[i] for i in ids) == list(range(len(classes)))


def test_an_s3_out_gets_the_same_files_and_a_rerun_drops_stale_images(
    s3, tiny_shards: Path, local_small_report: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the files to upload are staged
    bucket = s3.new_bucket()
    prefix = f"s3://{bucket}/reports/tiny"
    s3.client.put_object(Bucket=bucket, Key="reports/tiny/contact-notes.txt", Body=b"mine")
    code, stdout, stderr = _cli(tiny_shards, "--out", prefix, "--max-shards-scanned", "1", *SMALL_SHEETS)
    assert code == 0, stderr
    assert f"report: {prefix}/report.md (6 images)" in stdout
    local_out, _ = local_small_report
    got = {k.removeprefix("reports/tiny/"): v for k, v in s3.keys(bucket, "reports/tiny/").items()}
    assert got == {
        "contact-notes.txt": b"mine",
        **{p.name: p.read_bytes() for p in local_out.iterdir()},  # same local input, so the same bytes
    }
    code, stdout, stderr = _cli(tiny_shards, "--out", prefix, "--max-shards-scanned", "1", "--videos-per-class", "0")
    assert code == 0, stderr
    names = sorted(k.removeprefix("reports/tiny/") for k in s3.keys(bucket, "reports/tiny/"))
    assert names == [
        "bytes.png",
        "contact-notes.txt",
        "frame_sizes.png",
        "frames_per_video.png",
        "report.md",
        "videos_per_class.png",
    ]
    assert not list(tmp_path.iterdir())  # the staging folder is gone


def _needed_shards(folder: Path, page: str) -> set[str]:
    """The shards a report with one scanned shard per split must read: the first of each split and those holding
    a contact-sheet video."""
    needed = set()
    for index_file in folder.glob("ssv2-*.json"):
        if not index_file.name.endswith(".stats.json"):
            needed.add(read_index(index_file)["shardlist"][0]["url"])
    for split in ("train", "validation"):
        shard_of = {line["id"]: line["shard"] for line in read_manifest(folder / f"ssv2-{split}.manifest.jsonl")}
        needed |= {shard_of[i] for i in _sheet_rows(page, f"contact-{split}-00.png")}
    return needed


def test_an_s3_report_reads_only_the_shards_it_needs(
    s3, tiny_shards: Path, local_small_report: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssv2prep import storage

    opened: Counter[str] = Counter()
    real_open_read = storage.open_read

    def counting_open_read(url):  # the real reader, counted: which objects the report opens, how often
        opened[storage.basename(url)] += 1
        return real_open_read(url)

    monkeypatch.setattr(storage, "open_read", counting_open_read)
    local_out, _ = local_small_report
    local_page, local_images = _outputs(local_out)
    needed = _needed_shards(tiny_shards, local_page)
    shards = {p.name for p in tiny_shards.glob("*.tar")}
    assert needed < shards  # the test split's second shard at least is not needed
    prefix = f"s3://{s3.new_bucket()}/{tiny_shards.name}"
    _upload(tiny_shards, prefix, {p.name for p in tiny_shards.iterdir() if p.suffix != ".tar"} | needed)
    code, _, stderr = _cli(prefix, "--out", tmp_path / "out", "--max-shards-scanned", "1", *SMALL_SHEETS)
    assert code == 0, stderr
    page, images = _outputs(tmp_path / "out")
    # a shard the report opened beyond those would be a note ("could not be read"/"not found") on the page
    assert "## Notes" not in page
    assert (page, images) == (local_page, local_images)
    assert opened == dict.fromkeys(needed, 1)  # each once: the scan pass also reads the sheet videos it holds


def test_remote_default_out_is_in_the_current_folder_and_scans_two_shards(
    s3, tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3.new_bucket()
    prefix = f"s3://{bucket}/sets/{tiny_shards.name}"
    _upload(tiny_shards, prefix)
    before = s3.keys(bucket)
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = _cli(prefix, "--videos-per-class", "0")
    assert code == 0, stderr
    out = tmp_path / f"{tiny_shards.name}-report"
    assert f"report: {out / 'report.md'} (4 images)" in stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.md", "bytes.png", "frame_sizes.png", "frames_per_video.png", "videos_per_class.png"]
    )
    assert s3.keys(bucket) == before  # nothing written to the bucket
    page = (out / "report.md").read_text(encoding="utf-8")
    assert "train (2 of 4 shards scanned" in page and "validation (2 of 2 shards scanned" in page


def test_local_default_out_is_beside_the_shard_folder_and_writes_nothing_into_it(
    tiny_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards = tmp_path / "sets" / "shards"
    shards.mkdir(parents=True)
    for path in tiny_shards.iterdir():
        if path.is_file():
            (shards / path.name).write_bytes(path.read_bytes())
    before = {p.relative_to(shards): p.stat().st_mtime_ns for p in shards.rglob("*")}
    monkeypatch.chdir(shards)  # even run from inside the shard folder
    code, stdout, stderr = _cli(".", "--videos-per-class", "0")
    assert code == 0, stderr
    assert {p.relative_to(shards): p.stat().st_mtime_ns for p in shards.rglob("*")} == before
    out = tmp_path / "sets" / "shards-report"
    assert f"report: {out / 'report.md'} (4 images)" in stdout
    assert "train (4 of 4 shards scanned" in (out / "report.md").read_text(encoding="utf-8")


def test_an_index_over_http_gives_the_same_split_report(tiny_shards: Path, tmp_path: Path) -> None:
    from httpserver import FaultyServer

    args = ("--max-shards-scanned", "1", *SMALL_SHEETS)
    code, _, stderr = _cli(tiny_shards / "ssv2-validation.json", "--out", tmp_path / "local", *args)
    assert code == 0, stderr
    with FaultyServer(tiny_shards) as server:
        url = server.url_for("/ssv2-validation.json")
        code, stdout, stderr = _cli(url, "--out", tmp_path / "http", *args)
        assert code == 0, stderr
        folder_url = url.rsplit("/", 1)[0]
        code, _, stderr = _cli(folder_url, "--out", tmp_path / "x")
    (page, images), (local_page, local_images) = _outputs(tmp_path / "http"), _outputs(tmp_path / "local")
    assert page.startswith("# Dataset report: shards\n")  # the server's root has no name
    assert page.split("\n", 1)[1] == local_page.split("\n", 1)[1] and images == local_images
    assert "validation: 4 ok, 0 failed, 0 missing in 2 shards" in stdout
    assert list(_table_rows(_outputs(tmp_path / "http")[0])) == ["validation"]
    _assert_one_line_error(code, stderr, folder_url, "cannot be listed", "ssv2-<split>.json")


def _assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_bad_urls_and_missing_indexes_are_one_line_errors(s3, tiny_shards: Path, tmp_path: Path) -> None:
    code, _, stderr = _cli("ftp://host/shards", "--out", tmp_path / "a")
    _assert_one_line_error(code, stderr, "ftp://host/shards", "unknown scheme ftp://")
    bucket = s3.new_bucket()
    for prefix in (f"s3://{bucket}/nothing-here", f"s3://{bucket}-absent/x"):
        code, _, stderr = _cli(prefix, "--out", tmp_path / "b")
        _assert_one_line_error(code, stderr, prefix, "no shard index")
    code, _, stderr = _cli(tmp_path / "absent", "--out", tmp_path / "c")
    _assert_one_line_error(code, stderr, str(tmp_path / "absent"), "no shard index")
    code, _, stderr = _cli(tiny_shards, "--out", "https://host/report")
    _assert_one_line_error(code, stderr, "--out", "https://host/report", "read-only")
    code, _, stderr = _cli(tiny_shards, "--out", "ftp://host/report")
    _assert_one_line_error(code, stderr, "ftp://host/report", "unknown scheme ftp://")
    from ssv2prep import storage

    storage.write_bytes(f"s3://{bucket}/broken/ssv2-validation.json", b'{"shardlist": 3}')
    code, _, stderr = _cli(f"s3://{bucket}/broken", "--out", tmp_path / "d")
    _assert_one_line_error(code, stderr, f"s3://{bucket}/broken/ssv2-validation.json", "not a shard index")
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_contact_sheet_videos_come_from_scanned_shards_first(tmp_path: Path) -> None:
    from ssv2prep.report import _choose, _Entry, _Split

    # class 0: 3 videos in the scanned shard a, 3 elsewhere; class 1: 1 in a, 4 elsewhere; class 2: none in a
    layout = {0: ["a"] * 3 + ["b"] * 3, 1: ["a"] + ["c"] * 4, 2: ["b", "c"]}
    entries = [
        _Entry(id=f"{c}{k}", label=c, status="ok", shard=f"{shard}.tar", num_frames=20)
        for c, shards in layout.items()
        for k, shard in enumerate(shards)
    ]
    split = _Split("train", tmp_path / "x.json", {}, ["x", "y", "z"], entries, True, None)
    every = {"a.tar", "b.tar", "c.tar"}
    for seed in range(5):
        chosen = _choose(split, 2, seed, {"a.tar"})
        by_class = {c: [e for e in chosen if e.label == c] for c in layout}
        assert [len(v) for v in by_class.values()] == [2, 2, 2]
        assert {e.shard for e in by_class[0]} == {"a.tar"}
        assert sorted(e.shard for e in by_class[1]) == ["a.tar", "c.tar"]
        assert chosen == _choose(split, 2, seed, {"a.tar"})  # seeded
        assert _choose(split, 2, seed, every) == _choose(split, 2, seed)  # everything scanned: a plain draw
    assert len({tuple(e.id for e in _choose(split, 2, seed, {"a.tar"})) for seed in range(8)}) > 1


def test_a_contact_sheet_read_extracts_only_the_members_of_its_videos(
    tiny_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the scan's sample JSONs to collect, a shard read for contact-sheet videos extracts their members and
    nothing else (over S3 each extracted member is a ranged read), and stops after the last of them."""
    import tarfile

    from ssv2prep import report

    shard = tiny_shards / "ssv2-train-000001.tar"
    with tarfile.open(shard) as tar:
        names = tar.getnames()
    keys = list(dict.fromkeys(n.split(".", 1)[0] for n in names))
    assert len(keys) == 3
    extracted: list[str] = []
    real_extractfile = tarfile.TarFile.extractfile

    def counting_extractfile(self, member):  # the real method, recorded
        extracted.append(member.name)
        return real_extractfile(self, member)

    monkeypatch.setattr(tarfile.TarFile, "extractfile", counting_extractfile)
    metas, samples = report._read_shard(str(shard), {keys[1]}, metas=False)
    assert metas == [] and list(samples) == [keys[1]]
    assert extracted == [n for n in names if n.split(".", 1)[0] == keys[1]]
    with tarfile.open(shard) as tar:
        assert samples[keys[1]].members["json"] == real_extractfile(tar, f"{keys[1]}.json").read()
