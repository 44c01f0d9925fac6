"""SSv2 annotation files -> `VideoRecord`s, for both naming schemes of the labels package.

Files (in a labels folder), new scheme / old scheme:

- `labels.json` / `something-something-v2-labels.json`: class name -> index as a string
- `train.json`, `validation.json` / `something-something-v2-{train,validation}.json`:
  `[{"id", "label" (caption), "template", "placeholders"}, ...]`
- `test.json` / `something-something-v2-test.json`: `[{"id"}, ...]`
- `test-answers.csv` / `something-something-v2-test-answers.csv` (optional): `id;Class name`, no header

The class of a video is its template with every `[` and `]` removed; it must be a key of labels.json.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssv2prep.errors import AnnotationError

SPLITS = ("train", "validation", "test")
OLD_PREFIX = "something-something-v2-"
MAX_LISTED = 10


@dataclass(frozen=True, slots=True)
class VideoRecord:
    """One annotation entry. `label` is None when unknown (test without answers)."""

    video_id: str
    split: str
    label: int | None = None
    class_name: str | None = None
    template: str | None = None
    caption: str | None = None
    placeholders: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Annotations:
    """Classes in index order and the records of each split present."""

    classes: tuple[str, ...]
    splits: dict[str, list[VideoRecord]]
    labels_dir: Path


def template_to_class(template: str) -> str:
    """`"Putting [something] on [something]"` -> `"Putting something on something"`."""
    return template.replace("[", "").replace("]", "")


def find_label_file(labels_dir: Path, stem: str) -> Path | None:
    """The file for `stem` (e.g. `train.json`) under either naming scheme, or None."""
    for candidate in (labels_dir / stem, labels_dir / f"{OLD_PREFIX}{stem}", labels_dir / "labels" / stem):
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AnnotationError(f"{path}: not readable JSON ({exc})") from exc
    except RecursionError as exc:  # the parser recurses per nesting level; no annotation file nests more than 3
        raise AnnotationError(f"{path}: not usable JSON (nested too deeply for an annotation file)") from exc


def load_classes(labels_dir: Path) -> tuple[str, ...]:
    """Class names in index order from labels.json; indices must be exactly 0..K-1."""
    path = find_label_file(labels_dir, "labels.json")
    if path is None:
        raise AnnotationError(f"{labels_dir}: no labels.json (or {OLD_PREFIX}labels.json) found")
    obj = _read_json(path)
    if not isinstance(obj, dict) or not obj:
        raise AnnotationError(f"{path}: expected an object of class name -> index")
    try:
        by_index = {int(v): k for k, v in obj.items()}
    except (TypeError, ValueError) as exc:
        raise AnnotationError(f"{path}: class indices must be integers ({exc})") from exc
    if sorted(by_index) != list(range(len(obj))):
        raise AnnotationError(f"{path}: class indices must be 0..{len(obj) - 1}, each once")
    return tuple(by_index[i] for i in range(len(obj)))


def _listed(items: list[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:MAX_LISTED])
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return shown + more


def _labelled_records(path: Path, split: str, class_index: dict[str, int]) -> list[VideoRecord]:
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a list of entries")
    records, unknown = [], []
    for e in entries:
        if not isinstance(e, dict) or "id" not in e:
            raise AnnotationError(f"{path}: every entry needs an 'id' (got {str(e)[:80]})")
        template = e.get("template")
        name = template_to_class(template) if isinstance(template, str) else None
        if name is None or name not in class_index:
            unknown.append(f"{name}" if name is not None else f"<no template in entry {e['id']}>")
            continue
        records.append(
            VideoRecord(
                video_id=str(e["id"]),
                split=split,
                label=class_index[name],
                class_name=name,
                template=template,
                caption=e.get("label"),
                placeholders=tuple(e.get("placeholders") or ()),
            )
        )
    if unknown:
        raise AnnotationError(
            f"{path}: {len(unknown)} entries have a template whose class (brackets removed) is not in labels.json: "
            f"{_listed(sorted(set(unknown)))}"
        )
    return records


def load_test_answers(path: Path, class_index: dict[str, int]) -> dict[str, int]:
    """`id;Class name` lines -> {id: label index}."""
    answers: dict[str, int] = {}
    unknown: list[str] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.reader(fh, delimiter=";"):
            if not row:
                continue
            if len(row) != 2:
                raise AnnotationError(f"{path}: expected 'id;Class name' lines, got {';'.join(row)[:80]!r}")
            vid, name = row[0].strip(), row[1].strip()
            if name not in class_index:
                unknown.append(name)
            else:
                answers[vid] = class_index[name]
    if unknown:
        raise AnnotationError(f"{path}: {len(unknown)} answers name unknown classes: {_listed(sorted(set(unknown)))}")
    return answers


def _test_records(path: Path, classes: tuple[str, ...], answers: dict[str, int] | None) -> list[VideoRecord]:
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise AnnotationError(f"{path}: expected a list of entries")
    records = []
    for e in entries:
        if not isinstance(e, dict) or "id" not in e:
            raise AnnotationError(f"{path}: every entry needs an 'id' (got {str(e)[:80]})")
        vid = str(e["id"])
        label = answers.get(vid) if answers is not None else None
        name = classes[label] if label is not None else None
        records.append(
            VideoRecord(video_id=vid, split="test", label=label, class_name=name, template=e.get("template"))
        )
    return records


def check_ids(records: list[VideoRecord]) -> None:
    """Ids must be unique across splits and contain no `.` or `/` (WebDataset keys)."""
    bad = [r.video_id for r in records if "." in r.video_id or "/" in r.video_id or not r.video_id]
    if bad:
        raise AnnotationError(f"{len(bad)} video ids contain '.' or '/' or are empty: {_listed(bad)}")
    counts = Counter(r.video_id for r in records)
    dupes = sorted(v for v, n in counts.items() if n > 1)
    if dupes:
        raise AnnotationError(f"{len(dupes)} video ids appear more than once: {_listed(dupes)}")


def load_annotations(labels_dir: str | Path, splits: tuple[str, ...] = SPLITS) -> Annotations:
    """Read and validate labels and the requested splits (missing split files are an error)."""
    root = Path(labels_dir)
    classes = load_classes(root)
    class_index = {name: i for i, name in enumerate(classes)}
    out: dict[str, list[VideoRecord]] = {}
    for split in splits:
        if split not in SPLITS:
            raise AnnotationError(f"unknown split {split!r}; expected some of {list(SPLITS)}")
        path = find_label_file(root, f"{split}.json")
        if path is None:
            raise AnnotationError(f"{root}: no {split}.json (or {OLD_PREFIX}{split}.json) found")
        if split == "test":
            answers_path = find_label_file(root, "test-answers.csv")
            answers = load_test_answers(answers_path, class_index) if answers_path else None
            out[split] = _test_records(path, classes, answers)
        else:
            out[split] = _labelled_records(path, split, class_index)
    check_ids([r for recs in out.values() for r in recs])
    return Annotations(classes=classes, splits=out, labels_dir=root)


def flip_pairs(classes: tuple[str, ...] | list[str]) -> list[list[int]]:
    """Class index pairs whose meaning swaps under a horizontal flip ("left" <-> "right" in the name)."""
    index = {name: i for i, name in enumerate(classes)}
    pairs = []
    for i, name in enumerate(classes):
        words = name.split(" ")
        if "left" not in words and "right" not in words:
            continue
        twin = " ".join("right" if w == "left" else "left" if w == "right" else w for w in words)
        j = index.get(twin)
        if j is not None and i < j:
            pairs.append([i, j])
    return pairs
