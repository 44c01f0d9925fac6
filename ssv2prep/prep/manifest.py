"""The download manifest: which files make up a dataset distribution, their sizes and checksums.

JSON layout (`manifests/ssv2.json` is the real dataset; `synth --package` writes one for its own
distribution)::

    {"kind": "ssv2prep-download-manifest-v1",
     "name": "something-something-v2",
     "base_url": null,                       # the user supplies it (--base-url) unless set here
     "files": [{"name": "20bn-something-something-v2-00", "role": "video_part",
                "size_bytes": null, "approx_size_bytes": 10092886016,
                "sha256": "aab5...", "checksum_advisory": true, "url": null}, ...]}

`sha256` with `checksum_advisory: false` is binding (a mismatch deletes the file); an advisory
digest comes from a third party and a mismatch is reported but the file is kept.
`url`, when set, is used instead of `base_url + "/" + name`.

Checks that need no digest (`ManifestFile.size_bounds`, `ManifestFile.magics`):

- size: `size_bytes` is exact; otherwise `approx_size_bytes` allows ± `APPROX_SIZE_TOLERANCE` (20 %), so a login
  page or a truncated file of a multi-GB part is caught without a checksum.
- first bytes: a ``labels`` zip starts with ``PK\x03\x04``; the first video part (name ending ``-00`` or
  ``-00.zip``) and a joined ``video_archive`` start the gzip stream (``1f 8b``), or, for a part, a zip wrapper
  (``PK\x03\x04``). Later raw parts are byte-wise slices of the stream with no header: no check.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.errors import ManifestError
from ssv2prep.fsutil import atomic_write_json

MANIFEST_KIND = "ssv2prep-download-manifest-v1"
ROLES = ("video_part", "video_archive", "labels")
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
APPROX_SIZE_TOLERANCE = 0.2  # fraction of approx_size_bytes a file may differ by
_PART_INDEX_RE = re.compile(r"-(\d{2})(?:\.zip)?$")


@dataclass(frozen=True, slots=True)
class ManifestFile:
    """One file of a distribution."""

    name: str
    role: str
    size_bytes: int | None = None
    approx_size_bytes: int | None = None
    sha256: str | None = None
    checksum_advisory: bool = False
    url: str | None = None

    def size_bounds(self) -> tuple[int, int] | None:
        """(fewest, most) bytes the file may have: exact `size_bytes`, else `approx_size_bytes` ± the tolerance."""
        if self.size_bytes is not None:
            return self.size_bytes, self.size_bytes
        if self.approx_size_bytes is None:
            return None
        slack = int(self.approx_size_bytes * APPROX_SIZE_TOLERANCE)
        return max(0, self.approx_size_bytes - slack), self.approx_size_bytes + slack

    def magics(self) -> tuple[bytes, ...]:
        """Byte strings the file may start with (any one of them); empty when its first bytes are not fixed."""
        if self.role == "labels":
            return (ZIP_MAGIC,)
        if self.role == "video_archive":
            return (GZIP_MAGIC,)
        match = _PART_INDEX_RE.search(self.name)
        if match is not None and int(match.group(1)) == 0:
            return GZIP_MAGIC, ZIP_MAGIC  # the raw first part, or a zip wrapping it
        return ()


@dataclass(frozen=True, slots=True)
class DownloadManifest:
    """A distribution: its name, optional base URL and files."""

    name: str
    files: tuple[ManifestFile, ...]
    base_url: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to disk."""
        return {
            "kind": MANIFEST_KIND,
            "name": self.name,
            "base_url": self.base_url,
            "notes": list(self.notes),
            "files": [asdict(f) for f in self.files],
        }


def _file_from_json(obj: Any, where: str) -> ManifestFile:
    if not isinstance(obj, dict) or "name" not in obj or "role" not in obj:
        raise ManifestError(f"{where}: each entry of 'files' needs at least 'name' and 'role'")
    allowed = set(ManifestFile.__dataclass_fields__)
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ManifestError(f"{where}: unknown keys {unknown} in file entry {obj['name']!r}")
    entry = ManifestFile(**obj)
    if entry.role not in ROLES:
        raise ManifestError(f"{where}: file {entry.name!r} has role {entry.role!r}; expected one of {list(ROLES)}")
    if "/" in entry.name or entry.name in ("", ".", ".."):
        raise ManifestError(f"{where}: file name {entry.name!r} must be a plain file name")
    return entry


def load_manifest(path: str | Path) -> DownloadManifest:
    """Read and validate a manifest file; raise `ManifestError` naming the file on any problem."""
    p = Path(path)
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ManifestError(f"{p}: manifest not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{p}: not a readable JSON manifest ({exc})") from exc
    if not isinstance(obj, dict) or obj.get("kind") != MANIFEST_KIND:
        raise ManifestError(f"{p}: not an ssv2prep download manifest (expected kind {MANIFEST_KIND!r})")
    files = tuple(_file_from_json(f, str(p)) for f in obj.get("files", []))
    if not files:
        raise ManifestError(f"{p}: the manifest lists no files")
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise ManifestError(f"{p}: duplicate file names in the manifest")
    return DownloadManifest(
        name=str(obj.get("name", p.stem)), files=files, base_url=obj.get("base_url"), notes=list(obj.get("notes", []))
    )


def write_manifest(manifest: DownloadManifest, path: str | Path) -> None:
    """Write `manifest` atomically as JSON."""
    atomic_write_json(path, manifest.to_json())
