"""The comparison a sweep ends with: accuracy (from each variant's eval report) and latency per variant.

Writes `comparison.md`, `comparison.csv` and `comparison.png` (accuracy and latency per variant) into the sweep's
folder (`{work}/<pipeline name>/`).
Latency is measured here, in one process, on the same device for every variant: the median forward time of one
clip (batch 1, the run's frames and crop size) of each variant's trained model, repetitions interleaved.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssv2prep.errors import ConfigError
from ssv2prep.fsutil import atomic_write_bytes, atomic_write_text
from ssv2prep.train.report import markdown_table

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VariantResult:
    """One row of the comparison."""

    name: str
    shift: str
    evals: list[dict[str, Any]]
    latency_ms: float | None


def _shift_label(model_cfg: dict[str, Any]) -> str:
    div = model_cfg["shift_div"]
    if div == 0:
        return "none (TSN)"
    part = "all" if div == 1 else f"1/{div}"
    return f"{part} {model_cfg['shift_mode']} {model_cfg['shift_place']}"


def _latencies(checkpoints: dict[str, Path], *, repeats: int, crop: int) -> dict[str, float]:
    import torch

    from ssv2prep.train.evaluation import load_for_eval

    models = {name: load_for_eval(path, None)[:2] for name, path in checkpoints.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for rep in range(repeats + 1):  # round-robin so machine noise hits every variant alike; rep 0 warms up
            for name, (model, cfg) in models.items():
                x = torch.randn(1, cfg.num_segments, 3, crop, crop)
                start = time.perf_counter()
                model(x)
                if rep:
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def _eval_rows(run: Path) -> list[dict[str, Any]]:
    """Every setting of every `eval*/report.json` of a run, tagged with its folder (eval, eval-test, ...)."""
    rows = []
    for report in sorted(run.glob("eval*/report.json")):
        for setting in json.loads(report.read_text())["settings"]:
            rows.append({**setting, "folder": report.parent.name})
    return rows


def compare_variants(sweep_dir: Path, variants: list[str], *, repeats: int = 5) -> list[VariantResult]:
    """Read every variant's `<sweep_dir>/<name>/eval*/report.json` and checkpoint; write the comparison files."""
    evals, checkpoints, configs = {}, {}, {}
    for name in variants:
        run = sweep_dir / name
        evals[name] = _eval_rows(run)
        if not evals[name]:
            raise ConfigError(
                f"variant {name}: no {run}/eval*/report.json (its eval stages write out = '{{run}}/eval')"
            )
        configs[name] = json.loads((run / "config.json").read_text())
        checkpoints[name] = run / ("best.pt" if (run / "best.pt").is_file() else "last.pt")
    first = next(iter(configs.values()))
    crop, num_classes = first["data"]["crop_size"], first["model"]["num_classes"]
    latency = _latencies(checkpoints, repeats=repeats, crop=crop)
    results = [VariantResult(n, _shift_label(configs[n]["model"]), evals[n], latency.get(n)) for n in variants]
    _write(sweep_dir, results, crop, num_classes)
    return results


def _rows(results: list[VariantResult]) -> tuple[list[str], list[list[Any]]]:
    settings = [(e["folder"], e["crops"], e["clips"]) for e in results[0].evals]
    headers = (
        ["variant", "shift"] + [f"{f} top-1 {c}x{k}" for f, c, k in settings] + ["top-5 (first)", "latency ms/clip"]
    )
    rows = []
    for r in results:
        accs = [f"{e['top1']:.1f}" for e in r.evals]
        rows.append(
            [
                r.name,
                r.shift,
                *accs,
                f"{r.evals[0]['top5']:.1f}",
                f"{r.latency_ms:.1f}" if r.latency_ms is not None else "-",
            ]
        )
    return headers, rows


def comparison_figure(results: list[VariantResult], crop: int, num_classes: int) -> Any:
    """A matplotlib Figure of two bar charts, every bar labelled with its value: the top-1 of each variant's first
    eval setting with the chance level (100 / classes), and the latency per clip."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    names = [r.name for r in results]
    first = results[0].evals[0]
    fig = Figure(figsize=(11, 4.5), dpi=90)
    acc, lat = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    top1 = [r.evals[0]["top1"] for r in results]
    bars = acc.bar(names, top1, color="tab:blue")
    acc.bar_label(bars, labels=[f"{v:.1f}" for v in top1], fontsize=8)
    chance = 100.0 / num_classes
    acc.axhline(chance, color="tab:red", linestyle="--", linewidth=1)
    acc.text(
        len(names) - 0.5,
        chance + 1,
        f"chance {chance:.1f}%",
        color="tab:red",
        ha="right",
        va="bottom",
        fontsize=8,
        bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
    )
    acc.set_ylabel(f"{first['folder']} top-1 (%), {first['crops']} crop x {first['clips']} clip")
    acc.set_ylim(0, 105)
    acc.set_title("accuracy")
    ms = [r.latency_ms or 0.0 for r in results]
    bars = lat.bar(names, ms, color="tab:orange")
    lat.bar_label(
        bars,
        labels=[f"{v:.1f}" if r.latency_ms is not None else "-" for v, r in zip(ms, results, strict=True)],
        fontsize=8,
    )
    lat.set_ylabel(f"ms per clip (batch 1, {crop} px)")
    lat.set_title("CPU latency")
    for ax in (acc, lat):
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{len(results)} variants, {num_classes} classes")
    fig.tight_layout()
    return fig


def _plot(results: list[VariantResult], crop: int, num_classes: int) -> bytes:
    buf = io.BytesIO()
    comparison_figure(results, crop, num_classes).savefig(buf, format="png")
    return buf.getvalue()


def _write(work_dir: Path, results: list[VariantResult], crop: int, num_classes: int) -> None:
    headers, rows = _rows(results)
    atomic_write_text(work_dir / "comparison.md", markdown_table(headers, rows) + "\n")
    buf = io.StringIO()
    csv.writer(buf).writerows([headers, *rows])
    atomic_write_text(work_dir / "comparison.csv", buf.getvalue())
    atomic_write_bytes(work_dir / "comparison.png", _plot(results, crop, num_classes))
