"""`ssv2prep extract`: an SSv2 download, in any of its packagings, -> DEST/20bn-something-something-v2/ + DEST/labels/.

Layouts of SRC, detected by `find_layout` (nobody has to say which one it is):

- ``raw-parts``: ``20bn-something-something-v2-00`` .. ``-NN``, byte-wise splits of one ``.tar.gz`` (any number of
  parts). A raw part saved under a ``.zip`` name counts as raw: the first bytes decide, never the extension.
- ``zip-parts``: ``20bn-something-something-v2-NN.zip`` whose bytes start with ``PK\\x03\\x04``; each zip wraps one
  member, the raw part.
- ``tar.gz``: the joined ``20bn-something-something-v2.tar.gz``.
- ``folder``: an extracted ``20bn-something-something-v2/`` folder of ``<id>.webm`` (SRC may also be that folder
  itself). Videos are hard-linked into DEST when SRC and DEST share a file system (the bytes are then shared:
  editing one edits the other), else copied. Never symlinked.

An archive found next to an extracted folder wins (the folder may be an earlier, partial extraction).

How archives are read: the parts are read back to back as one stream (zip members streamed with
`zipfile.ZipFile.open`), decompressed by `gzip.GzipFile` and untarred by `tarfile` in stream mode ``"r|"``; the
joined archive never touches the disk and memory stays bounded. `gzip.GzipFile` is used instead of tarfile's
``"r|gz"`` because tarfile's own stream decompressor never checks the gzip CRC or end marker, and tarfile takes a cut
or garbled header after the first one for the end of the archive: a truncated or mis-ordered set of parts would pass
silently. After the tar end the gzip stream is drained so that its trailer is checked.

Members: only regular ``20bn-something-something-v2/<name>.webm`` files are written, each to a temporary name then
renamed. Absolute names, ``..`` components, links, devices and fifos stop the run with an `ExtractError` naming the
member; directories are accepted (nothing is created for them); other regular files are skipped with a warning and
counted in `ExtractResult.ignored`. Each video written gets the archive member's modification time (a copied one,
its source's); a video whose file already exists with the member's size and that time is skipped, so a re-run
resumes, while a file changed since (same size, other bytes: its time moved) is written again. When the stream turns
out corrupt (wrong part order, mixed sets, damaged bytes), the videos written in that run are removed again, since
their bytes cannot be trusted.

Labels: `20bn-something-something-download-package-labels.zip` (members ``labels/*``), else loose files in
``SRC/labels`` or ``SRC`` (or next to SRC when SRC is the videos folder), under either naming scheme. They are
written to DEST/labels/ under the new names: labels.json, train.json, validation.json, test.json and, when present,
test-answers.csv. The first four are required.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ssv2prep.annotations import OLD_PREFIX, find_label_file
from ssv2prep.errors import ExtractError
from ssv2prep.fsutil import CHUNK_BYTES, atomic_open, atomic_write_bytes, output_lock, write_problem

log = logging.getLogger(__name__)

VIDEO_DIR_NAME = "20bn-something-something-v2"
JOINED_NAME = f"{VIDEO_DIR_NAME}.tar.gz"
LABELS_ZIP_NAME = "20bn-something-something-download-package-labels.zip"
LABELS_DIR_NAME = "labels"
LABEL_FILES = ("labels.json", "train.json", "validation.json", "test.json", "test-answers.csv")
REQUIRED_LABEL_FILES = LABEL_FILES[:4]
PART_RE = re.compile(rf"^{re.escape(VIDEO_DIR_NAME)}-(\d{{2}})(\.zip)?$")
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
PROGRESS_STEP_BYTES = 8 << 20
MAX_WARNED = 10
# Names `fsutil.atomic_open` gives its temporary files (`.<target>.<random>.tmp`), left behind by a killed run.
_STALE_TMP_RE = re.compile(r"^\..+\.webm\.[^/]+\.tmp$")
_LINK_FALLBACK_ERRNOS = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK}

ProgressFn = Callable[[int, int | None], None]


@dataclass(frozen=True, slots=True)
class SourcePart:
    """One file of an archive as found in SRC.

    `size_bytes` is what the file adds to the joined stream (the member size for a zip wrapper);
    `zip_member` is the wrapped member's name, None for a raw part; `starts_gzip` tells whether the
    (unwrapped) bytes start with gzip magic.
    """

    index: int
    path: Path
    size_bytes: int
    starts_gzip: bool
    zip_member: str | None = None

    @property
    def label(self) -> str:
        """How messages name the part: `part 03 (20bn-something-something-v2-03.zip)`."""
        if self.path.name == JOINED_NAME:
            return self.path.name
        return f"part {self.index:02d} ({self.path.name})"


@dataclass(frozen=True, slots=True)
class Layout:
    """What SRC holds. `parts` is empty for a folder; `folder` is set only for a folder."""

    kind: str  # "raw-parts" | "zip-parts" | "tar.gz" | "folder"
    src: Path
    parts: tuple[SourcePart, ...] = ()
    folder: Path | None = None


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """What `extract_dataset` produced. `ignored` counts archive files that are not videos (not written)."""

    videos_dir: Path
    labels_dir: Path
    layout: str
    parts: tuple[str, ...]
    written: int
    skipped: int
    bytes_written: int
    ignored: int = 0


@dataclass(slots=True)
class _Run:
    """Where one run writes, and what it did so far (mutated as videos are placed)."""

    dest: Path  # resolved
    videos_dir: Path
    written: int = 0
    skipped: int = 0
    ignored: int = 0
    bytes_written: int = 0
    written_paths: list[Path] = field(default_factory=list)
    safe_dirs: set[Path] = field(default_factory=set)  # folders already resolved to inside DEST

    def check_inside(self, target: Path) -> None:
        """Refuse `target` unless its folder resolves to inside DEST (resolved once per folder and run)."""
        if target.parent not in self.safe_dirs:
            _check_inside(target, self.dest)
            self.safe_dirs.add(target.parent)

    def note_written(self, path: Path, size_bytes: int) -> None:
        """Count a video placed in DEST."""
        self.written += 1
        self.bytes_written += size_bytes
        self.written_paths.append(path)

    def note_ignored(self, name: str) -> None:
        """Count (and warn about) an archive file that is not a video."""
        self.ignored += 1
        if self.ignored <= MAX_WARNED:
            log.warning("extract: skipping %r: not a %s/<id>.webm video", name, VIDEO_DIR_NAME)


# ---------------------------------------------------------------------------------------------------------------------
# Layout detection.


def find_layout(src: str | Path) -> Layout:
    """Detect which packaging of the SSv2 videos SRC holds (see the module docstring).

    Args:
        src: The folder holding the downloaded files, or an extracted `20bn-something-something-v2/` folder.

    Returns:
        The layout; for archives, the parts in stream order, each sniffed (zip wrapper or raw, gzip start).

    Raises:
        ExtractError: SRC is not a folder, holds no videos, holds two kinds of archive, a part is missing or
            duplicated, a zip wrapper does not hold exactly one file, or the first part is not gzip data.
    """
    root = Path(src)
    if not root.is_dir():
        raise ExtractError(f"{root}: not a directory; SRC must be the folder holding the downloaded SSv2 files")
    part_paths = _part_paths(root)
    joined = root / JOINED_NAME
    if part_paths and joined.is_file():
        raise ExtractError(
            f"{root}: holds both split parts ({part_paths[0].name} ...) and {JOINED_NAME}; move one of them away"
        )
    folder = _video_folder(root)
    if part_paths:
        parts = tuple(_sniff_part(p, i) for i, p in enumerate(part_paths))
        layout = Layout("zip-parts" if any(p.zip_member for p in parts) else "raw-parts", root, parts)
    elif joined.is_file():
        layout = Layout("tar.gz", root, (_sniff_part(joined, 0),))
    elif folder is not None:
        return Layout("folder", root, folder=folder)
    else:
        raise ExtractError(
            f"{root}: no SSv2 videos found; looked for {VIDEO_DIR_NAME}-NN parts (raw or .zip), {JOINED_NAME} "
            f"and a {VIDEO_DIR_NAME}/ folder of .webm files"
        )
    if folder is not None:
        log.info("extract: ignoring the folder %s; extracting from the archive in %s instead", folder, root)
    first = layout.parts[0]
    if not first.starts_gzip:
        what = "a gzip archive" if layout.kind == "tar.gz" else "the first part of a gzip archive"
        raise ExtractError(f"{first.label}: not {what} (its data does not start with gzip magic 1f 8b)")
    return layout


def _part_paths(root: Path) -> list[Path]:
    """Part files of SRC in suffix order; they must run from 00 without gaps or duplicates."""
    found: dict[int, list[Path]] = {}
    for path in sorted(root.iterdir()):
        match = PART_RE.match(path.name)
        if match and path.is_file():
            found.setdefault(int(match.group(1)), []).append(path)
    for index, paths in sorted(found.items()):
        if len(paths) > 1:
            names = " and ".join(p.name for p in paths)
            raise ExtractError(f"{root}: part {index:02d} appears twice ({names}); keep one")
    if not found:
        return []
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        have = ", ".join(f"{i:02d}" for i in sorted(found))
        raise ExtractError(
            f"{root}: part {missing[0]:02d} ({VIDEO_DIR_NAME}-{missing[0]:02d}) is missing (found parts {have}); "
            "parts must run from 00 without gaps"
        )
    return [found[i][0] for i in sorted(found)]


def _video_folder(root: Path) -> Path | None:
    """The extracted videos folder in (or at) SRC, if it holds at least one .webm."""
    for candidate in (root / VIDEO_DIR_NAME, root):
        if candidate.name == VIDEO_DIR_NAME and candidate.is_dir() and any(candidate.glob("*.webm")):
            return candidate
    return None


def _sniff_part(path: Path, index: int) -> SourcePart:
    """Look at the first bytes: `PK\\x03\\x04` is a zip wrapper (unwrap it), anything else is raw."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head != ZIP_MAGIC:
            return SourcePart(index, path, path.stat().st_size, head[:2] == GZIP_MAGIC)
        with zipfile.ZipFile(path) as zf:
            members = [info for info in zf.infolist() if not info.is_dir()]
            if len(members) != 1:
                raise ExtractError(
                    f"part {index:02d} ({path.name}): the zip wrapper holds {len(members)} files; expected one raw part"
                )
            with zf.open(members[0]) as fh:
                start = fh.read(2)
        return SourcePart(index, path, members[0].file_size, start == GZIP_MAGIC, members[0].filename)
    except (OSError, zipfile.BadZipFile, NotImplementedError) as exc:  # NotImplementedError: e.g. Deflate64 zips
        raise ExtractError(f"part {index:02d} ({path.name}): cannot read it ({exc})") from exc


# ---------------------------------------------------------------------------------------------------------------------
# Reading the parts as one stream.


class _PartStream(io.RawIOBase):
    """The parts read back to back as one byte stream; knows which part the position is in."""

    def __init__(self, parts: tuple[SourcePart, ...], on_progress: ProgressFn | None) -> None:
        super().__init__()
        self.parts = parts
        self.index = -1  # the part being read; len(parts) once all are read
        self.part_offset = 0
        self.bytes_read = 0
        self.total_bytes = sum(p.size_bytes for p in parts)
        self._on_progress = on_progress
        self._reported = 0
        self._file: io.BufferedIOBase | None = None
        self._zip: zipfile.ZipFile | None = None

    @property
    def current(self) -> SourcePart:
        """The part being read (the last one once the stream is exhausted)."""
        return self.parts[min(max(self.index, 0), len(self.parts) - 1)]

    @property
    def exhausted(self) -> bool:
        """True once every part has been read to its end."""
        return self.index >= len(self.parts)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        """Fill `buffer` from the current part; move on to the next part at its end; 0 at the end of all."""
        while not self.exhausted:
            if self._file is None:
                self._open_next()
                continue
            try:
                n = self._file.readinto(buffer)
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise ExtractError(f"{self.current.label}: cannot read it ({exc}); re-download it") from exc
            if n:
                self.part_offset += n
                self.bytes_read += n
                self._report(force=False)
                return n
            self._close_part()
            self._report(force=True)
        return 0

    def _open_next(self) -> None:
        self.index += 1
        self.part_offset = 0
        if self.exhausted:
            return
        part = self.parts[self.index]
        try:
            if part.zip_member is None:
                self._file = open(part.path, "rb")  # noqa: SIM115 -- closed in _close_part
            else:
                self._zip = zipfile.ZipFile(part.path)
                self._file = self._zip.open(part.zip_member)
        except (OSError, zipfile.BadZipFile, KeyError) as exc:
            self._close_part()
            raise ExtractError(f"{part.label}: cannot open it ({exc})") from exc

    def _close_part(self) -> None:
        for handle in (self._file, self._zip):
            if handle is not None:
                handle.close()
        self._file = self._zip = None

    def _report(self, *, force: bool) -> None:
        if self._on_progress is not None and (force or self.bytes_read - self._reported >= PROGRESS_STEP_BYTES):
            self._reported = self.bytes_read
            self._on_progress(self.bytes_read, self.total_bytes)

    def close(self) -> None:
        self._close_part()
        super().close()


class _CorruptStreamError(ExtractError):
    """The joined stream does not decompress/untar: the bytes written from it cannot be trusted."""


class _CheckedReader:
    """The decompressed stream; turns gzip/zlib failures into `ExtractError`s naming the part being read."""

    def __init__(self, stream: _PartStream) -> None:
        self.stream = stream
        self._gz = gzip.GzipFile(fileobj=stream, mode="rb")

    def read(self, size: int = -1) -> bytes:
        """Read up to `size` decompressed bytes."""
        try:
            return self._gz.read(size)
        except (EOFError, zlib.error, OSError) as exc:  # gzip.BadGzipFile is an OSError
            raise _stream_failure(exc, self.stream) from exc

    def drain(self) -> None:
        """Read to the end of the gzip stream, so that its CRC and length get checked."""
        while self.read(CHUNK_BYTES):
            pass

    def close(self) -> None:
        self._gz.close()
        self.stream.close()


def _stream_failure(exc: BaseException, stream: _PartStream) -> ExtractError:
    """Name what went wrong: a truncated archive (data ends too early) or corrupt data in one part."""
    if isinstance(exc, EOFError):
        last = stream.parts[-1]
        return ExtractError(
            f"{last.label}: the archive is truncated (its data ends before the end of the gzip stream); "
            f"re-download {last.path.name}" + (" or the parts after it" if len(stream.parts) > 1 else "")
        )
    part = stream.current
    later = [p for p in stream.parts[1:] if p.starts_gzip]
    if later:
        hint = f"{later[0].label} also starts with gzip magic, so the parts are probably out of order or mixed sets"
    elif len(stream.parts) > 1:
        hint = "the parts may be out of order, from different downloads, or damaged; check them and re-download"
    else:
        hint = "the file is damaged; re-download it"
    return _CorruptStreamError(
        f"{part.label}: archive data is corrupt around byte {stream.part_offset} of this part ({exc}); {hint}"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Untarring safely.


def _check_member(member: tarfile.TarInfo, dest: Path) -> tuple[str, ...]:
    """Refuse unsafe members; return the name's components without `.` ones."""
    name = member.name
    path = PurePosixPath(name)
    if name.startswith(("/", "\\")) or path.is_absolute():
        raise ExtractError(f"archive member {name!r}: absolute path; refusing to extract it")
    if ".." in path.parts or ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise ExtractError(f"archive member {name!r}: contains a '..' component; refusing to extract it")
    if member.issym() or member.islnk():
        kind = "symbolic" if member.issym() else "hard"
        raise ExtractError(f"archive member {name!r}: a {kind} link to {member.linkname!r}; refusing to extract it")
    if not (member.isreg() or member.isdir()):
        raise ExtractError(f"archive member {name!r}: a device, fifo or other special file; refusing to extract it")
    data_filter = getattr(tarfile, "data_filter", None)
    if data_filter is not None:
        try:
            data_filter(member, str(dest))
        except tarfile.FilterError as exc:
            raise ExtractError(f"archive member {name!r}: refused by tarfile's data filter ({exc})") from exc
    return tuple(p for p in path.parts if p != ".")


def _video_target(parts: tuple[str, ...], run: _Run) -> Path | None:
    """DEST path of a `20bn-something-something-v2/<name>.webm` member, None for any other file."""
    if len(parts) != 2 or parts[0] != VIDEO_DIR_NAME or not parts[1].endswith(".webm") or parts[1] == ".webm":
        return None
    target = run.videos_dir / parts[1]
    run.check_inside(target)
    return target


def _check_inside(target: Path, dest: Path) -> None:
    """The resolved folder of `target` must lie inside (resolved) DEST."""
    resolved = Path(os.path.realpath(target.parent)) / target.name
    if not resolved.is_relative_to(dest):
        raise ExtractError(f"{target}: resolves to {resolved}, outside DEST {dest}; refusing to write there")


def _is_complete(target: Path, size_bytes: int, mtime_ns: int) -> bool:
    """A regular file (not a link) of the expected size and the modification time set when it was placed."""
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size_bytes and st.st_mtime_ns == mtime_ns


def _member_mtime_ns(member: tarfile.TarInfo) -> int:
    # An integer tar mtime maps exactly to nanoseconds; a pax float one is rounded the same way on every run.
    mtime = member.mtime
    return int(mtime) * 1_000_000_000 if float(mtime).is_integer() else round(mtime * 1_000_000_000)


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> None:
    """Copy one member's bytes to a temporary file beside `target`, then rename it onto `target`."""
    source = tar.extractfile(member)
    if source is None:  # only for non-regular members, which were refused before
        raise ExtractError(f"archive member {member.name!r}: has no data")
    try:
        with atomic_open(target) as out:
            while chunk := source.read(CHUNK_BYTES):
                out.write(chunk)
        mtime_ns = _member_mtime_ns(member)
        os.utime(target, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    except OSError as exc:
        raise ExtractError(f"{target}: cannot write it ({_os_problem(exc)})") from exc


def _os_problem(exc: OSError) -> str:
    return write_problem(exc) or exc.strerror or str(exc)


def _untar(reader: _CheckedReader, run: _Run) -> None:
    """Walk the tar stream once, writing the videos that are not complete yet."""
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        while (member := tar.next()) is not None:
            # Stream mode keeps every TarInfo in `members`; 220k of them is memory we do not need.
            tar.members.clear()
            parts = _check_member(member, run.dest)
            if member.isdir():
                continue
            target = _video_target(parts, run)
            if target is None:
                run.note_ignored(member.name)
            elif _is_complete(target, member.size, _member_mtime_ns(member)):
                run.skipped += 1
            else:
                _write_member(tar, member, target)
                run.note_written(target, member.size)


def _extract_archive(layout: Layout, run: _Run, on_progress: ProgressFn | None) -> None:
    """Stream the parts through gzip and tar into DEST; on corrupt data, remove what this run wrote."""
    reader = _CheckedReader(_PartStream(layout.parts, on_progress))
    try:
        try:
            _untar(reader, run)
        except tarfile.TarError as exc:
            # A gzip-level problem (truncation, bad data) explains a tar error best: draining raises it.
            reader.drain()
            raise _CorruptStreamError(
                f"{layout.parts[0].label}: the joined data is valid gzip but not a valid tar archive ({exc})"
            ) from exc
        reader.drain()
    except _CorruptStreamError as exc:
        for path in run.written_paths:
            path.unlink(missing_ok=True)
        raise ExtractError(f"{exc} (removed the {run.written} videos this run wrote from it)") from exc
    finally:
        reader.close()
    if run.ignored > MAX_WARNED:
        log.warning("extract: skipped %d archive files that are not videos", run.ignored)


# ---------------------------------------------------------------------------------------------------------------------
# An extracted folder.


def _link_or_copy(source: Path, target: Path, *, try_link: bool) -> bool:
    """Place `source` at `target` atomically: a hard link when possible, else a copy. True if linked."""
    if try_link:
        tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
            os.replace(tmp, target)
            return True
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno not in _LINK_FALLBACK_ERRNOS:
                raise ExtractError(f"{target}: cannot link {source} there ({exc})") from exc
            log.debug("extract: cannot hard-link %s (%s); copying", source, exc)
    try:
        with open(source, "rb") as src_fh, atomic_open(target) as out:
            shutil.copyfileobj(src_fh, out, CHUNK_BYTES)
        st = os.stat(source)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
    except OSError as exc:
        raise ExtractError(f"{target}: cannot copy {source} there ({_os_problem(exc)})") from exc
    return False


def _place_folder(layout: Layout, run: _Run, on_progress: ProgressFn | None) -> None:
    """Hard-link (same file system) or copy every `<id>.webm` of the extracted folder into DEST."""
    assert layout.folder is not None  # set by find_layout for this kind
    videos = []
    for entry in sorted(os.scandir(layout.folder), key=lambda e: e.name):
        if entry.name.endswith(".webm") and entry.is_file():
            videos.append(entry)
        else:
            run.note_ignored(entry.name)
    total_bytes = sum(e.stat().st_size for e in videos)
    try_link = os.stat(layout.folder).st_dev == os.stat(run.videos_dir).st_dev
    done_bytes = linked = 0
    for entry in videos:
        source_stat = entry.stat()
        size_bytes = source_stat.st_size
        target = run.videos_dir / entry.name
        run.check_inside(target)
        if _is_complete(target, size_bytes, source_stat.st_mtime_ns):
            run.skipped += 1
        else:
            linked += _link_or_copy(Path(entry.path), target, try_link=try_link)
            run.note_written(target, size_bytes)
        done_bytes += size_bytes
        if on_progress is not None:
            on_progress(done_bytes, total_bytes)
    log.info("extract: %d videos hard-linked, %d copied, %d already there", linked, run.written - linked, run.skipped)


_PLACERS: dict[str, Callable[[Layout, _Run, ProgressFn | None], None]] = {
    "raw-parts": _extract_archive,
    "zip-parts": _extract_archive,
    "tar.gz": _extract_archive,
    "folder": _place_folder,
}


# ---------------------------------------------------------------------------------------------------------------------
# Labels.


def _new_label_name(name: str) -> str | None:
    """`something-something-v2-train.json` or `train.json` -> `train.json`; None for other files."""
    stem = name.removeprefix(OLD_PREFIX)
    return stem if stem in LABEL_FILES else None


def _labels_from_zip(path: Path) -> dict[str, bytes]:
    """Label files of the labels package, by new name (a new-scheme member wins over an old-scheme one)."""
    found: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            # Old-scheme names first, so a new-scheme member of the same file overwrites it.
            for info in sorted(infos, key=lambda i: not PurePosixPath(i.filename).name.startswith(OLD_PREFIX)):
                new_name = _new_label_name(PurePosixPath(info.filename).name)
                if new_name is not None:
                    found[new_name] = zf.read(info)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ExtractError(f"{path}: cannot read the labels zip ({exc}); re-download it") from exc
    return found


def _read_label_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ExtractError(f"{path}: cannot read this label file ({exc})") from exc


def _collect_labels(search_dirs: list[Path]) -> dict[str, bytes]:
    """Label bytes by new name: the labels zip first, then loose files; raise if a required one is missing."""
    found: dict[str, bytes] = {}
    for folder in search_dirs:
        if (folder / LABELS_ZIP_NAME).is_file():
            found = _labels_from_zip(folder / LABELS_ZIP_NAME)
            log.info("extract: labels from %s", folder / LABELS_ZIP_NAME)
            break
    for name in (n for n in LABEL_FILES if n not in found):
        for folder in search_dirs:
            path = find_label_file(folder / LABELS_DIR_NAME, name) or find_label_file(folder, name)
            if path is not None:
                found[name] = _read_label_file(path)
                log.info("extract: %s from %s", name, path)
                break
    missing = [n for n in REQUIRED_LABEL_FILES if n not in found]
    if missing:
        where = " and ".join(str(d) for d in search_dirs)
        raise ExtractError(
            f"labels missing: {', '.join(missing)}; looked for {LABELS_ZIP_NAME} and for loose files "
            f"(<name> or {OLD_PREFIX}<name>) in {where} and their {LABELS_DIR_NAME}/ folders"
        )
    return found


def _write_labels(labels: dict[str, bytes], labels_dir: Path, run: _Run) -> None:
    """Write each label file under its new name, atomically, unless the same bytes are already there."""
    for name, data in labels.items():
        target = labels_dir / name
        run.check_inside(target)
        if not (target.is_file() and target.read_bytes() == data):
            atomic_write_bytes(target, data)


def _search_dirs(layout: Layout) -> list[Path]:
    """Where labels may be: SRC, and its parent when SRC is the videos folder itself."""
    if layout.folder is not None and layout.folder == layout.src:
        return [layout.src, layout.src.parent]
    return [layout.src]


# ---------------------------------------------------------------------------------------------------------------------
# Entry point.


def _start_run(dest: Path) -> _Run:
    """Create DEST and its videos folder, check the latter resolves inside DEST, clear stale temp files."""
    dest.mkdir(parents=True, exist_ok=True)
    resolved_dest = dest.resolve()
    videos_dir = dest / VIDEO_DIR_NAME
    if not videos_dir.resolve().is_relative_to(resolved_dest):
        raise ExtractError(f"{videos_dir}: resolves to {videos_dir.resolve()}, outside DEST; refusing to write there")
    videos_dir.mkdir(exist_ok=True)
    for entry in os.scandir(videos_dir):
        if _STALE_TMP_RE.match(entry.name) and entry.is_file(follow_symlinks=False):
            log.debug("extract: removing %s left by an interrupted run", entry.path)
            os.unlink(entry.path)
    return _Run(dest=resolved_dest, videos_dir=videos_dir)


def extract_dataset(
    src: str | Path, dest: str | Path, *, on_progress: Callable[[int, int | None], None] | None = None
) -> ExtractResult:
    """Turn the SSv2 files in SRC into DEST/20bn-something-something-v2/<id>.webm and DEST/labels/.

    Labels are checked and written first (so that missing labels fail fast), then the videos. Re-running
    skips the videos already complete (the member's size and modification time); the archive is still read
    through. DEST is locked for the run (`fsutil.output_lock`): a second extract into it fails at once.

    Args:
        src: Folder with the downloaded files (any layout of the module docstring), or the videos folder.
        dest: Output folder; nothing is written outside it.
        on_progress: Called as `on_progress(bytes_read, total_bytes)`: the archive bytes (the joined, compressed
            stream) read so far and in all, at each part boundary and every few MiB; for a folder, the video
            bytes placed so far and in all.

    Returns:
        The paths, the layout and the counts of this run.

    Raises:
        ExtractError: Any problem with the layout, the labels, the archive data (truncated, corrupt, naming the
            part) or an unsafe archive member (naming it), or a write that fails (full, read-only).
        OutputLockedError: another process is extracting into DEST.
    """
    layout = find_layout(src)
    dest_root = Path(dest)
    labels = _collect_labels(_search_dirs(layout))
    with output_lock(dest_root, option="--dest"):
        try:
            run = _start_run(dest_root)
            labels_dir = dest_root / LABELS_DIR_NAME
            _write_labels(labels, labels_dir, run)
        except OSError as exc:
            raise ExtractError(f"{dest_root}: cannot write there ({_os_problem(exc)})") from exc
        _PLACERS[layout.kind](layout, run, on_progress)
    log.info(
        "extract: %s from %s: %d videos written (%d bytes), %d already complete, %d other files skipped",
        layout.kind,
        layout.src,
        run.written,
        run.bytes_written,
        run.skipped,
        run.ignored,
    )
    return ExtractResult(
        videos_dir=run.videos_dir,
        labels_dir=labels_dir,
        layout=layout.kind,
        parts=tuple(p.path.name for p in layout.parts),
        written=run.written,
        skipped=run.skipped,
        bytes_written=run.bytes_written,
        ignored=run.ignored,
    )


__all__ = ["ExtractResult", "Layout", "SourcePart", "extract_dataset", "find_layout"]
