"""Tests for `ssv2prep.prep.extract`: every SSv2 packaging, labels, damaged archives, tar-slip and resume.

Fixtures are built here: a dozen random byte blobs named `<id>.webm` (extract never decodes them) in a
gzip tar, split byte-wise into parts with plain slicing, optionally zip-wrapped.
"""

from __future__ import annotations

import io
import os
import random
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from ssv2prep.errors import ExtractError
from ssv2prep.prep.extract import (
    JOINED_NAME,
    LABELS_ZIP_NAME,
    VIDEO_DIR_NAME,
    _link_or_copy,
    extract_dataset,
    find_layout,
)

LABELS_NEW = {
    "labels.json": b'{"Pushing something": "0", "Pulling something": "1"}\n',
    "train.json": b'[{"id": "1", "label": "push cup", "template": "Pushing [something]", "placeholders": ["cup"]}]\n',
    "validation.json": b'[{"id": "2", "label": "pulling a pen", "template": "Pulling [something]"}]\n',
    "test.json": b'[{"id": "3"}]\n',
    "test-answers.csv": b"3;Pushing something\n",
}
OLD_PREFIX = "something-something-v2-"


# ---------------------------------------------------------------------------------------------------------------------
# Fixture builders.


def make_videos(n: int = 12, seed: int = 0) -> dict[str, bytes]:
    """`<id>.webm` -> random bytes of 2000..9000 bytes (incompressible, like real video)."""
    rng = random.Random(seed)
    return {f"{i}.webm": rng.randbytes(rng.randint(2000, 9000)) for i in range(1, n + 1)}


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_600_000_000
    for key, value in attrs.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def make_tar(videos: dict[str, bytes], *, extra: Callable[[tarfile.TarFile], None] | None = None, mode: str = "w:gz"):
    """The archive bytes: the top folder, then the videos, then whatever `extra` adds."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        _add(tar, VIDEO_DIR_NAME, type=tarfile.DIRTYPE, mode=0o755)
        for name, data in videos.items():
            _add(tar, f"{VIDEO_DIR_NAME}/{name}", data, mode=0o644)
        if extra is not None:
            extra(tar)
    return buf.getvalue()


def split_bytes(data: bytes, n: int) -> list[bytes]:
    size = -(-len(data) // n)
    return [data[i * size : (i + 1) * size] for i in range(n)]


def part_name(i: int) -> str:
    return f"{VIDEO_DIR_NAME}-{i:02d}"


def write_parts(src: Path, chunks: list[bytes], *, wrap: tuple[bool, ...] | bool = False, suffix: str = "") -> None:
    """Write parts `-00..`; `wrap` zip-wraps (per part or all); `suffix` names raw parts (e.g. a misleading .zip)."""
    src.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks):
        zipped = wrap[i] if isinstance(wrap, tuple) else wrap
        if zipped:
            with zipfile.ZipFile(src / f"{part_name(i)}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                zf.writestr(part_name(i), chunk)
        else:
            (src / f"{part_name(i)}{suffix}").write_bytes(chunk)


def write_loose_labels(folder: Path, *, old: bool = False, answers: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in LABELS_NEW.items():
        if name == "test-answers.csv" and not answers:
            continue
        (folder / (OLD_PREFIX + name if old else name)).write_bytes(data)


def write_labels_zip(src: Path, *, old: bool = False) -> None:
    src.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src / LABELS_ZIP_NAME, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("labels/", b"")
        for name, data in LABELS_NEW.items():
            zf.writestr(f"labels/{OLD_PREFIX + name if old else name}", data)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def files_outside(root: Path, dest: Path) -> dict[str, int]:
    """Every path under `root` that is not under `dest`, with its size (0 for directories)."""
    out = {}
    for p in root.rglob("*"):
        if p == dest or dest in p.parents:
            continue
        out[str(p)] = p.lstat().st_size if not p.is_dir() else 0
    return out


@pytest.fixture
def videos() -> dict[str, bytes]:
    return make_videos()


@pytest.fixture
def archive(videos: dict[str, bytes]) -> bytes:
    return make_tar(videos)


# ---------------------------------------------------------------------------------------------------------------------
# Every layout gives the same DEST.


def _raw2(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    write_parts(src, split_bytes(archive, 2))


def _raw5(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    write_parts(src, split_bytes(archive, 5))


def _zip5(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    write_parts(src, split_bytes(archive, 5), wrap=True)


def _zip_mixed(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    write_parts(src, split_bytes(archive, 3), wrap=(True, False, True))


def _raw_misnamed_zip(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    write_parts(src, split_bytes(archive, 2), suffix=".zip")


def _joined(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / JOINED_NAME).write_bytes(archive)


def _folder(src: Path, archive: bytes, videos: dict[str, bytes]) -> None:
    folder = src / VIDEO_DIR_NAME
    folder.mkdir(parents=True)
    for name, data in videos.items():
        (folder / name).write_bytes(data)


LAYOUTS = {
    "raw-2-parts": (_raw2, "raw-parts", [part_name(0), part_name(1)]),
    "raw-5-parts": (_raw5, "raw-parts", [part_name(i) for i in range(5)]),
    "zip-5-parts": (_zip5, "zip-parts", [f"{part_name(i)}.zip" for i in range(5)]),
    "zip-and-raw-mixed": (_zip_mixed, "zip-parts", [f"{part_name(0)}.zip", part_name(1), f"{part_name(2)}.zip"]),
    "raw-named-zip": (_raw_misnamed_zip, "raw-parts", [f"{part_name(0)}.zip", f"{part_name(1)}.zip"]),
    "joined-tar-gz": (_joined, "tar.gz", [JOINED_NAME]),
    "folder": (_folder, "folder", []),
}


@pytest.mark.parametrize("layout_id", list(LAYOUTS))
def test_every_layout_gives_identical_dest(
    tmp_path: Path, videos: dict[str, bytes], archive: bytes, layout_id: str
) -> None:
    build, kind, parts = LAYOUTS[layout_id]
    src, dest = tmp_path / "src", tmp_path / "dest"
    build(src, archive, videos)
    write_loose_labels(src)

    assert find_layout(src).kind == kind
    result = extract_dataset(src, dest)

    assert result.layout == kind
    assert list(result.parts) == parts
    assert result.videos_dir == dest / VIDEO_DIR_NAME
    assert result.labels_dir == dest / "labels"
    assert (result.written, result.skipped, result.ignored) == (12, 0, 0)
    assert result.bytes_written == sum(len(v) for v in videos.values())
    # Byte-identical videos and no temporary files left beside them.
    assert tree(dest / VIDEO_DIR_NAME) == videos
    assert tree(dest / "labels") == LABELS_NEW


def test_folder_layout_hard_links_on_the_same_file_system(tmp_path: Path, videos: dict[str, bytes]) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _folder(src, b"", videos)
    write_loose_labels(src / "labels")
    extract_dataset(src, dest)
    for name in videos:
        assert os.stat(dest / VIDEO_DIR_NAME / name).st_ino == os.stat(src / VIDEO_DIR_NAME / name).st_ino
        assert not (dest / VIDEO_DIR_NAME / name).is_symlink()


def test_folder_given_directly_with_labels_beside_it(tmp_path: Path, videos: dict[str, bytes]) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    _folder(src, b"", videos)
    write_loose_labels(src / "labels", old=True)
    result = extract_dataset(src / VIDEO_DIR_NAME, dest)
    assert result.layout == "folder"
    assert tree(dest / VIDEO_DIR_NAME) == videos
    assert tree(dest / "labels") == LABELS_NEW


def test_copy_fallback_writes_an_independent_file(tmp_path: Path) -> None:
    source, target = tmp_path / "a.webm", tmp_path / "out" / "a.webm"
    source.write_bytes(b"\x1a\x45\xdf\xa3" * 100)
    target.parent.mkdir()
    assert _link_or_copy(source, target, try_link=False) is False
    assert target.read_bytes() == source.read_bytes()
    assert os.stat(target).st_ino != os.stat(source).st_ino
    assert _link_or_copy(source, tmp_path / "out" / "b.webm", try_link=True) is True
    assert os.stat(tmp_path / "out" / "b.webm").st_ino == os.stat(source).st_ino


def test_archive_next_to_a_partial_folder_wins(tmp_path: Path, videos: dict[str, bytes], archive: bytes) -> None:
    src = tmp_path / "src"
    _raw2(src, archive, videos)
    _folder(src, b"", {"1.webm": videos["1.webm"]})
    assert find_layout(src).kind == "raw-parts"


# ---------------------------------------------------------------------------------------------------------------------
# Labels.

LABEL_SOURCES: dict[str, Callable[[Path], None]] = {
    "new-names-in-src": lambda src: write_loose_labels(src),
    "old-names-in-src": lambda src: write_loose_labels(src, old=True),
    "new-names-in-src-labels": lambda src: write_loose_labels(src / "labels"),
    "old-names-in-src-labels": lambda src: write_loose_labels(src / "labels", old=True),
    "labels-zip": lambda src: write_labels_zip(src),
    "labels-zip-old-names": lambda src: write_labels_zip(src, old=True),
}


@pytest.mark.parametrize("source", list(LABEL_SOURCES))
def test_labels_are_written_under_the_new_names(tmp_path: Path, archive: bytes, source: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    LABEL_SOURCES[source](src)
    result = extract_dataset(src, dest)
    assert tree(result.labels_dir) == LABELS_NEW


def test_test_answers_are_optional(tmp_path: Path, archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    write_loose_labels(src, answers=False)
    result = extract_dataset(src, dest)
    assert sorted(p.name for p in result.labels_dir.iterdir()) == [
        "labels.json",
        "test.json",
        "train.json",
        "validation.json",
    ]


def test_labels_zip_wins_over_loose_files(tmp_path: Path, archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    write_labels_zip(src)
    (src / "train.json").write_bytes(b"[]")
    extract_dataset(src, dest)
    assert (dest / "labels" / "train.json").read_bytes() == LABELS_NEW["train.json"]


def test_missing_labels_name_what_was_looked_for(tmp_path: Path, archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    with pytest.raises(ExtractError, match=r"labels\.json.*train\.json.*validation\.json.*test\.json") as err:
        extract_dataset(src, dest)
    assert LABELS_ZIP_NAME in str(err.value)
    assert OLD_PREFIX in str(err.value)
    assert not (dest / VIDEO_DIR_NAME).exists()  # labels are checked before any video is written


def test_one_missing_label_file_is_named(tmp_path: Path, archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    write_loose_labels(src)
    (src / "test.json").unlink()
    with pytest.raises(ExtractError, match=r"labels missing: test\.json;"):
        extract_dataset(src, dest)


# ---------------------------------------------------------------------------------------------------------------------
# Layout errors: missing, misordered, non-gzip, truncated, corrupt.


def test_missing_middle_part_is_named(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    write_parts(src, split_bytes(archive, 5))
    (src / part_name(1)).unlink()
    with pytest.raises(ExtractError, match=rf"part 01 \({part_name(1)}\) is missing \(found parts 00, 02, 03, 04\)"):
        extract_dataset(src, tmp_path / "dest")


def test_missing_first_part_is_named(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    write_parts(src, split_bytes(archive, 5), wrap=True)
    (src / f"{part_name(0)}.zip").unlink()
    with pytest.raises(ExtractError, match=r"part 00 .* is missing"):
        find_layout(src)


def test_first_part_that_is_not_gzip_start_is_named(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    chunks = split_bytes(archive, 5)
    chunks[0], chunks[2] = chunks[2], chunks[0]  # parts saved under the wrong numbers
    write_parts(src, chunks)
    with pytest.raises(ExtractError, match=r"part 00 \(.*\): not the first part of a gzip archive"):
        extract_dataset(src, tmp_path / "dest")


def test_plain_tar_parts_are_refused_at_part_00(tmp_path: Path, videos: dict[str, bytes]) -> None:
    src = tmp_path / "src"
    write_parts(src, split_bytes(make_tar(videos, mode="w"), 2), wrap=True)
    with pytest.raises(ExtractError, match=r"part 00 .*not the first part of a gzip archive.*1f 8b"):
        find_layout(src)


def test_joined_archive_that_is_not_gzip_is_named(tmp_path: Path, videos: dict[str, bytes]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / JOINED_NAME).write_bytes(make_tar(videos, mode="w"))
    with pytest.raises(ExtractError, match=rf"{re.escape(JOINED_NAME)}: not a gzip archive"):
        find_layout(src)


def test_parts_out_of_order_are_named_and_leave_no_garbage(
    tmp_path: Path, videos: dict[str, bytes], archive: bytes
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    chunks = split_bytes(archive, 5)
    chunks[1], chunks[2] = chunks[2], chunks[1]
    write_parts(src, chunks)
    write_loose_labels(src)
    with pytest.raises(ExtractError, match=r"part 0[1-4] \(.*\): archive data is corrupt.*out of order"):
        extract_dataset(src, dest)
    # Whatever is left is exactly right: videos written from the damaged stream were removed again.
    left = tree(dest / VIDEO_DIR_NAME)
    assert all(videos.get(name) == data for name, data in left.items())


def test_later_part_with_gzip_magic_is_hinted(tmp_path: Path, videos: dict[str, bytes]) -> None:
    """Parts from two different downloads: 01 of the second set starts a new gzip stream."""
    src, dest = tmp_path / "src", tmp_path / "dest"
    first = split_bytes(make_tar(videos), 2)
    second = make_tar(make_videos(seed=1))
    write_parts(src, [first[0], second])
    write_loose_labels(src)
    with pytest.raises(ExtractError, match=r"part 01 .* also starts with gzip magic"):
        extract_dataset(src, dest)


@pytest.mark.parametrize("cut", ["half-of-last-part", "gzip-trailer-only"])
def test_truncated_last_part_is_named(tmp_path: Path, videos: dict[str, bytes], archive: bytes, cut: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    chunks = split_bytes(archive, 4)
    chunks[-1] = chunks[-1][: len(chunks[-1]) // 2] if cut == "half-of-last-part" else chunks[-1][:-4]
    write_parts(src, chunks, wrap=True)
    write_loose_labels(src)
    with pytest.raises(ExtractError, match=rf"part 03 \({part_name(3)}\.zip\): the archive is truncated"):
        extract_dataset(src, dest)
    left = tree(dest / VIDEO_DIR_NAME)
    assert all(videos[name] == data for name, data in left.items())  # the intact prefix is kept, no partial file
    if cut == "gzip-trailer-only":
        assert left == videos  # every video came through; only the gzip end marker was missing


def test_missing_last_part_reads_as_truncated(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    write_parts(src, split_bytes(archive, 5))
    (src / part_name(4)).unlink()
    write_loose_labels(src)
    with pytest.raises(ExtractError, match=r"part 03 .*: the archive is truncated.*or the parts after it"):
        extract_dataset(src, tmp_path / "dest")


def test_ambiguous_and_empty_sources(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(ExtractError, match=r"no SSv2 videos found; looked for .*-NN parts.*tar\.gz.*folder"):
        find_layout(src)
    write_parts(src, split_bytes(archive, 2))
    (src / JOINED_NAME).write_bytes(archive)
    with pytest.raises(ExtractError, match=r"both split parts .* and .*tar\.gz"):
        find_layout(src)
    (src / JOINED_NAME).unlink()
    write_parts(src, split_bytes(archive, 2)[:1], wrap=True)
    with pytest.raises(ExtractError, match=r"part 00 appears twice"):
        find_layout(src)
    with pytest.raises(ExtractError, match=r"not a directory"):
        find_layout(src / part_name(1))


def test_zip_wrapper_with_two_files_is_named(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    write_parts(src, split_bytes(archive, 2), wrap=True)
    with zipfile.ZipFile(src / f"{part_name(1)}.zip", "a") as zf:
        zf.writestr("readme.txt", b"hello")
    with pytest.raises(ExtractError, match=r"part 01 .*holds 2 files; expected one raw part"):
        find_layout(src)


# ---------------------------------------------------------------------------------------------------------------------
# Tar-slip and unsafe members.


def _evil_members(tmp_path: Path) -> dict[str, tuple[str, Callable[[tarfile.TarFile], None]]]:
    abs_name = str(tmp_path / "abs.webm")
    top = VIDEO_DIR_NAME
    return {
        "dotdot": ("../evil.webm", lambda t: _add(t, "../evil.webm", b"evil")),
        "dotdot-inside-top": (f"{top}/../../evil.webm", lambda t: _add(t, f"{top}/../../evil.webm", b"evil")),
        "absolute": (abs_name, lambda t: _add(t, abs_name, b"evil")),
        "symlink": (f"{top}/link.webm", lambda t: _add(t, f"{top}/link.webm", type=tarfile.SYMTYPE, linkname="../x")),
        "symlink-abs": (f"{top}/l.webm", lambda t: _add(t, f"{top}/l.webm", type=tarfile.SYMTYPE, linkname="/etc")),
        "hardlink": (
            f"{top}/h.webm",
            lambda t: _add(t, f"{top}/h.webm", type=tarfile.LNKTYPE, linkname=f"{top}/1.webm"),
        ),
        "fifo": (f"{top}/f.webm", lambda t: _add(t, f"{top}/f.webm", type=tarfile.FIFOTYPE)),
        "device": (f"{top}/d.webm", lambda t: _add(t, f"{top}/d.webm", type=tarfile.CHRTYPE, devmajor=1, devminor=3)),
    }


@pytest.mark.parametrize(
    "kind", ["dotdot", "dotdot-inside-top", "absolute", "symlink", "symlink-abs", "hardlink", "fifo", "device"]
)
def test_unsafe_members_are_refused_and_nothing_lands_outside_dest(
    tmp_path: Path, videos: dict[str, bytes], kind: str
) -> None:
    member_name, add_evil = _evil_members(tmp_path)[kind]
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(make_tar(videos, extra=add_evil), 2))
    write_loose_labels(src)
    before = files_outside(tmp_path, dest)

    with pytest.raises(ExtractError, match=rf"archive member {re.escape(repr(member_name))}: .*refus"):
        extract_dataset(src, dest)

    assert files_outside(tmp_path, dest) == before
    assert not (tmp_path / "evil.webm").exists() and not (tmp_path / "abs.webm").exists()
    # Inside DEST only real videos, no link or special file.
    for path in (dest / VIDEO_DIR_NAME).iterdir():
        assert path.is_file() and not path.is_symlink()
        assert path.read_bytes() == videos[path.name]


def test_videos_dir_linking_outside_dest_is_refused(tmp_path: Path, archive: bytes) -> None:
    src, dest, elsewhere = tmp_path / "src", tmp_path / "dest", tmp_path / "elsewhere"
    write_parts(src, split_bytes(archive, 2))
    write_loose_labels(src)
    elsewhere.mkdir()
    dest.mkdir()
    (dest / VIDEO_DIR_NAME).symlink_to(elsewhere)
    with pytest.raises(ExtractError, match=r"outside DEST"):
        extract_dataset(src, dest)
    assert list(elsewhere.iterdir()) == []


def test_other_files_are_skipped_and_counted(tmp_path: Path, videos: dict[str, bytes]) -> None:
    def extra(tar: tarfile.TarFile) -> None:
        _add(tar, f"{VIDEO_DIR_NAME}/README.txt", b"notes")
        _add(tar, f"{VIDEO_DIR_NAME}/sub", type=tarfile.DIRTYPE, mode=0o755)
        _add(tar, f"{VIDEO_DIR_NAME}/sub/99.webm", b"nested")
        _add(tar, "other/98.webm", b"outside the top folder")

    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(make_tar(videos, extra=extra), 3))
    write_loose_labels(src)
    result = extract_dataset(src, dest)
    assert (result.written, result.ignored) == (12, 3)
    assert tree(dest) == {
        **{f"{VIDEO_DIR_NAME}/{k}": v for k, v in videos.items()},
        **{f"labels/{k}": v for k, v in LABELS_NEW.items()},
    }


# ---------------------------------------------------------------------------------------------------------------------
# Re-runs, resume, progress and streaming.


def test_rerun_skips_everything_and_touches_nothing(tmp_path: Path, videos: dict[str, bytes], archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 5), wrap=True)
    write_labels_zip(src)
    extract_dataset(src, dest)
    stamps = {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in dest.rglob("*") if p.is_file()}

    result = extract_dataset(src, dest)

    assert (result.written, result.skipped, result.bytes_written) == (0, 12, 0)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in dest.rglob("*") if p.is_file()} == stamps


def test_rerun_resumes_missing_and_wrong_sized_videos(tmp_path: Path, videos: dict[str, bytes], archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    write_loose_labels(src)
    extract_dataset(src, dest)
    out = dest / VIDEO_DIR_NAME
    (out / "2.webm").unlink()
    (out / "5.webm").unlink()
    (out / "7.webm").write_bytes(b"partial")
    (out / ".9.webm.abc123.tmp").write_bytes(b"left by a killed run")

    result = extract_dataset(src, dest)

    assert (result.written, result.skipped) == (3, 9)
    assert result.bytes_written == sum(len(videos[n]) for n in ("2.webm", "5.webm", "7.webm"))
    assert tree(out) == videos


def test_progress_reports_compressed_bytes_up_to_the_total(tmp_path: Path, archive: bytes) -> None:
    src = tmp_path / "src"
    write_parts(src, split_bytes(archive, 5), wrap=True)
    write_loose_labels(src)
    calls: list[tuple[int, int | None]] = []
    extract_dataset(src, tmp_path / "dest", on_progress=lambda done, total: calls.append((done, total)))
    assert len(calls) >= 5  # at least once per part
    assert calls[-1] == (len(archive), len(archive))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert {total for _, total in calls} == {len(archive)}


def test_parts_are_streamed_never_joined_on_disk(
    tmp_path: Path, videos: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest, scratch = tmp_path / "src", tmp_path / "dest", tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # any tempfile use lands where we can see it
    archive = make_tar(videos)
    write_parts(src, split_bytes(archive, 6))
    write_loose_labels(src)
    largest_video = max(len(v) for v in videos.values())
    assert len(archive) > 5 * largest_video  # so a joined copy would stand out
    seen: list[int] = []

    def watch(done: int, total: int | None) -> None:
        seen.extend(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file() and src not in p.parents)

    extract_dataset(src, dest, on_progress=watch)
    assert len(seen) > 0
    assert max(seen) <= largest_video
    assert tree(dest / VIDEO_DIR_NAME) == videos
    assert list(scratch.iterdir()) == []


def test_rerun_rewrites_a_video_changed_at_the_same_size(
    tmp_path: Path, videos: dict[str, bytes], archive: bytes
) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    write_loose_labels(src)
    extract_dataset(src, dest)
    changed = dest / VIDEO_DIR_NAME / "4.webm"
    changed.write_bytes(bytes(len(videos["4.webm"])))  # same size, other bytes

    result = extract_dataset(src, dest)

    assert (result.written, result.skipped) == (1, 11)
    assert tree(dest / VIDEO_DIR_NAME) == videos


def test_rerun_of_a_copied_folder_rewrites_a_video_changed_at_the_same_size(
    tmp_path: Path, videos: dict[str, bytes]
) -> None:
    src = tmp_path / "src"
    (src / VIDEO_DIR_NAME).mkdir(parents=True)
    for name, data in videos.items():
        (src / VIDEO_DIR_NAME / name).write_bytes(data)
    write_loose_labels(src)
    dest = tmp_path / "dest"
    extract_dataset(src, dest)
    target = dest / VIDEO_DIR_NAME / "3.webm"
    target.unlink()  # break the hard link: an independent copy whose bytes then change
    target.write_bytes(bytes(len(videos["3.webm"])))

    result = extract_dataset(src, dest)

    assert (result.written, result.skipped) == (1, 11)
    assert tree(dest / VIDEO_DIR_NAME) == videos


def test_a_second_extract_into_the_same_dest_fails_naming_the_holder(tmp_path: Path, archive: bytes) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    write_parts(src, split_bytes(archive, 2))
    write_loose_labels(src)
    from ssv2prep.fsutil import OutputLockedError, output_lock

    with output_lock(dest):  # this process stands for the first run
        message = rf"{re.escape(str(dest))}: --dest is in use by process {os.getpid()}"
        with pytest.raises(OutputLockedError, match=message):
            extract_dataset(src, dest)
        assert not (dest / VIDEO_DIR_NAME).exists()  # refused before writing anything
    assert sorted(p.name for p in dest.iterdir()) == []  # the lock file goes with its holder
    assert extract_dataset(src, dest).written == 12
