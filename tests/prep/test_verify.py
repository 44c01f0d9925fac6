"""`verify`: names from an index never leave the folder; a split without its index is never OK."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures import read_json, shard_config

from ssv2prep.errors import ShardError
from ssv2prep.prep.prepare import shard_dataset
from ssv2prep.prep.verify import verify_folder


def copy_shards(tiny_shards: Path, dst: Path) -> Path:
    shutil.copytree(tiny_shards, dst)
    return dst


def edit_index(path: Path, edit) -> None:
    index = read_json(path)
    edit(index)
    path.write_text(json.dumps(index))


def test_tiny_shards_verify_ok(tiny_shards: Path) -> None:
    report = verify_folder(tiny_shards, decode=False)
    assert report.ok, report.problems
    assert report.splits == {"test": 4, "train": 12, "validation": 4}


@pytest.mark.parametrize("url", ["../outside.tar", "/ABS/outside.tar", "sub/../../outside.tar"])
def test_a_shard_url_outside_the_folder_is_refused_not_read(tiny_shards: Path, tmp_path: Path, url: str) -> None:
    shards = copy_shards(tiny_shards, tmp_path / "shards")
    # The shard really is outside, byte for byte as the index records it: reading it would pass every check.
    (shards / "ssv2-validation-000000.tar").rename(tmp_path / "outside.tar")
    url = url.replace("/ABS", str(tmp_path))
    edit_index(shards / "ssv2-validation.json", lambda ix: ix["shardlist"][0].update(url=url))

    report = verify_folder(shards, decode=False)

    problems = [p for p in report.problems if "ssv2-validation.json" in p]
    assert len(problems) == 1 and f"url {url!r}" in problems[0] and "outside" in problems[0], report.problems
    assert "validation" not in report.splits  # nothing of that split was read


def test_a_class_list_outside_the_folder_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(tiny_shards, tmp_path / "shards")
    (shards / "classes.json").rename(tmp_path / "classes.json")
    edit_index(shards / "ssv2-train.json", lambda ix: ix.update(classes="../classes.json"))
    report = verify_folder(shards, decode=False)
    assert any("ssv2-train.json" in p and "classes '../classes.json'" in p for p in report.problems), report.problems


def test_a_deleted_index_is_named_and_fails(tiny_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(tiny_shards, tmp_path / "shards")
    (shards / "ssv2-train.json").unlink()
    report = verify_folder(shards, decode=False)
    assert not report.ok
    assert [p for p in report.problems if p.startswith("split train:")] == [
        "split train: 4 shards (or its manifest) but no index ssv2-train.json (unfinished --part runs, or a deleted "
        "index); re-run shard without --part once all parts are done"
    ]
    assert report.splits == {"test": 4, "validation": 4}  # the others are still checked


def test_unfinished_part_runs_fail_naming_each_waiting_split(synth_tiny, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    cfg = shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, part=(1, 2), videos_per_shard=4)
    result = shard_dataset(cfg)
    assert result.incomplete_splits and result.summaries  # the part left some splits waiting, finished others
    report = verify_folder(out, decode=False)
    named = sorted(p.split(":")[0].removeprefix("split ") for p in report.problems if p.startswith("split "))
    assert named == sorted(result.incomplete_splits)
    assert set(report.splits) == set(result.summaries)


def test_only_part_shards_and_no_index_at_all_is_an_error_naming_the_splits(synth_tiny, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    shard_dataset(shard_config(synth_tiny.videos_dir, synth_tiny.labels_dir, out, splits=("train",), part=(1, 2)))
    with pytest.raises(ShardError, match=r"no shard index .* but shards of train: unfinished --part runs"):
        verify_folder(out)


def test_a_split_with_no_sample_is_a_problem(tiny_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(tiny_shards, tmp_path / "shards")
    empty = tmp_path / "empty.tar"
    import tarfile

    with tarfile.open(empty, "w"):
        pass
    for entry in read_json(shards / "ssv2-validation.json")["shardlist"]:
        shutil.copy(empty, shards / entry["url"])
    edit_index(
        shards / "ssv2-validation.json",
        lambda ix: [e.update(nsamples=0, filesize=None, md5sum=None) for e in ix["shardlist"]],
    )
    report = verify_folder(shards, decode=False)
    assert "ssv2-validation.json: split validation holds no samples at all" in report.problems


def corrupt_a_jpeg(shards: Path) -> str:
    """Flip bytes inside the first JPEG member of a validation shard (its size stays, its MD5 changes)."""
    import tarfile

    name = "ssv2-validation-000001.tar"
    path = shards / name
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(path.read_bytes())
    for i in range(member.offset_data + 200, member.offset_data + 260):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return name


def report_fields(report) -> tuple:
    return report.problems, report.splits, report.shards, report.samples, report.frames


def test_two_workers_report_exactly_what_one_does_on_good_and_corrupted_shards(tiny_shards: Path, tmp_path) -> None:
    one, two = verify_folder(tiny_shards, workers=1), verify_folder(tiny_shards, workers=2)
    assert one.ok and report_fields(one) == report_fields(two)
    assert one.shards == 8 and one.samples == 20

    shards = copy_shards(tiny_shards, tmp_path / "shards")
    name = corrupt_a_jpeg(shards)
    (shards / "ssv2-train-000002.tar").unlink()
    bad_one, bad_two = verify_folder(shards, workers=1), verify_folder(shards, workers=2)
    assert report_fields(bad_one) == report_fields(bad_two)
    assert f"{name}: md5 differs from the index" in bad_one.problems
    assert "ssv2-train-000002.tar: missing" in bad_one.problems


def test_cli_verify_workers_keeps_the_one_line_report(tiny_shards: Path) -> None:
    from click.testing import CliRunner

    from ssv2prep.cli import main

    lines = {w: CliRunner().invoke(main, ["verify", str(tiny_shards), "--workers", w]).output for w in ("1", "2")}
    assert lines["1"] == lines["2"]
    assert lines["1"].strip() == "verify: OK: 8 shards, 20 samples (test 4, train 12, validation 4), " + (
        f"{sum(read_json(tiny_shards / f'ssv2-{s}.json')['num_frames'] for s in ('test', 'train', 'validation'))} "
        "frames"
    )


def test_an_index_carries_its_class_names(tiny_shards: Path, tmp_path: Path) -> None:
    from ssv2prep.prep.index import read_classes, read_index

    shards = copy_shards(tiny_shards, tmp_path / "shards")
    names = read_json(shards / "classes.json")
    (shards / "classes.json").unlink()  # self-contained: the index alone is enough
    index = read_index(shards / "ssv2-train.json")
    assert index["class_names"] == names and index["classes"] == "classes.json"
    assert read_classes(shards / "ssv2-train.json", index) == names
    report = verify_folder(shards, decode=False)
    assert report.ok, report.problems


def test_an_index_without_class_names_reads_classes_json_beside_it_or_fails_naming_the_index(
    tiny_shards: Path, tmp_path: Path
) -> None:
    from ssv2prep.prep.index import read_classes, read_index

    shards = copy_shards(tiny_shards, tmp_path / "shards")
    for split in ("train", "validation", "test"):
        edit_index(shards / f"ssv2-{split}.json", lambda ix: ix.pop("class_names"))
    index_file = shards / "ssv2-train.json"
    assert read_classes(index_file, read_index(index_file)) == read_json(shards / "classes.json")  # older indexes

    (shards / "classes.json").unlink()
    with pytest.raises(ShardError, match=rf"^{index_file}: the index carries no class_names and its class list "):
        read_classes(index_file, read_index(index_file))
    report = verify_folder(shards, decode=False)
    assert not report.ok and report.splits == {}  # no split is checked against made-up names
    assert len([p for p in report.problems if "carries no class_names" in p]) == 3


def test_class_names_that_disagree_with_classes_json_are_a_problem(tiny_shards: Path, tmp_path: Path) -> None:
    shards = copy_shards(tiny_shards, tmp_path / "shards")
    edit_index(shards / "ssv2-test.json", lambda ix: ix["class_names"].reverse())
    report = verify_folder(shards, decode=False)
    assert report.problems == ["ssv2-test.json: class_names differ from classes.json beside it"]


def shard_jpegs(shards: Path, name: str) -> list[bytes]:
    import tarfile

    with tarfile.open(shards / name) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]


def error_text(exc: BaseException) -> str:
    """The error's type and message; for bytes PIL cannot identify the type alone, as `verify` reports it (that
    message names the in-memory stream by its address, which differs between processes)."""
    from PIL import UnidentifiedImageError

    return type(exc).__name__ if isinstance(exc, UnidentifiedImageError) else f"{type(exc).__name__}: {exc}"


def full_decode_error(data: bytes) -> str | None:
    """What a full-size PIL decode raises on `data` (None when it decodes): the reference for `decode_check`."""
    import io

    from PIL import Image

    try:
        Image.open(io.BytesIO(data)).load()
    except (OSError, SyntaxError) as exc:
        return error_text(exc)
    return None


def test_decode_check_fails_exactly_where_a_full_size_decode_fails(tiny_shards: Path) -> None:
    import random

    from ssv2prep.prep.verify import decode_check

    def reduced_error(data: bytes) -> str | None:
        try:
            decode_check(data)
        except (OSError, SyntaxError) as exc:
            return error_text(exc)
        return None

    import io

    from PIL import Image

    def reencode(data: bytes, mode: str, **options) -> bytes:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).convert(mode).save(buf, format="JPEG", **options)
        return buf.getvalue()

    frames = shard_jpegs(tiny_shards, "ssv2-train-000000.tar")
    # our writer's baseline 4:2:0 frames, and what other writers emit: progressive, grey, 4:4:4
    jpegs = frames + [
        reencode(f, mode, **options)
        for f in frames[:4]
        for mode, options in (("RGB", {"progressive": True}), ("L", {}), ("RGB", {"subsampling": 0}))
    ]
    rng = random.Random(12)
    outcomes = []
    for trial in range(800):
        data = bytearray(rng.choice(jpegs))
        at = rng.randrange(len(data))
        kind = trial % 4
        if kind == 0:  # flipped bytes anywhere: headers, tables, entropy-coded data
            for _ in range(rng.randint(1, 12)):
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        elif kind == 1:  # truncated
            del data[at:]
        elif kind == 2:  # a zeroed run
            data[at : at + 64] = bytes(len(data[at : at + 64]))
        else:  # a stray marker
            data[at:at] = bytes([0xFF, rng.randrange(256)])
        outcomes.append((full_decode_error(bytes(data)), reduced_error(bytes(data))))
    assert [full for full, _ in outcomes] == [reduced for _, reduced in outcomes]
    failed = sum(full is not None for full, _ in outcomes)
    assert 150 < failed < 700, failed  # both outcomes occur, so the comparison means something
    assert all(reduced_error(j) is None for j in jpegs)


def test_a_frame_that_does_not_decode_is_named_with_any_number_of_workers(tiny_shards: Path, tmp_path) -> None:
    import hashlib
    import io
    import tarfile

    shards = copy_shards(tiny_shards, tmp_path / "shards")
    name = "ssv2-validation-000001.tar"
    # Rewrite the shard with one JPEG cut short and the index updated, so that only decoding can tell.
    src = (shards / name).read_bytes()
    buf = io.BytesIO()
    bad = None
    with tarfile.open(fileobj=io.BytesIO(src)) as tin, tarfile.open(fileobj=buf, mode="w") as tout:
        for member in tin:
            data = tin.extractfile(member).read()
            if bad is None and member.name.endswith("000002.jpg"):
                bad, data = member.name, data[: len(data) // 2]
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    (shards / name).write_bytes(buf.getvalue())
    entry_update = {"filesize": len(buf.getvalue()), "md5sum": hashlib.md5(buf.getvalue()).hexdigest()}
    edit_index(
        shards / "ssv2-validation.json",
        lambda ix: [e.update(entry_update) for e in ix["shardlist"] if e["url"] == name],
    )
    key, _, frame = bad.partition(".")
    with tarfile.open(shards / name) as tar:
        why = full_decode_error(tar.extractfile(bad).read())
    assert why is not None and why.startswith("OSError: ")

    one, two = verify_folder(shards, workers=1), verify_folder(shards, workers=2)
    assert one.problems == [f"{name}: sample {key}: frame {frame} does not decode ({why.removeprefix('OSError: ')})"]
    assert report_fields(one) == report_fields(two)
    assert verify_folder(shards, decode=False).ok  # sizes, MD5s and counts all agree: only the decode finds it
