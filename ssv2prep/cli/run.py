"""Commands that run whole jobs: run (pipeline files) and demo."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import click
from rich.progress import Progress, TextColumn, TimeElapsedColumn

from ssv2prep.cli.app import console, main, out

# ----------------------------------------------------------------------------------------------------------- demo


@main.command()
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-out"),
    show_default=True,
    help="Output folder: synthetic data, downloads, shards, runs, report.md.",
)
@click.option("--small", is_flag=True, help="A very small run (for tests and a quick look); targets do not apply.")
@click.option("--set", "overrides", multiple=True, help="Override a pipeline option: STAGE.OPTION=value.")
def demo(out_dir: Path, small: bool, overrides: tuple[str, ...]) -> None:
    """Run the main job on built-in synthetic data, end to end through the real code paths.

    synth --package, served from a loopback HTTP server, download, extract, shard, verify; then a TSM and a TSN of
    the same small backbone are trained, evaluated on validation and on test, and compared (pipelines/demo.toml).

    \b
    Example:
      ssv2prep demo --out demo-out
    """
    from ssv2prep.demo import run_demo

    log = logging.getLogger("ssv2prep.demo")
    report, _ = run_demo(
        out_dir,
        small=small,
        overrides=list(overrides),
        on_stage=lambda stage, status: log.info("stage %s (%s)", stage.key, status),
    )
    text = report.read_text()
    out.print(text.split("\n\n![comparison]")[0], markup=False)
    out.print(f"report: {report}")


# ------------------------------------------------------------------------------------------------------------ run


@main.command("run")
@click.argument("pipeline_file", metavar="PIPELINE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, help="Override an option: STAGE.OPTION=value (repeatable).")
@click.option("--from", "from_stage", default=None, help="Re-run from this stage on.")
@click.option("--only", default=None, help="Run only this stage.")
@click.option("--dry-run", is_flag=True, help="Print the plan (stages, commands, what is done) and stop.")
def run_cmd(
    pipeline_file: Path, overrides: tuple[str, ...], from_stage: str | None, only: str | None, dry_run: bool
) -> None:
    """Run a pipeline: its stages in order, skipping the ones already finished.

    PIPELINE is a pipeline file, or the name of a shipped one (the repository's pipelines/ folder, also in the
    installed package): demo, ssv2-tsm-r50-8f, ...; an unknown name lists them all.

    Each stage is logged as running, done (with its time), failed or skipped (done before with the same command).
    In a parallel sweep ([sweep] parallel = N) every variant's stages are listed as queued / running / done /
    failed / not run, with how far a running one is (epoch and step, from the tail of its log) and its log file:
    live rows on a terminal, a line per running stage every minute off one.

    \b
    Examples:
      ssv2prep run ssv2-tsm-r50-8f --set download.base_url=https://example.org/ssv2
      ssv2prep run ssv2-shift-study --dry-run
      ssv2prep run demo --only train@tsm --set train.epochs=2
      ssv2prep run my-pipeline.toml
    """
    import shlex

    from ssv2prep.pipeline import load_pipeline, run_pipeline, select_stages, stage_status

    pipeline = load_pipeline(pipeline_file, list(overrides))
    if dry_run:
        out.print(f"pipeline {pipeline.name}: work folder {pipeline.work_dir}")
        for stage in select_stages(pipeline, from_stage=from_stage, only=only):
            status = stage_status(pipeline, stage)
            out.print(f"  [{status:>7}] {stage.key}: {shlex.join(stage.argv())}", soft_wrap=True, markup=False)
        return
    with _StageDisplay(forced=from_stage is not None or only is not None) as display:
        results = run_pipeline(
            pipeline, from_stage=from_stage, only=only, on_stage=display.on_stage, on_state=display.on_state
        )
    if pipeline.variants and any(s.variant for s, _ in results):
        from ssv2prep.sweep import compare_variants

        compare_variants(pipeline.run_dir(), pipeline.variants)
        out.print((pipeline.run_dir() / "comparison.md").read_text())
    ran = sum(1 for _, what in results if what == "ran")
    out.print(f"run: {ran} stages ran, {len(results) - ran} already done; outputs in {pipeline.work_dir}")


# ------------------------------------------------------------------------------------------------- stage display

_STEP_RE = re.compile(r"epoch \d+/\d+ step \d+/\d+")
_EPOCH_DONE_RE = re.compile(r"epoch (\d+)( validation)?: ")
_LOG_PREFIX_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Z]+ ")


def stage_progress(log_path: Path, tail_bytes: int = 16384) -> str:
    """How far a stage of a parallel sweep is, from the end of its log file: `epoch 2/50 step 310/1320` for a
    train stage, `epoch 2 done` between epochs, else its last line (without time and level), or `starting`."""
    try:
        with log_path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - tail_bytes))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return "starting"
    for line in reversed(lines):
        if found := _STEP_RE.search(line):
            return found.group(0)
        if found := _EPOCH_DONE_RE.search(line):
            return f"epoch {found.group(1)} {'validated' if found.group(2) else 'done'}"
    if not lines:
        return "starting"
    last = _LOG_PREFIX_RE.sub("", lines[-1])
    return last if len(last) <= 70 else last[:69] + "…"


class _StageDisplay:
    """What `run` says about its stages.

    Every stage gets a log line when it is skipped, starts, finishes or fails. The stages of a parallel sweep
    (whose output goes to log files) also show, on a terminal, one row each (queued / running / done / failed,
    how far it is from the tail of its log, and the log file), refreshed every second; off a terminal, a line
    per running stage with the same every `every_s` seconds."""

    def __init__(self, *, forced: bool, every_s: float = 60.0) -> None:
        self.forced, self.every_s = forced, every_s
        self.log = logging.getLogger("ssv2prep.run")
        self.status: dict[str, str] = {}
        self.started: dict[str, float] = {}
        self.rows: dict[str, dict[str, Any]] = {}  # parallel stages: state, log, start time, progress task
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.progress: Progress | None = None
        self.poller = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _StageDisplay:
        self.poller.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.poller.join()
        with self.lock:
            for key, row in self.rows.items():
                if row["state"] == "queued":
                    row["state"] = "not run"
                    self.log.info("stage %s: not run (an earlier stage of its chain failed, or the run stopped)", key)
            self._close_rows()

    def on_stage(self, stage: Any, status: str) -> None:
        self.status[stage.key] = status  # done / changed / pending: why it runs or is skipped

    def on_state(self, stage: Any, state: str, log_path: Path | None) -> None:
        key = stage.key
        where = f" (log: {log_path})" if log_path is not None else ""
        with self.lock:
            row = self.rows.get(key)
            if log_path is not None and row is None:
                row = self.rows[key] = {"log": log_path, "start": None, "task": None}
                self._open_rows()
            if row is not None:
                row["state"] = state
                if state == "running":
                    row["start"] = time.monotonic()
            if state == "running":
                self.started[key] = time.monotonic()
            if state == "queued":
                if self.progress is None:
                    self.log.info("stage %s: queued%s", key, where)
            elif state == "running":
                self.log.info("stage %s: running%s%s", key, self._why(key), where)
            elif state == "skipped":
                self.log.info("stage %s: skipped (done before with this command)", key)
            else:
                took = f" after {_clock(time.monotonic() - self.started[key])}" if key in self.started else ""
                self.log.info("stage %s: %s%s%s", key, state, took, where)
            self._draw()
            if row is not None and all(r["state"] in ("done", "failed", "skipped") for r in self.rows.values()):
                self._close_rows()

    def _why(self, key: str) -> str:
        status = self.status.get(key)
        if status == "changed":
            return " (its command changed since it was recorded)"
        if status == "done" and self.forced:
            return " again (--from/--only)"
        return ""

    def _open_rows(self) -> None:
        if self.progress is None and console.is_terminal:
            self.progress = Progress(
                TextColumn("{task.description}"),
                TextColumn("{task.fields[state]:<8}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                console=console,
            )
            self.progress.start()

    def _close_rows(self) -> None:
        if self.progress is not None:
            self._draw()
            self.progress.stop()
            self.progress = None
        self.rows.clear()

    def _draw(self) -> None:
        if self.progress is None:
            return
        for key, row in self.rows.items():
            info = stage_progress(row["log"]) if row["state"] == "running" else ""
            info = f"{info}  {row['log']}" if info else str(row["log"])
            if row["task"] is None:
                row["task"] = self.progress.add_task(key, total=None, state=row["state"], info=info, start=False)
            if row["state"] == "running":
                self.progress.start_task(row["task"])
            elif row["state"] in ("done", "failed"):
                self.progress.stop_task(row["task"])
            self.progress.update(row["task"], state=row["state"], info=info)

    def _poll(self) -> None:
        last_lines = time.monotonic()
        while not self.stop.wait(1.0):
            with self.lock:
                self._draw()
                if self.progress is None and time.monotonic() - last_lines >= self.every_s:
                    last_lines = time.monotonic()
                    for key, row in self.rows.items():
                        if row["state"] == "running":
                            self.log.info(
                                "stage %s: running for %s, %s (log: %s)",
                                key,
                                _clock(time.monotonic() - row["start"]),
                                stage_progress(row["log"]),
                                row["log"],
                            )


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
