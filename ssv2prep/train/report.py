"""Run outputs besides checkpoints: `metrics.jsonl`, TensorBoard events (when installed), PNG plots, tables.

`metrics.jsonl` has one JSON object per line: `{"kind": "train", "epoch", "step", "loss", "top1", "lr", ...}` for
logged steps, `{"kind": "epoch", ...}` per finished epoch and `{"kind": "eval", "epoch", "step", "top1", ...}` per
evaluation. `epoch` is 1-based everywhere (the epoch a step belongs to, or the epoch just finished); a train
record's `step` is its 0-based step index, an epoch or eval record's the number of steps done. On resume, lines
after the checkpoint's step are dropped (and TensorBoard purges its events from there) so nothing appears twice.

TensorBoard tags: `train/<name>` per logged step, `epoch/train_<name>` per epoch, `val/<name>` per evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ssv2prep.fsutil import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    """Append-only JSON lines (plus TensorBoard scalars when the package is installed); rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tb: Any = None
        self._writer: Any = None  # the SummaryWriter class, when tensorboard is installed
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                log.debug("tensorboard not installed; writing metrics.jsonl only")
            else:
                self._writer = SummaryWriter
                self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only what was logged by the time `step` optimizer steps were done (used when resuming).

        A "train" record's `step` is the index of its step (0-based); epoch and eval records carry the number of
        steps done when they were written.
        """
        if not self.enabled:
            return
        if self._tb is not None:  # a resumed run's events replace those logged after the checkpoint
            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = self._writer(log_dir=log_dir, purge_step=step)
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            if line:
                record = json.loads(line)
                if record["step"] < step or (record["step"] == step and record["kind"] != "train"):
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (and its numeric fields to TensorBoard under `kind/name`)."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if isinstance(value, int | float) and name not in ("step", "epoch"):
                    self._tb.add_scalar(tensorboard_tag(record["kind"], name), value, record["step"])

    def close(self) -> None:
        """Flush TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def tensorboard_tag(kind: str, name: str) -> str:
    """The TensorBoard tag of field `name` of a `kind` record: `train/loss`, `epoch/train_loss`, `val/top1`."""
    if kind == "epoch":
        return f"epoch/train_{name}"
    return f"{'val' if kind == 'eval' else kind}/{name}"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a `metrics.jsonl`."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _plot_series(ax: Any, records: list[dict[str, Any]], x: str, y: str, label: str) -> None:
    points = [(r[x], r[y]) for r in records if r.get(y) is not None]
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, label=label, marker="o" if len(points) < 30 else None, markersize=3)


def plot_run(run_dir: Path) -> list[Path]:
    """Write `loss.png` and `accuracy.png` (per step and per epoch) from `metrics.jsonl`; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    evals = [r for r in records if r["kind"] == "eval"]
    written = []
    for name, series in (("loss", ("loss",)), ("accuracy", ("top1", "top5"))):
        fig, (by_step, by_epoch) = plt.subplots(1, 2, figsize=(11, 4))
        for key in series:
            _plot_series(by_step, train, "step", key, f"train {key} (per step)")
            _plot_series(by_epoch, epochs, "epoch", key, f"train {key}")
            _plot_series(by_epoch, evals, "epoch", key, f"val {key}")
        by_step.set_xlabel("optimizer step")
        by_epoch.set_xlabel("epoch")
        for ax in (by_step, by_epoch):
            ax.set_ylabel(name + (" (%)" if name == "accuracy" else ""))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
        fig.suptitle(f"{run_dir.name}: {name}")
        fig.tight_layout()
        path = run_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (numbers as given; format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
