"""The files ssv2prep ships: download manifests and pipeline files, found the same way in a checkout and a wheel.

The repository's top-level `manifests/` and `pipelines/` folders are the only copies. A wheel carries them as
package data in `ssv2prep/shipped/{manifests,pipelines}/` (setup.py copies them there at build time); a checkout,
or an editable install, reads them where they are. `shipped_dir` hides the difference.

A shipped file can be named instead of given by path: `find_pipeline("demo")` and `find_manifest("ssv2")` return
the shipped `pipelines/demo.toml` and `manifests/ssv2.json`. An existing file always wins over a shipped name.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ssv2prep.errors import ConfigError, ManifestError, Ssv2PrepError

PACKAGED_DIR = "shipped"  # inside the ssv2prep package of a wheel
SUFFIXES = {"manifests": ".json", "pipelines": ".toml"}


def shipped_dir(kind: str) -> Path:
    """The folder of shipped `kind` files ("manifests" or "pipelines"): the wheel's package data or the checkout's.

    Raises Ssv2PrepError when neither is there (a broken install)."""
    if kind not in SUFFIXES:
        raise ValueError(f"unknown kind of shipped file {kind!r}; expected one of {sorted(SUFFIXES)}")
    packaged = files("ssv2prep").joinpath(PACKAGED_DIR, kind)
    # an installed wheel is a folder on disk; stages get these files as paths on their command lines
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / kind).is_dir():  # a checkout, not some site-packages/<kind>
        return root / kind
    raise Ssv2PrepError(f"the shipped {kind} are missing: neither {packaged} nor {root / kind} exists; reinstall")


def shipped_names(kind: str) -> list[str]:
    """Names (file stems) of the shipped `kind` files, sorted."""
    return sorted(p.stem for p in shipped_dir(kind).glob(f"*{SUFFIXES[kind]}"))


def _not_found(kind: str, message: str) -> Ssv2PrepError:
    error = ManifestError if kind == "manifests" else ConfigError
    return error(f"{message}; shipped {kind}: {', '.join(shipped_names(kind))}")


def shipped_file(kind: str, name: str) -> Path:
    """The shipped `kind` file called `name` (its stem, or its file name): e.g. ("pipelines", "demo").

    Raises ConfigError (pipelines) or ManifestError (manifests), listing the shipped names, when there is none."""
    stem = name.removesuffix(SUFFIXES[kind])
    if stem not in shipped_names(kind):
        raise _not_found(kind, f"{name}: no such file, nor a shipped {kind.removesuffix('s')}")
    return shipped_dir(kind) / f"{stem}{SUFFIXES[kind]}"


def _find(kind: str, given: str | Path) -> Path:
    path = Path(given)
    if path.is_file():
        return path
    if path.parent != Path("."):  # a path with folders is a path, never a name
        raise _not_found(kind, f"{path}: file not found")
    return shipped_file(kind, path.name)


def find_pipeline(given: str | Path) -> Path:
    """A pipeline file: `given` if it is a file, else the shipped pipeline of that name (`demo`, `demo.toml`).

    Raises ConfigError, listing the shipped names, when it is neither."""
    return _find("pipelines", given)


def find_manifest(given: str | Path) -> Path:
    """A download manifest: `given` if it is a file, else the shipped manifest of that name (`ssv2`, `ssv2.json`).

    Raises ManifestError, listing the shipped names, when it is neither."""
    return _find("manifests", given)
