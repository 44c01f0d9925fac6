"""Accuracy metrics as pure functions over scores and labels, plus a small running meter.

Video-level scores follow the official test protocol: the plain mean of raw logits over crops x clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


def top_hits(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """How many rows of `logits` (N, K) have their label among the top-k scores, for each k (k capped at K), as an
    int64 tensor `(len(ks),)` on the logits' device (no host sync)."""
    if logits.shape[0] == 0:
        return torch.zeros(len(ks), dtype=torch.int64, device=logits.device)
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # (N, maxk), best first
    hits = top.eq(labels.view(-1, 1))
    return torch.stack([hits[:, : min(k, maxk)].any(dim=1).sum() for k in ks])


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """`top_hits` read back as Python ints."""
    return [int(v) for v in top_hits(logits, labels, ks).tolist()]


def confusion_matrix(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels.astype(np.int64), preds.astype(np.int64)), 1)
    return cm


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class (diag / row sum); NaN for classes with no samples."""
    rows = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(rows > 0, np.diag(cm) / np.maximum(rows, 1), np.nan)


@dataclass(frozen=True, slots=True)
class EvalMetrics:
    """Video-level results of one evaluation."""

    num_videos: int
    top1: float  # percent
    top5: float  # percent
    mean_class_accuracy: float  # percent, over classes that have samples
    confusion: np.ndarray
    per_class: np.ndarray  # fraction, NaN where a class has no samples


def video_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> EvalMetrics:
    """Metrics of (N, K) video scores against (N,) labels (only labelled videos: label >= 0)."""
    keep = labels >= 0
    scores, labels = scores[keep], labels[keep]
    n = len(labels)
    t1, t5 = topk_correct(torch.from_numpy(scores), torch.from_numpy(labels)) if n else (0, 0)
    cm = confusion_matrix(scores.argmax(axis=1) if n else np.zeros(0), labels, num_classes)
    per_class = per_class_accuracy(cm)
    present = ~np.isnan(per_class)
    mca = float(per_class[present].mean() * 100) if present.any() else 0.0
    return EvalMetrics(
        num_videos=n,
        top1=100.0 * t1 / n if n else 0.0,
        top5=100.0 * t5 / n if n else 0.0,
        mean_class_accuracy=mca,
        confusion=cm,
        per_class=per_class,
    )


@dataclass(slots=True)
class Meter:
    """Running sums of named values weighted by sample counts (all-reduced at the end of an epoch)."""

    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def update(self, name: str, value: float, n: float = 1.0) -> None:
        """Add `value` (a mean over `n` samples)."""
        self.sums[name] = self.sums.get(name, 0.0) + value * n
        self.counts[name] = self.counts.get(name, 0.0) + n

    def mean(self, name: str) -> float:
        """The weighted mean so far (0 when empty)."""
        n = self.counts.get(name, 0.0)
        return self.sums.get(name, 0.0) / n if n else 0.0
