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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssv2prep.errors import ManifestError
from ssv2prep.fsutil import atomic_write_json

MANIFEST_KIND = "ssv2prep-download-manifest-v1"
ROLES = ("video_part", "video_archive", "labels")


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
